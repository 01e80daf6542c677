"""Forward FLOPs of one aten op, from shapes: pure formulas, symbolic in B and S.

Tensors are passed as ``Shape`` (a tuple of ints or sympy expressions) wherever they sit
in the op's arguments; everything else (ints, lists, bools) as it is. Two numbers per op:

- ``fc_flops``: what ``torch.utils.flop_counter.FlopCounterMode`` counts. For every op in
  its registry (mm, addmm, bmm, baddbmm, _scaled_mm, convolution[_backward], the SDPA
  kernels and their backwards) we call torch's own registered formula with our shapes,
  so the numbers agree by construction (torch/utils/flop_counter.py, ``flop_registry``).
  Ops outside the registry count 0 there.
- ``op_flops``: everything we price. Equal to ``fc_flops`` on registry ops; for the rest,
  the rule registered in ``OP_RULES`` under the op's name (``register_op_rule``): formulas
  (matmul, linear, norms, pools, CPU flash attention) and per-element constants (fvcore's
  conventions for norms: 5 FLOPs per element with an affine transform, 4 without,
  fvcore/nn/jit_handles.py ``norm_flop_counter``).

Where a new op's rule goes: ``@register_op_rule("op_name")`` on a function ``(args, kwargs,
out) -> sympy.Expr`` (shapes as ``Shape``), here or in user code before ``partition()``. An op
with no rule is priced as elementwise, one FLOP per output element, and logged once at DEBUG
(``partitioner.cost_models.flops``) so ``PARTITIONER_LOG=debug`` lists the ops priced that way. Ops that
``FlopCounterMode`` counts use torch's formula; registering a rule for one is refused.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import sympy
import torch
from torch.utils import _pytree as pytree
from torch.utils import flop_counter as fc

from partitioner.cost_models.errors import CostModelError

__all__ = [
    "OP_RULES",
    "Shape",
    "counted_by_flop_counter",
    "fc_flops",
    "op_flops",
    "op_name",
    "register_cpu_flash_attention_flops",
    "register_op_rule",
]

log = logging.getLogger(__name__)

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


#: A cost rule: (args, kwargs, out) with tensors as ``Shape`` -> forward FLOPs (sympy, in B and S).
Rule = Callable[[Sequence[Any], Mapping[str, Any], Any], sympy.Expr]
#: op name (``op_name``: "mm", "native_layer_norm", ...) -> its rule. One entry per op.
OP_RULES: dict[str, Rule] = {}


def register_op_rule(*names: str, replace: bool = False) -> Callable[[Rule], Rule]:
    """Decorator: ``rule`` prices the ops ``names`` (aten names without overload, "add" also
    prices in-place "add_"). Refuses an op ``FlopCounterMode`` counts (torch's formula wins
    there, a rule would never run) and a second rule for one op unless ``replace=True``."""

    def wrap(rule: Rule) -> Rule:
        for name in names:
            if counted_by_flop_counter(name):
                raise CostModelError(f"op {name!r} is priced by torch.utils.flop_counter's own formula; "
                                     "a rule registered here would never run")
            if name in OP_RULES and not replace:
                raise CostModelError(f"op {name!r} already has a cost rule ({OP_RULES[name].__name__}); "
                                     "pass replace=True to replace it")
            OP_RULES[name] = rule
        return rule

    return wrap


_UNPRICED: set[str] = set()


def op_flops(op: Any, args: Sequence[Any], kwargs: Mapping[str, Any], out: Any) -> sympy.Expr:
    """All forward FLOPs we price for ``op`` (a backward op is priced as its own forward)."""
    if counted_by_flop_counter(op):
        return fc_flops(op, args, kwargs, out)
    name = op_name(op)
    rule = OP_RULES.get(name) or OP_RULES.get(name.rstrip("_"))  # in-place add_ prices as add
    if rule is None and name.rstrip("_").startswith(_ZERO_PREFIXES):
        return sympy.Integer(0)
    if rule is not None:
        return rule(args, kwargs, out)
    if name not in _UNPRICED:
        _UNPRICED.add(name)
        log.debug("no cost rule for op %r: priced as elementwise, 1 FLOP per output element "
                  "(add one with partitioner.cost_models.flops.register_op_rule)", name)
    return _out_numel(out)


def _per_out(k: int) -> Rule:
    def rule(args: Sequence[Any], kwargs: Mapping[str, Any], out: Any) -> sympy.Expr:
        return k * _out_numel(out)

    rule.__name__ = f"per_output_element_{k}"
    return rule


def _per_in(k: int) -> Rule:
    def rule(args: Sequence[Any], kwargs: Mapping[str, Any], out: Any) -> sympy.Expr:
        return k * _numel(args[0])

    rule.__name__ = f"per_input_element_{k}"
    return rule


def _zero(args: Sequence[Any], kwargs: Mapping[str, Any], out: Any) -> sympy.Expr:
    return sympy.Integer(0)


def _norm(w_idx: int, factor: int) -> Rule:
    def rule(args: Sequence[Any], kwargs: Mapping[str, Any], out: Any) -> sympy.Expr:
        affine = len(args) > w_idx and isinstance(args[w_idx], Shape)
        return factor * (5 if affine else 4) * _numel(args[0 if factor == 1 else 1])

    rule.__name__ = "norm"
    return rule


def _matmul(args: Sequence[Any], kwargs: Mapping[str, Any], out: Any) -> sympy.Expr:
    return 2 * _out_numel(out) * args[0][-1]


def _pool(args: Sequence[Any], kwargs: Mapping[str, Any], out: Any) -> sympy.Expr:
    kernel = args[1] if len(args) > 1 else kwargs.get("kernel_size", (1,))
    return _out_numel(out if isinstance(out, Shape) else out[0]) * math.prod(kernel)


def _pool_backward(args: Sequence[Any], kwargs: Mapping[str, Any], out: Any) -> sympy.Expr:
    return _out_numel(out)


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


# Names that are data movement or factories whatever their suffix (new_zeros, empty_like, sym_size, ...)
_ZERO_PREFIXES = ("new_", "empty", "zeros", "ones", "full", "sym_", "_to_")


def _register_builtin_rules() -> None:
    """The built-in table, one rule per op name (tables above turned into registry entries)."""
    for n in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward"):
        if not counted_by_flop_counter(n):  # once registered with FlopCounterMode, torch's formula prices it
            OP_RULES[n] = (lambda name: lambda args, kwargs, out: _cpu_flash(name, args))(n)
    OP_RULES["matmul"] = OP_RULES["linear"] = _matmul
    for n, (w_idx, factor) in _NORMS.items():
        OP_RULES[n] = _norm(w_idx, factor)
    for n in _POOLS:
        OP_RULES[n] = _pool
    for n in ("max_pool2d_with_indices_backward", "max_pool3d_with_indices_backward", "avg_pool2d_backward",
              "avg_pool3d_backward", "adaptive_max_pool2d_backward", "_adaptive_avg_pool2d_backward",
              "_adaptive_avg_pool3d_backward"):
        OP_RULES[n] = _pool_backward
    for n in _ZERO:
        OP_RULES[n] = _zero
    for n, k in _PER_OUT.items():
        OP_RULES[n] = _per_out(k)
    for n, k in _PER_IN.items():  # after _PER_OUT: a name in both is a reduction ("max", "min")
        OP_RULES[n] = _per_in(k)


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


_register_builtin_rules()
