"""One evaluator of cost expressions (issue 13 item 4): ``partitioner.cost_models.cost.evaluate`` behind
pricing's ``Evaluator``, ``poly.evaluate`` (the plan's ``cost_at``, runtime wire shapes) and
``devices.evaluate`` (``DeviceSpec.node_time``). Before the merge they disagreed where an
expression is not an integer polynomial: the lambdified one returned floats (1.5 where the
others said 2) and rounded rationals through floating point."""

from __future__ import annotations

import pytest
import sympy

from partitioner.cost_models.cost import BATCH, SEQ, evaluate
from partitioner.cost_models.errors import CostModelError

# expressions shape-prop and the cost formulas really produce: rationals (causal attention
# halves S^2), ceilings (strided convolutions, chunking), and huge integers (70B FLOPs)
CASES = [
    (BATCH * 3 / 2, 3, 1, 5),  # 4.5 -> 5
    (SEQ**2 / 2 + SEQ / 2, 1, 7, 28),
    (sympy.ceiling(SEQ / 3) * BATCH, 2, 10, 8),
    (sympy.floor((SEQ - 1) / 2) + 1, 1, 9, 5),
    (sympy.Rational(1, 3) * BATCH * 3, 5, 1, 5),  # exact: no 5.000000001 -> 6
    (6 * 10**18 * BATCH + 1, 3, 1, 18 * 10**18 + 1),  # past float's 2**53
    (sympy.Integer(7), 9, 9, 7),
]


@pytest.mark.parametrize("expr,b,s,want", CASES)
def test_the_three_evaluators_agree(expr: sympy.Expr, b: int, s: int, want: int) -> None:
    from partitioner import poly
    from partitioner.cost_models.devices import evaluate as dev_evaluate
    from partitioner.pricing import Evaluator

    assert evaluate(expr, b, s) == want
    assert Evaluator(b, s)(expr) == want
    assert poly.evaluate(expr, b, s) == want
    assert dev_evaluate([expr], {"B": b, "S": s}) == [float(want)]


def test_plain_ints_pass_through_and_unknown_symbols_are_refused() -> None:
    assert evaluate(12, 3, 4) == 12
    with pytest.raises(CostModelError, match="other than B and S"):
        evaluate(BATCH * sympy.Symbol("s7"), 2, 2)


def test_poly_text_round_trip_evaluates_the_same() -> None:
    from partitioner import poly

    expr = 12 * BATCH**2 * SEQ + sympy.Rational(7, 2) * SEQ + 3
    assert poly.evaluate(poly.from_text(poly.to_text(expr)), 3, 5) == evaluate(expr, 3, 5) == 12 * 9 * 5 + 18 + 3


def test_poly_text_with_negative_terms_round_trips() -> None:
    """``S - 1`` (a shifted slice, padded back: MobileBERT) is a cost term; it once printed as
    ``+ -32*B``, which the plan schema refused, so such a plan could not be reloaded."""
    from partitioner import poly

    for expr in (160 * BATCH * SEQ**2 - 32 * BATCH + 32 * SEQ, SEQ - 1, 1 - SEQ, -2 * BATCH + SEQ, sympy.Integer(-5)):
        text = poly.to_text(expr)
        assert "+ -" not in text and sympy.expand(poly.from_text(text) - expr) == 0, text
    assert poly.to_text(SEQ - 1) == "S - 1" and poly.to_text(3 - 2 * BATCH) == "-2*B + 3"
    for bad in ("-", "B -", "B + - S", "2 -- B"):
        with pytest.raises(poly.PolyError):
            poly.from_text(bad)
