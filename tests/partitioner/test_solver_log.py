"""Issue 13 item 9: the solver logs its decisions at DEBUG (``partitioner.solver``)."""

from __future__ import annotations

import logging

from partitioner.solver import SolverInput, solve


def test_solver_logs_its_answer_at_debug() -> None:
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("partitioner.solver")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        sol = solve(SolverInput([3, 1, 1, 3], [0] * 5, [0, 5, 1, 5, 0], [True] * 5, [0] * 4, [0] * 4, [1, 1],
                                [100, 100]), 2)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    text = " ".join(r.getMessage() for r in records)
    assert f"bottleneck {sol.bottleneck}" in text and f"cuts {list(sol.cuts)}" in text
