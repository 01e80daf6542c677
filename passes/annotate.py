"""Per-node costs: run each node once more on fake tensors and price the aten ops it runs.

For a node we rebuild its inputs as fresh fake leaves (``requires_grad`` as shape
propagation found it), run it under ``_Recorder`` (a ``TorchDispatchMode`` that prices
every aten op with ``partitioner.cost_models.flops``, decomposing exactly as ``FlopCounterMode``
does), then call ``torch.autograd.grad`` on its outputs w.r.t. those leaves and the
node's own parameters: the backward ops priced are the ones autograd really runs, so a
first layer whose input needs no gradient is charged its weight gradients only, as
``FlopCounterMode`` would. Bytes saved for backward come from ``saved_tensors_hooks``.

Results are cached by a structural key (target + input shapes/dtypes/requires_grad), so
the 32 identical decoder layers of a Llama are priced once.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import sympy
import torch
from torch import fx
from torch._dispatch.python import enable_python_dispatcher
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.utils import _pytree as pytree
from torch.utils import flop_counter as fc
from torch.utils._python_dispatch import TorchDispatchMode

from partitioner.cost_models.cost import BATCH, SEQ, ZERO, NodeCost
from partitioner.cost_models.errors import PartitionError
from partitioner.cost_models.flops import Shape, fc_flops, op_flops
from partitioner.passes.base import Pass, TensorDesc
from partitioner.passes.meta import (
    COST,
    DESC,
    DEVICE,
    EXAMPLE,
    FAKE_MODE,
    FAKE_PARAMS,
    FAKES_BY_MODULE,
    RETYPE,
    SYMBOLS,
    VAL,
)
from partitioner.passes.shape_prop import (
    DATA_DEPENDENT,
    OnDevice,
    _real_like,
    node_key,
    quiet_fake_tensors,
    shown_for,
    state_by_module,
)

__all__ = ["FALLBACK", "REAL_RUN", "AnnotateCosts", "AnnotateError", "fallback_note", "is_attention", "param_users",
           "tensor_users"]

log = logging.getLogger(__name__)

# Metadata queries FlopCounterMode lets through without counting (flop_counter.py), a tensor's
# device (``prim.device``: the decompositions of gelu, layer norm, linear and the fused softmax ask
# it of each operand), and the checks torch.export records on metadata and on sizes
# (``_assert_tensor_metadata``, ``_assert_scalar``, the size constraints): none launches a kernel
# or touches a tensor's memory, so none is priced or listed among a node's ops.
_META_OPS = {
    getattr(torch.ops.aten, n).default
    for n in [
        "sym_is_contiguous",
        "is_contiguous",
        "is_strides_like_format",
        "is_non_overlapping_and_dense",
        "size",
        "sym_size",
        "stride",
        "sym_stride",
        "storage_offset",
        "sym_storage_offset",
        "numel",
        "sym_numel",
        "dim",
        "_assert_tensor_metadata",
        "_assert_scalar",
        "sym_constrain_range",
        "sym_constrain_range_for_size",
    ]
} | {torch.ops.aten.is_contiguous.memory_format, torch.ops.prim.layout.default, torch.ops.prim.device.default}

# Ops that run but move no bytes of their tensors: ``_unsafe_view`` is a view (a reshape of a
# contiguous result) that autograd does not mark as one (``OpOverload.is_view`` is False), and
# ``new_empty`` / ``new_empty_strided`` allocate as ``empty`` does. They stay in a node's ops
# (``devices.kernels`` counts no launch for them).
_NO_BYTES = {torch.ops.aten._unsafe_view.default, torch.ops.aten.new_empty.default,
             torch.ops.aten.new_empty_strided.default}

# Ops that overwrite their first operand (``self``) without reading it: ``copy_`` reads its source
# and writes ``self``, ``fill_`` / ``zero_`` only write it (and their functional forms write a new
# tensor of ``self``'s size). Their bytes are the other operands read plus the output written once;
# ``self`` is not charged as a read (an in-place op that does read ``self``, ``add_``, stays priced
# as a read of it plus a write).
_WRITE_ONLY = {
    getattr(getattr(torch.ops.aten, name), overload)
    for name, overloads in (("copy_", ("default",)), ("copy", ("default",)), ("fill_", ("Scalar", "Tensor")),
                            ("fill", ("Scalar", "Tensor")), ("zero_", ("default",)), ("zero", ("default",)))
    for overload in overloads
}


class AnnotateError(PartitionError):
    """Pricing the graph failed: a node's op could not be run on fake tensors, or the pass was
    run out of order (before shape-prop) or with a bad option."""


@dataclass(frozen=True)
class AnnotateCosts(Pass):
    """Write a ``NodeCost`` (symbolic in B and S) into ``meta["pp.cost"]`` of every node.

    ``target`` is the kind of device the plan is for. "cpu": every op is priced as the CPU
    kernels run it (the fakes live on the CPU, whatever device the model object is on).
    "gpu": the same, except attention (SDPA), which is priced as the CUDA flash and
    memory-efficient kernels run it (see ``_flash_attention``).
    """

    name = "annotate-costs"
    requires = (VAL, DESC)
    provides = (COST,)

    target: str = "gpu"

    def run(self, gm: fx.GraphModule) -> fx.GraphModule:
        if FAKE_MODE not in gm.meta:
            raise AnnotateError(f"annotate-costs needs shape-prop first: gm.meta has no {FAKE_MODE!r}")
        if self.target not in ("gpu", "cpu"):
            raise AnnotateError(f"AnnotateCosts.target must be 'gpu' or 'cpu', got {self.target!r}")
        mode, mapping = gm.meta[FAKE_MODE], gm.meta[SYMBOLS]
        fakes: dict[str, torch.Tensor] = gm.meta[FAKE_PARAMS]
        owned = _first_use_bytes(gm)
        cache: dict[str, NodeCost] = {}
        sizes = _Sizes(mapping, mode.shape_env)
        depends: dict[fx.Node, bool] = {}
        shown = shown_for(gm)
        out_memo: dict[TensorDesc, sympy.Expr] = {}
        final: dict[tuple[Any, ...], NodeCost] = {}
        for node in gm.graph.nodes:
            if node.op in ("placeholder", "output"):
                node.meta[COST] = NodeCost()
                continue
            key = node_key(node, gm, shown)
            assert key is not None  # annotate's key (shapes=False) exists for every node
            causal = is_attention(node) and not _data_mask(node, depends)
            key += "|causal" if causal else ""
            if key not in cache:
                with mode, OnDevice(gm.meta.get(DEVICE, torch.device("cpu")), gm.meta.get(RETYPE)), \
                        quiet_fake_tensors():
                    cost = _price_symbolic(node, gm, fakes, sizes, mode)
                    if is_attention(node):
                        cost = _attention(node, sizes, cost, self.target, causal)
                cache[key] = cost
            params, buffers = owned.get(node.name, (ZERO, ZERO))
            desc = node.meta[DESC]
            out_bytes = out_memo.get(desc) if type(desc) is TensorDesc else None
            if out_bytes is None:
                out_bytes = sum((_nbytes(d) for d in _descs(desc)), ZERO)
                if type(desc) is TensorDesc:
                    out_memo[desc] = out_bytes
            # structurally identical nodes with the same parameter bytes share one (frozen) record
            whole = (key, params, buffers, out_bytes)
            record = final.get(whole)
            if record is None:
                record = final[whole] = replace(cache[key], param_bytes=params, buffer_bytes=buffers,
                                                output_bytes=out_bytes)
            node.meta[COST] = record
        return gm


#: ``NodeCost.ops[0]`` of a node priced by the fallback (``_price_symbolic``); the plan notes name such nodes.
FALLBACK = "<priced at the example sizes, scaled with B and S>"


def _price_symbolic(node: fx.Node, gm: fx.GraphModule, fakes: dict[str, torch.Tensor], sizes: _Sizes,
                    mode: FakeTensorMode) -> NodeCost:
    """A node's cost as an expression in B and S, by the first of these that keeps its sizes symbolic.

    1. torch's kernels on the symbolic fakes, guards off: a kernel that reads a size as an
       int (constant_pad_nd) must not pin B or S for every later node;
    2. its own output then lost a symbol its shape has (shape-prop's), or such a kernel
       refused symbolic strides outright: again through the Python dispatcher (Python
       metas and decompositions, as torch.export traces), which keeps sizes symbolic. Not
       first: its decompositions differ from the C++ kernels in what aliases (eval-mode
       dropout returns a copy), which memory prices;
    3. neither keeps them (a kernel fails on symbolic sizes either way): the node runs on
       fakes of the example's sizes and each figure is scaled in proportion to the size
       symbols its output has (B/B0, S/S0). ``ops[0]`` is then ``FALLBACK`` and the
       reason, and the plan's notes name the node (``fallback_note``).
    """
    failed: AnnotateError | None = None
    try:
        with mode.shape_env.suppress_guards() if mode.shape_env is not None else contextlib.nullcontext():
            cost = _price(node, gm, fakes, sizes)
        if not _lost_symbols(cost, node.meta[DESC]):
            return cost
    except AnnotateError as e:
        failed = e
    _clear_fake_cache(mode)  # that run cached static outputs for symbolic inputs
    try:
        with enable_python_dispatcher():
            cost = _price(node, gm, fakes, sizes)
        if not _lost_in_new_storage(cost, node.meta[DESC]):
            return cost  # (a view keeps its base's storage, static when the base is a weight or buffer)
        why = "its kernels give its output fixed sizes"
    except AnnotateError as e:
        failed = failed or e
        why = _reason(failed)
    log.debug("cost of %s not derived symbolically (%s): priced at the example sizes", node.name, why)
    _clear_fake_cache(mode)
    try:
        static = _price(node, gm, fakes, sizes, at_example=True)
    except AnnotateError:
        if failed is not None:
            raise failed from None
        raise
    return _scaled(static, node.meta[DESC], gm.meta.get(EXAMPLE, {}), why)


def _reason(e: BaseException) -> str:
    cause = e.__cause__ or e
    text = (str(cause).strip().splitlines() or [""])[0]
    return f"{type(cause).__name__}: {text[:160]}"


def _scaled(cost: NodeCost, desc: Any, example: dict[str, int], why: str) -> NodeCost:
    """``cost`` (numbers at the example sizes) times (B/B0)(S/S0) for the symbols the
    node's output shape has."""
    symbols = set().union(*(sympy.sympify(e).free_symbols for d in _descs(desc) for e in d.shape))
    ratio: sympy.Expr = sympy.Integer(1)
    for name, sym in (("B", BATCH), ("S", SEQ)):
        if sym in symbols and example.get(name):
            ratio *= sym / sympy.Integer(example[name])

    def scale(e: sympy.Expr) -> sympy.Expr:
        return sympy.expand(sympy.sympify(e) * ratio)

    return replace(
        cost, fwd_flops=scale(cost.fwd_flops), bwd_flops=scale(cost.bwd_flops), fwd_flops_fc=scale(cost.fwd_flops_fc),
        bwd_flops_fc=scale(cost.bwd_flops_fc), saved_bytes=scale(cost.saved_bytes),
        fwd_bytes_moved=scale(cost.fwd_bytes_moved), saved_internal=scale(cost.saved_internal),
        out_storage=tuple(scale(e) for e in cost.out_storage), ops=(f"{FALLBACK} {why}", *cost.ops),
    )


def fallback_note(gm: fx.GraphModule) -> str | None:
    """The plan note naming the nodes ``_price_symbolic`` priced by its fallback, if any."""
    nodes = [n for n in gm.graph.nodes if (c := n.meta.get(COST)) is not None and c.ops
             and str(c.ops[0]).startswith(FALLBACK)]
    if not nodes:
        return None
    example = gm.meta.get(EXAMPLE, {})
    at = ", ".join(f"{k}={v}" for k, v in sorted(example.items()))
    shown = "; ".join(f"{n.name} ({n.meta[COST].ops[0].removeprefix(FALLBACK).strip()})" for n in nodes[:5])
    more = f"; and {len(nodes) - 5} more" if len(nodes) > 5 else ""
    return (f"cost fallback: {len(nodes)} node(s) could not be priced symbolically in B and S, so each was "
            f"priced at the example sizes ({at or 'static'}) and scaled in proportion to its output's "
            f"B and S: {shown}{more}")


def _clear_fake_cache(mode: FakeTensorMode) -> None:
    FakeTensorMode.cache_clear()
    cache = getattr(mode.shape_env, "fake_tensor_cache", None)  # with symbolic sizes, the cache is the env's
    if isinstance(cache, dict):
        cache.clear()


def _lost_in_new_storage(cost: NodeCost, desc: Any) -> bool:
    """Whether an output in a storage of its own (no input's) misses a size symbol its shape has."""
    descs = _descs(desc)
    if len(descs) != len(cost.out_storage) or len(cost.out_alias) != len(cost.out_storage):
        return _lost_symbols(cost, desc)
    for d, storage, alias in zip(descs, cost.out_storage, cost.out_alias):
        want = set().union(*(sympy.sympify(e).free_symbols for e in d.shape))
        if alias is None and want - sympy.sympify(storage).free_symbols:
            return True
    return False


def _lost_symbols(cost: NodeCost, desc: Any) -> bool:
    """Whether the priced run's outputs miss a size symbol that shape-prop gave them."""
    want = set().union(*(sympy.sympify(e).free_symbols for d in _descs(desc) for e in d.shape))
    if not want:
        return False
    got = set().union(*(sympy.sympify(e).free_symbols for e in cost.out_storage))
    return bool(want - got)


#: What the attention core is, as the two capture routes spell it.
_ATTENTION = {torch.ops.aten.scaled_dot_product_attention.default, torch._C._nn.scaled_dot_product_attention,
              torch.nn.functional.scaled_dot_product_attention}


def is_attention(node: fx.Node) -> bool:
    """An SDPA call: the attention core that selective recomputation re-runs."""
    return node.op == "call_function" and node.target in _ATTENTION


def _attention(node: fx.Node, sizes: _Sizes, cost: NodeCost, target: str, causal: bool) -> NodeCost:
    """SDPA as the target's kernel runs it.

    GPU: the CUDA flash / memory-efficient kernels keep q, k, v, the output and the
    log-sum-exp (B x H x Sq, fp32) for backward, never the S x S probabilities (the
    backward recomputes them), plus the mask when there is a real one (attn_bias of the
    memory-efficient kernel). FLOPs are PyTorch's own SDPA formulas
    (``flop_counter.sdpa_flop_count`` / ``sdpa_backward_flop_count``).

    Capture artefacts: a mask computed from shapes alone (no input's data reaches it) is
    the causal mask that export materialises where eager Hugging Face code passes no mask
    and ``is_causal`` (and, then, GQA in the kernel: see ``partitioner.memory``). It is
    priced as the kernel runs the eager call: not kept, on either target (the CPU kernel
    would otherwise keep it converted to float). ``kind`` records "attention-causal".
    A mask that depends on an input (padding) is real and is kept as priced.
    """
    lse = None
    q = _qkv(node)[0].meta[VAL]
    qs = Shape(sizes.expr(d) for d in q.shape)
    lse = sympy.Mul(*qs[:-1]) * 4  # log-sum-exp rows, fp32
    kind = "attention-causal" if causal else "attention"
    if target == "cpu":
        if causal:  # what the CPU kernel keeps without the mask: its refs and the log-sum-exp
            cost = replace(cost, saved_internal=lse, saved_bytes=cost.saved_bytes - cost.saved_internal + lse)
        return replace(cost, kind=kind)
    qkv = _qkv(node)
    q, k, v = (a.meta[VAL] for a in qkv)  # type: ignore[union-attr]
    qs, ks, vs = (Shape(sizes.expr(d) for d in t.shape) for t in (q, k, v))
    fwd = sympy.sympify(fc.sdpa_flop_count(qs, ks, vs))
    bwd = sympy.sympify(fc.sdpa_backward_flop_count(Shape((*qs[:-1], vs[-1])), qs, ks, vs))
    out = sympy.Mul(*qs[:-1]) * vs[-1] * _itemsize(q.dtype)
    io = sum((sympy.Mul(*s) * _itemsize(t.dtype) for s, t in ((qs, q), (ks, k), (vs, v))), ZERO) + out
    refs = [*(_input_index(node, a) for a in qkv), (-1, 0)]
    mask = _mask(node)
    saved = io + lse
    if mask is not None and not causal and isinstance(mask.meta.get(VAL), torch.Tensor):
        refs.append(_input_index(node, mask))
        saved += sizes.nbytes(mask.meta[VAL])
    return replace(
        cost, fwd_flops=fwd, bwd_flops=bwd, fwd_flops_fc=fwd, bwd_flops_fc=bwd, fwd_bytes_moved=io + lse,
        saved_bytes=saved, saved_internal=lse, saved_refs=tuple(refs), kind=kind,
        ops=("aten._scaled_dot_product_flash_attention (priced for a GPU target)",),
    )


def _qkv(node: fx.Node) -> list[fx.Node]:
    names = ("query", "key", "value")
    return [node.args[i] if i < len(node.args) else node.kwargs[names[i]] for i in range(3)]  # type: ignore[misc]


def _mask(node: fx.Node) -> fx.Node | None:
    m = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    return m if isinstance(m, fx.Node) else None


_SHAPE_QUERIES = {"sym_size", "size", "sym_numel", "numel", "dim", "sym_stride", "stride"}


def _data_mask(node: fx.Node, memo: dict[fx.Node, bool]) -> bool:
    """Whether the SDPA node's mask carries data from a model input (padding), rather than
    being built from shapes alone (a causal mask the capture materialised)."""
    mask = _mask(node)
    if mask is None:
        return False
    val = mask.meta.get(VAL)
    if isinstance(val, torch.Tensor) and val.requires_grad:  # a learned bias (T5's position bias)
        return True
    return _depends(mask, memo)


def _depends(node: fx.Node, memo: dict[fx.Node, bool]) -> bool:
    if not memo:  # one pass over the graph, in its (topological) order
        for n in node.graph.nodes:
            name = str(n.target) if n.op == "call_method" else getattr(n.target, "__name__", str(n.target)).split(".")[0]
            if n.op == "placeholder":
                memo[n] = True
            elif n.op == "get_attr" or name in _SHAPE_QUERIES:
                memo[n] = False
            else:
                memo[n] = any(memo.get(a, False) for a in n.all_input_nodes)
    return memo.get(node, True)


def param_users(gm: fx.GraphModule) -> dict[str, tuple[str, ...]]:
    """node name → FQNs of the parameters and buffers that node itself reads.

    ``call_module``: everything the module holds; ``get_attr``: the attribute (or, for a
    module, everything under it). Tied weights appear under each of their names.
    """
    named = dict(gm.named_parameters(remove_duplicate=False)) | dict(gm.named_buffers(remove_duplicate=False))
    under: dict[str, list[str]] = {}  # every module path prefix → the FQNs below it (and itself)
    for k in named:
        parts = k.split(".")
        for i in range(1, len(parts) + 1):
            under.setdefault(".".join(parts[:i]), []).append(k)
    users: dict[str, tuple[str, ...]] = {}
    for node in gm.graph.nodes:
        if node.op in ("call_module", "get_attr"):
            fqns = tuple(under.get(str(node.target), ()))
            if fqns:
                users[node.name] = fqns
    return users


def tensor_users(gm: fx.GraphModule) -> dict[str, tuple[str, ...]]:
    """compute node name → FQNs of the parameters and buffers it uses, directly
    (``call_module``) or through a ``get_attr`` input (what ``torch.export`` produces)."""
    direct = param_users(gm)
    out: dict[str, tuple[str, ...]] = {}
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        fqns = list(direct.get(node.name, ()))
        for a in node.all_input_nodes:
            if a.op == "get_attr":
                fqns += [f for f in direct.get(a.name, ()) if f not in fqns]
        if fqns:
            out[node.name] = tuple(fqns)
    return out


def _first_use_bytes(gm: fx.GraphModule) -> dict[str, tuple[sympy.Expr, sympy.Expr]]:
    """Parameter and buffer bytes per compute node, each tensor charged once, to its first
    user (a ``get_attr`` is no position of the solver: its first consumer pays)."""
    params = dict(gm.named_parameters(remove_duplicate=False))
    buffers = dict(gm.named_buffers(remove_duplicate=False))
    seen: set[int] = set()
    out: dict[str, tuple[sympy.Expr, sympy.Expr]] = {}
    for name, fqns in tensor_users(gm).items():
        p = b = 0
        for f in fqns:
            t = params.get(f, buffers.get(f))
            if t is None or id(t) in seen:  # a tied weight is paid for once
                continue
            seen.add(id(t))
            nbytes = t.numel() * t.element_size()
            p, b = (p + nbytes, b) if f in params else (p, b + nbytes)
        out[name] = (sympy.Integer(p), sympy.Integer(b))
    return out


class _Sizes:
    """SymInt → sympy in B/S, shapes → ``Shape``; nbytes of fake tensors."""

    def __init__(self, mapping: dict[Any, sympy.Expr], env: Any) -> None:
        self.mapping, self.env = mapping, env

    def expr(self, s: Any) -> sympy.Expr:
        if isinstance(s, int):
            return sympy.Integer(s)
        e = s.node.expr if self.env is None else self.env.replace(s.node.expr)
        return sympy.sympify(e).xreplace(self.mapping)

    def shapes(self, tree: Any) -> Any:
        def conv(x: Any) -> Any:
            if isinstance(x, torch.Tensor):
                return Shape(self.expr(s) for s in x.shape)
            if isinstance(x, (torch.SymInt, torch.SymFloat)):
                return self.expr(x)
            return x

        return pytree.tree_map(conv, tree)

    def nbytes(self, t: torch.Tensor) -> sympy.Expr:
        return sympy.Mul(*(self.expr(s) for s in t.shape)) * _itemsize(t.dtype)


def _itemsize(dtype: torch.dtype) -> int:
    # the dtype's own size, not an allocated tensor's: inside a retyping context (OnDevice with
    # a precision) a float32 tensor is made as bf16/fp16, and a cached answer would then price
    # every later fp32 tensor in the process at 2 bytes
    return dtype.itemsize


def _nbytes(d: TensorDesc) -> sympy.Expr:
    return (sympy.Mul(*d.shape) if d.shape else sympy.Integer(1)) * _itemsize(d.dtype)


def _descs(desc: Any) -> list[TensorDesc]:
    return [
        d for d in pytree.tree_leaves(desc, is_leaf=lambda x: isinstance(x, TensorDesc)) if isinstance(d, TensorDesc)
    ]


class _Recorder(TorchDispatchMode):
    """Prices every aten op that reaches it; decomposes as ``FlopCounterMode`` does."""

    def __init__(self, sizes: _Sizes) -> None:
        super().__init__()
        self.sizes = sizes
        self.flops = self.flops_fc = self.moved = ZERO
        self.ops: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _META_OPS or isinstance(func, torch._ops.HigherOrderOperator):
            return func(*args, **kwargs)
        with self:
            r = func.decompose(*args, **kwargs)
            if r is not NotImplemented:
                return r
        out = func(*args, **kwargs)
        s_args, s_kwargs, s_out = self.sizes.shapes((args, kwargs, out))
        self.flops += op_flops(func, s_args, s_kwargs, s_out)
        self.flops_fc += fc_flops(func, s_args, s_kwargs, s_out)
        # views and allocations move no bytes
        if not func.is_view and func not in _NO_BYTES and not str(func).startswith("aten.empty"):
            read = (args[1:], kwargs) if func in _WRITE_ONLY else (args, kwargs)  # ``self`` only written
            tensors = [t for t in pytree.tree_leaves((read, out)) if isinstance(t, torch.Tensor)]
            self.moved += sum((self.sizes.nbytes(t) for t in tensors), ZERO)
        self.ops.append(str(func))
        return out


def _at_example(v: Any) -> Any:
    """A fake value with every symbolic size at its example value (its hint)."""

    def hint(x: Any) -> Any:
        return int(x.node.hint) if isinstance(x, torch.SymInt) else x

    if isinstance(v, torch.Tensor):
        if not any(isinstance(d, torch.SymInt) for d in (*v.shape, *v.stride())):
            return v
        out = torch.empty_strided([hint(d) for d in v.shape], [hint(d) for d in v.stride()], dtype=v.dtype,
                                  device=v.device)
        return out.requires_grad_(v.requires_grad)
    return hint(v)


def _price(node: fx.Node, gm: fx.GraphModule, fakes: dict[str, torch.Tensor], sizes: _Sizes,
           at_example: bool = False) -> NodeCost:
    """``at_example``: run on fakes of the example's sizes (no size symbol reaches the kernels)."""
    if node.op == "get_attr":
        return NodeCost()
    leaves: list[torch.Tensor] = []

    def fresh(v: Any) -> Any:
        if not isinstance(v, torch.Tensor):
            return v
        if not v.requires_grad:
            # its own storage: shape-prop may give structurally identical nodes one shared value,
            # and two inputs must not look like one storage to the saved-tensor accounting
            return v.detach().clone()
        leaf = v.detach().requires_grad_(True)
        leaves.append(leaf)
        return leaf.clone()  # a non-leaf, so in-place ops on it stay legal

    # Which storage each tensor the node receives lives in: (j, i) = leaf i of fx input j.
    inputs: dict[int, tuple[int, int]] = {}
    n_inputs = [0]

    def value(a: Any) -> Any:
        if not isinstance(a, fx.Node):
            return a
        v = fresh(pytree.tree_map(_at_example, a.meta[VAL]) if at_example else a.meta[VAL])
        j = n_inputs[0]
        n_inputs[0] += 1
        for i, t in enumerate(_tensors(v)):
            inputs.setdefault(_storage(t), (j, i))
        return v

    args, kwargs = pytree.tree_map(value, (node.args, node.kwargs), is_leaf=lambda a: isinstance(a, fx.Node))
    if at_example:  # sizes computed by other nodes (view shapes) reach a node as SymInts
        args, kwargs = pytree.tree_map_only(torch.SymInt, _at_example, (args, kwargs))
    run, own = _runner(node, gm, fakes)
    own_storages = {_storage(p) for p in own}  # weights are static memory, not activations
    saved: dict[int, sympy.Expr] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage(t)
        if key not in own_storages:
            saved.setdefault(key, sizes.expr(t.untyped_storage().nbytes()))
        return t

    fwd = _Recorder(sizes)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), fwd:
            out = run(*args, **kwargs)
        outs = [o for o in pytree.tree_leaves(out) if isinstance(o, torch.Tensor) and o.requires_grad]
        wrt = leaves + [p for p in own if p.requires_grad]
        bwd = _Recorder(sizes)
        if outs and wrt:
            grads = [torch.ones_like(o) for o in outs]
            with bwd:
                torch.autograd.grad(outs, wrt, grads, allow_unused=True)
    except DATA_DEPENDENT:
        # A leaf that branches on data (shape-prop ran it for real): no fake run can price it.
        return _price_leaf_for_real(node, gm)
    except Exception as e:  # report the node, not the depths of autograd
        raise AnnotateError(f"cannot price node {node.format_node()}: {type(e).__name__}: {e}") from e
    outputs: dict[int, int] = {}
    alias: list[tuple[int, int] | None] = []
    storage: list[sympy.Expr] = []
    for i, o in enumerate(_tensors(out)):
        key = _storage(o)
        outputs.setdefault(key, i)
        alias.append(inputs.get(key))
        storage.append(sizes.expr(o.untyped_storage().nbytes()))
    refs: list[tuple[int, int]] = []
    internal = ZERO
    for key, nbytes in saved.items():
        if key in inputs:
            refs.append(inputs[key])
        elif key in outputs:
            refs.append((-1, outputs[key]))
        else:
            internal += nbytes
    return NodeCost(
        fwd_flops=fwd.flops, bwd_flops=bwd.flops, fwd_flops_fc=fwd.flops_fc, bwd_flops_fc=bwd.flops_fc,
        saved_bytes=sum(saved.values(), ZERO), fwd_bytes_moved=fwd.moved, ops=tuple(fwd.ops),
        saved_internal=internal, saved_refs=tuple(refs), out_alias=tuple(alias), out_storage=tuple(storage),
        kind="",
    )  # fmt: skip


#: ``NodeCost.ops[0]`` of a leaf module priced on one real run.
REAL_RUN = "<data-dependent leaf, priced on one real run>"


def _price_leaf_for_real(node: fx.Node, gm: fx.GraphModule) -> NodeCost:
    """A leaf module that branches on tensor data: one real forward and backward on random
    inputs of the example's sizes, FLOPs as ``FlopCounterMode`` counts them, bytes saved for
    backward from ``saved_tensors_hooks``; numbers for the example's sizes (a warning names
    the leaf). Weights on the meta device cannot run: 0 FLOPs, with a warning."""
    mod = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
    own = [p for p in mod.parameters()] if mod is not None else []
    if mod is None or any(t.device.type == "meta" for t in [*own, *mod.buffers()]):
        warnings.warn(f"cannot price leaf {node.format_node()}: it branches on tensor data and cannot run for "
                      "real here; its FLOPs count as 0", stacklevel=3)
        return NodeCost(ops=("<data-dependent leaf>",))
    device = next((t.device for t in [*own, *mod.buffers()]), torch.device("cpu"))
    with unset_fake_temporarily():
        leaves: list[torch.Tensor] = []

        def real(v: Any) -> Any:
            if not isinstance(v, torch.Tensor):
                return v
            t = _real_like(v).to(device)
            if v.requires_grad:
                t.requires_grad_(True)
                leaves.append(t)
            return t

        args, kwargs = pytree.tree_map(lambda a: pytree.tree_map(real, a.meta[VAL]) if isinstance(a, fx.Node) else a,
                                       (node.args, node.kwargs), is_leaf=lambda a: isinstance(a, fx.Node))
        own_storages = {_storage(p) for p in own}
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            if _storage(t) not in own_storages:
                saved.setdefault(_storage(t), t.untyped_storage().nbytes())
            return t

        buffers = [(b, b.detach().clone()) for b in mod.buffers()]  # running statistics stay as they were
        try:
            with fc.FlopCounterMode(display=False) as fwd, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = mod(*args, **kwargs)
            outs = [o for o in pytree.tree_leaves(out) if isinstance(o, torch.Tensor) and o.requires_grad]
            wrt = leaves + [p for p in own if p.requires_grad]
            with fc.FlopCounterMode(display=False) as bwd:
                if outs and wrt:
                    torch.autograd.grad(outs, wrt, [torch.ones_like(o) for o in outs], allow_unused=True)
        finally:
            with torch.no_grad():
                for b, before in buffers:
                    b.copy_(before)
        storage = tuple(sympy.Integer(o.untyped_storage().nbytes()) for o in _tensors(out))
    warnings.warn(f"leaf module {str(node.target)!r} branches on tensor data: priced from one real run on random "
                  "inputs of the example's sizes (FlopCounterMode), not symbolic", stacklevel=3)
    total = sympy.Integer(sum(saved.values()))
    f, b = sympy.Integer(fwd.get_total_flops()), sympy.Integer(bwd.get_total_flops())
    return NodeCost(fwd_flops=f, bwd_flops=b, fwd_flops_fc=f, bwd_flops_fc=b, saved_bytes=total,
                    saved_internal=total, out_alias=(None,) * len(storage), out_storage=storage, ops=(REAL_RUN,))


def _input_index(node: fx.Node, arg: fx.Node) -> tuple[int, int]:
    """(j, 0): ``arg`` is the node's j-th fx input in ``(args, kwargs)`` order."""
    flat = [a for a in pytree.tree_leaves((node.args, node.kwargs), is_leaf=lambda a: isinstance(a, fx.Node))
            if isinstance(a, fx.Node)]
    return flat.index(arg), 0


def _tensors(tree: Any) -> list[torch.Tensor]:
    """The tensor leaves of a value, in pytree order (the order ``saved_refs`` index)."""
    return [t for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


def _storage(t: torch.Tensor) -> int:
    """Identity of the storage under ``t`` (views, detaches and getitems share it)."""
    return int(t.untyped_storage()._cdata)


def _runner(
    node: fx.Node, gm: fx.GraphModule, fakes: dict[str, torch.Tensor]
) -> tuple[Callable[..., Any], list[torch.Tensor]]:
    """The callable a node runs, and the fake parameters it owns."""
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        index = gm.meta.get(FAKES_BY_MODULE)
        if index is None:
            index = gm.meta[FAKES_BY_MODULE] = state_by_module(fakes)
        state = dict(index.get(str(node.target), {}))
        unique = list({id(v): v for v in state.values()}.values())

        def call(*a: Any, **kw: Any) -> Any:
            return torch.func.functional_call(mod, state, a, kw, strict=False)

        return call, unique
    if node.op == "call_method":
        return (lambda self, *a, **kw: getattr(self, str(node.target))(*a, **kw)), []
    return node.target, []  # type: ignore[return-value]
