"""Attention as the plan prices it: the causal mask and the K/V head repeat the capture
materialised, rewritten to the fused call.

``torch.export`` captures a Hugging Face decoder (``use_cache=False``) with its causal mask
built as a tensor (arange / compare / and / expand over the input's sizes) and, for
grouped-query attention, K and V repeated to the query's head count (``repeat_kv``: unsqueeze,
expand, reshape) before ``scaled_dot_product_attention``. The planner prices that node as the
fused kernel runs the eager call (``passes/annotate.py`` ``_attention``, ``partitioner/memory.py``
``_is_repeat_kv``): no mask, ``is_causal``, the K/V heads shared in the kernel. Run as captured,
a GPU stage would instead pass an explicit mask (which rules the flash kernel out), allocate
the S x S mask, and make and keep K/V copies ``n_heads / n_kv_heads`` times larger.

``rewrite_attention(gm)`` rewrites each such node of a stage module, in place, into a call of a
``FusedAttention`` module that takes the unrepeated K/V and runs
``sdpa(q, k, v, is_causal=True, enable_gqa=True)`` where that is provably what the captured
node computes, and the captured computation otherwise:

- **the proof, per size**: the mask's producers must read no tensor's data, only sizes (the
  walk stops at ``sym_size`` / ``size`` / shape queries and at integer stage inputs; any
  tensor input, attribute, module call or random op refuses); that subgraph is copied into a
  small function of those sizes, evaluated on the CPU for the sizes each call brings, and
  compared exactly with the causal mask (q_len == kv_len; a bool mask equal to ``tril``, a
  float mask 0 on and below the diagonal and -inf or the dtype's lowest value above). The
  verdict is cached per distinct size. A mask that passes for some sizes and not others (a
  sliding window: causal while S <= window) runs fused only for the sizes that passed;
- **the fallback** is the captured computation itself: the mask (the stage input, or the
  copied subgraph re-run on the sizes when its nodes were removed), K/V repeated by the same
  unsqueeze / expand / reshape, and the same ``scaled_dot_product_attention`` call, so the
  results are those of the unrewritten graph;
- a mask the model builds once and every layer reads is not sent from stage to stage: the same
  walk, over a whole graph (``size_only_values``), tells ``passes.liveness`` and
  ``passes.split`` which tensors a stage rebuilds from integer sizes instead of receiving them,
  so a later stage holds the mask's producers itself. One that still arrives as a stage input
  (made from a whole ``torch.Size``, or a stage of a plan written before) has its producers in
  another stage: ``mark_size_only`` (run by ``emit`` on the whole graph) records on such an
  input the function of sizes that makes it (``SIZE_ONLY``), which the proof uses as if its
  subgraph were local;
- grouped-query attention already ``is_causal`` (no mask) drops the repeat unconditionally;
  a causal mask without GQA becomes ``is_causal`` alone.

Left as they are: a mask that reads data (a padding ``attention_mask``), ALiBi and relative
biases (float masks with other values: the comparison fails), dropout in the call, q_len !=
kv_len, a node whose mask producers cannot be proven size-only. ``gm.meta[ATTENTION]`` lists
the nodes rewritten and those left with an explicit mask; a stage on a CUDA device warns once
about those the plan priced as the fused kernel (their mask looked size-only to the planner,
the proof did not hold), and about each size that falls back.

Kernels: on the CPU ``enable_gqa`` runs in the flash kernel (forward and backward, no repeat).
On CUDA only the flash kernel shares K/V heads (the memory-efficient kernel refuses
``enable_gqa`` and SDPA would fall back to the math kernel, which materialises the S x S
scores), and flash takes fp16 / bf16 only: for other dtypes the call keeps the repeat and
gains only ``is_causal`` (no mask: the memory-efficient kernel without an attention bias).

The original scale is kept as the node passed it (flash and memory-efficient kernels take it).
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils import _pytree as pytree

from partitioner.passes.meta import ATTENTION, COST, SIZE_ONLY, VAL

__all__ = ["SizeOnly", "FusedAttention", "rewrite_attention", "mark_size_only", "is_causal_mask", "size_only_values",
           "SDPA_TARGETS"]

log = logging.getLogger("partitioner.runtime")

_ATEN_SDPA = torch.ops.aten.scaled_dot_product_attention.default
#: the call targets of SDPA in captured graphs: aten's (torch.export) and ``F``'s (the fx route)
SDPA_TARGETS = (_ATEN_SDPA, F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
_SIG = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
_SIZE_OPS = {torch.ops.aten.sym_size.int, torch.ops.aten.sym_numel.default, torch.ops.aten.sym_stride.int}
_BIG = 2**62  # a slice end at least this is "to the end" (export writes sys.maxsize)
_PREFIX = "pp_attention"  # where the FusedAttention modules live in a stage module


@dataclass(frozen=True)
class SizeOnly:
    """A value computed from sizes alone: ``fn(*leaves)``, where ``leaves`` name the integer
    values (sizes) it reads, as node names of the graph it is recorded in."""

    leaves: tuple[str, ...]
    fn: fx.GraphModule


def is_causal_mask(mask: torch.Tensor, q_len: int, kv_len: int) -> bool:
    """Whether ``mask`` is exactly the top-left causal mask for these lengths: q_len ==
    kv_len, its last two dims (q_len, kv_len), a bool mask True exactly on and below the
    diagonal, a float mask 0 there and -inf or the dtype's lowest value above."""
    if q_len != kv_len or mask.dim() < 2 or tuple(mask.shape[-2:]) != (q_len, kv_len):
        return False
    below = torch.ones(q_len, kv_len, dtype=torch.bool, device=mask.device).tril().expand(mask.shape)
    if mask.dtype == torch.bool:
        return bool(torch.equal(mask, below))
    if not mask.is_floating_point():
        return False
    if not bool((mask[below] == 0).all()):
        return False
    above = mask[~below]
    return bool(((above == float("-inf")) | (above == torch.finfo(mask.dtype).min)).all())


class FusedAttention(nn.Module):
    """One rewritten attention node: the fused causal call for sizes whose mask was proven
    causal, the captured computation for the others (see the module docstring).

    Called as ``(q, k, v, mask, *sizes)``: ``k``/``v`` unrepeated when ``repeat`` (the captured
    graph repeated them to q's heads), ``mask`` the captured mask when it stays alive in the
    graph anyway (a stage input) or None (then ``mask_fn(*sizes)`` remakes it for a fallback),
    ``sizes`` the values ``check_fn`` makes the mask from. Without a mask (``check_fn`` None)
    the node was ``is_causal`` or unmasked already and only the repeat goes."""

    target: Callable[..., Any]
    check_fn: fx.GraphModule | None
    mask_fn: fx.GraphModule | None

    def __init__(self, name: str, target: Callable[..., Any], kwargs: dict[str, Any], repeat: bool,
                 check_fn: fx.GraphModule | None, mask_fn: fx.GraphModule | None) -> None:
        super().__init__()
        self.node_name, self.repeat, self.kwargs = name, repeat, dict(kwargs)
        # plain attributes, not submodules: no state, nothing for state dicts, FSDP or optimizers
        self.__dict__["target"] = target
        self.__dict__["check_fn"] = check_fn
        self.__dict__["mask_fn"] = mask_fn
        #: (sizes, q_len, kv_len) -> whether the mask is the causal one there
        self.verdicts: dict[tuple[Any, ...], bool] = {}

    def causal(self, sizes: tuple[Any, ...], q_len: int, kv_len: int, cuda: bool = False) -> bool:
        """The cached per-size proof: the mask for these sizes, evaluated on the CPU, compared
        with the causal mask exactly. A size that fails is logged once (a warning on CUDA,
        where the plan priced the fused kernel)."""
        key = (sizes, q_len, kv_len)
        hit = self.verdicts.get(key)
        if hit is None:
            with torch.no_grad():
                mask = self.check_fn(*sizes)  # type: ignore[misc]  # called only with a check
            hit = self.verdicts[key] = isinstance(mask, torch.Tensor) and is_causal_mask(mask, q_len, kv_len)
            if not hit:
                log.log(logging.WARNING if cuda else logging.INFO,
                        "attention %s: the mask for sizes %s is not the causal mask; this size runs the captured "
                        "attention with its explicit mask (the plan priced the fused kernel)", self.node_name, key)
        return hit

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                *sizes: Any) -> torch.Tensor:
        q_len, kv_len = int(q.shape[-2]), int(k.shape[-2])
        if self.check_fn is None or self.causal(tuple(_concrete(s) for s in sizes), q_len, kv_len, q.is_cuda):
            causal = self.check_fn is not None or bool(self.kwargs.get("is_causal", False))
            kw = {k_: v_ for k_, v_ in self.kwargs.items() if k_ not in ("is_causal", "attn_mask", "enable_gqa")}
            gqa = self.repeat and _gqa_in_kernel(q)
            if self.repeat and not gqa:
                k, v = _repeat_kv(k, q.shape[1]), _repeat_kv(v, q.shape[1])
            return self.target(q, k, v, None, is_causal=causal, enable_gqa=gqa, **kw)  # type: ignore[no-any-return]
        if mask is None:
            mask = self.mask_fn(*sizes)  # type: ignore[misc]  # set whenever no mask is passed
            if mask.is_floating_point() and mask.dtype != q.dtype:  # the graph was retyped since (precision)
                mask = mask.to(q.dtype)
        if self.repeat:
            k, v = _repeat_kv(k, q.shape[1]), _repeat_kv(v, q.shape[1])
        return self.target(q, k, v, mask, **self.kwargs)  # type: ignore[no-any-return]


def _concrete(size: Any) -> Any:
    """A size as a plain int (or tuple of ints, for a whole shape): the verdicts' key."""
    return tuple(int(d) for d in size) if isinstance(size, (tuple, list)) else int(size)


def _gqa_in_kernel(q: torch.Tensor) -> bool:
    """Whether the kernel SDPA picks shares K/V heads itself: the CPU flash kernel does for
    every dtype; on CUDA only the flash kernel (fp16 / bf16) does, the others would fall back
    to the math kernel, so there the repeat stays."""
    return q.device.type != "cuda" or q.dtype in (torch.float16, torch.bfloat16)


def _repeat_kv(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Hugging Face's ``repeat_kv``, as the capture recorded it: each K/V head repeated
    ``n_heads // heads`` times, adjacently (the grouping ``enable_gqa`` uses)."""
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n_heads // h, s, d).reshape(b, n_heads, s, d)


# -- analysis -----------------------------------------------------------------------------------


def _call_args(node: fx.Node) -> dict[str, Any]:
    out = dict(zip(_SIG, node.args))
    out.update(node.kwargs)
    return out


def _is_size_leaf(n: fx.Node) -> bool:
    if n.op == "call_function" and n.target in _SIZE_OPS:
        return True
    if n.op == "call_method" and n.target in ("size", "dim", "numel"):
        return True
    if n.op == "call_function" and n.target is getattr and len(n.args) > 1 and n.args[1] == "shape":
        return True
    if n.op == "placeholder":
        val = n.meta.get(VAL)
        return isinstance(val, (int, torch.SymInt)) and not isinstance(val, bool)
    return False


def _is_pure(n: fx.Node) -> bool:
    """A call whose result depends on its arguments only (no randomness, no state)."""
    if n.op == "call_method":
        return str(n.target) not in ("bernoulli_", "random_", "uniform_", "normal_", "exponential_")
    if n.op != "call_function":
        return False
    tags = getattr(n.target, "tags", ())
    if torch.Tag.nondeterministic_seeded in tags:
        return False
    return n.target not in (torch.rand, torch.randn, torch.randint, torch.randperm, F.dropout)


def _mutates(n: fx.Node) -> bool:
    """Whether ``n`` may write into one of its inputs: an in-place method (``masked_fill_``),
    an operator whose schema mutates an argument, item assignment."""
    if n.op == "call_method":
        return str(n.target).endswith("_") and not str(n.target).startswith("__")
    if n.op != "call_function":
        return False
    if n.target is operator.setitem:
        return True
    schema = getattr(n.target, "_schema", None)
    if schema is not None:
        return bool(schema.is_mutable)
    return "out" in n.kwargs or getattr(n.target, "__name__", "").endswith("_")


_LEAF, _MADE, _REFUSED = "leaf", "made", "refused"


def _rule(n: fx.Node) -> str:
    """The proof's verdict on one node, whatever reads it: a size (``_LEAF``: a size query, an
    integer stage input, a stage input recorded ``SIZE_ONLY``), a pure call whose value is made
    from its inputs alone (``_MADE``), or something that reads data, state or randomness
    (``_REFUSED``)."""
    if n.op == "placeholder" and SIZE_ONLY in n.meta and not any(_mutates(u) for u in n.users):
        return _LEAF
    if _is_size_leaf(n):
        return _LEAF
    if n.op in ("placeholder", "get_attr", "call_module", "output") or not _is_pure(n):
        return _REFUSED
    if any(_mutates(u) for u in n.users):  # written in place later (the fx route): not what was made
        return _REFUSED
    return _MADE


def _producers(value: fx.Node) -> tuple[list[fx.Node], list[fx.Node]] | None:
    """(size leaves, the nodes computing ``value`` from them, in graph order), or None when
    some producer reads a tensor's data, an attribute, a module or randomness. A stage input
    recorded ``SIZE_ONLY`` counts as a leaf of its own (expanded by ``_size_function``)."""
    leaves: list[fx.Node] = []
    nodes: set[fx.Node] = set()
    stack, seen = [value], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        rule = _rule(n)
        if rule == _LEAF:
            leaves.append(n)
            continue
        if rule == _REFUSED:
            return None
        nodes.add(n)
        stack.extend(n.all_input_nodes)
    order = {n: i for i, n in enumerate(value.graph.nodes)}
    return sorted(leaves, key=order.__getitem__), sorted(nodes, key=order.__getitem__)


def _int_value(n: fx.Node) -> bool:
    val = n.meta.get(VAL)
    return isinstance(val, (int, torch.SymInt)) and not isinstance(val, bool)


def size_only_values(gm: fx.GraphModule | fx.Graph) -> dict[fx.Node, frozenset[fx.Node]]:
    """Every node of ``gm`` that a stage can rebuild from integer sizes instead of receiving
    it, mapped to the integer values (size queries, integer inputs) it is made from.

    The proof is ``_producers``' (the one the attention rewrite uses): the node's producers are
    pure calls down to sizes, reading no tensor's data, no parameter or buffer, no module call,
    no randomness, written in place by none of their users. On top of it, every size it reads
    must be an ``int`` (what crosses a cut as 8 bytes; a whole ``torch.Size`` does not qualify),
    no tensor among them may require a gradient, and none may share storage with a tensor that
    something writes into later (a write through a view: ``_rule`` sees only direct writes).
    Computed in one sweep in graph order, so the answer per node is ``_producers(node)`` with
    these conditions added, at linear cost. Leaves themselves are not listed."""
    # deferred: split imports liveness, which imports this module
    from partitioner.passes.split import aliases, writes_into  # noqa: PLC0415

    graph = gm.graph if isinstance(gm, fx.GraphModule) else gm
    root = graph.owning_module
    made: dict[fx.Node, frozenset[fx.Node]] = {}
    leaf: dict[fx.Node, frozenset[fx.Node]] = {}
    for n in graph.nodes:
        rule = _rule(n)
        if rule == _LEAF:
            if _int_value(n):  # not a whole torch.Size, nor a stage input recorded SIZE_ONLY (a tensor)
                leaf[n] = frozenset((n,))
            continue
        if rule != _MADE:
            continue
        ins = n.all_input_nodes
        if not all(a in made or a in leaf for a in ins):
            continue
        val = n.meta.get(VAL)
        if isinstance(val, torch.Tensor) and val.requires_grad:
            continue
        made[n] = frozenset().union(*(made[a] if a in made else leaf[a] for a in ins))
    # a write into a view of a made tensor changes it after it was made: neither it nor what
    # was made from it may be rebuilt (forward, so the exclusion reaches every user)
    def writes(user: fx.Node, value: fx.Node) -> bool:  # a module call without its module: assume it may
        return user.op == "call_module" if root is None else writes_into(root, user, value)

    written = {n for n in made if isinstance(n.meta.get(VAL), torch.Tensor)
               and any(writes(u, a) for a in aliases(n) for u in a.users)}
    if written:
        for n in graph.nodes:
            if n in made and (n in written or any(a in written for a in n.all_input_nodes)):
                written.add(n)
                del made[n]
    return made


def _cpu(a: Any) -> Any:
    return torch.device("cpu") if isinstance(a, torch.device) else a


def _size_function(value: fx.Node, on_cpu: bool) -> tuple[list[fx.Node], fx.GraphModule] | None:
    """``value`` as a function of the sizes it reads: (the leaf nodes of this graph, in the
    function's argument order; the function), or None when it is not size-only. ``on_cpu``
    moves every device argument to the CPU (the proof evaluates there)."""
    found = _producers(value)
    if found is None:
        return None
    leaves, nodes = found
    g = fx.Graph()
    env: dict[fx.Node, Any] = {}
    args: list[fx.Node] = []
    for leaf in leaves:
        rec = leaf.meta.get(SIZE_ONLY) if leaf.op == "placeholder" else None
        if not isinstance(rec, SizeOnly):
            env[leaf] = g.placeholder(f"size_{len(args)}")
            args.append(leaf)
            continue
        # a stage input made elsewhere from sizes: inline its function over leaves of this graph
        by_name = {n.name: n for n in leaf.graph.nodes}
        if any(name not in by_name or not _is_size_leaf(by_name[name]) for name in rec.leaves):
            return None
        vmap: dict[fx.Node, Any] = {}
        for name, ph in zip(rec.leaves, [p for p in rec.fn.graph.nodes if p.op == "placeholder"]):
            src = by_name[name]
            if src not in args:
                env[src] = g.placeholder(f"size_{len(args)}")
                args.append(src)
            vmap[ph] = env[src]
        env[leaf] = g.graph_copy(rec.fn.graph, vmap)
    for n in nodes:
        new = g.node_copy(n, lambda a: env[a])
        if on_cpu:
            new.args, new.kwargs = pytree.tree_map(_cpu, new.args), pytree.tree_map(_cpu, new.kwargs)
        env[n] = new
    g.output(env[value])
    return args, fx.GraphModule(nn.Module(), g, class_name="SizeFunction")


def _strip_noop_slices(n: Any) -> Any:
    while (isinstance(n, fx.Node) and n.op == "call_function" and n.target is torch.ops.aten.slice.Tensor
           and len(n.args) >= 3 and n.args[2] in (0, None) and (len(n.args) < 4 or n.args[3] is None
                                                                or (isinstance(n.args[3], int) and n.args[3] >= _BIG))
           and (len(n.args) < 5 or n.args[4] == 1)):
        n = n.args[0]
    return n


def _shape(n: Any) -> tuple[Any, ...] | None:
    val = n.meta.get(VAL) if isinstance(n, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _same(a: Any, b: Any) -> bool:
    return a == b if isinstance(a, int) and isinstance(b, int) else str(a) == str(b)


def _unrepeated(r: Any) -> fx.Node | None:
    """K or V before Hugging Face's ``repeat_kv`` when ``r`` is its result
    (``reshape(expand(unsqueeze(x, 2)))``, no-op slices between, each head repeated
    adjacently), else None."""
    if not (isinstance(r, fx.Node) and r.op == "call_function"
            and r.target in (torch.ops.aten.reshape.default, torch.ops.aten.view.default)):
        return None
    e = r.args[0]
    if not (isinstance(e, fx.Node) and e.op == "call_function" and e.target is torch.ops.aten.expand.default):
        return None
    u = _strip_noop_slices(e.args[0])
    if not (isinstance(u, fx.Node) and u.op == "call_function" and u.target is torch.ops.aten.unsqueeze.default
            and u.args[1] in (2, -3)):
        return None
    x = _strip_noop_slices(u.args[0])
    xs, es, rs = _shape(x), _shape(e), _shape(r)
    if xs is None or es is None or rs is None or len(xs) != 4 or len(es) != 5 or len(rs) != 4:
        return None
    b, h, s, d = xs
    n = es[2]
    if not isinstance(n, int) or not isinstance(h, int):
        return None
    if not all(_same(p, q) for p, q in zip((es[0], es[1], es[3], es[4]), (b, h, s, d))):
        return None
    if not all(_same(p, q) for p, q in zip(rs, (b, h * n, s, d))):
        return None
    return x if isinstance(x, fx.Node) else None


# -- the passes ---------------------------------------------------------------------------------


def mark_size_only(gm: fx.GraphModule, stages: Sequence[fx.GraphModule]) -> int:
    """Record on each stage input that carries (part of) a size-only attention mask of the
    whole graph ``gm`` the function of sizes that makes it (``SIZE_ONLY``), so the stage that
    receives it can prove it causal (``rewrite_attention``). Returns how many inputs it marked."""
    masks = dict.fromkeys(a["attn_mask"] for n in gm.graph.nodes if n.op == "call_function" and n.target in SDPA_TARGETS
                          for a in [_call_args(n)] if isinstance(a.get("attn_mask"), fx.Node))  # every layer's: one
    wanted: dict[str, fx.Node] = {}
    for m in masks:
        found = _producers(m)
        if found is not None:
            wanted.update({n.name: n for n in (m, *found[1])})
    done = 0
    for st in stages:
        for ph in st.graph.find_nodes(op="placeholder"):
            src = wanted.get(ph.name)
            if src is None:
                continue
            made = _size_function(src, on_cpu=True)
            if made is not None:
                ph.meta[SIZE_ONLY] = SizeOnly(tuple(a.name for a in made[0]), made[1])
                done += 1
    return done


def rewrite_attention(gm: nn.Module) -> dict[str, list[str]]:
    """Rewrite, in place, every attention node of ``gm`` (and of the graph modules inside it)
    that runs a size-only mask, or repeats K/V for grouped-query attention, into a
    ``FusedAttention`` call (see the module docstring). Returns, and records in
    ``gm.meta[ATTENTION]``, the nodes rewritten (``"fused"``), those left with an explicit
    mask (``"explicit"``), and of these the ones the plan priced as the fused causal kernel
    (``"priced_fused"``: annotate found their mask made from sizes, the proof did not hold).
    A module already rewritten is left as it is."""
    if isinstance(gm, fx.GraphModule) and isinstance(gm.meta.get(ATTENTION), dict):
        return gm.meta[ATTENTION]  # type: ignore[no-any-return]
    report: dict[str, list[str]] = {"fused": [], "explicit": [], "priced_fused": []}
    for mod in list(gm.modules()):
        if not isinstance(mod, fx.GraphModule):
            continue
        _mark_calls(mod)
        changed = False
        for node in list(mod.graph.nodes):
            if node.op == "call_function" and node.target in SDPA_TARGETS:
                name, masked = node.name, isinstance(_call_args(node).get("attn_mask"), fx.Node)
                if _rewrite_node(mod, node):
                    changed = True
                    report["fused"].append(name)
                elif masked:
                    report["explicit"].append(name)
                    if getattr(node.meta.get(COST), "kind", "") == "attention-causal":
                        report["priced_fused"].append(name)
        if changed:
            mod.graph.lint()
            _recompile(mod)
    if isinstance(gm, fx.GraphModule):
        gm.meta[ATTENTION] = report
    return report


def _mark_calls(gm: fx.GraphModule) -> None:
    """For each graph module ``gm`` calls (a block FSDP outlined, ``runtime.outline``): record
    on its inputs that carry an attention mask made in ``gm`` from sizes the function that
    makes it (``SIZE_ONLY``, over ``gm``'s size nodes, which the block receives under the same
    names), so the block proves it as the stage would."""
    for call in gm.graph.find_nodes(op="call_module"):
        sub = gm.get_submodule(str(call.target))
        if not isinstance(sub, fx.GraphModule) or isinstance(sub, FusedAttention):
            continue
        phs = list(sub.graph.find_nodes(op="placeholder"))
        for ph in _mask_inputs(sub):
            i = phs.index(ph)
            arg = call.args[i] if i < len(call.args) else None
            if SIZE_ONLY in ph.meta or not isinstance(arg, fx.Node):
                continue
            made = _size_function(arg, on_cpu=True)
            if made is not None:
                ph.meta[SIZE_ONLY] = SizeOnly(tuple(a.name for a in made[0]), made[1])


def _mask_inputs(gm: fx.GraphModule) -> set[fx.Node]:
    """The placeholders an attention mask of ``gm`` is computed from through pure calls."""
    out: set[fx.Node] = set()
    stack = [m for n in gm.graph.nodes if n.op == "call_function" and n.target in SDPA_TARGETS
             for m in [_call_args(n).get("attn_mask")] if isinstance(m, fx.Node)]
    seen: set[fx.Node] = set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            out.add(n)
        elif _is_pure(n):
            stack.extend(n.all_input_nodes)
    return out


def _recompile(gm: fx.GraphModule) -> None:
    """``gm.recompile()`` on the class fx generated the code for. A module FSDP has sharded
    (``fully_shard``) is an instance of a subclass FSDP made of that class; fx's recompile on
    the subclass would wrap ``__call__`` around the class's own wrapper, which calls back into
    the subclass's: infinite recursion. So the code goes to the class that owns ``forward``,
    which the subclass inherits (as ``RankStage`` retypes graphs before sharding for this reason)."""
    cls = type(gm)
    owner = next((c for c in cls.__mro__ if issubclass(c, fx.GraphModule) and "forward" in vars(c)), cls)
    if owner is cls:
        gm.recompile()
        return
    gm.__class__ = owner
    try:
        gm.recompile()
    finally:
        gm.__class__ = cls


def _rewrite_node(gm: fx.GraphModule, node: fx.Node) -> bool:
    a = _call_args(node)
    q, k, v, mask = a.get("query"), a.get("key"), a.get("value"), a.get("attn_mask")
    if not all(isinstance(t, fx.Node) for t in (q, k, v)):
        return False
    dropout = a.get("dropout_p", 0.0)
    if isinstance(dropout, fx.Node) or dropout != 0.0 or a.get("enable_gqa", False) is not False:
        return False
    if mask is not None and a.get("is_causal", False) is not False:
        return False
    k0, v0 = _unrepeated(k), _unrepeated(v)
    qs, k0s = _shape(q), _shape(k0) if k0 is not None else None
    repeat = (k0 is not None and v0 is not None and k0s is not None and k0s == _shape(v0) and qs is not None
              and len(qs) == 4)
    if mask is not None and not isinstance(mask, fx.Node):
        return False
    check_fn = mask_fn = None
    sizes: list[fx.Node] = []
    keep_mask: Any = None
    if isinstance(mask, fx.Node):
        made = _size_function(mask, on_cpu=True)
        if made is None:
            return False
        sizes, check_fn = made
        alive = mask.op == "placeholder" or any(u is not node for u in mask.users)
        if alive:
            keep_mask = mask
        else:
            local = _size_function(mask, on_cpu=False)
            if local is None or local[0] != sizes:
                keep_mask = mask  # cannot remake it: keep it alive for the fallback
            else:
                mask_fn = local[1]
    elif not repeat:
        return False  # no mask and nothing repeated: as priced already
    kwargs = {n: a[n] for n in ("dropout_p", "is_causal", "scale") if n in a}
    if isinstance(mask, fx.Node) and "is_causal" in kwargs:
        kwargs["is_causal"] = False
    target = node.target
    site = FusedAttention(node.name, target, kwargs, repeat, check_fn, mask_fn)  # type: ignore[arg-type]
    if not hasattr(gm, _PREFIX):
        gm.add_module(_PREFIX, nn.Module())
    getattr(gm, _PREFIX).add_module(node.name, site)
    with gm.graph.inserting_before(node):
        call = gm.graph.call_module(f"{_PREFIX}.{node.name}",
                                    (q, k0 if repeat else k, v0 if repeat else v, keep_mask, *sizes))
    call.meta = dict(node.meta)
    node.replace_all_uses_with(call)
    gm.graph.erase_node(node)
    _drop_dead([k, v, mask] if isinstance(mask, fx.Node) else [k, v])
    return True


def _drop_dead(roots: list[Any]) -> None:
    """Erase the nodes nothing uses any more from ``roots`` upwards (the repeat, the mask's
    subgraph), with the dtype assertions export hangs on them."""
    stack = [r for r in roots if isinstance(r, fx.Node)]
    while stack:
        n = stack.pop()
        if getattr(n, "_erased", False) or n.op in ("placeholder", "output", "get_attr") or not _is_pure(n):
            continue
        users = list(n.users)
        if any(not _is_assert(u) for u in users):
            continue
        ins = list(n.all_input_nodes)
        for u in users:
            n.graph.erase_node(u)
        n.graph.erase_node(n)
        stack.extend(ins)


def _is_assert(n: fx.Node) -> bool:
    return n.op == "call_function" and n.target in (torch.ops.aten._assert_tensor_metadata.default,) and not n.users


