"""Memory of a stage as a training run holds it: static bytes, activations, recomputation.

Static memory of a stage is every parameter and buffer it uses, counted once per rank
(a weight tied across two stages is held by both ranks), at the bytes per parameter of
the precision and optimizer (``bytes_per_param``).

Activations are *storages*, not node outputs. ``annotate`` records, per node, which of
its input and output storages its backward keeps (``NodeCost.saved_refs``), which output
shares an input's storage (a view, a getitem: ``out_alias``) and what it keeps privately
(``saved_internal``). Here each value is resolved to the storage it lives in (its
*root*: the node that allocated it), so a stage keeps each root once however many of
its nodes save it, a received boundary tensor counts once, and parameters never count.

Recomputation (``recompute=``) changes what a stage keeps:

- ``"full"``: every repeated block in the stage (a transformer layer: the instances of
  ``blocks``, by default the longest run of ``<path>.<int>`` module instances) runs under
  ``torch.utils.checkpoint``: the stage keeps each block's inputs; the backward re-runs
  one block at a time, so one block's activations are held on top (the *transient*).
  Nodes outside blocks (embeddings, the head) keep what they keep without recompute.
- ``"selective"``: only the attention cores (SDPA nodes) are checkpointed, as Megatron's
  selective recomputation: they keep their inputs; their outputs and internals go. A
  grouped-query K/V repeat the capture made just before the core (``reshape(expand(kv))``,
  ``repeat_kv``) is checkpointed with it, so the core keeps the unrepeated K/V, not copies
  ``n_heads / n_kv_heads`` times larger.
- ``"selective-op"``: torchtitan's op-level selective activation checkpointing
  (``selective_ac_option = "op"``): every repeated block runs under ``torch.utils.checkpoint``
  with a ``create_selective_checkpoint_contexts`` policy that keeps the outputs of the
  attention kernels and of every other ``aten.mm`` (the 1st, 3rd, ... of the region) and
  recomputes everything else. A block keeps its inputs, those outputs and the attention
  kernel's log-sum-exp; the backward re-runs the rest of one block at a time (the transient).
  Only the recomputed nodes pay their forward again.

On top of what is kept, one micro-batch's forward or backward holds a *working set* for a
while: storages alive between their producer and last user but not kept (the loss's fp32
logits), the gradients alive at a node, the weight gradients it makes before they are
accumulated, the gradient of what it keeps privately, and the recompute transient
(``Activations.working``). A stage's peak is its static bytes, its in-flight micro-batches'
kept bytes and the largest working set over the stage (one micro-batch's at a time).
``measure_peak`` measures the peak of live storages on the CPU to check it.

The solver needs costs that add up position by position; a stage's real memory does not
(a storage saved on both sides of a cut is held by both ranks). ``Activations.arrays``
gives the additive form (each root charged to the first position that keeps it); the
planner checks every chosen stage with the exact ``stage_saved`` and re-solves with a
tighter capacity where the two differ (see ``partitioner.api``).
"""

from __future__ import annotations

import fnmatch
import itertools
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import sympy
import torch
from torch import fx
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from partitioner.cost_models.cost import ZERO, NodeCost
from partitioner.options import OPTIMIZER_STATES, PRECISIONS, RECOMPUTE  # re-exported: torch-free tables
from partitioner.passes import recompute
from partitioner.passes.annotate import tensor_users
from partitioner.passes.base import TensorDesc
from partitioner.passes.meta import COST, DESC, MODULE
from partitioner.passes.tensor_parallel import param_divisor

__all__ = [
    "PRECISIONS", "RECOMPUTE", "Activations", "bytes_per_param", "compute_dtype", "default_precision",
    "find_blocks", "optimizer_copies", "fsdp_units", "fsdp_unit_of", "fsdp_spans", "block_of",
    "fsdp_role_spans", "fsdp_unit_at", "measure_peak",
]

Root = tuple[str, int]  # (node that allocated the storage, tensor leaf index)


def optimizer_copies(optimizer: str) -> int:
    return OPTIMIZER_STATES[optimizer]


def bytes_per_param(precision: str, optimizer: str) -> int:
    """Bytes a training run keeps per parameter: weight + gradient + optimizer state.

    Mixed precision (the ZeRO paper's accounting, Rajbhandari et al. 2020, section 3.1):
    2-byte weights and gradients, and, when an optimizer updates them, an fp32 master copy
    (4) and fp32 state (4 per copy): Adam 2 + 2 + 4 + 8 = 16 bytes. ``optimizer="none"``
    keeps weights and gradients only (no update step, so no master copy).
    """
    width, master, state = PRECISIONS[precision]
    copies = OPTIMIZER_STATES[optimizer]
    updates = optimizer != "none"
    return 2 * width + (4 if master and updates else 0) + copies * state


def block_of(path: str) -> str | None:
    """The repeated block a module or attribute path lies in: the shortest prefix ending in a
    list index (``transformer.h.0`` for ``transformer.h.0.attn.c_attn``), None outside blocks."""
    parts = path.split(".")
    cut = next((i for i, part in enumerate(parts[:-1]) if part.isdigit()), None)
    return None if cut is None else ".".join(parts[:cut + 1])


def fsdp_spans(gm: torch.nn.Module) -> dict[str, list[fx.Node]]:
    """The blocks a graph reads by ``get_attr`` (the ``torch.export`` route) that can be their
    own FSDP unit, each with the nodes ``partitioner.runtime.outline`` moves into one call of
    the block: every node from the first to the last that uses one of the block's attributes
    (its span in graph order), the block's own ``get_attr`` nodes, but not other attributes
    read inside the span (they become inputs of the call). A block needs a parameter read by
    ``get_attr``; it keeps no unit of its own (it stays in the module's unit) when one of its
    parameters is registered twice (a weight shared with another module), when its span
    overlaps another block's or calls a module outside the block, or when the graph returns
    one of its attributes. In graph order."""
    graph = getattr(gm, "graph", None)
    if graph is None:
        return {}
    counts: dict[int, int] = {}
    for _, p in gm.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    nodes = list(graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    reads: dict[str, list[fx.Node]] = {}
    owned: dict[str, bool] = {}  # block -> whether a parameter of it is read by get_attr
    for n in nodes:
        if n.op not in ("get_attr", "call_module"):
            continue
        block = block_of(str(n.target))
        if block is None:
            continue
        reads.setdefault(block, []).append(n)
        if n.op == "get_attr" and isinstance(_attr(gm, str(n.target)), torch.nn.Parameter):
            owned[block] = True
    spans: dict[str, tuple[int, int]] = {}
    spoiled: set[str] = set()
    for block, rs in reads.items():
        if not owned.get(block):
            continue
        uses = [u for r in rs for u in r.users] + [r for r in rs if r.op == "call_module"]
        if not uses:
            continue
        spans[block] = (min(pos[u] for u in uses), max(pos[u] for u in uses))
        params = gm.get_submodule(block).parameters()
        if any(u.op == "output" for u in uses) or any(counts.get(id(p), 0) > 1 for p in params):
            spoiled.add(block)
    order = sorted(spans, key=lambda b: spans[b])
    for a, b in zip(order, order[1:]):  # spans overlapping another block's: neither is a unit
        if spans[b][0] <= spans[a][1]:
            spoiled.update((a, b))
    out: dict[str, list[fx.Node]] = {}
    for block in order:
        if block in spoiled:
            continue
        first, last = spans[block]
        inside = [n for n in nodes[first:last + 1] if n.op not in ("placeholder", "output", "get_attr")]
        if any(n.op == "call_module" and block_of(str(n.target)) != block for n in inside):
            continue  # a module outside the block cannot be handed to the block's call
        own = [r for r in reads[block] if r.op == "get_attr"]
        out[block] = sorted({*inside, *own}, key=pos.__getitem__)
    return out


def _attr(gm: torch.nn.Module, target: str) -> Any:
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name, None)


_EMBEDDING = torch.ops.aten.embedding.default
_LINEAR = torch.ops.aten.linear.default


def _outlined_op(mod: torch.nn.Module) -> Any:
    """The one operation of a module ``runtime.outline`` made of an embedding's or the head's
    span (a ``GraphModule`` running a single ``call_function``), else None."""
    if not isinstance(mod, fx.GraphModule):
        return None
    ops = [n for n in mod.graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
    return ops[0].target if len(ops) == 1 and ops[0].op == "call_function" else None


@dataclass(frozen=True)
class _Role:
    """An embedding or output-head read that can be an FSDP unit of its own."""

    kind: str  # "embed" or "head"
    path: str  # the module holding the weights (the unit's module once outlined)
    node: fx.Node  # the call_module, or the aten.embedding / aten.linear reading them by get_attr


def _roles(gm: torch.nn.Module, strict: bool = True) -> list[_Role]:
    """The embeddings and the output head of a graph that are FSDP units of their own, in graph
    order (``fsdp_units``). An embedding: a module outside the repeated blocks the graph calls
    and that is an ``nn.Embedding`` (``torch.fx`` route), or whose weight a get_attr hands
    ``aten.embedding`` (``torch.export`` route). The head: the last linear of the graph (an
    ``nn.Linear`` call, or ``aten.linear`` on get_attr weights of one module), after every
    block, outside them. Either is refused when its module is read anywhere else in the graph,
    called twice, or lies inside a block's span; on the export route also when the module holds
    a tensor the operation does not read (outlining keeps only what the span reads). ``strict``
    (what runs): also when one of its parameters is registered twice (a weight tied within the
    graph: it stays in the stage's unit). Not strict (the planner's per-position view,
    ``fsdp_unit_at``): reads by another embedding or head are allowed, for the stages that hold
    only one of them."""
    graph = getattr(gm, "graph", None)
    if graph is None:
        return []
    nodes = list(graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    spans = fsdp_spans(gm)
    inside = {n for ns in spans.values() for n in ns}
    last_block = -1
    readers: dict[str, list[fx.Node]] = {}
    for n in nodes:
        if n.op not in ("get_attr", "call_module"):
            continue
        target = str(n.target)
        if block_of(target) is not None:
            last_block = max([last_block, pos[n], *(pos[u] for u in n.users)])
            continue
        owner = target if n.op == "call_module" else target.rpartition(".")[0]
        while owner:  # every module above the attribute reads it
            readers.setdefault(owner, []).append(n)
            owner = owner.rpartition(".")[0]
    found: list[_Role] = []
    for n in nodes:
        if n in inside:
            continue
        kind, path = "", ""
        if n.op == "call_module":
            path = str(n.target)
            if block_of(path) is not None:
                continue
            mod = gm.get_submodule(path)
            op = _outlined_op(mod)
            kind = "embed" if isinstance(mod, torch.nn.Embedding) or op is _EMBEDDING else \
                "head" if isinstance(mod, torch.nn.Linear) or op is _LINEAR else ""
        elif n.op == "call_function" and n.target in (_EMBEDDING, _LINEAR):
            w = n.args[0] if n.target is _EMBEDDING else n.args[1]
            attrs = [a for a in n.all_input_nodes if a.op == "get_attr"]
            if not isinstance(w, fx.Node) or w.op != "get_attr" or block_of(str(w.target)) is not None:
                continue
            path = str(w.target).rpartition(".")[0]
            if not path or any(str(a.target).rpartition(".")[0] != path for a in attrs):
                continue
            held = {f"{path}.{k}" for k, _ in gm.get_submodule(path).named_parameters()}
            held |= {f"{path}.{k}" for k, _ in gm.get_submodule(path).named_buffers()}
            if held - {str(a.target) for a in attrs}:
                continue
            kind = "embed" if n.target is _EMBEDDING else "head"
        if kind:
            found.append(_Role(kind, path, n))
    # one tensor-parallel rank's view (partitioner.tensor_parallel.view): an embedding split by
    # vocabulary runs as runtime.tensor_parallel's embedding_on_shards, no aten.embedding: the stage's unit
    divisor = param_divisor(gm) if isinstance(gm, fx.GraphModule) else {}
    found = [r for r in found if r.kind != "embed" or not any(
        divisor.get(f"{r.path}.{k}", 1) > 1 for k, _ in gm.get_submodule(r.path).named_parameters())]
    roles = {id(r.node) for r in found}
    counts: dict[int, int] = {}
    for _, p in gm.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1

    def alone(r: _Role) -> bool:
        params = list(gm.get_submodule(r.path).parameters())
        if not params or (strict and any(counts.get(id(p), 0) > 1 for p in params)):
            return False
        for x in readers.get(r.path, []):
            if x.op == "call_module" and x is not r.node:
                return False
            if x.op == "get_attr" and not all(u is r.node or (not strict and id(u) in roles) for u in x.users):
                return False
        return True

    heads = [r for r in found if r.kind == "head"]
    head = heads[-1] if heads and pos[heads[-1].node] > last_block and alone(heads[-1]) else None
    return [r for r in found if (r.kind == "embed" and alone(r)) or r is head]


def _role_units(roles: Sequence[_Role]) -> list[tuple[str, list[str]]]:
    """(unit key, module paths): the embeddings as one unit (keyed by the first), the head as one."""
    embeds = list(dict.fromkeys(r.path for r in roles if r.kind == "embed"))
    out = [(embeds[0], embeds)] if embeds else []
    return out + [(r.path, [r.path]) for r in roles if r.kind == "head"]


def fsdp_role_spans(gm: torch.nn.Module) -> dict[str, list[fx.Node]]:
    """The embeddings and the head a ``torch.export`` graph reads by ``get_attr`` that are
    FSDP units (``fsdp_units``), each with the nodes ``runtime.outline`` moves into one call of
    the module holding the weights: its get_attr nodes and the operation. In graph order."""
    out: dict[str, list[fx.Node]] = {}
    for r in _roles(gm):
        if r.node.op == "call_function":
            out[r.path] = [*(a for a in r.node.all_input_nodes if a.op == "get_attr"), r.node]
    return out


def fsdp_units(gm: torch.nn.Module) -> list[tuple[str, list[str]]]:
    """The FSDP units of a graph besides the module itself (``zero=3``,
    ``partitioner.runtime.fsdp``): (block path, the paths of the modules sharded as the
    unit), in graph order. A block is the shortest path prefix ending in a list index
    (``transformer.h.0``). Blocks of two kinds, and the embeddings and the head:

    - a block the graph calls leaves of (``torch.fx`` route): the flat graph never calls the
      block, so its called leaves with parameters form the unit. Such a block with a weight
      shared with another module, or one the graph also reads by ``get_attr``, stays in the
      module's own unit (FSDP's hooks would not gather it).
    - a block the graph reads by ``get_attr`` (``torch.export`` route) with a span
      (``fsdp_spans``): the runtime outlines the span into one call of the block
      (``partitioner.runtime.outline``), which is the unit: ``(block, [block])``. On an
      outlined graph the same unit is that call.
    - the token embeddings as one unit (keyed by the first one's path) and the output head as
      another (``_roles``: ``nn.Embedding`` / ``nn.Linear`` leaves on the fx route, the
      modules holding the weights of ``aten.embedding`` / the last ``aten.linear`` on the
      export route, outlined like blocks), as torchtitan shards ``tok_embeddings`` and
      ``output``; not when the two share a weight in this graph (tied on one rank).

    The planner prices the units the runtime shards with this one rule (per stage, for a weight
    tied between the embedding and the head: ``fsdp_unit_at``)."""
    graph = getattr(gm, "graph", None)
    if graph is None:
        return []
    counts: dict[int, int] = {}
    for _, p in gm.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    spans = fsdp_spans(gm)
    blocks: dict[str, list[str]] = {}
    spoiled: set[str] = set()
    for node in graph.nodes:
        if node.op == "get_attr" and block_of(str(node.target)) in spans:
            blocks.setdefault(str(block_of(str(node.target))), [])
        if node.op != "call_module":
            continue
        path = str(node.target)
        if isinstance(gm.get_submodule(path), fx.GraphModule) and path.split(".")[-1].isdigit():
            blocks[path] = [path]  # a block outlined into one call (partitioner.runtime.outline)
            continue
        block = block_of(path)
        if block is None or block in spans:
            continue  # not under a repeated block: the module's own unit; or outlined with its span
        params = list(gm.get_submodule(path).parameters())
        if not params:
            continue
        leaves = blocks.setdefault(block, [])
        if path not in leaves:
            leaves.append(path)
        if any(counts[id(p)] > 1 for p in params):
            spoiled.add(block)
    for node in graph.nodes:  # leaves' blocks also read by get_attr, without a span: the module's unit
        block = block_of(str(node.target)) if node.op == "get_attr" else None
        if block in blocks and block not in spans:
            spoiled.add(str(block))
    for block in spans:
        blocks[block] = [block]
    units = [(b, leaves) for b, leaves in blocks.items() if b not in spoiled]
    return _in_order(graph, units + _role_units(_roles(gm)))


def _in_order(graph: fx.Graph, units: list[tuple[str, list[str]]]) -> list[tuple[str, list[str]]]:
    """Units sorted by the first graph node reading one of their modules."""
    first: dict[str, int] = {}
    for i, n in enumerate(graph.nodes):
        if n.op in ("get_attr", "call_module"):
            target = str(n.target)
            while target:
                first.setdefault(target, i)
                target = target.rpartition(".")[0]
    return sorted(units, key=lambda u: min(first.get(p, 1 << 60) for p in u[1]))


def fsdp_unit_of(gm: torch.nn.Module) -> dict[int, str]:
    """id(parameter) -> the FSDP unit (its key: a block path, the first embedding's or the
    head's module path) holding it in ``gm`` as a whole; parameters in none belong to the stage
    module's own unit (``fsdp_units``)."""
    return {id(p): block for block, leaves in fsdp_units(gm) for leaf in leaves
            for p in gm.get_submodule(leaf).parameters()}


def fsdp_unit_at(gm: torch.nn.Module, order: Sequence[fx.Node]) -> list[dict[int, str]]:
    """Per position of ``order``: id(parameter) -> the embedding or head unit it is read as
    there, ignoring the graph's other readers of the same weight (not strict ``_roles``). A
    weight tied between the embedding and the head is read at two positions: a stage holding
    both keeps it in its own unit, a stage holding one shards it as that unit
    (``data_parallel.ZeroShard`` decides per stage, as ``fsdp_units`` does on the stage graph)."""
    roles = _roles(gm, strict=False)
    at: dict[str, dict[int, str]] = {}
    for key, paths in _role_units(roles):
        for r in roles:
            if r.path in paths:
                at.setdefault(r.node.name, {}).update({id(p): key for p in gm.get_submodule(r.path).parameters()})
    return [at.get(n.name, {}) for n in order]


def default_precision(param_dtype: torch.dtype) -> str:
    """bf16/fp16 parameters train mixed (the usual recipe); everything else fp32."""
    return {torch.bfloat16: "bf16-mixed", torch.float16: "fp16-mixed"}.get(param_dtype, "fp32")


def compute_dtype(precision: str) -> str:
    return {"fp32": "float32", "fp16-mixed": "float16"}.get(precision, "bfloat16")


# -- repeated blocks ----------------------------------------------------------------------

def find_blocks(paths: Sequence[str]) -> tuple[str, ...]:
    """Globs of the model's repeated blocks: the outermost ``<prefix>.<int>`` module lists
    with two or more instances (``model.layers.*``; T5's ``encoder.block.*`` and
    ``decoder.block.*``); empty if the model has none."""
    instances: dict[str, set[str]] = {}
    for path in paths:
        parts = path.split(".") if path else []
        for i in range(1, len(parts)):
            if parts[i].isdigit():
                instances.setdefault(".".join(parts[:i]), set()).add(parts[i])
                break  # the outermost list only
    return tuple(sorted(p + ".*" for p, idx in instances.items() if len(idx) >= 2))


def _instance(path: str, patterns: Sequence[str]) -> str | None:
    parts = path.split(".") if path else []
    for i in range(1, len(parts) + 1):
        prefix = ".".join(parts[:i])
        if any(fnmatch.fnmatchcase(prefix, pat) for pat in patterns):
            return prefix
    return None


def _runs(keys: Sequence[Any]) -> list[tuple[int, int]]:
    """[start, end) of each maximal run of equal, non-None keys."""
    out: list[tuple[int, int]] = []
    i = 0
    while i < len(keys):
        j = i + 1
        while j < len(keys) and keys[j] == keys[i]:
            j += 1
        if keys[i] is not None:
            out.append((i, j))
        i = j
    return out


# -- activations --------------------------------------------------------------------------

def _sum(terms: Sequence[Any]) -> sympy.Expr:
    """One sympy Add of many terms (adding one by one is quadratic); equal terms grouped first."""
    counts: dict[Any, int] = {}
    for t in terms:
        if t != 0:
            counts[t] = counts.get(t, 0) + 1
    return sympy.Add(*(k * c if c > 1 else k for k, c in counts.items())) if counts else ZERO


_VIEWS = {"reshape", "view", "_unsafe_view"}
#: the matrix multiply torchtitan's op-level policy counts (a bias-free linear runs one)
_MM = "aten.mm."


def _name(target: Any) -> str:
    if isinstance(target, str):
        return target
    if isinstance(target, torch._ops.OpOverload):
        return target._overloadpacket.__name__
    return getattr(target, "__name__", str(target))


def _is_repeat_kv(node: fx.Node) -> bool:
    """``reshape(expand(x))``: the K/V head repeat of grouped-query attention."""
    if node.op not in ("call_function", "call_method") or _name(node.target) not in _VIEWS:
        return False
    src = node.args[0] if node.args else None
    return isinstance(src, fx.Node) and src.op in ("call_function", "call_method") and _name(src.target) == "expand"


def _arg_nodes(node: fx.Node) -> list[fx.Node]:
    """Every fx input of ``node`` in ``(args, kwargs)`` pytree order, repeats included (the
    ``j`` of ``saved_refs``): a direct walk of plain tuples, lists and dicts, pytree for
    anything else (namedtuples, ...)."""
    out: list[fx.Node] = []
    if _walk_nodes((node.args, node.kwargs), out):
        return out
    return [a for a in pytree.tree_leaves((node.args, node.kwargs), is_leaf=lambda a: isinstance(a, fx.Node))
            if isinstance(a, fx.Node)]


_SEQS = (tuple, list, fx.immutable_collections.immutable_list)
_MAPS = (dict, fx.immutable_collections.immutable_dict)


def _walk_nodes(a: Any, out: list[fx.Node]) -> bool:
    t = type(a)
    if t is fx.Node:
        out.append(a)
    elif t in _SEQS:
        return all(_walk_nodes(x, out) for x in a)
    elif t in _MAPS:
        return all(_walk_nodes(v, out) for v in a.values())
    elif isinstance(a, (tuple, list, dict, fx.Node)):
        return False  # a subclass pytree may flatten otherwise
    return True


def _desc_leaves(desc: Any) -> list[TensorDesc]:
    return [d for d in pytree.tree_leaves(desc, is_leaf=lambda x: isinstance(x, TensorDesc))
            if isinstance(d, TensorDesc)]


@dataclass(frozen=True)
class Regions:
    """Checkpointed regions for one recompute mode: [start, end) position ranges."""

    mode: str
    spans: tuple[tuple[int, int], ...]


class Activations:
    """Who keeps which storage, for one captured graph (see the module docstring)."""

    def __init__(self, gm: fx.GraphModule, order: Sequence[fx.Node], *, target: str = "gpu",
                 blocks: Sequence[str] | None = None) -> None:
        self.order = tuple(order)
        self.pos = {n.name: i for i, n in enumerate(self.order)}
        self.leaves = {n.name: _desc_leaves(n.meta.get(DESC)) for n in gm.graph.nodes}
        self.static_names = {n.name for n in gm.graph.nodes if n.op == "get_attr"}
        self._cache: dict[tuple[int, int], Any] = {}
        # stage_saved per (a, b, mode, evaluator): the exact check asks again for the same
        # stage under every layout that shares this graph and micro-batch size (the joint
        # search re-checks one split at several ZeRO levels); the evaluator is the key
        # object itself (held, so its identity is never reused)
        self._saved: dict[tuple[int, int, str, Any], tuple[sympy.Expr, sympy.Expr]] = {}
        # per position, what every _resolve needs (walked once, not once per stage tried)
        self.args = [_arg_nodes(n) for n in self.order]
        self.costs: list[NodeCost] = [n.meta.get(COST, NodeCost()) for n in self.order]
        self.internal_expr = [sympy.sympify(c.saved_internal) for c in self.costs]
        self._nbytes: dict[Root, sympy.Expr] = {}
        self.saves, self.inputs, self.internal, self.bytes, self.outs = self._resolve(0, len(self.order))
        self.attention = tuple(n.meta.get(COST, NodeCost()).kind.startswith("attention") for n in self.order)
        # per position: the last user's position (len(order) for the graph output), and the
        # bytes of the weight gradients its backward makes (weights read by get_attr or held
        # by the module it calls)
        end = len(self.order)
        self.last_user = [max((self.pos.get(u.name, end) for u in n.users), default=i)
                          for i, n in enumerate(self.order)]
        self.wgrad = [self._weight_grad_bytes(gm, n) for n in self.order]
        # per position: the bytes of the gradient reaching its output when it reads a trainable
        # weight; a split backward (zero-bubble I / W) records it in I and holds it until W
        # computes that weight's gradient from it (runtime.splitgrad's parameter groups)
        self.wgrad_out = [_sum([d.nbytes() for d in self.leaves.get(n.name, []) if d.dtype.is_floating_point])
                          if w else sympy.Integer(0) for n, w in zip(self.order, self.wgrad)]
        self.n = end
        # a graph returning a scalar that needs a gradient (the loss) is trained from it: its
        # other outputs (the logits) get no gradient
        outputs = [d for n in gm.graph.nodes if n.op == "output" for a in n.all_input_nodes
                   for d in self.leaves.get(a.name, [])]
        self.loss_only = any(d.requires_grad and d.dtype.is_floating_point and d.numel() == 1 for d in outputs)
        paths = [str(n.meta.get(MODULE, "")) for n in self.order]
        self.blocks = tuple(blocks) if blocks is not None else find_blocks(paths)
        block_runs = _runs([_instance(p, self.blocks) for p in paths]) if self.blocks else [(0, len(self.order))]
        self.mms = tuple(sum(1 for op in c.ops if op.startswith(_MM)) for c in self.costs)
        self._sac: dict[tuple[int, int], frozenset[int]] = {}
        self.regions = {
            "none": Regions("none", ()),
            "full": Regions("full", tuple(block_runs)),
            "selective": Regions("selective", tuple((self._repeat_start(i), i + 1)
                                                    for i, a in enumerate(self.attention) if a)),
            "selective-op": Regions("selective-op", tuple(block_runs)),
        }

    def _weight_grad_bytes(self, gm: fx.GraphModule, node: fx.Node) -> int:
        """Bytes of the gradients of the trainable weights ``node`` reads, which its backward
        makes whole before they are accumulated (or reduce-scattered): of the ``get_attr``
        inputs as captured, or of the parameters of the module it calls, in their dtype."""
        if node.op == "call_module":
            params = {id(t): t for t in gm.get_submodule(str(node.target)).parameters() if t.requires_grad}
            return sum(t.numel() * t.element_size() for t in params.values())
        total = 0
        for arg in dict.fromkeys(a for a in node.all_input_nodes if a.name in self.static_names):
            for d in self.leaves.get(arg.name, []):
                if d.requires_grad and d.dtype.is_floating_point:
                    total += int(d.nbytes())
        return total

    def _repeat_start(self, i: int) -> int:
        """Where the selective region of the attention core at position ``i`` starts: at ``i``,
        or earlier over the nodes right before it that only repeat K/V heads for it (``expand``
        and the ``reshape`` of it, ``_is_repeat_kv``), so the checkpoint takes (and keeps) the
        unrepeated K/V instead of the repeated copies."""
        start = i
        inside = {self.order[i]}
        while start > 0:
            node = self.order[start - 1]
            name = _name(node.target) if node.op in ("call_function", "call_method") else ""
            if not (_is_repeat_kv(node) or name == "expand") or not set(node.users) <= inside:
                break
            inside.add(node)  # an expand joins only once its reshape is inside: whole repeats move in
            start -= 1
        return start

    def _lse(self, p: int) -> sympy.Expr:
        """The log-sum-exp an attention kernel returns beside its output: fp32, one per query
        row and head (``B x H x Sq``: the query's shape less its head dimension). What the
        kernel's backward keeps of its own besides its inputs and output; on the CPU the
        ``"none"`` price of the node may hold more (the float mask a boolean one becomes),
        which a selective policy recomputes."""
        q = self.leaves.get(self.args[p][0].name, []) if self.args[p] else []
        return sympy.Mul(*q[0].shape[:-1]) * 4 if q else ZERO

    def sac_saved(self, s: int, e: int) -> frozenset[int]:
        """Positions in [s, e) whose outputs one ``"selective-op"`` checkpoint of [s, e) keeps:
        the attention cores and the nodes running the odd-numbered ``aten.mm`` calls of the
        region, counted from its start (``passes.recompute.sac_policy``, torchtitan's rule). A
        node running several matrix multiplies is kept whole when one of them is odd (the
        kernels keep that product only; the captured transformers run one per linear)."""
        hit = self._sac.get((s, e))
        if hit is None:
            kept: set[int] = set()
            count = 0
            for p in range(s, e):
                if self.attention[p]:
                    kept.add(p)
                for _ in range(self.mms[p]):
                    count += 1
                    if count % 2:
                        kept.add(p)
            hit = self._sac[(s, e)] = frozenset(kept)
        return hit

    def _resolve(self, a: int, b: int) -> tuple[list[tuple[Root, ...]], list[tuple[Root, ...]], list[sympy.Expr],
                                                dict[Root, sympy.Expr], list[tuple[Root, ...]]]:
        """Storages of positions [a, b) run as one stage: every value made outside it (graph
        inputs, earlier stages) arrives as its own storage, as the transport delivers it.
        Per position: the storages its backward keeps, its inputs' storages, its internal
        bytes; the sizes of every storage; per position the storages of its outputs."""
        hit = self._cache.get((a, b))
        if hit is not None:
            return hit  # type: ignore[no-any-return]
        sizes: dict[Root, sympy.Expr] = {}
        roots: dict[str, list[Root | None]] = {}

        def root_of(arg: fx.Node) -> list[Root | None]:
            if arg.name in roots:
                return roots[arg.name]
            if arg.name in self.static_names:  # parameters and buffers: static memory
                return [None] * max(len(self.leaves.get(arg.name, [])), 1)
            received: list[Root | None] = []
            for i, d in enumerate(self.leaves.get(arg.name, [])):
                sizes[(arg.name, i)] = self._leaf_bytes(arg.name, i, d)
                received.append((arg.name, i))
            roots[arg.name] = received
            return received

        saves: list[tuple[Root, ...]] = []
        inputs: list[tuple[Root, ...]] = []
        internal: list[sympy.Expr] = []
        outs: list[tuple[Root, ...]] = []
        for p in range(a, b):
            node, cost, args = self.order[p], self.costs[p], self.args[p]
            gqa = cost.kind == "attention-causal"

            def resolve(j: int, i: int) -> Root | None:
                if not 0 <= j < len(args):
                    return None
                arg = args[j]
                # GQA in the kernel: eager code that passes no mask passes K/V unrepeated, so a
                # repeat the capture made in this stage (reshape of an expand) is priced as its source
                if gqa and arg.name in roots and _is_repeat_kv(arg):
                    arg = arg.args[0]  # type: ignore[assignment]
                src = root_of(arg)
                return src[i] if i < len(src) else None

            mine: list[Root | None] = []
            for i, d in enumerate(self.leaves.get(node.name, [])):
                alias = cost.out_alias[i] if i < len(cost.out_alias) else None
                r = resolve(*alias) if alias is not None else None
                if r is None:
                    r = (node.name, i)
                    sizes[r] = cost.out_storage[i] if i < len(cost.out_storage) else self._leaf_bytes(node.name, i, d)
                mine.append(r)
            roots[node.name] = mine
            outs.append(tuple(dict.fromkeys(r for r in mine if r is not None)))
            kept: list[Root] = []
            for j, i in cost.saved_refs:
                r = (mine[i] if i < len(mine) else None) if j == -1 else resolve(j, i)
                if r is not None and r not in kept:
                    kept.append(r)
            ins: list[Root] = []
            for arg in args:
                for r in root_of(arg):
                    if r is not None and r not in ins:
                        ins.append(r)
            saves.append(tuple(kept))
            inputs.append(tuple(ins))
            internal.append(self.internal_expr[p])
        out = (saves, inputs, internal, sizes, outs)
        self._cache[(a, b)] = out
        return out

    def _leaf_bytes(self, name: str, i: int, d: TensorDesc) -> sympy.Expr:
        hit = self._nbytes.get((name, i))
        if hit is None:
            hit = self._nbytes[(name, i)] = d.nbytes()
        return hit

    def pending_weight_grads(self, a: int, b: int) -> sympy.Expr:
        """Bytes one micro-batch of positions [a, b) holds between its input-gradient pass
        (``I``) and its weight-gradient pass (``W``) on top of what it keeps: the gradient at
        the output of every node that reads a trainable weight (measured on the CPU: a zbv
        rank holds its kept bytes plus these, tests/partitioner/test_rank_memory.py)."""
        return _sum(self.wgrad_out[a:b])

    # -- exact, per stage ----------------------------------------------------------------
    def stage_saved(self, a: int, b: int, mode: str, ev: Callable[[Any], int]) -> tuple[sympy.Expr, sympy.Expr]:
        """(bytes kept per micro-batch, bytes held once on top of them) of positions [a, b) run
        as one stage. The second is the stage's largest working set (``working``): what one
        micro-batch's forward or backward holds for a while besides what is kept, the
        recompute's transient included."""
        key = (a, b, mode, ev)
        hit = self._saved.get(key)
        if hit is None:
            total, _, work = self._stage(a, b, mode, ev)
            hit = self._saved[key] = (total, work)
        return hit

    def _stage(self, a: int, b: int, mode: str, ev: Callable[[Any], int]) -> tuple[sympy.Expr, sympy.Expr, sympy.Expr]:
        """(kept, the largest recompute transient, the largest working set) of [a, b)."""
        _, _, internal, sizes, _ = self._resolve(a, b)
        pieces = self._pieces(a, b, mode)
        kept, inside, held, redo = self._kept_set(a, b, mode)
        terms = [internal[p - a] for p in range(a, b) if p not in inside]
        terms += [self._lse(p) for p in sorted(held) if self.attention[p]]  # the kernel's log-sum-exp
        total = _sum(terms + [sizes[r] for r in kept])
        transient, best = ZERO, -1
        for s, _ in pieces:
            value = ev(redo[s - a])
            if value > best:
                transient, best = redo[s - a], value
        values, expr_at = self._working(a, b, kept, pieces, held, redo, ev)
        top = max(range(b - a), key=values.__getitem__) if b > a else -1
        return total, transient, expr_at(top) if top >= 0 else ZERO

    def working(self, a: int, b: int, mode: str, ev: Callable[[Any], int]) -> list[int]:
        """Per position of [a, b) run as one stage: the bytes one micro-batch holds while that
        node runs besides what the stage keeps (see ``_working``)."""
        kept, _, held, redo = self._kept_set(a, b, mode)
        return self._working(a, b, kept, self._pieces(a, b, mode), held, redo, ev)[0]

    def _kept_set(self, a: int, b: int, mode: str) -> tuple[dict[Root, None], set[int], set[int], list[sympy.Expr]]:
        """What [a, b) keeps under ``mode``: the storages (in the order first kept), the
        positions inside checkpointed regions, those whose outputs a ``"selective-op"``
        policy keeps, and per position its region's recompute transient (what the region's
        nodes keep again while it is re-run in backward; 0 outside regions)."""
        saves, inputs, internal, sizes, outs = self._resolve(a, b)
        pieces = self._pieces(a, b, mode)
        inside = {p for s, e in pieces for p in range(s, e)}
        kept: dict[Root, None] = {}
        for p in range(a, b):
            if p not in inside:
                kept.update(dict.fromkeys(saves[p - a]))
        held: set[int] = set()
        for s, e in pieces:
            kept.update(dict.fromkeys(self._piece_inputs(s, e, inputs[s - a:e - a])))
            if mode == "selective-op":
                for p in sorted(self.sac_saved(s, e)):
                    held.add(p)
                    kept.update(dict.fromkeys(outs[p - a]))
        redo: list[sympy.Expr] = [ZERO] * (b - a)
        for s, e in pieces:
            own = dict.fromkeys(r for p in range(s, e) for r in saves[p - a] if r not in kept)
            redo[s - a:e - a] = [_sum([internal[p - a] - (self._lse(p) if p in held and self.attention[p] else 0)
                                       for p in range(s, e)] + [sizes[r] for r in own])] * (e - s)
        return kept, inside, held, redo

    def _working(self, a: int, b: int, kept: Any, pieces: Sequence[tuple[int, int]], sac: set[int],
                 redo: Sequence[sympy.Expr], ev: Callable[[Any], int]) -> tuple[list[int], Callable[[int], sympy.Expr]]:
        """The working set of [a, b) run as one stage, on top of the ``kept`` storages: per
        position, the larger of its forward's and its backward's (evaluated), and the
        expression at a position.

        Forward at ``p``: every storage not kept that is alive while ``p`` runs: made at or
        before ``p`` (a received one from the start) and used at or after it (one the stage
        returns, or a received one, until the forward ends), and what a recomputed node
        (``redone``) keeps privately, freed after the checkpointed forward.

        Backward at ``p``: the storages the stage received or returns (the runtime holds them
        until the backward ends), the gradients alive while ``p``'s backward runs, one per
        storage that needs one: a storage's gradient is made by the backward of its last user (of a
        returned storage, received from the next stage; none for a model output beside a
        scalar loss) and consumed by its producer's, so it is alive over the same positions
        as the storage in forward; plus the gradients of
        the weights ``p`` reads, of what ``p`` keeps privately (its backward makes a gradient
        of that size: the loss's log-probabilities), and, inside a checkpointed region, the
        region's recompute transient (``redo``). Kept storages are counted whole for the
        backward, less what the backward has freed by ``p``: a kept storage goes once the
        first node keeping it (a checkpointed region: its first node) has run its backward,
        a node's private bytes with its backward. So the working set can be negative: the
        stage's peak is its kept bytes plus the largest. Operators' private scratch is not
        priced (``measure_peak`` does not see it either)."""
        saves, inputs, internal, sizes, outs = self._resolve(a, b)
        n = b - a
        inside = {p for s, e in pieces for p in range(s, e)}
        redone = inside - sac
        keeper: dict[Root, int] = {}  # the first position keeping a storage (relative to a)
        for p in range(n):
            if a + p not in inside:
                for r in saves[p]:
                    keeper.setdefault(r, p)
        for s, e in pieces:
            mine = list(self._piece_inputs(s, e, inputs[s - a:e - a]))
            mine += [r for q in range(s, e) if q in sac for r in outs[q - a]]
            for r in mine:
                keeper[r] = min(keeper.get(r, s - a), s - a)
        birth: dict[Root, int] = {}
        last: dict[Root, int] = {}
        for p in range(n):
            for r in outs[p]:
                birth.setdefault(r, p)
                last[r] = max(last.get(r, p), p)
            for r in inputs[p]:
                birth.setdefault(r, 0)  # received: there from the start
                last[r] = max(last.get(r, p), p)
        grad_last = dict(last)
        pinned: set[Root] = set()  # received or returned: the runtime holds them until the backward ends
        for p in range(n):
            if self.last_user[a + p] >= b:  # returned by the stage: until its forward ends
                users = [self.pos.get(u.name, self.n) for u in self.order[a + p].users]
                graded = any(b <= q < self.n for q in users) or (not self.loss_only and self.n in users)
                for r in outs[p]:
                    last[r] = n - 1
                    pinned.add(r)
                    if graded:  # its gradient comes from the next stage (or the caller)
                        grad_last[r] = n - 1
        for r in birth:
            if r[0] not in self.pos or not a <= self.pos[r[0]] < b:
                last[r] = n - 1
                pinned.add(r)
        held = pinned - set(kept)  # those the kept bytes do not count already
        size = {r: ev(sizes[r]) for r in birth}
        held_bytes = sum(size[r] for r in held)
        fwd = [0] * (n + 1)
        bwd = [0] * (n + 1)
        for r, p in birth.items():
            if r not in kept:
                fwd[p] += size[r]
                fwd[last[r] + 1] -= size[r]
            if self._needs_grad(r):
                bwd[p] += size[r]
                bwd[grad_last[r] + 1] -= size[r]
        freed = [0] * (n + 1)  # kept bytes the backward has freed by each position
        for r, k in keeper.items():
            if r in kept and r not in pinned and k > 0:
                nbytes = size[r] if r in size else ev(sizes[r])
                freed[0] += nbytes
                freed[k] -= nbytes
        own = [ev(internal[p]) for p in range(n)]
        for p in range(1, n):
            if a + p not in inside and own[p]:
                freed[0] += own[p]
                freed[p] -= own[p]
        freed_at = list(itertools.accumulate(freed[:n]))
        fwd_at = list(itertools.accumulate(fwd[:n]))
        bwd_at = list(itertools.accumulate(bwd[:n]))
        redo_at = [ev(x) for x in redo]
        values = []
        for p in range(n):
            f = fwd_at[p] + (own[p] if a + p in redone else 0)
            g = held_bytes + bwd_at[p] + own[p] + self.wgrad[a + p] + redo_at[p] - freed_at[p]
            values.append(max(f, g))

        def expr_at(p: int) -> sympy.Expr:
            f = [sizes[r] for r, q in birth.items() if r not in kept and q <= p <= last[r]]
            f += [internal[p]] if a + p in redone else []
            g = [sizes[r] for r, q in birth.items() if self._needs_grad(r) and q <= p <= grad_last[r]]
            g += [sizes[r] for r in held] + [internal[p], sympy.Integer(self.wgrad[a + p]), redo[p]]
            g += [-sizes[r] for r, k in keeper.items() if r in kept and r not in pinned and k > p]
            g += [-internal[q] for q in range(p + 1, n) if a + q not in inside]
            fe, ge = _sum(f), _sum(g)
            return fe if ev(fe) >= ev(ge) else ge

        return values, expr_at

    def _needs_grad(self, r: Root) -> bool:
        leaves = self.leaves.get(r[0], [])
        return r[1] < len(leaves) and leaves[r[1]].requires_grad and leaves[r[1]].dtype.is_floating_point

    def _pieces(self, a: int, b: int, mode: str) -> list[tuple[int, int]]:
        return [(max(s, a), min(e, b)) for s, e in self.regions[mode].spans if s < b and e > a]

    def _piece_inputs(self, s: int, e: int, inputs: Sequence[tuple[Root, ...]]) -> list[Root]:
        """Storages a checkpointed piece [s, e) keeps: its inputs made outside it."""
        made = {self.order[p].name for p in range(s, e)}
        out: dict[Root, None] = {}
        for ins in inputs:
            for r in ins:
                if r[0] not in made:
                    out[r] = None
        return list(out)

    # -- additive, for the solver ----------------------------------------------------------
    def arrays(self, mode: str, ev: Callable[[Any], int]) -> tuple[list[int], list[bool], int]:
        """(activation bytes per position, recomputed per position, reserve) for ``mode``:
        each storage charged to the first position that keeps it; reserve is held once per
        stage: the largest transient of any region, or the largest working set of a position
        in the repeated blocks when larger."""
        n = len(self.order)
        spans = self.regions[mode].spans
        redo = [False] * n
        keeps: list[tuple[Root, ...]] = list(self.saves)
        internal = [ev(x) for x in self.internal]
        reserve = 0
        sac = mode == "selective-op"
        for s, e in spans:
            held = self.sac_saved(s, e) if sac else frozenset()
            for p in range(s, e):
                redo[p] = p not in held  # what the policy keeps is not run again
                keeps[p] = self.outs[p] if p in held else ()
                internal[p] = ev(self._lse(p)) if p in held and self.attention[p] else 0
            keeps[s] = tuple(self._piece_inputs(s, e, self.inputs[s:e])) + keeps[s]
            reserve = max(reserve, ev(self.stage_saved(s, e, mode, ev)[1] if sac else self.stage_saved(s, e, "none", ev)[0]))
        # the working set: the solver holds one number per stage, so it takes the largest in the
        # repeated blocks (every stage of a transformer runs some); a stage with a larger one
        # (the loss after a large vocabulary head) is over by the difference in the exact
        # check (``stage_saved``), which lowers that stage's capacity and solves again
        work = self.working(0, n, mode, ev)
        reserve = max([reserve, *(work[p] for s, e in self.regions["full"].spans for p in range(s, e))])
        seen: set[Root] = set()
        act = []
        for p in range(n):
            total = internal[p]
            for r in keeps[p]:
                if r not in seen:
                    seen.add(r)
                    total += ev(self.bytes[r])
            act.append(total)
        return act, redo, reserve


# -- static memory ------------------------------------------------------------------------

class Static:
    """Parameters and buffers per stage: each tensor once per rank that uses it."""

    def __init__(self, gm: fx.GraphModule, order: Sequence[fx.Node], per_param: int, per_frozen: int) -> None:
        named: dict[str, torch.Tensor] = dict(gm.named_parameters(remove_duplicate=False))
        params = set(named)
        named.update(gm.named_buffers(remove_duplicate=False))
        users = tensor_users(gm)
        # one tensor-parallel rank's view (partitioner.tensor_parallel.view): sharded weights' share
        divisor = param_divisor(gm)
        self.size: dict[int, int] = {}
        self.uses: list[tuple[int, ...]] = []
        for node in order:
            ids: list[int] = []
            for fqn in users.get(node.name, ()):
                t = named.get(fqn)
                if t is None:
                    continue
                if id(t) not in self.size:
                    nbytes = t.numel() * t.element_size()
                    if fqn in params:
                        nbytes = t.numel() * (per_param if t.requires_grad else per_frozen)
                    self.size[id(t)] = nbytes // divisor.get(fqn, 1)
                if id(t) not in ids:
                    ids.append(id(t))
            self.uses.append(tuple(ids))
        seen: set[int] = set()
        self.first_use: list[int] = []
        for used in self.uses:
            fresh = [i for i in used if i not in seen]
            seen.update(fresh)
            self.first_use.append(sum(self.size[i] for i in fresh))

    def stage(self, a: int, b: int) -> int:
        """Static bytes of positions [a, b): every tensor they use, once."""
        ids = {i for p in range(a, b) for i in self.uses[p]}
        return sum(self.size[i] for i in ids)


# -- measuring the truth --------------------------------------------------------------------

def measure_saved(fn: Callable[[], Any], exclude: Sequence[torch.Tensor] = ()) -> tuple[int, Any]:
    """Run ``fn()`` on real tensors and return (bytes of the storages autograd keeps for
    backward, fn's result): every storage once, ``exclude`` (the parameters) left out.

    Inputs of regions run under ``partitioner.passes.recompute.checkpoint`` are counted too: the
    checkpoint keeps them alive for the recomputation although no saved-tensor hook sees
    them; so are the outputs a selective policy keeps (``"selective-op"``). This is the instrument the tests and ``benchmarks/memory_bench.py`` compare the
    plan's ``saved_bytes`` with.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    kept: dict[int, int] = {}

    def note(t: Any) -> Any:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            st = t.untyped_storage()
            if st.data_ptr() not in skip and st.nbytes():
                kept[st.data_ptr()] = st.nbytes()
        return t

    plain = recompute.checkpoint

    def spy(f: Any, *args: Any, keep: Any = None) -> Any:
        for a in args:
            note(a)
        if keep is not None:  # a selective policy: what it keeps in forward is held too
            made = keep
            keep = lambda: made(observe=lambda out: pytree.tree_map(note, out))  # noqa: E731
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            return plain(f, *args, keep=keep)  # what runs inside is recomputed, not kept

    recompute.checkpoint = spy  # type: ignore[assignment]
    try:
        with torch.autograd.graph.saved_tensors_hooks(note, lambda t: t):
            out = fn()
    finally:
        recompute.checkpoint = plain
    return sum(kept.values()), out


class _LiveStorages(TorchDispatchMode):
    """Every storage an operator returns while the mode is on, until it is freed: the live
    bytes after each operator and their peak. Storages alive before the mode (parameters,
    their gradients, the inputs) are not counted; ``holds`` adds those that should be."""

    def __init__(self, holds: Sequence[torch.Tensor] = (), exclude: Sequence[torch.Tensor] = ()) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        # a view of a parameter (the transposed weight of a linear) is its storage: static
        self.skip = {t.untyped_storage()._cdata for p in exclude for t in (p, p.grad) if t is not None}
        self.now = self.peak = 0
        for t in holds:
            self._add(t)
        self.peak = self.now

    def _add(self, t: Any) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        st = t.untyped_storage()
        key = st._cdata
        if key not in self.live and key not in self.skip and st.nbytes():
            self.live[key] = (StorageWeakRef(st), st.nbytes())
            self.now += st.nbytes()

    def _sweep(self) -> None:
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.now -= self.live.pop(key)[1]

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self._sweep()  # what the previous operators freed
        out = func(*args, **(kwargs or {}))
        pytree.tree_map(self._add, out)
        self.peak = max(self.peak, self.now)  # the operator's inputs are still held here
        return out


def measure_peak(fn: Callable[[], Any], holds: Sequence[torch.Tensor] = (),
                 exclude: Sequence[torch.Tensor] = ()) -> tuple[int, Any]:
    """Run ``fn()`` (a forward and its backward) on real tensors and return (the peak bytes of
    tensor storages alive at once, each storage once, fn's result): what every operator
    returned (outputs, saved and unsaved temporaries, gradients) from its allocation until
    it is freed, checked after each operator, plus ``holds`` (e.g. the received inputs) held
    throughout. Storages made before the call are not counted, nor views of ``exclude`` (the
    parameters) and of their ``.grad``: give parameters a zero ``.grad`` first, so the
    backward accumulates into it and each weight gradient it makes is a temporary, as in a
    training step after the first.

    Why an instrument of its own: ``saved_tensors_hooks`` (``measure_saved``) see only what
    autograd keeps, not the temporaries a forward or backward holds for a while (the loss's
    fp32 logits and their gradients), and the CPU allocator keeps no peak statistics
    (``torch.cuda.max_memory_allocated`` has no CPU counterpart); ``torch.profiler``'s memory
    events also count operators' private scratch buffers, which differ between the CPU and
    GPU kernels. A dispatch mode sees every storage an operator returns, forward and backward
    (the autograd engine runs the CPU backward under the caller's modes), and a storage
    weak reference tells when it is freed. Operators' internal scratch is not seen.
    """
    mode = _LiveStorages(holds, exclude)
    with mode:
        out = fn()
    return mode.peak, out
