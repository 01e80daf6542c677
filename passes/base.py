"""What a pass is: a frozen dataclass with a name, declared meta keys, and ``run(gm) -> gm``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import sympy
import torch
from torch import fx

__all__ = ["Pass", "InputSpec", "TensorDesc"]


class InputSpec(NamedTuple):
    """One flat graph input, as the plan records it (so a plan can be re-applied without data).

    ``dims`` maps a dimension index to a symbol name ("B" or "S") when that dimension is
    symbolic; other dimensions are fixed at ``shape``. ``kind`` is "tensor" or the Python
    type name of a constant input ("int", "float", "bool", "none").
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    dtype: str  # e.g. "float32", "int64"; "" for non-tensors
    dims: tuple[tuple[int, str], ...]  # ((0, "B"), (1, "S"))
    value: int | float | bool | None = None  # for non-tensor inputs

    def zeros(self, batch: int | None = None) -> torch.Tensor | int | float | bool | None:
        """An example value: zeros of the recorded shape (dims marked "B" set to ``batch``)."""
        if self.kind != "tensor":
            return self.value
        shape = list(self.shape)
        if batch is not None:
            for dim, sym in self.dims:
                if sym == "B":
                    shape[dim] = batch
        return torch.zeros(shape, dtype=getattr(torch, self.dtype))


class TensorDesc(NamedTuple):
    """A tensor value as the cost model and the plan see it: shape symbolic in B and S."""

    shape: tuple[sympy.Expr, ...]
    dtype: torch.dtype
    requires_grad: bool

    def numel(self) -> sympy.Expr:
        return sympy.Mul(*self.shape) if self.shape else sympy.Integer(1)

    def nbytes(self) -> sympy.Expr:
        return self.numel() * _itemsize(self.dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return dtype.itemsize  # never an allocated tensor's size: a retyping context would change it


@dataclass(frozen=True)
class Pass:
    """Base of every pass. Subclasses are frozen dataclasses; options are their fields.

    ``requires`` and ``provides`` name ``node.meta`` keys, ``graph_requires`` and
    ``graph_provides`` name ``gm.meta`` keys (all declared in ``partitioner.passes.meta``); the pass
    manager checks them between passes. ``run`` returns a new or the same GraphModule and
    never touches the user's original module.
    """

    name: ClassVar[str] = "pass"
    requires: ClassVar[tuple[str, ...]] = ()
    provides: ClassVar[tuple[str, ...]] = ()
    graph_requires: ClassVar[tuple[str, ...]] = ()
    graph_provides: ClassVar[tuple[str, ...]] = ()

    def run(self, gm: fx.GraphModule) -> fx.GraphModule:  # pragma: no cover - abstract
        raise NotImplementedError
