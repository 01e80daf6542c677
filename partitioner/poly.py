"""Symbolic costs as text that loads without ``eval``: polynomials in B and S.

``sympy.sympify`` and ``parse_expr`` evaluate Python, so plans (user files, data) use
this small grammar instead: ``"4096*B*S + 12*B^2 + 7"``, ``"S - 1"`` — a sum of terms (signed by
``+``/``-``), each an integer or rational coefficient times powers of ``B`` and ``S``.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Mapping

import sympy

from partitioner.cost_models.cost import BATCH, SEQ
from partitioner.cost_models.cost import evaluate as cost_evaluate
from partitioner.cost_models.errors import PartitionError

__all__ = ["PolyError", "to_text", "from_text", "evaluate"]

_SYMBOLS = {"B": BATCH, "S": SEQ}
MAX_DEGREE = 16  # real costs are at most quadratic in S (attention); anything far past that is garbage
_TERM = re.compile(r"^(?:(\d+)(?:/(\d+))?)?((?:\*?[BS](?:\^\d+)?)*)$")
_FACTOR = re.compile(r"([BS])(?:\^(\d+))?")


class PolyError(PartitionError):
    """A cost expression is not a polynomial in B and S, or its text does not parse."""


def to_text(expr: sympy.Expr | int, at: Mapping[str, int] | None = None) -> str:
    """Canonical text of ``expr``; a non-polynomial is evaluated at ``at`` (or refused)."""
    expr = sympy.sympify(expr)
    try:
        poly = sympy.Poly(expr, BATCH, SEQ)
        if not all(c.is_rational for c in poly.coeffs()):
            raise sympy.PolynomialError(str(expr))
    except sympy.PolynomialError:
        if at is None:
            raise PolyError(f"cost {expr} is not a polynomial in B and S") from None
        return str(cost_evaluate(expr, at.get("B", 1), at.get("S", 1)))
    text = ""
    for (pb, ps), c in sorted(poly.terms(), reverse=True):
        factors = [f"B^{pb}" if pb > 1 else "B"] * (pb > 0) + [f"S^{ps}" if ps > 1 else "S"] * (ps > 0)
        coef = str(abs(sympy.Rational(c)))
        term = "*".join(factors) if factors and coef == "1" else "*".join([coef, *factors])
        sign = "-" if c < 0 else "+"
        text = (f"{text} {sign} {term}" if text else f"-{term}" if c < 0 else term)
    return text or "0"


def from_text(text: str) -> sympy.Expr:
    """Parse ``to_text`` output back into a sympy expression; never evaluates code."""
    if not isinstance(text, str) or not text.strip():
        raise PolyError(f"expected a polynomial in B and S as text, got {text!r}")
    total: sympy.Expr = sympy.Integer(0)
    parts = re.split(r"([+-])", text)  # terms and the signs between them: "S - 1" (a pad), "-2*B + S"
    if not parts[0].strip() and parts[1:2] == ["-"]:
        parts = parts[2:]
        parts[0] = "-" + parts[0]
    for i, raw in enumerate(parts[::2]):
        negative = raw.strip().startswith("-") or (i > 0 and parts[2 * i - 1] == "-")
        term = raw.strip().removeprefix("-").replace(" ", "")
        m = _TERM.match(term)
        if not term or m is None:
            raise PolyError(f"bad term {raw.strip()!r} in {text!r}: expected e.g. '12*B^2*S'")
        num, den, factors = m.groups()
        if num is None and not factors:
            raise PolyError(f"bad term {raw.strip()!r} in {text!r}")
        if den is not None and int(den) == 0:
            raise PolyError(f"bad term {raw.strip()!r} in {text!r}: division by zero")
        value: sympy.Expr = sympy.Rational(Fraction(int(num or 1), int(den or 1)))
        for sym, power in _FACTOR.findall(factors):
            if int(power or 1) > MAX_DEGREE:  # B^10**9 parses, but evaluating it never ends
                raise PolyError(f"bad term {raw.strip()!r} in {text!r}: powers above {MAX_DEGREE} are not costs")
            value *= _SYMBOLS[sym] ** int(power or 1)
        total += -value if negative else value
    return total


def evaluate(expr: sympy.Expr, batch: int, seq: int = 1) -> int:
    """``expr`` at ``B=batch``, ``S=seq``, rounded up: ``partitioner.cost_models.cost.evaluate``."""
    return cost_evaluate(expr, batch, seq)
