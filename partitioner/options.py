"""Option tables shared by the library and the CLI, importable without torch.

``partition(optimizer=, precision=, recompute=)`` accept exactly these keys; the CLI's
``--optimizer`` / ``--precision`` / ``--recompute`` choices are read from here, so the
two never drift. ``partitioner.memory`` (which prices them, and needs torch) re-exports
them. See docs/ARCHITECTURE.md, "Memory".
"""

from __future__ import annotations

__all__ = ["OPTIMIZER_STATES", "PRECISIONS", "RECOMPUTE"]

#: precision → (weight/grad bytes per element, fp32 master copy kept by the optimizer, state bytes)
PRECISIONS: dict[str, tuple[int, bool, int]] = {
    "fp32": (4, False, 4),
    "bf16-mixed": (2, True, 4),  # bf16 weights and grads; fp32 master weights and optimizer state
    "fp16-mixed": (2, True, 4),
    "bf16": (2, False, 2),  # pure bf16: weights, grads and optimizer state all bf16
}
#: Optimizer state kept per parameter, in parameter-sized copies (Adam: two moments).
OPTIMIZER_STATES: dict[str, int] = {"none": 0, "sgd": 0, "momentum": 1, "adam": 2, "adamw": 2}
#: recompute= values, and the options each lets the solver use (fastest first).
RECOMPUTE: dict[str, tuple[str, ...]] = {
    "none": ("none",),
    "selective": ("selective",),
    "selective-op": ("selective-op",),  # torchtitan's op-level selective checkpointing
    "full": ("full",),
    "auto": ("none", "selective", "selective-op", "full"),
}
