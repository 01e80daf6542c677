"""Per-node costs: run each node once more on fake tensors and price the aten ops it runs.

For a node we rebuild its inputs as fresh fake leaves (``requires_grad`` as shape
propagation found it), run it under ``_Recorder`` (a ``TorchDispatchMode`` that prices
every aten op with ``cost_models.flops``, decomposing exactly as ``FlopCounterMode``
does), then call ``torch.autograd.grad`` on its outputs w.r.t. those leaves and the
node's own parameters: the backward ops priced are the ones autograd really runs, so a
first layer whose input needs no gradient is charged its weight gradients only, as
``FlopCounterMode`` would. Bytes saved for backward come from ``saved_tensors_hooks``.

Results are cached by a structural key (target + input shapes/dtypes/requires_grad), so
the 32 identical decoder layers of a Llama are priced once.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sympy
import torch
from torch import fx
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from cost_models.cost import ZERO, NodeCost
from cost_models.flops import Shape, fc_flops, op_flops
from passes.base import Pass, TensorDesc
from passes.meta import COST, DESC, VAL
from passes.shape_prop import DATA_DEPENDENT, ShapePropError

__all__ = ["AnnotateCosts", "param_users"]

# Metadata queries FlopCounterMode lets through without counting (flop_counter.py).
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
    ]
} | {torch.ops.aten.is_contiguous.memory_format, torch.ops.prim.layout.default}


@dataclass(frozen=True)
class AnnotateCosts(Pass):
    """Write a ``NodeCost`` (symbolic in B and S) into ``meta["pp.cost"]`` of every node."""

    name = "annotate-costs"
    requires = (VAL, DESC)
    provides = (COST,)

    def run(self, gm: fx.GraphModule) -> fx.GraphModule:
        if "pp.fake_mode" not in gm.meta:
            raise ShapePropError("annotate-costs needs shape-prop first: gm.meta has no 'pp.fake_mode'")
        mode, mapping = gm.meta["pp.fake_mode"], gm.meta["pp.symbols"]
        fakes: dict[str, torch.Tensor] = gm.meta["pp.fake_params"]
        owned = _first_use_bytes(gm)
        cache: dict[str, NodeCost] = {}
        sizes = _Sizes(mapping, mode.shape_env)
        for node in gm.graph.nodes:
            if node.op in ("placeholder", "output"):
                node.meta[COST] = NodeCost()
                continue
            key = _key(node, gm)
            if key not in cache:
                with mode:
                    cache[key] = _price(node, gm, fakes, sizes)
            params, buffers = owned.get(node.name, (ZERO, ZERO))
            out_bytes = sum((_nbytes(d) for d in _descs(node.meta[DESC])), ZERO)
            cost = cache[key]
            node.meta[COST] = NodeCost(
                cost.fwd_flops, cost.bwd_flops, cost.fwd_flops_fc, cost.bwd_flops_fc,
                params, buffers, out_bytes, cost.saved_bytes, cost.fwd_bytes_moved, cost.ops,
            )  # fmt: skip
        return gm


def param_users(gm: fx.GraphModule) -> dict[str, tuple[str, ...]]:
    """node name → FQNs of the parameters and buffers that node itself reads.

    ``call_module``: everything the module holds; ``get_attr``: the attribute (or, for a
    module, everything under it). Tied weights appear under each of their names.
    """
    named = dict(gm.named_parameters(remove_duplicate=False)) | dict(gm.named_buffers(remove_duplicate=False))
    users: dict[str, tuple[str, ...]] = {}
    for node in gm.graph.nodes:
        if node.op in ("call_module", "get_attr"):
            t = str(node.target)
            fqns = tuple(k for k in named if k == t or k.startswith(t + "."))
            if fqns:
                users[node.name] = fqns
    return users


def _first_use_bytes(gm: fx.GraphModule) -> dict[str, tuple[sympy.Expr, sympy.Expr]]:
    """Parameter and buffer bytes per node, each tensor charged once, to its first user."""
    params = dict(gm.named_parameters(remove_duplicate=False))
    buffers = dict(gm.named_buffers(remove_duplicate=False))
    seen: set[int] = set()
    out: dict[str, tuple[sympy.Expr, sympy.Expr]] = {}
    for name, fqns in param_users(gm).items():
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


def _key(node: fx.Node, gm: fx.GraphModule) -> str:
    """What a node's cost depends on: what it runs and the shapes it runs on."""

    def show(a: Any) -> Any:
        return a.meta.get(DESC) if isinstance(a, fx.Node) else a

    args = pytree.tree_map(show, (node.args, node.kwargs), is_leaf=lambda a: isinstance(a, fx.Node))
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        state = [(k, tuple(v.shape), v.dtype, v.requires_grad) for k, v in mod.state_dict(keep_vars=True).items()]
        target: Any = (type(mod).__qualname__, mod.extra_repr(), mod.training, state)
    elif node.op == "get_attr":
        target = node.meta.get(DESC)
    else:
        target = getattr(node.target, "__module__", ""), getattr(node.target, "__qualname__", node.target)
    return repr((node.op, target, args))


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


@functools.cache
def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


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
        if func is not torch.ops.prim.device.default:
            with self:
                r = func.decompose(*args, **kwargs)
                if r is not NotImplemented:
                    return r
        out = func(*args, **kwargs)
        s_args, s_kwargs, s_out = self.sizes.shapes((args, kwargs, out))
        self.flops += op_flops(func, s_args, s_kwargs, s_out)
        self.flops_fc += fc_flops(func, s_args, s_kwargs, s_out)
        if not func.is_view:  # a view moves no bytes
            tensors = [t for t in pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
            self.moved += sum((self.sizes.nbytes(t) for t in tensors), ZERO)
        self.ops.append(str(func))
        return out


def _price(node: fx.Node, gm: fx.GraphModule, fakes: dict[str, torch.Tensor], sizes: _Sizes) -> NodeCost:
    if node.op == "get_attr":
        return NodeCost()
    leaves: list[torch.Tensor] = []

    def fresh(v: Any) -> Any:
        if not isinstance(v, torch.Tensor):
            return v
        if not v.requires_grad:
            return v.detach()
        leaf = v.detach().requires_grad_(True)
        leaves.append(leaf)
        return leaf.clone()  # a non-leaf, so in-place ops on it stay legal

    def value(a: Any) -> Any:
        return fresh(a.meta[VAL]) if isinstance(a, fx.Node) else a

    args, kwargs = pytree.tree_map(value, (node.args, node.kwargs), is_leaf=lambda a: isinstance(a, fx.Node))
    run, own = _runner(node, gm, fakes)
    saved: dict[int, sympy.Expr] = {}
    own_ids = {id(p) for p in own}

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if id(t) not in own_ids and id(base) not in own_ids:  # weights are counted as params
            saved.setdefault(id(base), sizes.nbytes(base))
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
        warnings.warn(f"cannot price leaf {node.format_node()}: it branches on tensor data; "
                      "its FLOPs count as 0", stacklevel=2)
        return NodeCost(ops=("<data-dependent leaf>",))
    except Exception as e:  # report the node, not the depths of autograd
        raise ShapePropError(f"cannot price node {node.format_node()}: {type(e).__name__}: {e}") from e
    return NodeCost(
        fwd_flops=fwd.flops, bwd_flops=bwd.flops, fwd_flops_fc=fwd.flops_fc, bwd_flops_fc=bwd.flops_fc,
        saved_bytes=sum(saved.values(), ZERO), fwd_bytes_moved=fwd.moved, ops=tuple(fwd.ops),
    )  # fmt: skip


def _runner(
    node: fx.Node, gm: fx.GraphModule, fakes: dict[str, torch.Tensor]
) -> tuple[Callable[..., Any], list[torch.Tensor]]:
    """The callable a node runs, and the fake parameters it owns."""
    if node.op == "call_module":
        mod, prefix = gm.get_submodule(str(node.target)), f"{node.target}."
        state = {k[len(prefix) :]: v for k, v in fakes.items() if k.startswith(prefix)}
        unique = list({id(v): v for v in state.values()}.values())

        def call(*a: Any, **kw: Any) -> Any:
            return torch.func.functional_call(mod, state, a, kw, strict=False)

        return call, unique
    if node.op == "call_method":
        return (lambda self, *a, **kw: getattr(self, str(node.target))(*a, **kw)), []
    return node.target, []  # type: ignore[return-value]
