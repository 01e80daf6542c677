"""A compiler for pipeline parallelism: ``partition(model, n_gpus)`` → balanced stages + a plan.

The public surface is small on purpose: ``partition``, ``Pipe``, ``Plan``, ``load_plan``,
the device/link specs and the errors users catch (``PartitionerError`` is the root;
``PartitionError`` — a ``ValueError`` — for bad input, with ``InfeasibleError``,
``CaptureError`` and ``PlanError`` under it; ``PipelineRuntimeError`` — a
``RuntimeError`` — when a step fails while running). Everything else is internal.

The names load on first use (PEP 562): ``import partitioner.schedule`` or
``partitioner.plan`` does not import torch or the compiler. docs/ARCHITECTURE.md
describes the package.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from partitioner.api import partition
    from partitioner.calibrate import calibrate_device
    from partitioner.cost_models.devices import DEVICES, LINKS, DeviceSpec, LinkSpec
    from partitioner.cost_models.errors import PartitionerError, PartitionError
    from partitioner.passes.errors import CaptureError
    from partitioner.pipe import Pipe
    from partitioner.plan import Plan, PlanError, load_plan
    from partitioner.runtime.errors import PipelineRuntimeError
    from partitioner.solver import InfeasibleError

# A source checkout keeps passes/, cost_models/ and tools/ beside this folder (the
# repository's layout); an install puts them inside it (pyproject's package-dir). In a
# checkout, a finder ahead of the others maps exactly these three names to this checkout's
# folders (the editable install's own finder would map them to the tree that was installed,
# another worktree's perhaps); their submodules follow through the package's __path__.
_HERE = os.path.dirname(os.path.abspath(__file__))
_SUBPACKAGES = {f"partitioner.{name}": os.path.join(os.path.dirname(_HERE), name)
                for name in ("passes", "cost_models", "tools")}


class _CheckoutFolders(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        folder = _SUBPACKAGES.get(name)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(name, os.path.join(folder, "__init__.py"),
                                                      submodule_search_locations=[folder])


if not os.path.isdir(os.path.join(_HERE, "passes")) and all(
        os.path.isfile(os.path.join(f, "__init__.py")) for f in _SUBPACKAGES.values()) \
        and not any(isinstance(f, _CheckoutFolders) for f in sys.meta_path):
    sys.meta_path.insert(0, _CheckoutFolders())

#: public name → the module that defines it
_WHERE = {
    "partition": "partitioner.api",
    "Pipe": "partitioner.pipe",
    "Plan": "partitioner.plan",
    "load_plan": "partitioner.plan",
    "PlanError": "partitioner.plan",
    "calibrate_device": "partitioner.calibrate",
    "DeviceSpec": "partitioner.cost_models.devices",
    "LinkSpec": "partitioner.cost_models.devices",
    "DEVICES": "partitioner.cost_models.devices",
    "LINKS": "partitioner.cost_models.devices",
    "PartitionerError": "partitioner.cost_models.errors",
    "PartitionError": "partitioner.cost_models.errors",
    "InfeasibleError": "partitioner.solver",
    "CaptureError": "partitioner.passes.errors",
    "PipelineRuntimeError": "partitioner.runtime.errors",
}

__all__ = [
    "partition", "Pipe", "Plan", "load_plan", "PlanError", "calibrate_device",
    "DeviceSpec", "LinkSpec", "DEVICES", "LINKS",
    "PartitionerError", "PartitionError", "InfeasibleError", "CaptureError", "PipelineRuntimeError",
]
__version__ = "0.1.0"


#: The library's logger: every module logs under it ("partitioner.passes.trace",
#: "partitioner.solver", ...). ``PARTITIONER_LOG=debug`` (or info, warning, ...) prints them.
LOGGERS = ("partitioner",)


def _configure_logging(setting: str | None) -> int | None:
    """Level and a stderr handler for the library's loggers from ``PARTITIONER_LOG``; the
    level set, or None (unset: logging stays the application's to configure)."""
    if not setting or not setting.strip():
        return None
    level = logging.getLevelName(setting.strip().upper())
    if not isinstance(level, int):
        raise ValueError(f"PARTITIONER_LOG={setting!r}: expected debug, info, warning, error or critical")
    for name in LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        if not any(getattr(h, "_partitioner", False) for h in logger.handlers):
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
            handler._partitioner = True  # type: ignore[attr-defined]
            logger.addHandler(handler)
    return level


_configure_logging(os.environ.get("PARTITIONER_LOG"))


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(where), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
