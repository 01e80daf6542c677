"""Issue 13 item 9: the solver logs its decisions at DEBUG (``partitioner.solver``)."""

from __future__ import annotations

import logging

from partitioner.solver import SolverInput, solve
from tests.logs import captured


def test_solver_logs_its_answer_at_debug() -> None:
    with captured("partitioner.solver", logging.DEBUG) as records:
        sol = solve(SolverInput([3, 1, 1, 3], [0] * 5, [0, 5, 1, 5, 0], [True] * 5, [0] * 4, [0] * 4, [1, 1],
                                [100, 100]), 2)
    text = " ".join(r.getMessage() for r in records)
    assert f"bottleneck {sol.bottleneck}" in text and f"cuts {list(sol.cuts)}" in text
