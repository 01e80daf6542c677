"""Finds the regions of a captured graph that tensor parallelism shards, and prices them at a degree T.

A region is Megatron-LM's pattern (Shoeybi et al. 2019, "Megatron-LM", section 3): one or
more *column* linears whose weights are split by output feature, then ops that only carry
that split along (element-wise math, views that keep the feature or head dimension whole
per rank, attention), ending in *row* linears whose weights are split by input feature and
whose partial outputs are summed by one all-reduce. Attention (q/k/v then o) and the MLP
(up/gate then down) are the two regions of a transformer layer. In the forward pass each
region costs one all-reduce of its row linears' output; in the backward pass one
all-reduce of the gradient of its input (the "f" and "g" operators of the paper).

The finder reads only the graph's dataflow and its ops, never module names: a linear whose
weight is a parameter (``aten.linear``, ``nn.Linear`` and ``F.linear`` on the fx route; not
GPT-2's ``Conv1D``, an ``addmm``, which the runtime does not shard) opens a region;
walking its users forward, every op must be one that carries a feature
split through unchanged (``CARRY``), or a row linear taking the split value as its input.
A value that reaches anything else (a reduction such as a norm over the hidden size, the
graph output, an unknown op) makes the region unshardable, and its linears stay
replicated: this errs towards pricing too much, never a sharding that computes the wrong
thing. A degree T is possible for a region when every column's output features, every
row's input features and the head counts of its attention cores divide by T.

``shard(gm, T)`` prices the graph for one rank of a T-way group: the region's FLOPs,
output and saved bytes and parameters divided by T, and the all-reduce bytes each node
adds (forward on row linears, backward on the first column linear of each input).

The vocabulary (``find_vocab``, Megatron-LM's vocabulary-parallel embedding and output
layer, PyTorch's ``RowwiseParallel`` embedding and ``loss_parallel``): a token embedding
(``aten.embedding`` / ``nn.Embedding`` looking up a graph input) splits its table by rows,
each rank looking up the ids in its range and one all-reduce summing the masked rows; an
output layer (a linear widening to more outputs than inputs, whose values reach only the
graph's output and an in-graph cross-entropy, through casts and views that keep the classes
last) splits its weight by output feature, the logits stay split on the class dimension and
the cross-entropy runs on the shards (three all-reduces of one value per token: the max, the
sum of exponentials, the target's logit). The same function decides for the planner (on the
captured graph) and the runtime (on each stage graph), so what is priced is what runs.

What is priced is what runs (``agreed_split``): the regions found here price a split, the
runtime executes the dataflow analysis of ``passes.tp_dataflow`` (``split_linears``, as
DTensor propagates a shard), and both call ``agreed_split``, which keeps a region sharded only
where both agree -- a region whose linears the analysis keeps whole is priced whole, and a
linear the analysis would shard outside every region here is kept whole at run time -- each
with the reason (``Sharded.whole``, ``TensorParallelPlan.replicated``). A fused projection stacked
by output feature (one linear whose output is split or chunked on its sharded dimension into q, k
and v, or gate and up) is whole in both; one laid out per head (GPT-NeoX: viewed as heads x
(3 x head_dim), then chunked on the last dimension) splits as it is. A degree the analysis refuses (a head count T does not divide) is
refused by the planner too (``Sharded.refused``; ``partitioner.tensor_parallel.node_time``
raises it when that degree is priced).

Sequence parallelism (``shard(..., sequence_parallel=True)``; Korthikanti et al. 2022,
"Reducing Activation Recomputation in Large Transformer Models", section 4.2.2): between the
regions the activations are split on the sequence dimension over the group, so each row
linear's all-reduce becomes a reduce-scatter onto the sequence shards and each region's
input is all-gathered before its column linears (backward: the reverse pair). The wire
bytes are the all-reduce's; what changes is that the ops between regions (norms, residual
adds, dropout: every node a row output reaches before the next region, keeping the
sequence dimension) run on S/T tokens and keep 1/T of their activations. A region's input
keeps its whole size: the gathered copy is what its column linears save. The sequence
dimension of a value is the one sized by the symbol ``S`` (``sequence_dim``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Collection, Iterable, Mapping, Sequence

import sympy
from torch import fx, nn

from partitioner.cost_models.cost import SEQ, NodeCost
from partitioner.passes.base import TensorDesc
from partitioner.passes.errors import GraphError
from partitioner.passes.meta import COST, DESC, TP
from partitioner.passes.tp_dataflow import IndivisibleError, LinearSplit, _maybe_tensor, split_linears

__all__ = ["Region", "find_regions", "Vocab", "find_vocab", "Sharded", "shard", "param_divisor", "CARRY",
           "sequence_dim", "Agreed", "agreed_split"]

#: ops (aten packet names, torch function names, Tensor methods) that carry a split of the
#: feature (or head) dimension through unchanged: element-wise math, views that keep the
#: sharded dimension whole per rank, attention over heads, dropout, casts
CARRY = frozenset({
    "view", "reshape", "_unsafe_view", "transpose", "permute", "expand", "unsqueeze", "squeeze", "slice", "select", "flatten",
    "unflatten",
    "contiguous", "clone", "to", "_to_copy", "type_as", "float", "half", "bfloat16", "alias", "t",
    "mul", "add", "sub", "div", "neg", "silu", "gelu", "relu", "tanh", "sigmoid", "exp", "pow", "square", "rsqrt",
    "mean",
    "dropout", "native_dropout", "scaled_dot_product_attention", "softmax", "_softmax", "matmul", "bmm",
    "baddbmm", "masked_fill", "where", "cat", "stack", "split", "split_with_sizes", "chunk", "getitem", "mul_",
    "add_", "_assert_tensor_metadata", "gelu_", "silu_", "relu_", "dropout_", "sdpa", "flash_attention",
})
_ATTENTION = frozenset({"scaled_dot_product_attention", "sdpa", "flash_attention"})


def _op_name(gm: fx.GraphModule, node: fx.Node) -> str:
    """aten.view.default → "view"; torch.nn.functional.silu → "silu"; call_method "view" → "view";
    a call_module → its class name in lower case ("linear" for ``nn.Linear``)."""
    if node.op == "call_module":
        return type(gm.get_submodule(str(node.target))).__name__.lower()
    if node.op == "call_method":
        return str(node.target)
    t = node.target
    packet = getattr(t, "overloadpacket", None)
    if packet is not None:
        return str(getattr(packet, "__name__", packet)).split(".")[-1]
    return str(getattr(t, "__name__", t)).split(".")[-1]


def _is_param(gm: fx.GraphModule, a: Any) -> str | None:
    """The parameter's qualified name when ``a`` reads one (a get_attr of a parameter)."""
    if isinstance(a, fx.Node) and a.op == "get_attr":
        try:
            t = gm.get_parameter(str(a.target))
        except AttributeError:
            return None
        return str(a.target) if isinstance(t, nn.Parameter) else None
    return None


@dataclass(frozen=True)
class _Linear:
    node: fx.Node
    x: fx.Node  # the input the weight multiplies
    weight: str  # parameter's qualified name
    bias: str | None
    out_features: int
    in_features: int


def _linear(gm: fx.GraphModule, node: fx.Node) -> _Linear | None:
    """``node`` as a linear layer with parameter weights, or None."""
    if node.op not in ("call_function", "call_module"):
        return None
    name = _op_name(gm, node)
    if node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), nn.Linear):
        mod = gm.get_submodule(str(node.target))
        x = node.args[0] if node.args else None
        if not isinstance(x, fx.Node):
            return None
        return _Linear(node, x, f"{node.target}.weight", f"{node.target}.bias" if mod.bias is not None else None,
                       int(mod.out_features), int(mod.in_features))  # type: ignore[arg-type]
    args = list(node.args)
    if name == "linear" and len(args) >= 2:
        x, w = args[0], args[1]
        b = args[2] if len(args) > 2 else node.kwargs.get("bias")
        wname = _is_param(gm, w)
        if wname is None or not isinstance(x, fx.Node):
            return None
        shape = gm.get_parameter(wname).shape
        return _Linear(node, x, wname, _is_param(gm, b), int(shape[0]), int(shape[1]))
    # GPT-2's Conv1D (addmm(bias, x, weight), weight stored (in, out)) is not a linear here: the
    # runtime (runtime.tensor_parallel.shard_plan) does not shard it, and its fused q/k/v would
    # need Megatron's interleaved weight layout, so the planner prices it whole too
    return None


@dataclass(frozen=True)
class Region:
    """One shardable pattern: column linears, the ops between, row linears."""

    columns: tuple[fx.Node, ...]
    inner: tuple[fx.Node, ...]
    rows: tuple[fx.Node, ...]
    #: features per linear (column: outputs, row: inputs) and head counts of attention cores:
    #: T must divide each of them
    sizes: tuple[int, ...]
    #: parameters split by T: (qualified name, dim) — 0 for column weights and biases, 1 for row weights
    params: tuple[tuple[str, int], ...]
    #: row biases: added once after the reduction, replicated
    replicated: tuple[str, ...] = ()

    def degrees(self, limit: int) -> list[int]:
        """The degrees up to ``limit`` this region can be sharded to."""
        return [t for t in range(1, limit + 1) if all(s % t == 0 for s in self.sizes)]


def _shape(node: Any) -> tuple[sympy.Expr, ...] | None:
    d = node.meta.get(DESC) if isinstance(node, fx.Node) else None
    return tuple(sympy.sympify(x) for x in d.shape) if isinstance(d, TensorDesc) else None


def _prod(xs: Sequence[sympy.Expr]) -> sympy.Expr:
    return sympy.Mul(*xs) if xs else sympy.Integer(1)


def _dims(node: fx.Node, names: Sequence[str], default: Any = None) -> list[Any]:
    """The node's arguments ``names`` (positional first, then keyword), ``default`` where absent."""
    return [node.args[i] if i < len(node.args) else node.kwargs.get(n, default) for i, n in enumerate(names)]


def _norm(d: Any, rank: int) -> int | None:
    return d % rank if isinstance(d, int) and rank else None


def _carry(gm: fx.GraphModule, u: fx.Node, v: fx.Node, dim: int, split: dict[fx.Node, int],
           linears: dict[fx.Node, Any]) -> int | None:
    """The split dimension of ``u``'s output when its input ``v`` is split along ``dim``, or
    None when ``u`` cannot carry that split (it would mix or reduce the split features)."""
    name = _op_name(gm, u)
    src, out = _shape(v), _shape(u)
    if name in ("getitem", "_assert_tensor_metadata"):
        return dim if out is not None and src is not None and len(out) == len(src) else (None if name != "getitem" else dim)
    if name in ("split", "split_with_sizes", "chunk"):  # tuple outputs: each getitem keeps the dimension
        d = _norm(_dims(u, ("self", "split_size", "dim"), 0)[2], len(src or ()))
        # along the split dimension itself: a fused projection ([q; k; v] or [gate; up] stacked
        # by output feature). A Shard(0) weight would give rank 0 all of q, not its share of
        # each (Megatron interleaves the weight; DTensor has no such layout), so it stays whole
        return dim if src is not None and d is not None and d != dim else None
    if src is None or out is None:
        return None
    if name in ("view", "reshape", "_unsafe_view", "flatten", "unflatten"):
        # the split dim's features, with everything to its right, map to a run of output dims:
        # the split lands on the outermost of them (heads when hidden is viewed as heads x head_dim)
        whole = _prod(src[dim:])
        acc = sympy.Integer(1)
        for e in range(len(out) - 1, -1, -1):
            acc = acc * out[e]
            if out[e] != 1 and sympy.simplify(acc - whole) == 0:
                return e
        return None
    if name in ("transpose",):
        a, b = (_norm(x, len(src)) for x in _dims(u, ("self", "dim0", "dim1"))[1:])
        return b if dim == a else a if dim == b else dim
    if name == "t":
        return 1 - dim if len(src) == 2 else dim
    if name == "permute":
        given = u.args[1] if len(u.args) > 1 else u.kwargs.get("dims", ())
        perm = [_norm(x, len(src)) for x in (given if isinstance(given, (list, tuple)) else ())]
        return perm.index(dim) if dim in perm else None
    if name == "unsqueeze":
        k = _norm(_dims(u, ("self", "dim"))[1], len(out))
        return None if k is None else dim + 1 if k <= dim else dim
    if name == "mean":  # a reduction over other dimensions (Qwen3's per-head RMSNorm over head_dim)
        given, keep = _dims(u, ("self", "dim", "keepdim"), None)[1:3]
        dims = [given] if isinstance(given, int) else list(given) if isinstance(given, (list, tuple)) else None
        reduced = {_norm(x, len(src)) for x in dims} if dims else None
        if not reduced or None in reduced or dim in reduced:
            return None
        return dim if keep else dim - sum(1 for x in reduced if x is not None and x < dim)
    if name == "stack":  # a new dimension (GPT-J's rotary: (-x2, x1) stacked last), the split moves past it
        k = _norm(_dims(u, ("tensors", "dim"), 0)[1], len(out))
        return None if k is None else dim + 1 if k <= dim else dim
    if name == "select":  # one index of another dimension (BLOOM's q, k, v of a per-head fused projection)
        k = _norm(_dims(u, ("self", "dim", "index"))[1], len(src))
        return None if k is None or k == dim else dim - 1 if k < dim else dim
    if name == "squeeze":
        return dim - (len(src) - len(out)) if len(out) < len(src) and src[dim] != 1 else dim
    if name in ("softmax", "_softmax", "cat", "slice"):
        d = _dims(u, ("self", "dim"), 0)[1]
        if name == "cat":
            return dim if _norm(d, len(src)) != dim else None
        return dim if _norm(d, len(src)) != dim else None
    if name in ("matmul", "bmm", "baddbmm"):
        # attention's q @ k^T and p @ v: the split must be a batch dimension (heads)
        lead = len(out) - 2
        off = len(out) - len(src)
        return dim + off if dim + off < lead else None
    if name in _ATTENTION:
        return dim + len(out) - len(src) if dim + len(out) - len(src) < len(out) - 2 else None
    if name == "expand":
        return dim + len(out) - len(src)
    # element-wise: right-aligned broadcasting (whether the other operands agree is checked
    # once the region is whole, ``_consistent``)
    k = dim - len(src)  # from the right
    return len(out) + k if len(out) >= -k else None


def _closure(gm: fx.GraphModule, start: fx.Node, linears: dict[fx.Node, _Linear]
             ) -> tuple[dict[fx.Node, int], set[fx.Node], bool]:
    """Ops a split of ``start``'s output features reaches (through ``CARRY``, with the split
    dimension of each), the row linears that take it as input, and whether it reached
    nothing else."""
    out = _shape(start)
    if out is None:
        return {}, set(), False
    split: dict[fx.Node, int] = {start: len(out) - 1}
    rows: set[fx.Node] = set()
    todo = [start]
    while todo:
        v = todo.pop()
        for u in v.users:
            if u in rows or (u in split and u is not start):
                continue
            if u.op != "output" and not _maybe_tensor(u):
                continue  # a size query (h.shape[-1]): the runtime's DTensor answers the global size
            lin = linears.get(u)
            if lin is not None and lin.x is v:
                sv = _shape(v)
                if sv is None or split[v] != len(sv) - 1:
                    return split, rows, False  # only the contracted (last) dimension may arrive split
                rows.add(u)
                continue
            if u.op not in ("call_function", "call_method", "call_module") or _op_name(gm, u) not in CARRY:
                return split, rows, False
            d = _carry(gm, u, v, split[v], split, linears)
            if d is None:
                return split, rows, False
            split[u] = d
            todo.append(u)
    del split[start]
    return split, rows, True


def _consistent(gm: fx.GraphModule, inner: Iterable[fx.Node], dims: dict[fx.Node, int]) -> bool:
    """Every operand of the region's ops is split the same way, or broadcasts over the split
    (a rotary table, a mask); attention and matrix products take only split operands."""
    for n in inner:
        so = _shape(n)
        if so is None:  # a tuple (split, chunk): its getitems carry the check
            if _op_name(gm, n) in ("split", "split_with_sizes", "chunk"):
                continue
            return False
        k = dims[n] - len(so)
        for a in n.all_input_nodes:
            if a in dims:
                continue
            if _op_name(gm, n) in _ATTENTION | {"matmul", "bmm"} and a in n.args[:2]:
                return False
            sa = _shape(a)
            if sa is not None and len(sa) >= -k and sa[k] != 1 and _op_name(gm, n) not in ("getitem",):
                if _op_name(gm, n) in ("view", "reshape", "expand", "_assert_tensor_metadata", "to", "_to_copy"):
                    continue
                return False
    return True


def find_regions(gm: fx.GraphModule) -> list[Region]:
    """Every shardable region of ``gm``, in graph order (module docstring)."""
    linears = {n: lin for n in gm.graph.nodes if (lin := _linear(gm, n)) is not None}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    closures = {n: _closure(gm, n, linears) for n in linears}
    # linears whose splits meet (q, k and v at attention; gate and up at their product) form one region
    parent = {n: n for n in linears}

    def find(n: fx.Node) -> fx.Node:
        while parent[n] is not n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    owner: dict[fx.Node, fx.Node] = {}
    for n in sorted(linears, key=order.__getitem__):
        reached, ends, ok = closures[n]
        if not ok:  # stays replicated; a region that needs it fails _consistent
            continue
        for v in (*reached, *ends):
            if v in owner:
                parent[find(n)] = find(owner[v])
            else:
                owner[v] = n
    groups: dict[fx.Node, list[fx.Node]] = {}
    for n in linears:
        groups.setdefault(find(n), []).append(n)
    regions: list[Region] = []
    used: set[fx.Node] = set()
    for members in sorted(groups.values(), key=lambda g: min(order[m] for m in g)):
        columns = sorted(members, key=order.__getitem__)
        inner: set[fx.Node] = set().union(*(set(closures[c][0]) for c in columns))
        rows: set[fx.Node] = set().union(*(closures[c][1] for c in columns))
        if not rows or not all(closures[c][2] for c in columns) or rows & set(columns) or used & set(columns):
            continue
        dims: dict[fx.Node, int] = {}
        for c in columns:
            dims.update(closures[c][0])
            if (sc := _shape(c)) is not None:
                dims[c] = len(sc) - 1
        if not _consistent(gm, inner, dims):
            continue
        sizes = [linears[c].out_features for c in columns] + [linears[r].in_features for r in rows]
        for n, d in dims.items():  # every split dimension on the way (heads, kv heads after a view)
            sn = _shape(n)
            if sn is not None and sn[d].is_Integer:
                sizes.append(int(sn[d]))
        params: list[tuple[str, int]] = []
        replicated: list[str] = []
        for c in columns:
            lin = linears[c]
            params.append((lin.weight, 0 if c.op == "call_module" or _op_name(gm, c) == "linear" else 1))
            if lin.bias:
                params.append((lin.bias, 0))
        for r in sorted(rows, key=order.__getitem__):
            lin = linears[r]
            params.append((lin.weight, 1 if r.op == "call_module" or _op_name(gm, r) == "linear" else 0))
            if lin.bias:
                replicated.append(lin.bias)
        used |= rows
        regions.append(Region(tuple(columns), tuple(sorted(inner, key=order.__getitem__)),
                              tuple(sorted(rows, key=order.__getitem__)), tuple(sorted(set(sizes))), tuple(params),
                              tuple(replicated)))
    return regions


@dataclass(frozen=True)
class Agreed:
    """What both finders shard over ``tp`` ranks (``agreed_split``)."""

    #: the regions (``find_regions``) that shard: every column and row linear of each is one the
    #: dataflow analysis shards too
    regions: tuple[Region, ...]
    #: the dataflow analysis with every linear outside ``regions`` kept whole
    split: LinearSplit
    #: weight of a linear one finder would shard that stays whole -> why
    whole: Mapping[str, str] = field(default_factory=dict)


def agreed_split(gm: fx.GraphModule, tp: int, *, regions: Sequence[Region] | None = None,
                 vocab: Vocab | None = None, heads: Iterable[fx.Node] | None = None,
                 replicate: Iterable[str] = ()) -> Agreed:
    """The split of ``gm`` over ``tp`` ranks that the planner prices and the runtime runs (module
    docstring): the regions of ``find_regions`` whose linears the dataflow analysis
    (``tp_dataflow.split_linears``) shards too, and that analysis rerun with every other linear
    kept whole until the two name the same linears. ``vocab``: ``find_vocab(gm).at(tp)`` unless
    given; ``heads``: its output layers (split by vocabulary, never column linears) unless given;
    ``replicate``: weights kept whole by request. Raises ``IndivisibleError`` (a ``GraphError``)
    naming the node where a recognised pattern's sizes do not divide by ``tp``."""
    regions = find_regions(gm) if regions is None else list(regions)
    if heads is None:
        heads = (find_vocab(gm).at(tp) if vocab is None else vocab).heads
    heads, replicate = tuple(heads), tuple(replicate)
    forced: dict[fx.Node, str] = {}
    while True:  # each round keeps more linears whole: it ends
        split = split_linears(gm, tp, replicate=replicate, heads=heads, keep_whole=forced)
        rows = set(split.row)
        kept = [r for r in regions if tp in r.degrees(tp) and set(r.columns) <= split.column and set(r.rows) <= rows]
        covered = {n for r in kept for n in (*r.columns, *r.rows)}
        extra = [n for n in gm.graph.nodes if (n in split.column or n in rows) and n not in covered]
        if not extra:
            break
        for n in extra:
            mine = next((r for r in regions if n in r.columns or n in r.rows), None)
            if mine is None:
                forced[n] = ("kept whole: the planner's region finder does not price it split (no column ... row "
                             "pattern it can follow through this graph's ops)")
            elif tp not in mine.degrees(tp):
                forced[n] = f"kept whole: its region's sizes {list(mine.sizes)} do not all divide by tp={tp}"
            else:
                left = sorted(m.name for m in (*mine.columns, *mine.rows) if m not in split.column and m not in rows)
                forced[n] = f"kept whole: it shares a region with {', '.join(left)}, which stays whole"
    whole: dict[str, str] = {}
    for r in regions:
        if r in kept:
            continue
        for n in (*r.columns, *r.rows):
            lin = split.linears.get(n)
            why = split.excluded.get(n, "its output reaches no row-parallel linear")
            if lin is not None:
                whole[lin[0]] = why
    for n, why in forced.items():
        whole[split.linears[n][0]] = why
    return Agreed(tuple(kept), split, whole)


#: ops a vocabulary-split logits value passes through on its way to the loss or the graph's
#: output, keeping the classes on its last dimension (casts, copies, views that keep that size)
VOCAB_CARRY = frozenset({"view", "reshape", "_unsafe_view", "flatten", "to", "_to_copy", "float", "contiguous",
                         "clone", "type_as", "alias", "_assert_tensor_metadata"})
#: cross-entropy as captured: one op (export keeps ``aten.cross_entropy_loss``; fx keeps the
#: function or the module), with the positions of its arguments
_CROSS_ENTROPY = {"cross_entropy_loss": ("self", "target", "weight", "reduction", "ignore_index", "label_smoothing"),
                  "cross_entropy": ("input", "target", "weight", "size_average", "ignore_index", "reduce",
                                    "reduction", "label_smoothing"),
                  "crossentropyloss": ("input", "target")}


@dataclass(frozen=True)
class Vocab:
    """The vocabulary-parallel parts of a graph (module docstring): every weight here splits
    along dim 0 (rows of the table, output features of the head); T must divide ``rows``."""

    embeddings: tuple[fx.Node, ...] = ()
    heads: tuple[fx.Node, ...] = ()
    #: the cross-entropy ops that take split logits (they run on the shards)
    losses: tuple[fx.Node, ...] = ()
    #: the casts and views between a head and its loss or the output: split on the last dimension
    inner: tuple[fx.Node, ...] = ()
    #: values the graph returns split on the last dimension (gathered when a caller wants them whole)
    outputs: tuple[fx.Node, ...] = ()
    #: parameter -> its vocabulary (rows of the table / output features of the head)
    rows: Mapping[str, int] = field(default_factory=dict, compare=False)
    #: embedding or head node -> its weight
    owner: Mapping[fx.Node, str] = field(default_factory=dict, compare=False)
    #: carry, loss or returned value -> the heads whose logits it carries
    follows: Mapping[fx.Node, frozenset[fx.Node]] = field(default_factory=dict, compare=False)
    #: parameter -> why it stays whole although a node using it looks like a vocabulary part
    whole: Mapping[str, str] = field(default_factory=dict, compare=False)

    @property
    def params(self) -> tuple[str, ...]:
        return tuple(self.rows)

    def at(self, degree: int) -> Vocab:
        """Only the parts whose vocabulary ``degree`` divides; the others join ``whole``, with why."""
        keep = {p for p, v in self.rows.items() if v % degree == 0}
        heads = tuple(n for n in self.heads if self.owner[n] in keep)

        def carried(nodes: tuple[fx.Node, ...]) -> tuple[fx.Node, ...]:
            return tuple(n for n in nodes if self.follows.get(n, frozenset()) & set(heads))

        why = {p: f"its vocabulary of {v} does not divide by tensor_parallel={degree}"
               for p, v in self.rows.items() if p not in keep}
        return Vocab(tuple(n for n in self.embeddings if self.owner[n] in keep), heads, carried(self.losses),
                     carried(self.inner), carried(self.outputs), {p: v for p, v in self.rows.items() if p in keep},
                     self.owner, self.follows, {**self.whole, **why})


def _size(node: Any, dim: int) -> Any:
    """Size ``dim`` of ``node``'s value: from its TensorDesc (the planner's graphs) or its
    ``meta["val"]`` (stage graphs); None when neither says."""
    shape = _any_shape(node)
    return shape[dim] if shape and -len(shape) <= dim < len(shape) else None


def _any_shape(node: Any) -> tuple[Any, ...] | None:
    shape: tuple[Any, ...] | None = _shape(node)
    if shape is None and isinstance(node, fx.Node):
        v = node.meta.get("val")
        shape = tuple(getattr(v, "shape")) if hasattr(v, "shape") else None
    return shape


def _rank(node: Any) -> int | None:
    shape = _any_shape(node)
    return None if shape is None else len(shape)


def _embedding(gm: fx.GraphModule, node: fx.Node) -> tuple[str, fx.Node] | None:
    """(table, ids) when ``node`` looks a token up in a parameter table with nothing that
    needs the whole table (no max_norm, scale_grad_by_freq or sparse gradients)."""
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        ids = node.args[0] if node.args else None
        ok = (isinstance(mod, nn.Embedding) and mod.max_norm is None and not mod.scale_grad_by_freq
              and not mod.sparse)
        return (f"{node.target}.weight", ids) if ok and isinstance(ids, fx.Node) else None
    if node.op != "call_function" or _op_name(gm, node) != "embedding":
        return None
    args = list(node.args)
    if len(args) >= 2 and _is_param(gm, args[0]) and isinstance(args[1], fx.Node):  # aten: (weight, ids, ...)
        extra = _dims(node, ("weight", "indices", "padding_idx", "scale_grad_by_freq", "sparse"), False)[3:]
        return (str(args[0].target), args[1]) if not any(extra) else None  # type: ignore[union-attr]
    if len(args) >= 2 and _is_param(gm, args[1]) and isinstance(args[0], fx.Node):  # F.embedding(ids, weight, ...)
        extra = _dims(node, ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq",
                             "sparse"), None)
        return (str(args[1].target), args[0]) if not (extra[3] is not None or extra[5] or extra[6]) else None  # type: ignore[union-attr]
    return None


def _logits_path(gm: fx.GraphModule, head: fx.Node, vocab: int, outputs: bool
                 ) -> tuple[list[fx.Node], list[fx.Node], list[fx.Node]] | None:
    """(carries, losses, values returned) that the head's logits reach, split on the classes;
    None when they reach anything else. ``outputs``: whether the graph's output is the
    model's (a stage graph's output going to the next stage must be whole)."""
    inner: list[fx.Node] = []
    losses: list[fx.Node] = []
    returned: list[fx.Node] = []
    todo, seen = [head], {head}
    while todo:
        v = todo.pop()
        for u in v.users:
            if u in seen:
                continue
            name = _op_name(gm, u)
            if u.op == "output":
                if not outputs:
                    return None
                returned.append(v)
                continue
            if name in _CROSS_ENTROPY:
                given = _dims(u, _CROSS_ENTROPY[name], None)
                smoothing = given[-1] if name != "crossentropyloss" else None
                if (u.args[0] is not v or _rank(v) != 2 or given[2] is not None or smoothing not in (None, 0, 0.0)):
                    return None  # classes not on dim 1 of (tokens, classes), class weights, label smoothing
                if name == "crossentropyloss":
                    mod = gm.get_submodule(str(u.target))
                    if getattr(mod, "weight", None) is not None or float(getattr(mod, "label_smoothing", 0.0)):
                        return None
                seen.add(u)
                losses.append(u)
                continue
            if u.op not in ("call_function", "call_method") or name not in VOCAB_CARRY:
                return None
            last = _size(u, -1)
            if name != "_assert_tensor_metadata" and (last is None or sympy.simplify(sympy.sympify(last) - vocab) != 0):
                return None  # a view that moves the classes off the last dimension
            seen.add(u)
            inner.append(u)
            todo.append(u)
    return (inner, losses, returned) if losses or returned else None


def _from_input(gm: fx.GraphModule, ids: fx.Node, inputs: Collection[str] | None = None) -> bool:
    """Whether ``ids`` is an input of the graph, perhaps viewed (GPT-2 flattens its ids):
    token ids, not positions made inside the model. ``inputs``: the placeholders that are the
    model's inputs (a later stage's other placeholders are values made by an earlier stage,
    such as OPT's positions); None: every placeholder."""
    while ids.op != "placeholder":
        if ids.op not in ("call_function", "call_method") or _op_name(gm, ids) not in VOCAB_CARRY:
            return False
        first = ids.args[0] if ids.args else None
        if not isinstance(first, fx.Node):
            return False
        ids = first
    return inputs is None or ids.name in inputs


def find_vocab(gm: fx.GraphModule, *, model_outputs: bool = True, model_inputs: Collection[str] | None = None
               ) -> Vocab:
    """The token embeddings and the output layers of ``gm`` that split by vocabulary (module
    docstring), at any degree; ``Vocab.at(T)`` keeps those T divides. ``model_outputs``: the
    graph's output is the model's (False for a stage graph that is not the last: its
    outputs go to the next stage whole, so no head there keeps its logits split).
    ``model_inputs``: the names of the placeholders that are the model's inputs (a stage
    graph's others come from earlier stages, so a lookup of them is not of token ids, as on the
    captured graph); None: every placeholder."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    uses: dict[str, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            uses.setdefault(str(n.target), []).extend(n.users)
        elif n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), (nn.Linear, nn.Embedding)):
            uses.setdefault(f"{n.target}.weight", []).append(n)
    rows: dict[str, int] = {}
    owner: dict[fx.Node, str] = {}
    follows: dict[fx.Node, set[fx.Node]] = {}
    found: dict[fx.Node, tuple[list[fx.Node], list[fx.Node], list[fx.Node]]] = {}
    embeddings, heads = [], []
    for n in gm.graph.nodes:
        emb = _embedding(gm, n)
        if emb is not None and _from_input(gm, emb[1], model_inputs):  # token ids: an input of the model
            w = gm.get_parameter(emb[0])
            owner[n], rows[emb[0]] = emb[0], int(w.shape[0])
            embeddings.append(n)
            continue
        lin = _linear(gm, n)
        if lin is None or (n.op == "call_function" and _op_name(gm, n) != "linear") or lin.out_features <= lin.in_features:
            continue  # GPT-2's Conv1D (addmm) is an inner layer, never the output layer
        path = _logits_path(gm, n, lin.out_features, model_outputs)
        if path is None:
            continue
        found[n] = path
        owner[n], rows[lin.weight] = lin.weight, lin.out_features
        heads.append(n)
    whole: dict[str, str] = {}
    for p in list(rows):  # a table shared with anything but a lookup or an output layer stays whole
        others = [u.name for u in uses.get(p, []) if u not in owner]
        if others:
            whole[p] = f"it is also used by {', '.join(others)}"
        elif len({rows[p]} | {int(gm.get_parameter(p).shape[0])}) > 1:
            whole[p] = "its uses disagree on the vocabulary"
    same: dict[int, list[str]] = {}  # a weight tied under several names splits under all or none
    for name in uses:
        try:
            same.setdefault(id(gm.get_parameter(name)), []).append(name)
        except AttributeError:
            continue
    for names in same.values():
        split = [p for p in names if p in rows and p not in whole]
        if split and len(split) < len(names):
            for p in split:
                whole[p] = f"it is tied to {', '.join(q for q in names if q not in split)}, which stays whole"
    for p in whole:
        rows.pop(p, None)
    embeddings = [n for n in embeddings if owner[n] in rows]
    heads = [n for n in heads if owner[n] in rows]
    inner: set[fx.Node] = set()
    losses: set[fx.Node] = set()
    returned: set[fx.Node] = set()
    for h in heads:
        i, lo, r = found[h]
        for v in (*i, *lo, *r):
            follows.setdefault(v, set()).add(h)
        inner |= set(i)
        losses |= set(lo)
        returned |= set(r)

    def ordered(xs: Iterable[fx.Node]) -> tuple[fx.Node, ...]:
        return tuple(sorted(xs, key=order.__getitem__))

    return Vocab(ordered(embeddings), ordered(heads), ordered(losses), ordered(inner), ordered(returned), rows,
                 owner, {k: frozenset(v) for k, v in follows.items()}, whole)


@dataclass
class Sharded:
    """What one rank of a ``degree``-way tensor-parallel group holds and does, per node."""

    degree: int
    regions: list[Region]
    #: per node name: the cost on one rank (only nodes that change are listed)
    costs: dict[str, NodeCost] = field(default_factory=dict)
    #: per parameter: the divisor of its size on one rank
    param_divisor: dict[str, int] = field(default_factory=dict)
    #: per node name: bytes all-reduced over the group in the forward / backward pass
    fwd_allreduce: dict[str, sympy.Expr] = field(default_factory=dict)
    bwd_allreduce: dict[str, sympy.Expr] = field(default_factory=dict)
    #: regions left replicated because the degree does not divide their sizes
    skipped: list[Region] = field(default_factory=list)
    #: weight of a linear left whole although a finder would shard it -> why (``agreed_split``:
    #: the runtime keeps it whole too)
    whole: dict[str, str] = field(default_factory=dict)
    #: why the runtime refuses this degree (a head count it does not divide), else None: the
    #: planner refuses it too (``partitioner.tensor_parallel.node_time``)
    refused: str | None = None
    #: the embedding, output layer and loss split by vocabulary at this degree
    vocab: Vocab = field(default_factory=Vocab)
    #: sequence parallelism: per node name, the bytes (of the whole tensor) all-gathered or
    #: reduce-scattered over the group in the forward / backward pass (each costs half an
    #: all-reduce); the nodes priced at S/T tokens between the regions; per row linear, the
    #: dimension its output is reduce-scattered on
    sequence_parallel: bool = False
    fwd_gather_scatter: dict[str, sympy.Expr] = field(default_factory=dict)
    bwd_gather_scatter: dict[str, sympy.Expr] = field(default_factory=dict)
    seq_sharded: tuple[str, ...] = ()
    seq_dims: dict[str, int] = field(default_factory=dict)


def _scaled(cost: NodeCost, t: int, *, outputs: bool, shape: tuple[sympy.Expr, ...] = ()) -> NodeCost:
    inv = sympy.Rational(1, t)
    out = dict(fwd_flops=cost.fwd_flops * inv, bwd_flops=cost.bwd_flops * inv, fwd_flops_fc=cost.fwd_flops_fc * inv,
               bwd_flops_fc=cost.bwd_flops_fc * inv, param_bytes=cost.param_bytes * inv,
               fwd_bytes_moved=cost.fwd_bytes_moved * inv, saved_internal=cost.saved_internal * inv,
               saved_bytes=cost.saved_bytes * inv)
    if outputs:
        out.update(output_bytes=cost.output_bytes * inv, out_storage=tuple(s * inv for s in cost.out_storage))
    if shape:
        out.update(shape=shape)
    return replace(cost, **out)


def _bytes(node: fx.Node) -> sympy.Expr:
    d = node.meta.get(DESC)
    return d.nbytes() if isinstance(d, TensorDesc) else sympy.Integer(0)


def _gemm_shape(node: fx.Node, lin: _Linear, t: int, column: bool) -> tuple[sympy.Expr, ...]:
    x, out = lin.x.meta.get(DESC), node.meta.get(DESC)
    if not (isinstance(x, TensorDesc) and isinstance(out, TensorDesc) and x.shape and out.shape):
        return ()
    n, k = out.shape[-1], x.shape[-1]
    m = out.numel() / n
    return (m, k, n / t) if column else (m, k / t, n)


def sequence_dim(node: fx.Node) -> int | None:
    """The sequence dimension of ``node``'s value: the one whose size is a multiple of the
    symbol ``S`` (never the last, the features); None when no dimension is, or more than one."""
    shape = _shape(node)
    if not shape:
        return None
    dims = [d for d, s in enumerate(shape[:-1]) if SEQ in s.free_symbols]
    return dims[0] if len(dims) == 1 else None


def shard(gm: fx.GraphModule, degree: int, regions: Sequence[Region] | None = None,
          vocab: Vocab | None = None, *, sequence_parallel: bool = False) -> Sharded:
    """One rank's share of ``gm`` under ``degree``-way tensor parallelism (module docstring);
    ``sequence_parallel``: the activations between the regions split on the sequence too
    (raises ``GraphError`` naming a row linear whose output has no sequence dimension)."""
    regions = find_regions(gm) if regions is None else list(regions)
    out = Sharded(degree, [], sequence_parallel=sequence_parallel and degree > 1)
    if degree <= 1:
        return out
    _shard_vocab(gm, out, (find_vocab(gm) if vocab is None else vocab).at(degree))
    linears = {n: lin for r in regions for n in (*r.columns, *r.rows) if (lin := _linear(gm, n)) is not None}
    try:  # price only what the runtime runs: the regions both finders shard
        agreed = agreed_split(gm, degree, regions=regions, vocab=out.vocab)
    except IndivisibleError as e:
        out.refused, out.skipped = str(e), list(regions)
        return out
    out.whole = dict(agreed.whole)
    for r in regions:
        if degree not in r.degrees(degree):
            out.skipped.append(r)
            continue
        if r not in agreed.regions:
            continue
        out.regions.append(r)
        for name, _dim in r.params:
            out.param_divisor[name] = degree
        entries: dict[fx.Node, fx.Node] = {}
        for c in r.columns:
            cost = c.meta.get(COST, NodeCost())
            out.costs[c.name] = _scaled(cost, degree, outputs=True, shape=_gemm_shape(c, linears[c], degree, True))
            entries.setdefault(linears[c].x, c)
        for n in r.inner:
            out.costs[n.name] = _scaled(n.meta.get(COST, NodeCost()), degree, outputs=True)
        for w in r.rows:
            cost = w.meta.get(COST, NodeCost())
            out.costs[w.name] = _scaled(cost, degree, outputs=False, shape=_gemm_shape(w, linears[w], degree, False))
            if out.sequence_parallel:  # reduce-scattered onto the sequence shards; its gradient all-gathered
                d = sequence_dim(w)
                if d is None:
                    raise GraphError(f"sequence parallelism: the output of the row-parallel linear {w.name} (shape "
                                     f"{_shape(w)}) has no dimension sized by the sequence S, so it cannot be split "
                                     "on the sequence; name the inputs' sequence dimension (partition(seq_dims=...)) "
                                     "or use sequence_parallel=False")
                out.seq_dims[w.name] = d
                out.fwd_gather_scatter[w.name] = out.fwd_gather_scatter.get(w.name, sympy.Integer(0)) + _bytes(w)
                out.bwd_gather_scatter[w.name] = out.bwd_gather_scatter.get(w.name, sympy.Integer(0)) + _bytes(w)
            else:
                out.fwd_allreduce[w.name] = out.fwd_allreduce.get(w.name, sympy.Integer(0)) + _bytes(w)
        for x, c in entries.items():  # the gradient of each input the region reads, summed over the group
            if out.sequence_parallel:  # all-gathered from the sequence shards; its gradient reduce-scattered
                out.fwd_gather_scatter[c.name] = out.fwd_gather_scatter.get(c.name, sympy.Integer(0)) + _bytes(x)
                out.bwd_gather_scatter[c.name] = out.bwd_gather_scatter.get(c.name, sympy.Integer(0)) + _bytes(x)
            else:
                out.bwd_allreduce[c.name] = out.bwd_allreduce.get(c.name, sympy.Integer(0)) + _bytes(x)
    if out.sequence_parallel:
        _shard_sequence(gm, out)
        _whole_entries(gm, out)
    return out


def _whole_entries(gm: fx.GraphModule, out: Sharded) -> None:
    """Sequence parallelism: a region (or output layer) whose input no row output has split
    yet -- the first region after the embedding -- reads a whole value, so the runtime
    gathers nothing there and all-reduces its input's gradient in backward, as without
    sequence parallelism (``runtime.tensor_parallel.gather_sequence``): priced so, in place of
    the all-gather / reduce-scatter pair."""
    split = set(out.seq_sharded) | {w.name for r in out.regions for w in r.rows}
    pairs: list[tuple[fx.Node, fx.Node]] = []  # (an input read, the node its collectives are priced on), as shard
    for r in out.regions:
        firsts: dict[fx.Node, fx.Node] = {}
        for c in r.columns:
            lin = _linear(gm, c)
            if lin is not None:
                firsts.setdefault(lin.x, c)
        pairs.extend(firsts.items())
    for h in out.vocab.heads:
        lin = _linear(gm, h)
        if lin is not None:
            pairs.append((lin.x, h))
    for x, c in pairs:
        if x.name in split or c.name not in out.fwd_gather_scatter:
            continue
        b = _bytes(x)
        for table in (out.fwd_gather_scatter, out.bwd_gather_scatter):
            left = table[c.name] - b
            if left == 0:
                del table[c.name]
            else:
                table[c.name] = left
        out.bwd_allreduce[c.name] = out.bwd_allreduce.get(c.name, sympy.Integer(0)) + b


def _shard_sequence(gm: fx.GraphModule, out: Sharded) -> None:
    """The nodes between the regions that sequence parallelism runs on S/T tokens: every node
    outside the regions and the vocabulary parts that a row linear's output reaches, through
    nodes that keep a sequence dimension, before a region's column linear gathers it. Their
    FLOPs, bytes moved and activations are divided by T (their parameters, norm weights,
    stay whole); a region's input keeps its whole output size, since the gathered copy is
    what the column linears save for backward."""
    t = out.degree
    inv = sympy.Rational(1, t)
    parts: set[fx.Node] = set()
    entries: set[fx.Node] = set()
    linears = {}
    for r in out.regions:
        parts |= {*r.columns, *r.inner, *r.rows}
        for c in r.columns:
            lin = _linear(gm, c)
            if lin is not None:
                entries.add(lin.x)
                linears[c] = lin
    v = out.vocab
    parts |= {*v.embeddings, *v.heads, *v.inner, *v.losses}
    for h in v.heads:  # the output layer gathers its input as the column linears do
        lin = _linear(gm, h)
        if lin is not None:
            entries.add(lin.x)
    sharded: set[fx.Node] = {n for r in out.regions for n in r.rows}
    names: list[str] = []
    for n in gm.graph.nodes:
        if n in parts or n.op not in ("call_function", "call_method", "call_module") or sequence_dim(n) is None:
            continue
        if not any(a in sharded for a in n.all_input_nodes):
            continue
        sharded.add(n)
        names.append(n.name)
        cost = n.meta.get(COST, NodeCost())
        scaled = dict(fwd_flops=cost.fwd_flops * inv, bwd_flops=cost.bwd_flops * inv,
                      fwd_flops_fc=cost.fwd_flops_fc * inv, bwd_flops_fc=cost.bwd_flops_fc * inv,
                      fwd_bytes_moved=cost.fwd_bytes_moved * inv, saved_internal=cost.saved_internal * inv,
                      saved_bytes=cost.saved_bytes * inv)
        if n not in entries:
            scaled.update(output_bytes=cost.output_bytes * inv, out_storage=tuple(s * inv for s in cost.out_storage))
        out.costs[n.name] = replace(cost, **scaled)
    out.seq_sharded = tuple(names)


def _shard_vocab(gm: fx.GraphModule, out: Sharded, vocab: Vocab) -> None:
    """The vocabulary's share of one rank: the table's and the head's weights, the head's
    FLOPs and logits, the loss's work on the logits divided by T; all-reduced: each lookup's
    output (forward), each head's input gradient (backward) and, per token, three fp32
    values of each cross-entropy (the max, the sum of exponentials, the target's logit),
    priced here as one all-reduce of their bytes."""
    t = out.degree
    inv = sympy.Rational(1, t)
    out.vocab = vocab
    for p in vocab.params:
        out.param_divisor[p] = t
    for n in vocab.embeddings:  # the lookup writes whole rows: only the table and its gradient split
        cost = n.meta.get(COST, NodeCost())
        out.costs[n.name] = replace(cost, param_bytes=cost.param_bytes * inv, bwd_flops=cost.bwd_flops * inv,
                                    bwd_flops_fc=cost.bwd_flops_fc * inv)
        out.fwd_allreduce[n.name] = out.fwd_allreduce.get(n.name, sympy.Integer(0)) + _bytes(n)
    for h in vocab.heads:
        lin = _linear(gm, h)
        assert lin is not None
        out.costs[h.name] = _scaled(h.meta.get(COST, NodeCost()), t, outputs=True, shape=_gemm_shape(h, lin, t, True))
        if out.sequence_parallel:  # its input gathered from the sequence shards, as a region's
            out.fwd_gather_scatter[h.name] = out.fwd_gather_scatter.get(h.name, sympy.Integer(0)) + _bytes(lin.x)
            out.bwd_gather_scatter[h.name] = out.bwd_gather_scatter.get(h.name, sympy.Integer(0)) + _bytes(lin.x)
        else:
            out.bwd_allreduce[h.name] = out.bwd_allreduce.get(h.name, sympy.Integer(0)) + _bytes(lin.x)
    for n in vocab.inner:
        out.costs[n.name] = _scaled(n.meta.get(COST, NodeCost()), t, outputs=True)
    for n in vocab.losses:
        out.costs[n.name] = _scaled(n.meta.get(COST, NodeCost()), t, outputs=False)
        tokens = _size(n.args[0], 0)
        if tokens is not None:
            out.fwd_allreduce[n.name] = out.fwd_allreduce.get(n.name, sympy.Integer(0)) + 3 * 4 * sympy.sympify(tokens)


def param_divisor(gm: fx.GraphModule) -> dict[str, int]:
    """Per parameter name: how many ranks split it in ``gm`` when ``gm`` is one
    tensor-parallel rank's view (``gm.meta["pp.tp"]``); empty otherwise."""
    sharded = gm.meta.get(TP)
    return sharded.param_divisor if isinstance(sharded, Sharded) else {}
