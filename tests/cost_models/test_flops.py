"""FLOP formulas: exact integers, symbolic shapes, and agreement with FlopCounterMode."""

from __future__ import annotations

from typing import Any

import pytest
import sympy
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from partitioner.cost_models.cost import BATCH, SEQ
from partitioner.cost_models.errors import CostModelError
from partitioner.cost_models.flops import (
    Shape,
    counted_by_flop_counter,
    fc_flops,
    op_flops,
    op_name,
    register_cpu_flash_attention_flops,
)

aten = torch.ops.aten


def _shapes(tree: Any) -> Any:
    return torch.utils._pytree.tree_map(lambda t: Shape(t.shape) if isinstance(t, torch.Tensor) else t, tree)


def _both(op: Any, *args: Any) -> tuple[int, int]:
    """(our op_flops, FlopCounterMode's count) for one real call of ``op``."""
    with FlopCounterMode(display=False) as counter:
        out = op(*args)
    return int(op_flops(op, _shapes(args), {}, _shapes(out))), counter.get_total_flops()


r = torch.randn
CASES = {
    "mm": (aten.mm.default, r(4, 3), r(3, 5)),
    "addmm": (aten.addmm.default, r(5), r(4, 3), r(3, 5)),
    "bmm": (aten.bmm.default, r(2, 4, 3), r(2, 3, 5)),
    "baddbmm": (aten.baddbmm.default, r(2, 4, 5), r(2, 4, 3), r(2, 3, 5)),
    "conv1d": (aten.convolution.default, r(2, 4, 9), r(6, 4, 3), r(6), [2], [1], [1], False, [0], 1),
    "conv2d-groups": (
        aten.convolution.default,
        r(2, 4, 8, 8),
        r(8, 2, 3, 3),
        None,
        [1, 1],
        [1, 1],
        [1, 1],
        False,
        [0, 0],
        2,
    ),
    "conv2d-stride": (
        aten.convolution.default,
        r(2, 3, 9, 9),
        r(5, 3, 3, 3),
        r(5),
        [2, 2],
        [0, 0],
        [1, 1],
        False,
        [0, 0],
        1,
    ),
    "conv3d": (
        aten.convolution.default,
        r(1, 2, 4, 4, 4),
        r(3, 2, 2, 2, 2),
        None,
        [1, 1, 1],
        [0, 0, 0],
        [1, 1, 1],
        False,
        [0, 0, 0],
        1,
    ),
    "conv-transposed": (
        aten.convolution.default,
        r(2, 4, 5, 5),
        r(4, 3, 2, 2),
        r(3),
        [2, 2],
        [0, 0],
        [1, 1],
        True,
        [0, 0],
        1,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_flop_counter_mode(case: str) -> None:
    ours, theirs = _both(*CASES[case])
    assert ours == theirs > 0


def test_exact_integers() -> None:
    assert _both(aten.mm.default, r(2, 3), r(3, 5))[0] == 2 * 2 * 3 * 5
    # conv2d: out 2x5x4x4, each output 3*3*3 multiply-adds: 2 * 160 * 27.
    assert _both(*CASES["conv2d-stride"])[0] == 2 * (2 * 5 * 4 * 4) * 27


def test_symbolic_shapes() -> None:
    mm = op_flops(aten.mm.default, [Shape((BATCH * SEQ, 3)), Shape((3, 5))], {}, Shape((BATCH * SEQ, 5)))
    assert mm == 30 * BATCH * SEQ
    q = Shape((BATCH, 4, SEQ, 16))
    fwd = op_flops(aten._scaled_dot_product_flash_attention_for_cpu.default, [q, q, q], {}, (q, Shape((BATCH, 4, SEQ))))
    assert sympy.expand(fwd) == 2 * (2 * BATCH * 4 * SEQ**2 * 16)
    eff = fc_flops(aten._scaled_dot_product_efficient_attention.default, [q, q, q, None, False], {}, (q,))
    assert sympy.expand(eff) == sympy.expand(fwd)  # torch's formula, fed sympy sizes
    bwd = op_flops(aten._scaled_dot_product_flash_attention_for_cpu_backward.default, [q, q, q, q], {}, (q, q, q))
    assert sympy.expand(bwd) == 5 * (2 * BATCH * 4 * SEQ**2 * 16)  # recompute + 4 grad matmuls


def test_cpu_flash_attention_registration_is_idempotent_and_counts() -> None:
    register_cpu_flash_attention_flops()
    register_cpu_flash_attention_flops()
    assert counted_by_flop_counter(aten._scaled_dot_product_flash_attention_for_cpu.default)
    assert counted_by_flop_counter("aten::_scaled_dot_product_flash_attention_for_cpu_backward")
    q = torch.randn(2, 4, 8, 16, requires_grad=True)
    with FlopCounterMode(display=False) as fwd:
        out = F.scaled_dot_product_attention(q, q, q, is_causal=True)
    with FlopCounterMode(display=False) as bwd:
        out.sum().backward()
    assert fwd.get_total_flops() == 2 * (2 * 2 * 4 * 8 * 8 * 16)
    assert bwd.get_total_flops() == 5 * (2 * 2 * 4 * 8 * 8 * 16)


def test_counted_by_flop_counter() -> None:
    assert counted_by_flop_counter(aten.mm.default) and counted_by_flop_counter(aten.convolution_backward)
    assert not counted_by_flop_counter(aten.add.Tensor) and not counted_by_flop_counter("aten::native_layer_norm")
    assert fc_flops(aten.add.Tensor, [Shape((4,)), Shape((4,))], {}, Shape((4,))) == 0


x = Shape((BATCH, 8))


@pytest.mark.parametrize(
    "op, args, out, expected",
    [
        (aten.add.Tensor, [x, x], x, 8 * BATCH),  # 1 per output element
        (aten.add_.Tensor, [x, x], x, 8 * BATCH),  # in place: the same
        (aten.exp.default, [x], x, 4 * 8 * BATCH),  # transcendental: 4
        (aten.gelu.default, [x], x, 8 * 8 * BATCH),
        (aten._softmax.default, [x, -1, False], x, 7 * 8 * BATCH),
        (
            aten.native_layer_norm.default,
            [x, [8], Shape((8,)), Shape((8,)), 1e-5],
            (x, Shape((BATCH, 1)), Shape((BATCH, 1))),
            5 * 8 * BATCH,
        ),
        (
            aten.native_layer_norm.default,
            [x, [8], None, None, 1e-5],
            (x, Shape((BATCH, 1)), Shape((BATCH, 1))),
            4 * 8 * BATCH,
        ),
        (aten.sum.dim_IntList, [x, [1]], Shape((BATCH,)), 8 * BATCH),  # reduction: numel in
        (aten.var.correction, [x, [1]], Shape((BATCH,)), 3 * 8 * BATCH),
        (aten.view.default, [x, [BATCH, 2, 4]], Shape((BATCH, 2, 4)), 0),
        (aten.transpose.int, [x, 0, 1], Shape((8, BATCH)), 0),
        (aten.embedding.default, [Shape((10, 8)), Shape((BATCH,))], x, 0),  # a gather: bytes only
        (
            aten.max_pool2d_with_indices.default,
            [Shape((BATCH, 2, 4, 4)), [2, 2]],
            (Shape((BATCH, 2, 2, 2)), Shape((BATCH, 2, 2, 2))),
            8 * 4 * BATCH,
        ),
        (aten.avg_pool2d.default, [Shape((BATCH, 2, 4, 4)), [2, 2]], Shape((BATCH, 2, 2, 2)), 8 * 4 * BATCH),
        (
            aten.native_layer_norm_backward.default,
            [x, x, [8], Shape((BATCH, 1)), Shape((BATCH, 1)), Shape((8,)), Shape((8,)), [True, True, True]],
            (x, Shape((8,)), Shape((8,))),
            2 * 5 * 8 * BATCH,
        ),
        ("aten::some_unknown_op", [x], x, 8 * BATCH),  # unknown: assume elementwise
    ],
)
def test_per_element_rules(op: Any, args: list[Any], out: Any, expected: sympy.Expr) -> None:
    assert sympy.expand(op_flops(op, args, {}, out) - expected) == 0


def test_matmul_and_linear_when_not_decomposed() -> None:
    a, w = Shape((BATCH, SEQ, 3)), Shape((5, 3))
    assert op_flops("aten::linear", [a, w], {}, Shape((BATCH, SEQ, 5))) == 30 * BATCH * SEQ
    assert op_flops("matmul", [a, Shape((3, 5))], {}, Shape((BATCH, SEQ, 5))) == 30 * BATCH * SEQ


def test_op_name_and_errors() -> None:
    assert op_name(aten.mm.default) == op_name(aten.mm) == op_name("aten::mm.default") == "mm"
    with pytest.raises(CostModelError, match="cannot price 3: expected an aten OpOverload"):
        op_name(3)


# -- the per-op rule registry (issue 13 item 3) ----------------------------------------------


def test_every_builtin_table_entry_is_a_registry_rule() -> None:
    from partitioner.cost_models import flops

    for table in (flops._PER_OUT, flops._PER_IN, flops._ZERO, flops._NORMS, flops._POOLS):
        missing = [n for n in table if n not in flops.OP_RULES]
        assert not missing, missing
    assert flops.OP_RULES["matmul"] is flops.OP_RULES["linear"]


def test_a_registered_rule_prices_its_op_and_unknown_ops_are_elementwise() -> None:
    import logging

    from partitioner.cost_models import flops
    from partitioner.cost_models.cost import BATCH
    from tests.logs import captured

    x = flops.Shape((BATCH, 16))
    name = "pp_test_only_op"
    assert flops.op_flops(name, (x,), {}, x) == 16 * BATCH  # no rule: one FLOP per output element
    with captured("partitioner.cost_models.flops", logging.DEBUG) as records:
        flops.op_flops(name + "_2", (x,), {}, x)
        flops.op_flops(name + "_2", (x,), {}, x)
    assert sum(name + "_2" in r.getMessage() for r in records) == 1  # logged once per op

    @flops.register_op_rule(name)
    def seven_per_element(args: Any, kwargs: Any, out: Any) -> sympy.Expr:
        return 7 * flops._numel(args[0])

    try:
        assert flops.op_flops(name, (x,), {}, x) == 7 * 16 * BATCH
        assert flops.op_flops(name + "_", (x,), {}, x) == 7 * 16 * BATCH  # in-place variant
        with pytest.raises(CostModelError, match="already has a cost rule"):
            flops.register_op_rule(name)(seven_per_element)
        flops.register_op_rule(name, replace=True)(flops._zero)
        assert flops.op_flops(name, (x,), {}, x) == 0
    finally:
        del flops.OP_RULES[name]


def test_a_rule_for_an_op_torch_counts_is_refused() -> None:
    from partitioner.cost_models import flops

    with pytest.raises(CostModelError, match="flop_counter's own formula"):
        flops.register_op_rule("mm")(flops._zero)
    assert "mm" not in flops.OP_RULES
