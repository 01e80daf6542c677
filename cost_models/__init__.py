"""Pure cost arithmetic: op + tensor shapes → sympy expressions in B (and S); devices and links."""

from cost_models.cost import BATCH, SEQ, ZERO, NodeCost
from cost_models.devices import DEVICES, LINKS, DeviceSpec, LinkSpec, evaluate, get_device, get_link
from cost_models.errors import CostModelError, PartitionError
from cost_models.flops import (
    counted_by_flop_counter,
    fc_flops,
    op_flops,
    register_cpu_flash_attention_flops,
)

__all__ = [
    "BATCH",
    "DEVICES",
    "LINKS",
    "SEQ",
    "ZERO",
    "CostModelError",
    "DeviceSpec",
    "LinkSpec",
    "NodeCost",
    "PartitionError",
    "counted_by_flop_counter",
    "evaluate",
    "fc_flops",
    "get_device",
    "get_link",
    "op_flops",
    "register_cpu_flash_attention_flops",
]
