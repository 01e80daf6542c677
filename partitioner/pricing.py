"""Turns an annotated graph into the solver's integer arrays, at one micro-batch size.

Positions are the graph's compute nodes in order. A value crosses cut ``k`` when it is
produced before position ``k`` (graph inputs count as produced before position 0) and
used at or after ``k`` (the graph output counts as used at the end), so a skip
connection that spans two cuts is priced at both. A cut is allowed only where every
crossing value can go over the wire: a tensor, or a plain int/float/bool/None.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, replace
from typing import Any, Sequence

import sympy
from torch import fx

from partitioner.cost_models.cost import BATCH, SEQ, NodeCost, evaluate
from partitioner.passes.base import TensorDesc
from partitioner.passes.liveness import Liveness
from partitioner.passes.meta import COST, DESC, MODULE
from partitioner.passes.split import aliases, compute_nodes, writes_into

__all__ = ["Priced", "price", "value_bytes", "wire_kind", "TIME_UNIT"]

#: The solver works in integer picoseconds: exact sums, and 10^4 s still fits int64.
TIME_UNIT = 1e-12


@dataclass(frozen=True)
class Priced:
    order: tuple[fx.Node, ...]
    fwd_s: tuple[float, ...]  # per position
    bwd_s: tuple[float, ...]
    cut_bytes: tuple[int, ...]  # n + 1 entries: activation bytes crossing each cut
    cut_grad_bytes: tuple[int, ...]  # n + 1 entries: gradient bytes coming back
    allowed: tuple[bool, ...]  # n + 1 entries
    blocked_by: tuple[str, ...]  # n + 1 entries: why a cut is not allowed ("" when it is)


class Evaluator:
    """Sympy → int at fixed B and S, cached: transformer layers repeat the same expressions."""

    def __init__(self, batch: int, seq: int) -> None:
        self.values = {BATCH: batch, SEQ: seq}
        self.cache: dict[Any, int] = {}

    def __call__(self, expr: Any) -> int:
        if isinstance(expr, int):
            return expr
        hit = self.cache.get(expr)
        if hit is None:
            hit = evaluate(expr, self.values[BATCH], self.values[SEQ])  # the one evaluator (partitioner.cost_models.cost)
            self.cache[expr] = hit
        return hit


def wire_kind(desc: Any) -> str | None:
    """How a value would cross a cut, or None if it cannot."""
    if isinstance(desc, TensorDesc):
        return "tensor"
    if isinstance(desc, bool):
        return "bool"
    if isinstance(desc, (int, sympy.Expr)):
        return "int"
    if isinstance(desc, float):
        return "float"
    if desc is None:
        return "none"
    return None


def value_bytes(desc: Any, ev: Evaluator) -> tuple[int, int]:
    """(bytes forward, gradient bytes backward) of one crossing value."""
    if isinstance(desc, TensorDesc):
        nbytes = ev(desc.nbytes())
        grad = nbytes if desc.requires_grad and (desc.dtype.is_floating_point or desc.dtype.is_complex) else 0
        return nbytes, grad
    return 8, 0


def module_instance(path: str, pattern: str | None) -> str | None:
    """The shortest prefix of ``path`` that matches ``pattern`` (a glob), if any."""
    if pattern is None:
        return None
    parts = path.split(".") if path else []
    for i in range(1, len(parts) + 1):
        prefix = ".".join(parts[:i])
        if fnmatch.fnmatchcase(prefix, pattern):
            return prefix
    return None


def price(
    gm: fx.GraphModule,
    *,
    batch: int,
    seq: int,
    node_time: Any,  # (NodeCost, {"B": b, "S": s}) -> (fwd seconds, bwd seconds)
    cut_at: str | None = None,
    costs_known: bool = True,
) -> Priced:
    """The solver's view of an annotated graph at one micro-batch size.

    Args:
        gm: a graph annotated by ``ShapeProp`` and ``AnnotateCosts`` (``node.meta["pp.cost"]``).
        batch: the micro-batch size ``B`` the costs are evaluated at.
        seq: the sequence length ``S`` (1 for models without one).
        node_time: ``(NodeCost, {"B": b, "S": s}) -> (forward s, backward s)``, e.g.
            ``DeviceSpec.node_time``.
        cut_at: a glob of module paths; cuts are allowed only between modules it matches.
        costs_known: False when there were no example inputs (only parameter bytes are known).

    Returns:
        ``Priced``: the compute nodes in order (the positions), their forward and backward
        seconds, and per cut (n + 1 entries) the activation and gradient bytes crossing it,
        whether it may be cut, and why not.
    """
    order = compute_nodes(gm)
    n = len(order)
    ev = Evaluator(batch, seq)
    fwd, bwd = [], []
    values = {"B": batch, "S": seq}
    # annotate gives structurally identical nodes one shared cost record: each is timed once
    # (by identity, the entry keeping the record alive; sympy's equality is slow)
    times: dict[int, tuple[NodeCost, tuple[float, float]]] = {}
    for node in order:
        cost: NodeCost = node.meta.get(COST, NodeCost())
        hit = times.get(id(cost))
        if hit is None or hit[0] is not cost:
            hit = times[id(cost)] = (cost, node_time(with_shape(node, cost), values))
        f, b = hit[1]
        fwd.append(f)
        bwd.append(b)
    # per value crossing some cut: its wire bytes, or why it cannot cross (partitioner.passes.liveness)
    live = Liveness(gm, order)
    fbytes, gbytes = [], []
    bad: dict[fx.Node, str] = {}
    for v in live.values:
        desc = v.meta.get(DESC) if costs_known else None
        kind = wire_kind(desc) if costs_known else ("tensor" if v.op in ("placeholder", "call_module") else None)
        if kind is None:
            bad[v] = f"{v.name} ({type(desc).__name__ if costs_known else 'unknown type'})"
        fb, gb = value_bytes(desc, ev) if costs_known and kind is not None else (0, 0)
        fbytes.append(fb)
        gbytes.append(gb)
    cut_bytes, cut_grad = live.totals(fbytes), live.totals(gbytes)
    first_bad = live.first(bad.__contains__) if bad else [None] * (n + 1)
    split_write = _split_writes(gm, live)
    allowed, why = [], []
    instances = [module_instance(str(nd.meta.get(MODULE, "")), cut_at) for nd in order]
    for k in range(n + 1):
        reason = ""
        if 0 < k < n:
            blocker = first_bad[k]
            if blocker is not None:
                reason = f"non-tensor value crosses: {bad[blocker]}"
            elif split_write[k]:
                reason = split_write[k]
            elif cut_at is not None and (instances[k - 1] == instances[k] or
                                         (instances[k - 1] is None and instances[k] is None)):
                reason = f"inside or outside {cut_at!r} boundaries"
        allowed.append(not reason)
        why.append(reason)
    return Priced(tuple(order), tuple(fwd), tuple(bwd),
                  tuple(cut_bytes), tuple(cut_grad), tuple(allowed), tuple(why))


_GEMM_OPS = ("aten.mm.", "aten.addmm.", "aten.bmm.", "aten.baddbmm.", "aten.matmul.", "aten.linear.")


def with_shape(node: fx.Node, cost: NodeCost) -> NodeCost:
    """``cost`` with the kernel's problem size the device model prices by (``NodeCost.shape``):
    ``(M, K, N)`` of a matrix multiply (K the first input's last dim, N the output's, M the
    rest of the output, batch dims folded in); ``(Sq, Sk, head_dim, causal)`` of an attention
    core. A ``.to()`` that keeps the dtype launches nothing on the stage's GPU (ops: an alias).
    Unchanged where the node is none of these or its sizes are unknown."""
    if cost.shape:
        return cost
    descs = [a.meta.get(DESC) for a in node.all_input_nodes]
    out = node.meta.get(DESC)
    if (str(node.target).startswith("aten.to.") or (node.op == "call_method" and node.target == "to")) and \
            descs and isinstance(descs[0], TensorDesc) and isinstance(out, TensorDesc) and descs[0].dtype == out.dtype:
        # a move to the device the stage runs on (a meta or CPU capture's artefact): no kernel
        return replace(cost, ops=("aten.alias.default",))
    if cost.kind.startswith("attention"):
        q, k = (descs + [None, None])[:2]
        if isinstance(q, TensorDesc) and isinstance(k, TensorDesc) and len(q.shape) >= 2 and len(k.shape) >= 2:
            mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
            causal = bool(node.kwargs.get("is_causal", node.args[5] if len(node.args) > 5 else False)) or (
                cost.kind == "attention-causal" and isinstance(mask, fx.Node))  # a mask made from shapes alone
            return replace(cost, shape=(q.shape[-2], k.shape[-2], q.shape[-1], sympy.Integer(int(causal))))
        return cost
    if not any(op.startswith(_GEMM_OPS) for op in cost.ops):
        return cost
    first = descs[0] if descs else None
    if isinstance(first, TensorDesc) and isinstance(out, TensorDesc) and first.shape and out.shape:
        n = out.shape[-1]
        return replace(cost, shape=(out.numel() / n, first.shape[-1], n))
    return cost


def _split_writes(gm: fx.GraphModule, live: Liveness) -> list[str]:
    """Per cut: why it may not be cut because an in-place write after it (``h[:, :4].mul_(2)``)
    reaches a tensor of which two aliases (a base and its view) cross the cut. Each arrives
    as its own tensor, so the write would miss the other: a silent wrong result. (One alias
    crossing is fine: the stage writes into a copy, ``partitioner.passes.split``.)"""
    n = live.n
    out = [""] * (n + 1)
    for w in live.order:
        targets = [a for a in (*w.args, *w.kwargs.values()) if isinstance(a, fx.Node) and writes_into(gm, w, a)]
        for target in targets:
            count = [0] * (n + 2)
            for m in aliases(target):
                s = live.span(m)
                if s.last > s.produced:
                    count[s.produced + 1] += 1
                    count[s.last + 1] -= 1
            acc = 0
            for k in range(live.pos[w] + 1):
                acc += count[k]
                if acc >= 2 and not out[k]:
                    out[k] = f"{w.name} writes in place into {target.name}, and two of its aliases would cross"
    return out


def to_units(seconds: Sequence[float]) -> list[int]:
    return [int(round(s / TIME_UNIT)) for s in seconds]
