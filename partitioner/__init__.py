"""A compiler for pipeline parallelism: ``partition(model, n_gpus)`` → balanced stages + a plan.

The public surface is small on purpose: ``partition``, ``Pipe``, ``Plan``, ``load_plan``,
the device/link specs and the error root. Everything else is internal.
"""

from cost_models.devices import DEVICES, LINKS, DeviceSpec, LinkSpec
from cost_models.errors import PartitionError
from partitioner.api import partition
from partitioner.calibrate import calibrate_device
from partitioner.pipe import Pipe
from partitioner.plan import Plan, PlanError, load_plan

__all__ = [
    "partition", "Pipe", "Plan", "load_plan", "PartitionError", "PlanError",
    "DeviceSpec", "LinkSpec", "DEVICES", "LINKS", "calibrate_device",
]
__version__ = "0.1.0"
