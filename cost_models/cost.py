"""Per-node cost record: plain symbolic data, no torch objects."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import sympy

from partitioner.cost_models.errors import CostModelError

__all__ = ["NodeCost", "BATCH", "SEQ", "ZERO", "evaluate"]

#: The batch symbol: every batch-dependent size is a polynomial in it.
BATCH = sympy.Symbol("B", positive=True, integer=True)
#: The sequence-length symbol, for models that have one.
SEQ = sympy.Symbol("S", positive=True, integer=True)
ZERO = sympy.Integer(0)


@dataclass(frozen=True)
class NodeCost:
    """What one graph node costs, per micro-batch of ``B`` samples.

    Every field is a sympy expression in ``B`` (and ``S``), or a constant.
    """

    fwd_flops: sympy.Expr = ZERO  # all forward FLOPs we count (matmul-like, elementwise, norms, ...)
    bwd_flops: sympy.Expr = ZERO  # all backward FLOPs (input grads + weight grads)
    fwd_flops_fc: sympy.Expr = ZERO  # the part of fwd_flops on ops that FlopCounterMode also counts
    bwd_flops_fc: sympy.Expr = ZERO  # same for backward
    param_bytes: sympy.Expr = ZERO  # parameters this node reads (owned by its stage)
    buffer_bytes: sympy.Expr = ZERO  # buffers this node reads
    output_bytes: sympy.Expr = ZERO  # bytes of the node's output tensors
    saved_bytes: sympy.Expr = ZERO  # bytes autograd keeps alive for backward
    fwd_bytes_moved: sympy.Expr = ZERO  # memory traffic of the forward (reads + writes)
    ops: tuple[str, ...] = field(default=())  # aten ops seen, for inspection
    # -- where the saved bytes live, so a stage can count each storage once --------------
    # ``saved_bytes`` above is this node priced alone. The same bytes split by storage:
    saved_internal: sympy.Expr = ZERO  # storages only this node's backward uses (created inside it)
    #: storages of the node's own inputs or outputs that it saves: ``(j, i)`` = tensor leaf ``i``
    #: of the node's ``j``-th fx input (in ``(args, kwargs)`` order); ``(-1, i)`` = its output leaf ``i``
    saved_refs: tuple[tuple[int, int], ...] = field(default=())
    #: per output tensor leaf: the input leaf ``(j, i)`` whose storage it shares (a view, a
    #: getitem), or None when the node allocated it
    out_alias: tuple[tuple[int, int] | None, ...] = field(default=())
    out_storage: tuple[sympy.Expr, ...] = field(default=())  # per output tensor leaf: storage bytes
    #: "attention": an attention core (SDPA), the region selective recomputation re-runs
    kind: str = ""
    #: the kernel's problem size where the device model needs it (``partitioner.pricing``
    #: fills it; empty otherwise): ``(M, K, N)`` of a matrix multiply (batch folded into M),
    #: ``(Sq, Sk, head_dim, causal)`` of an attention core
    shape: tuple[sympy.Expr, ...] = field(default=())

    def __add__(self, other: NodeCost) -> NodeCost:
        summed = {f: getattr(self, f) + getattr(other, f) for f in _SUMMED}
        return NodeCost(**summed, ops=self.ops + other.ops)


_SUMMED = (
    "fwd_flops",
    "bwd_flops",
    "fwd_flops_fc",
    "bwd_flops_fc",
    "param_bytes",
    "buffer_bytes",
    "output_bytes",
    "saved_bytes",
    "fwd_bytes_moved",
)


def evaluate(expr: Any, batch: int, seq: int = 1) -> int:
    """``expr`` (a sympy expression in ``B`` and ``S``, or a number) at ``B=batch``, ``S=seq``,
    rounded up to an int: exact (rational arithmetic, no floats), cached per (expression,
    sizes). The one evaluator of cost expressions: pricing, the plan's ``cost_at``,
    ``DeviceSpec.node_time`` and the runtime's wire shapes all call it.

    Raises ``CostModelError`` if the expression has a symbol other than ``B`` and ``S``.
    """
    if isinstance(expr, int) and not isinstance(expr, bool):
        return expr
    return _evaluate(sympy.sympify(expr), int(batch), int(seq))


@functools.lru_cache(maxsize=1 << 16)
def _evaluate(expr: sympy.Expr, batch: int, seq: int) -> int:
    value = sympy.sympify(expr.xreplace({BATCH: sympy.Integer(batch), SEQ: sympy.Integer(seq)}))
    if value.free_symbols:
        raise CostModelError(f"cost {expr} has symbols other than B and S ({sorted(map(str, value.free_symbols))}); "
                             "costs must be polynomials or functions of B and S only")
    return int(sympy.ceiling(value))
