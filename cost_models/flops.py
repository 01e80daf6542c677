"""Forward FLOPs of one aten op, from shapes: pure formulas, symbolic in B and S.

Tensors are passed as ``Shape`` (a tuple of ints or sympy expressions) wherever they sit
in the op's arguments; everything else (ints, lists, bools) as it is. Two numbers per op:

- ``fc_flops``: what ``torch.utils.flop_counter.FlopCounterMode`` counts. For every op in
  its registry (mm, addmm, bmm, baddbmm, _scaled_mm, convolution[_backward], the SDPA
  kernels and their backwards) we call torch's own registered formula with our shapes,
  so the numbers agree by construction (torch/utils/flop_counter.py, ``flop_registry``).
  Ops outside the registry count 0 there.
- ``op_flops``: everything we price. Equal to ``fc_flops`` on registry ops; for the rest,
  per-element constants below (fvcore's conventions for norms: 5 FLOPs per element with an
  affine transform, 4 without, fvcore/nn/jit_handles.py ``norm_flop_counter``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import sympy
import torch
from torch.utils import _pytree as pytree
from torch.utils import flop_counter as fc

from cost_models.errors import CostModelError

__all__ = [
    "Shape",
    "counted_by_flop_counter",
    "fc_flops",
    "op_flops",
    "op_name",
    "register_cpu_flash_attention_flops",
]

aten = torch.ops.aten


class Shape(tuple):  # type: ignore[type-arg]
    """A tensor argument, by its shape (so it is not mistaken for an int-list argument)."""


def op_name(op: Any) -> str:
    """``aten.mm.default`` / ``aten.mm`` / ``"aten::mm.default"`` / ``"mm"`` → ``"mm"``."""
    if isinstance(op, torch._ops.OpOverload):
        return op._overloadpacket.__name__
    if isinstance(op, torch._ops.OpOverloadPacket):
        return op.__name__
    if isinstance(op, str):
        return op.split("::")[-1].split(".")[0]
    raise CostModelError(f"cannot price {op!r}: expected an aten OpOverload, packet or op name")


def _packet(op: Any) -> Any:
    if isinstance(op, torch._ops.OpOverload):
        return op._overloadpacket
    if isinstance(op, torch._ops.OpOverloadPacket):
        return op
    return getattr(aten, op_name(op), None)


def counted_by_flop_counter(op: Any) -> bool:
    """Whether ``FlopCounterMode`` (created now) would count ``op``."""
    return _packet(op) in fc.flop_registry


def fc_flops(op: Any, args: Sequence[Any], kwargs: Mapping[str, Any], out: Any) -> sympy.Expr:
    """FLOPs that ``FlopCounterMode`` counts for ``op`` on these shapes (0 if it counts none)."""
    formula = fc.flop_registry.get(_packet(op))
    if formula is None:
        return sympy.Integer(0)
    if getattr(formula, "_get_raw", False) or not hasattr(formula, "__wrapped__"):
        # Raw formulas (flash/efficient attention) read ``t.shape`` from real tensors.
        def raw(x: Any) -> Any:
            return SimpleNamespace(shape=x) if isinstance(x, Shape) else x

        args, kwargs, out = pytree.tree_map(raw, (tuple(args), dict(kwargs), out), is_leaf=_is_shape)
    return sympy.sympify(formula(*args, **kwargs, out_val=out))


def _is_shape(x: Any) -> bool:
    return isinstance(x, Shape)


def _numel(shape: Sequence[Any]) -> sympy.Expr:
    return sympy.Mul(*shape) if shape else sympy.Integer(1)


def _out_numel(out: Any) -> sympy.Expr:
    leaves = [s for s in pytree.tree_leaves(out, is_leaf=_is_shape) if isinstance(s, Shape)]
    return sympy.Add(*(_numel(s) for s in leaves)) if leaves else sympy.Integer(0)


# Costs of one exp/log/erf/tanh/sqrt evaluation: we count 4 FLOPs, a rough figure for the
# polynomial/SFU work; throughput-bound ops this cheap are memory-bound anyway.
_T = 4
# FLOPs per *output* element. Arithmetic is 1; composites add their parts.
_PER_OUT: dict[str, int] = {
    **dict.fromkeys(
        [
            "add",
            "sub",
            "rsub",
            "mul",
            "div",
            "neg",
            "abs",
            "relu",
            "clamp",
            "clamp_min",
            "clamp_max",
            "maximum",
            "minimum",
            "where",
            "masked_fill",
            "threshold_backward",
            "eq",
            "ne",
            "lt",
            "le",
            "gt",
            "ge",
            "logical_not",
            "bitwise_not",
            "sign",
            "reciprocal",
            "square",
            "pow",
            "floor",
            "ceil",
            "round",
            "remainder",
            "fmod",
            "hardtanh",
            "leaky_relu",
        ],
        1,
    ),
    **dict.fromkeys(["addcmul", "addcdiv", "lerp", "hardtanh_backward"], 2),
    **dict.fromkeys(
        ["exp", "exp2", "expm1", "log", "log2", "log1p", "sin", "cos", "tan", "tanh", "erf", "sqrt", "rsqrt"], _T
    ),
    "sigmoid": _T + 2,  # 1 / (1 + exp(-x))
    "silu": _T + 3,  # x * sigmoid(x)
    "gelu": _T + 4,  # 0.5 * x * (1 + erf(x / sqrt 2)), or the tanh form
    "sigmoid_backward": 3,  # g * y * (1 - y)
    "tanh_backward": 3,  # g * (1 - y^2)
    "silu_backward": _T + 6,
    "gelu_backward": _T + 8,
    "_softmax": _T + 3,  # max, subtract, exp, sum, divide
    "_log_softmax": _T + 4,  # max, subtract, exp, sum, log (per row), subtract
    "_softmax_backward_data": 4,  # y * (g - sum(g * y))
    "_log_softmax_backward_data": _T + 3,
}
# FLOPs per *input* element (argument 0): reductions and statistics.
_PER_IN: dict[str, int] = {
    **dict.fromkeys(
        ["sum", "mean", "amax", "amin", "max", "min", "prod", "argmax", "argmin", "any", "all", "norm", "logsumexp"], 1
    ),
    **dict.fromkeys(["var", "std", "var_mean", "std_mean"], 3),
    **dict.fromkeys(["_adaptive_avg_pool2d", "_adaptive_avg_pool3d", "adaptive_max_pool2d"], 1),
    "embedding_dense_backward": 1,  # one accumulate per gradient element (index_add)
}
# Norms, fvcore's convention: per input element, 5 with an affine transform, 4 without;
# backward twice that (two passes over the statistics).
_NORMS: dict[str, tuple[int, int]] = {  # name → (weight argument index, fwd/bwd factor)
    "native_layer_norm": (2, 1),
    "native_batch_norm": (1, 1),
    "_native_batch_norm_legit": (1, 1),
    "_native_batch_norm_legit_functional": (1, 1),
    "_native_batch_norm_legit_no_training": (1, 1),
    "native_group_norm": (1, 1),
    "_fused_rms_norm": (2, 1),
    "native_layer_norm_backward": (5, 2),
    "native_batch_norm_backward": (2, 2),
    "native_group_norm_backward": (4, 2),
    "_fused_rms_norm_backward": (4, 2),
}
_POOLS = {"max_pool1d", "max_pool2d_with_indices", "max_pool3d_with_indices", "avg_pool1d", "avg_pool2d", "avg_pool3d"}


def op_flops(op: Any, args: Sequence[Any], kwargs: Mapping[str, Any], out: Any) -> sympy.Expr:
    """All forward FLOPs we price for ``op`` (a backward op is priced as its own forward)."""
    name = op_name(op)
    if counted_by_flop_counter(op):
        return fc_flops(op, args, kwargs, out)
    if name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward"):
        return _cpu_flash(name, args)
    if name == "matmul":
        a = args[0]
        return 2 * _out_numel(out) * a[-1]
    if name == "linear":
        return 2 * _out_numel(out) * args[0][-1]
    if name in _NORMS:
        w_idx, factor = _NORMS[name]
        affine = len(args) > w_idx and isinstance(args[w_idx], Shape)
        return factor * (5 if affine else 4) * _numel(args[0 if factor == 1 else 1])
    if name in _POOLS:
        kernel = args[1] if len(args) > 1 else kwargs.get("kernel_size", (1,))
        return _out_numel(out if isinstance(out, Shape) else out[0]) * math.prod(kernel)
    if name.endswith(("pool2d_backward", "pool3d_backward", "pool2d_with_indices_backward")):
        return _out_numel(out)
    base = name.rstrip("_") if name not in _PER_OUT else name  # in-place add_ prices as add
    if base in _PER_IN:
        return _PER_IN[base] * _numel(args[0])
    if base in _PER_OUT:
        return _PER_OUT[base] * _out_numel(out)
    if base in _ZERO or base.startswith(("new_", "empty", "zeros", "ones", "full", "sym_", "_to_")):
        return sympy.Integer(0)
    return _out_numel(out)  # unknown op: assume elementwise, 1 FLOP per output element


# Data movement only: views, copies, gathers, factories. Priced by bytes, not FLOPs.
_ZERO = {
    "view",
    "_unsafe_view",
    "reshape",
    "_reshape_alias",
    "transpose",
    "t",
    "permute",
    "expand",
    "expand_as",
    "slice",
    "select",
    "unsqueeze",
    "squeeze",
    "split",
    "split_with_sizes",
    "chunk",
    "narrow",
    "as_strided",
    "alias",
    "detach",
    "clone",
    "copy",
    "contiguous",
    "cat",
    "stack",
    "index",
    "index_select",
    "gather",
    "scatter",
    "embedding",
    "arange",
    "fill",
    "lift_fresh",
    "unbind",
    "flatten",
    "unflatten",
    "scalar_tensor",
    "zero",
    "bernoulli",
    "native_dropout",
    "rand",
    "randn",
    "randint",
    "view_as",
    "_unsafe_index",
    "slice_scatter",
    "select_scatter",
    "index_put",
    "repeat",
    "roll",
    "flip",
    "tril",
    "triu",
    "masked_select",
    "nonzero",
    "where_self",
    "_local_scalar_dense",
    "item",
}


def _cpu_flash(name: str, args: Sequence[Any]) -> sympy.Expr:
    if name.endswith("_backward"):
        return sympy.sympify(fc.sdpa_backward_flop_count(args[0], args[1], args[2], args[3]))
    return sympy.sympify(fc.sdpa_flop_count(args[0], args[1], args[2]))


def register_cpu_flash_attention_flops() -> None:
    """Teach ``FlopCounterMode`` the CPU flash-attention kernels (it counts 0 for them).

    Same formulas torch uses for the CUDA flash kernel (``sdpa_flop``/``sdpa_backward_flop``);
    idempotent. Call before creating the ``FlopCounterMode``: it copies the registry.
    """
    fwd = aten._scaled_dot_product_flash_attention_for_cpu
    bwd = aten._scaled_dot_product_flash_attention_for_cpu_backward
    if fwd not in fc.flop_registry:

        @fc.register_flop_formula(fwd)
        def _fwd(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
            return fc.sdpa_flop_count(query, key, value)

    if bwd not in fc.flop_registry:

        @fc.register_flop_formula(bwd)
        def _bwd(
            grad_out: Any, query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any
        ) -> int:
            return fc.sdpa_backward_flop_count(grad_out, query, key, value)
