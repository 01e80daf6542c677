"""The dataflow analysis that decides which linears tensor parallelism shards: the one finder
the runtime executes (``runtime.tensor_parallel.shard_plan``) and, through
``passes.tensor_parallel.agreed_split``, the one the planner prices.

A linear over a parameter weight opens a *column* group (weight ``Shard(0)``); its output's
sharded dimension is followed node by node with the shapes shape-prop recorded
(``node.meta["val"]``), as DTensor's sharding propagation would move it: element-wise ops,
views / reshapes (the shard lands on the leading dimension of its group: heads), transposes,
permutes, expands, slices and concatenations off the sharded dimension, softmax off it,
attention and batched matmuls over the heads. A linear that takes the sharded value on its
features is *row*-parallel (weight ``Shard(1)``). Anything else a shard reaches (a norm over
the features, a stage output, an unknown op, a split or chunk of a fused projection) makes
every column group feeding it whole, and the analysis runs again until nothing fails (a
fixpoint): what is left sharded is what DTensor computes exactly as the unsharded model.

A recognised pattern that T does not divide (a head count after a view, a column's output
features) raises ``IndivisibleError`` naming the node and the sizes.

This module was the runtime's own; it sits with the graph passes so that the planner, one
layer below the runtime, calls the same code on the captured graph.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Collection

import torch
import torch.nn.functional as F
from torch import fx, nn

from partitioner.passes.errors import GraphError

__all__ = ["LinearSplit", "split_linears", "IndivisibleError"]

aten = torch.ops.aten

#: ops whose output keeps the input's layout, broadcasting aligned from the right
_ELEMENTWISE: set[Any] = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg,
    torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.tanh, torch.sigmoid, torch.exp, torch.pow,
    torch.where, torch.rsqrt, torch.sqrt, torch.abs, torch.clamp,
    F.relu, F.gelu, F.silu, F.dropout, F.sigmoid, F.tanh, torch.relu,
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.neg.default, aten.silu.default,
    aten.gelu.default, aten.relu.default, aten.tanh.default, aten.sigmoid.default, aten.exp.default,
    aten.pow.Tensor_Scalar, aten.dropout.default, aten.to.dtype, aten.to.dtype_layout, aten.clone.default,
    aten.contiguous.default, aten._to_copy.default, aten.where.self, aten.rsqrt.default, aten.mul.Scalar,
    aten.add.Scalar, aten.div.Scalar, aten.alias.default, aten.type_as.default, aten.detach.default,
}
_ELEMENTWISE_METHODS = {"add", "sub", "mul", "div", "neg", "relu", "sigmoid", "tanh", "exp", "pow", "to", "type",
                        "type_as", "contiguous", "clone", "float", "half", "bfloat16", "masked_fill", "detach"}
#: element-wise modules (called as leaves on the fx route: nanoGPT's ``nn.GELU``, a dropout)
_ELEMENTWISE_MODULES = (nn.GELU, nn.ReLU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Dropout, nn.Identity)
_VIEWS: set[Any] = {torch.reshape, torch.flatten, torch.unflatten, torch.squeeze, torch.unsqueeze,
                    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default,
                    aten.squeeze.dim, aten.flatten.using_ints, aten.unflatten.int}
_VIEW_METHODS = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze"}
_PERMUTES: set[Any] = {torch.transpose, torch.permute, torch.swapaxes, aten.transpose.int, aten.permute.default,
                       aten.t.default}
_PERMUTE_METHODS = {"transpose", "permute", "swapaxes", "t"}
_EXPANDS: set[Any] = {aten.expand.default}
_SLICES: set[Any] = {aten.slice.Tensor, aten.narrow.default, torch.narrow}
_CATS: set[Any] = {torch.cat, torch.concat, aten.cat.default}
_STACKS: set[Any] = {torch.stack, aten.stack.default}
#: reductions over other dimensions than the shard's (a per-head RMSNorm's mean over head_dim)
_MEANS: set[Any] = {torch.mean, aten.mean.dim}
#: one index of a dimension, which goes away (BLOOM's q, k, v: ``fused[..., 0, :]``)
_SELECTS: set[Any] = {torch.select, aten.select.int}
#: ops that cut a tensor into a tuple of pieces along one dimension (a fused projection's q, k, v)
_SPLITS: set[Any] = {torch.split, torch.chunk, aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default}
_SPLIT_METHODS = {"split", "chunk", "split_with_sizes"}
_SOFTMAX: set[Any] = {F.softmax, torch.softmax, aten.softmax.int, aten._softmax.default}
_MATMULS: set[Any] = {torch.matmul, torch.bmm, operator.matmul, aten.matmul.default, aten.bmm.default}
_SDPA: set[Any] = {F.scaled_dot_product_attention, aten.scaled_dot_product_attention.default}
_LINEARS: set[Any] = {F.linear, torch._C._nn.linear, aten.linear.default}
#: checks that return nothing: dropped from a tensor-parallel stage (their arguments are DTensors)
_DROPPED: set[Any] = {aten._assert_tensor_metadata.default}


class _NotShardable(Exception):
    """The shard cannot follow this node (the sources feeding it stay replicated)."""


class _Indivisible(Exception):
    """The pattern is recognised but T does not divide a dimension it shards."""


class IndivisibleError(GraphError):
    """Tensor parallelism over T ranks recognises a pattern whose sizes T does not divide (a
    head count, a linear's features): refused, naming the node, rather than kept whole, which
    would be another parallelism than the one asked for."""



def _linear(gm: fx.GraphModule, n: fx.Node) -> tuple[str, str | None, fx.Node] | None:
    """(weight FQN, bias FQN or None, input node) when ``n`` is a linear over parameters of ``gm``."""
    if n.op == "call_module":
        mod = gm.get_submodule(str(n.target))
        if type(mod) is nn.Linear and n.args and isinstance(n.args[0], fx.Node):
            return f"{n.target}.weight", (f"{n.target}.bias" if mod.bias is not None else None), n.args[0]
        return None
    if n.op == "call_function" and n.target in _LINEARS:
        args = list(n.args) + [n.kwargs.get("bias")] * (3 - len(n.args))
        x, w, b = args[0], args[1] if len(args) > 1 else n.kwargs.get("weight"), args[2]
        if not (isinstance(x, fx.Node) and isinstance(w, fx.Node) and w.op == "get_attr"):
            return None
        if b is not None and not (isinstance(b, fx.Node) and b.op == "get_attr"):
            return None
        return str(w.target), (str(b.target) if b is not None else None), x
    return None


def _shape(n: Any) -> tuple[int, ...] | None:
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    if isinstance(v, torch.Tensor):
        try:
            return tuple(int(s) for s in v.shape)
        except (TypeError, ValueError):  # a symbolic size without a hint
            return None
    return None


def _target_name(n: fx.Node) -> str:
    return n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))


def _view_dim(src: tuple[int, ...], dst: tuple[int, ...], d: int, tp: int, node: fx.Node) -> int:
    """Where dimension ``d`` of ``src`` goes under a view to ``dst``, as DTensor's view rule
    moves a shard: the dimension must lead its group of merged/split dimensions, and the
    shard goes to the group's leading output dimension, which T must divide."""
    i = j = 0
    while i < len(src) or j < len(dst):
        gi, gj = [i] if i < len(src) else [], [j] if j < len(dst) else []
        pi = src[i] if i < len(src) else 1
        pj = dst[j] if j < len(dst) else 1
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj and i < len(src):
                pi *= src[i]
                gi.append(i)
                i += 1
            elif j < len(dst):
                pj *= dst[j]
                gj.append(j)
                j += 1
            else:
                raise _NotShardable(f"view {src} -> {dst} not understood")
        if d in gi:
            lead_in = next((k for k in gi if src[k] != 1), gi[0])
            if d != lead_in:
                raise _NotShardable(f"the sharded dimension {d} of {src} is merged under dimension {lead_in}")
            lead_out = next((k for k in gj if dst[k] != 1), None)
            if lead_out is None:
                raise _NotShardable("the sharded dimension is viewed away")
            if dst[lead_out] % tp:
                raise _Indivisible(f"{node.name}: view {src} -> {dst} puts the shard on a dimension of "
                                   f"{dst[lead_out]} (e.g. heads), which tp={tp} does not divide")
            return lead_out
    raise _NotShardable(f"view {src} -> {dst}: dimension {d} not found")


def _dim_arg(n: fx.Node, pos: int, name: str, default: Any = None) -> Any:
    return n.args[pos] if len(n.args) > pos else n.kwargs.get(name, default)


def _propagate(n: fx.Node, ins: dict[fx.Node, int], tp: int, gm: fx.GraphModule | None = None) -> int:
    """The sharded dimension of ``n``'s output given its sharded inputs (``ins``: input node
    -> its sharded dimension), or raise ``_NotShardable`` / ``_Indivisible``."""
    out = _shape(n)
    tgt, op = n.target, n.op
    method = tgt if op == "call_method" else None
    args: Any = n.args  # fx's Argument union: the checks below read it as the op's schema says
    first = args[0] if args else None

    def aligned(src: fx.Node, d: int) -> int:  # broadcasting aligns dimensions from the right
        s = _shape(src)
        if s is None or out is None:
            raise _NotShardable("no recorded shapes")
        k = len(out) - len(s) + d
        if out[k] != s[d]:
            raise _NotShardable(f"the sharded dimension is broadcast ({s[d]} -> {out[k]})")
        return k

    if (op == "call_function" and tgt in _ELEMENTWISE) or method in _ELEMENTWISE_METHODS or (
            op == "call_module" and gm is not None and isinstance(gm.get_submodule(str(tgt)), _ELEMENTWISE_MODULES)):
        dims = {aligned(s, d) for s, d in ins.items()}
        if len(dims) != 1:
            raise _NotShardable(f"operands sharded on different dimensions {sorted(dims)}")
        return dims.pop()
    if len(ins) != 1 or first not in ins:
        if (op == "call_function" and tgt in _SDPA) or (op == "call_function" and tgt in _MATMULS) or (
                op == "call_function" and tgt in _CATS) or (op == "call_function" and tgt in _STACKS):
            pass  # several sharded operands: handled below
        else:
            raise _NotShardable("a sharded value enters an argument other than the first")
    src_shape = _shape(first) if isinstance(first, fx.Node) else None
    if (op == "call_function" and tgt in _VIEWS) or method in _VIEW_METHODS:
        if src_shape is None or out is None:
            raise _NotShardable("no recorded shapes")
        return _view_dim(src_shape, out, ins[first], tp, n)  # type: ignore[index]
    if (op == "call_function" and tgt in _PERMUTES) or method in _PERMUTE_METHODS:
        d, rank = ins[first], len(src_shape or ())  # type: ignore[index]
        name = _target_name(n)
        if name in ("t", "t.default"):
            perm = [1, 0]
        elif "transpose" in name or "swapaxes" in name:
            a, b = int(args[1]) % rank, int(args[2]) % rank
            perm = list(range(rank))
            perm[a], perm[b] = b, a
        else:
            raw = args[1:] if method else args[1]
            perm = [int(x) % rank for x in (raw[0] if method and len(raw) == 1 and isinstance(raw[0], (list, tuple))
                                            else raw)]
        return perm.index(d)
    if (op == "call_function" and tgt in _EXPANDS) or method == "expand":
        d = ins[first]  # type: ignore[index]
        if src_shape is None or out is None:
            raise _NotShardable("no recorded shapes")
        k = len(out) - len(src_shape) + d
        if out[k] != src_shape[d]:
            raise _NotShardable("the sharded dimension is expanded")
        return k
    if op == "call_function" and tgt in _SLICES:
        d = ins[first]  # type: ignore[index]
        dim = int(_dim_arg(n, 1, "dim", 0)) % len(src_shape or (0,))
        if dim == d and (out is None or src_shape is None or out[d] != src_shape[d]):
            raise _NotShardable("a slice of the sharded dimension")
        return d
    if (op == "call_function" and tgt in _SELECTS) or method == "select":
        d, rank = ins[first], len(src_shape or ())  # type: ignore[index]
        dim = _dim_arg(n, 1, "dim")
        if not isinstance(dim, int) or rank == 0 or dim % rank == d:
            raise _NotShardable("an index into the sharded dimension")
        return d - 1 if dim % rank < d else d
    if (op == "call_function" and tgt in _SPLITS) or method in _SPLIT_METHODS:
        # pieces along another dimension keep the shard (GPT-NeoX's query_key_value, viewed as
        # (..., heads, 3 x head_dim) and chunked on the last: each rank holds whole heads with
        # their q, k and v); along the sharded dimension itself, a fused [q; k; v] laid out by
        # output feature, rank 0 would hold all of q: refused
        d = ins[first]  # type: ignore[index]
        dim = int(_dim_arg(n, 2, "dim", 0)) % len(src_shape or (0,))
        if dim == d:
            raise _NotShardable("a split of the sharded dimension (a fused projection stacked by output feature)")
        return d
    if op == "call_function" and tgt is operator.getitem and isinstance(args[1], int) and isinstance(first, fx.Node) \
            and ((first.op == "call_function" and first.target in _SPLITS) or (
                first.op == "call_method" and first.target in _SPLIT_METHODS)):
        return ins[first]  # type: ignore[index]  # one piece of a split: sharded as the whole was
    if op == "call_function" and tgt in _CATS:
        tensors = args[0]
        dim = int(_dim_arg(n, 1, "dim", 0))
        if not isinstance(tensors, (list, tuple)) or any(t not in ins for t in tensors):
            raise _NotShardable("a concatenation of sharded and whole values")
        dims = {ins[t] for t in tensors}  # type: ignore[index]
        rank = len(out or ())
        if len(dims) != 1 or dim % max(rank, 1) in dims:
            raise _NotShardable("a concatenation along the sharded dimension")
        return dims.pop()
    if (op == "call_function" and tgt in _MEANS) or method == "mean":
        d, rank = ins[first], len(src_shape or ())  # type: ignore[index]
        given = _dim_arg(n, 1, "dim")
        axes: list[Any] = [given] if isinstance(given, int) else list(given) if isinstance(given, (list, tuple)) else []
        if not axes or rank == 0 or not all(isinstance(x, int) for x in axes):
            raise _NotShardable("a reduction over every dimension")
        reduced = {x % rank for x in axes}
        if d in reduced:
            raise _NotShardable("a reduction over the sharded dimension")
        return d if _dim_arg(n, 2, "keepdim", False) else d - sum(1 for x in reduced if x < d)
    if op == "call_function" and tgt in _STACKS:  # a new dimension: every operand sharded alike
        tensors = args[0]
        if not isinstance(tensors, (list, tuple)) or any(t not in ins for t in tensors):
            raise _NotShardable("a stack of sharded and whole values")
        dims = {ins[t] for t in tensors}  # type: ignore[index]
        if len(dims) != 1:
            raise _NotShardable(f"operands sharded on different dimensions {sorted(dims)}")
        d, k = dims.pop(), int(_dim_arg(n, 1, "dim", 0)) % max(len(out or ()), 1)
        return d + 1 if k <= d else d
    if (op == "call_function" and tgt in _SOFTMAX) or method == "softmax":
        d = ins[first]  # type: ignore[index]
        dim = int(_dim_arg(n, 1, "dim", -1))
        if dim % len(out or (0,)) == d:
            raise _NotShardable("a softmax over the sharded dimension")
        return d
    if op == "call_function" and tgt in _SDPA:
        q, k, v = args[:3]
        rest = [a for a in ins if a not in (q, k, v)]
        if rest or any(a not in ins for a in (q, k, v)):
            raise _NotShardable("attention with query, key and value not all sharded")
        dims = {len(_shape(a) or ()) - ins[a] for a in (q, k, v)}  # type: ignore[index]
        if dims != {3}:  # (..., heads, seq, head_dim): the heads
            raise _NotShardable("attention sharded on a dimension other than the heads")
        return len(out or ()) - 3
    if op == "call_function" and tgt in _MATMULS:
        a, b = args[:2]
        sa, sb = _shape(a), _shape(b)
        if a not in ins or b not in ins or sa is None or sb is None or out is None or min(len(sa), len(sb)) < 3:
            raise _NotShardable("a matmul of a sharded and a whole value")
        da, db = len(sa) - ins[a], len(sb) - ins[b]  # type: ignore[index]
        if da != db or da < 3:  # both on the same batch (heads) dimension
            raise _NotShardable("a matmul over the sharded dimension")
        return len(out) - da
    raise _NotShardable(f"{_target_name(n)} is not a recognised op for a sharded value")



def _maybe_tensor(n: fx.Node) -> bool:
    """May ``n`` produce a tensor? From shape-prop's ``meta["val"]`` when recorded, else yes."""
    if "val" not in n.meta:
        return True
    v = n.meta["val"]
    return any(isinstance(x, torch.Tensor) for x in torch.utils._pytree.tree_leaves(v))


@dataclass
class LinearSplit:
    """The linears of one graph that shard over ``tp`` ranks (module docstring).

    ``linears``: every linear over parameters -> (weight FQN, bias FQN or None, input node);
    ``column``: the column-parallel linears; ``row``: each row-parallel linear -> the column
    linears whose shard reaches it; ``excluded``: linear -> why it was made whole (a linear in
    neither ``column`` nor ``row`` nor ``excluded`` reaches no row-parallel linear)."""

    tp: int
    linears: dict[fx.Node, tuple[str, str | None, fx.Node]] = field(default_factory=dict)
    column: set[fx.Node] = field(default_factory=set)
    row: dict[fx.Node, set[fx.Node]] = field(default_factory=dict)
    excluded: dict[fx.Node, str] = field(default_factory=dict)


def split_linears(gm: fx.GraphModule, tp: int, *, replicate: Collection[str] = (),
                  heads: Collection[fx.Node] = (), keep_whole: dict[fx.Node, str] | None = None) -> LinearSplit:
    """The column- and row-parallel linears of ``gm`` over ``tp`` ranks (module docstring).
    ``replicate``: weight FQNs kept whole by request; ``heads``: output layers split by
    vocabulary (neither column nor row); ``keep_whole``: linear nodes kept whole, with why.
    Raises ``IndivisibleError`` naming the node where a recognised pattern's sizes do not
    divide by ``tp``."""
    nodes = list(gm.graph.nodes)
    linears = {n: lin for n in nodes if (lin := _linear(gm, n)) is not None}
    uses: dict[str, int] = {}
    for n in nodes:
        if n.op == "get_attr":
            uses[str(n.target)] = uses.get(str(n.target), 0) + len(n.users)
        elif n.op == "call_module":  # a module called twice: its weight has two roles
            uses[f"{n.target}.weight"] = uses.get(f"{n.target}.weight", 0) + 1
    excluded: dict[fx.Node, str] = {}
    for n, (w, b, _) in linears.items():
        if w in replicate:
            excluded[n] = "kept whole by request (replicate=...)"
        elif uses.get(w, 0) > 1 or (b is not None and uses.get(b, 0) > 1):
            excluded[n] = "its weight is used by another node too"
    for n, why in (keep_whole or {}).items():
        excluded.setdefault(n, why)
    whole = set(excluded) | set(heads)  # neither column- nor row-parallel (the heads: split by vocabulary)
    while True:
        shard: dict[fx.Node, int] = {}  # node -> sharded dimension of its output
        sources: dict[fx.Node, set[fx.Node]] = {}  # node -> the column linears its shard comes from
        column: set[fx.Node] = set()
        row: dict[fx.Node, set[fx.Node]] = {}
        failed: dict[fx.Node, str] = {}
        for n in nodes:
            ins = {a: shard[a] for a in n.all_input_nodes if a in shard}
            if n in linears and n not in whole:
                x = linears[n][2]
                if x in shard:  # a sharded input: row-parallel when it is sharded on the features
                    if shard[x] != len(_shape(x) or (0,)) - 1 or len(ins) != 1:
                        for s in sources[x]:
                            failed.setdefault(s, f"reaches {n.name} sharded on a dimension other than its features")
                    else:
                        row[n] = sources[x]
                    continue
                w_shape = tuple(gm.get_parameter(linears[n][0]).shape)
                if len(w_shape) != 2 or n in excluded:  # not column-parallel (it may still be a row)
                    continue
                column.add(n)
                shard[n], sources[n] = len(_shape(n) or (0, 0)) - 1, {n}
                continue
            if not ins:
                continue
            srcs = set().union(*(sources[a] for a in ins))
            if n.op == "call_function" and n.target in _DROPPED:
                continue
            if n.op != "output" and not _maybe_tensor(n):
                continue  # sizes of a DTensor are the global tensor's: nothing to shard
            if n.op == "call_function" and n.target is operator.getitem and not isinstance(n.args[1], int):
                reason = "an index into a sharded value"
            elif n.op == "output":
                reason = "its output leaves the stage"
            else:
                try:
                    dim = _propagate(n, ins, tp, gm)
                    if dim is None:
                        raise _NotShardable("no sharded dimension")
                    shard[n] = dim
                    sources[n] = srcs
                    continue
                except _NotShardable as e:
                    reason = f"{n.name} ({_target_name(n)}): {e}"
                except _Indivisible as e:
                    names = sorted(linears[s][0] for s in srcs)
                    raise IndivisibleError(
                        f"tensor parallelism over {tp} ranks cannot shard {names}: {e}; choose a tp that divides it, "
                        f"or keep these weights whole with shard_plan(..., replicate=...) (build_stage does not take it yet)") from None
            for s in srcs:
                failed.setdefault(s, reason)
        if not failed:
            break
        excluded.update(failed)
    for n in column:
        w = linears[n][0]
        out_features = gm.get_parameter(w).shape[0]
        if out_features % tp:
            raise IndivisibleError(f"tensor parallelism over {tp} ranks: the column-parallel linear {n.name} "
                                   f"({w}) has {out_features} output features, which tp={tp} does not divide")
    return LinearSplit(tp, linears, column, row, excluded)
