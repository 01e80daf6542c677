"""Pure cost arithmetic: op + tensor shapes → sympy expressions in B (and S); devices and links.

The names below load on first use (PEP 562), so ``partitioner.cost_models.errors`` and
``partitioner.cost_models.cost`` import without torch; ``devices`` and ``flops`` need it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from partitioner.cost_models.cost import BATCH, SEQ, ZERO, NodeCost
    from partitioner.cost_models.devices import DEVICES, LINKS, DeviceSpec, LinkSpec, evaluate, get_device, get_link
    from partitioner.cost_models.errors import CostModelError, PartitionerError, PartitionError
    from partitioner.cost_models.flops import (
        counted_by_flop_counter,
        fc_flops,
        op_flops,
        register_cpu_flash_attention_flops,
    )

#: public name → the submodule that defines it
_WHERE = {
    "BATCH": "cost", "SEQ": "cost", "ZERO": "cost", "NodeCost": "cost",
    "DEVICES": "devices", "LINKS": "devices", "DeviceSpec": "devices", "LinkSpec": "devices",
    "evaluate": "devices", "get_device": "devices", "get_link": "devices",
    "CostModelError": "errors", "PartitionError": "errors", "PartitionerError": "errors",
    "counted_by_flop_counter": "flops", "fc_flops": "flops", "op_flops": "flops",
    "register_cpu_flash_attention_flops": "flops",
}

__all__ = [
    "BATCH", "DEVICES", "LINKS", "SEQ", "ZERO", "CostModelError", "DeviceSpec", "LinkSpec", "NodeCost",
    "PartitionError", "PartitionerError", "counted_by_flop_counter", "evaluate", "fc_flops", "get_device",
    "get_link", "op_flops", "register_cpu_flash_attention_flops",
]


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{where}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
