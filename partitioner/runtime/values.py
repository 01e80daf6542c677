"""What crosses a cut, as the plan says it should: shapes at a micro-batch size, dtypes,
and the small-tensor encoding of non-tensor values (ints, floats, bools, None).

The runtime never asks a peer for a shape: both sides compute the same buffer layout
from the plan, and every value sent or received is checked against it, so a stage that
drifts from its plan fails loudly on the side that knows which value is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from partitioner import poly
from partitioner.plan import Plan, ValueSpec
from partitioner.runtime.errors import PipelineRuntimeError

__all__ = ["Wire", "boundary_wires", "input_wires", "encode", "decode", "check_value"]

# Non-tensors travel as one-element tensors; bools as int64 because gloo has no bool.
_SCALAR_DTYPE = {"int": torch.int64, "bool": torch.int64, "float": torch.float64}


@dataclass(frozen=True)
class Wire:
    """One value's slot on a link, at one micro-batch size."""

    name: str
    kind: str  # ValueSpec.kind
    shape: tuple[int, ...]  # tensors: the expected shape; scalars: (1,)
    dtype: torch.dtype
    requires_grad: bool  # a gradient comes back for it

    @property
    def travels(self) -> bool:
        return self.kind != "none"  # None is known from the plan; nothing is sent

    def empty(self, device: torch.device | str | None = None) -> torch.Tensor:
        return torch.empty(self.shape, dtype=self.dtype, device=device)


def _dim(d: int | str, batch: int, seq: int) -> int:
    return d if isinstance(d, int) else poly.evaluate(poly.from_text(d), batch, seq)


def _wire(spec: ValueSpec, batch: int, seq: int) -> Wire:
    if spec.kind == "tensor":
        dtype = getattr(torch, spec.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise PipelineRuntimeError(f"value {spec.name!r}: unknown dtype {spec.dtype!r} in the plan")
        shape = tuple(_dim(d, batch, seq) for d in spec.shape)
        return Wire(spec.name, "tensor", shape, dtype, spec.requires_grad and dtype.is_floating_point)
    if spec.kind in _SCALAR_DTYPE or spec.kind == "none":
        return Wire(spec.name, spec.kind, (1,), _SCALAR_DTYPE.get(spec.kind, torch.int64), False)
    raise PipelineRuntimeError(f"value {spec.name!r}: kind {spec.kind!r} cannot cross a cut at runtime")


def boundary_wires(plan: Plan, boundary: int, batch: int, seq: int) -> tuple[Wire, ...]:
    """The values stage ``boundary`` sends to stage ``boundary + 1``, in order."""
    return tuple(_wire(v, batch, seq) for v in plan.boundaries[boundary].values)


def input_wires(plan: Plan, batch: int, seq: int) -> tuple[Wire, ...]:
    """Stage 0's inputs (the model's flat inputs), with B and S dims made symbolic."""
    out = []
    for d in plan.inputs:
        dims = {int(i): str(sym) for i, sym in d.get("dims", [])}
        shape = tuple(dims.get(i, n) for i, n in enumerate(d.get("shape") or ()))
        spec = ValueSpec(d["name"], d["kind"], shape, d.get("dtype") or "", "0")
        out.append(_wire(spec, batch, seq))
    return tuple(out)


def check_value(where: str, wire: Wire, value: Any) -> None:
    """Raise if ``value`` is not what the plan promised for ``wire``."""
    if wire.kind == "tensor":
        if not isinstance(value, torch.Tensor):
            raise PipelineRuntimeError(f"{where}: value {wire.name!r} should be a tensor, got {type(value).__name__}")
        if tuple(value.shape) != wire.shape or value.dtype != wire.dtype:
            raise PipelineRuntimeError(
                f"{where}: value {wire.name!r} does not match the plan: expected shape {wire.shape} "
                f"{_short(wire.dtype)}, got {tuple(value.shape)} {_short(value.dtype)}; the model or its "
                "inputs differ from what was partitioned (batch, sequence length, config): re-run partition()"
            )
    elif wire.kind == "none":
        if value is not None:
            raise PipelineRuntimeError(f"{where}: value {wire.name!r} should be None, got {type(value).__name__}")
    elif isinstance(value, torch.Tensor) or type(value).__name__ != wire.kind:
        raise PipelineRuntimeError(f"{where}: value {wire.name!r} should be a {wire.kind}, got {type(value).__name__}")


def _short(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def encode(where: str, wires: Sequence[Wire], values: Sequence[Any], *, detach: bool = True) -> list[torch.Tensor]:
    """Check ``values`` and turn them into the tensors that travel: tensors as they are
    (detached unless ``detach`` is False: PyTorch's pipelining differentiates through
    them), Python scalars as one-element tensors, ``None`` not at all."""
    if len(values) != len(wires):
        raise PipelineRuntimeError(f"{where}: expected {len(wires)} values ({[w.name for w in wires]}), got {len(values)}")
    out = []
    for w, v in zip(wires, values):
        check_value(where, w, v)
        if w.kind == "tensor":
            out.append(v.detach() if detach else v)
        elif w.travels:
            out.append(torch.tensor([v], dtype=w.dtype))
    return out


def decode(wires: Sequence[Wire], tensors: Sequence[torch.Tensor], *, grad: bool | None) -> list[Any]:
    """Inverse of ``encode``; with ``grad`` the received tensors become leaves that
    collect the gradient to send back (``None``: tensors are left as they come)."""
    it = iter(tensors)
    out: list[Any] = []
    for w in wires:
        if not w.travels:
            out.append(None)
            continue
        t = next(it)
        if w.kind == "tensor":
            out.append(t if grad is None else t.requires_grad_(grad and w.requires_grad))
        elif w.kind == "bool":
            out.append(bool(t.item()))
        elif w.kind == "int":
            out.append(int(t.item()))
        else:
            out.append(float(t.item()))
    return out
