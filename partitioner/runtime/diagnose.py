"""What the runtime logs when a step fails: the schedule grid around the failing action.

As ``torch.distributed.pipelining`` does on a failed action, the error is logged with the
steps x ranks grid of the schedule, the failing cell bracketed, cut to ``context`` rows
either side so a long schedule stays readable. A rank that failed only because a peer did
(``PipelineRuntimeError.secondary``: a receive broke or timed out, i.e. a hang) logs at
INFO; the rank that failed for its own reasons at ERROR. ``PARTITIONER_LOG=debug`` shows
every log line of the library (docs/ARCHITECTURE.md, "Logging").
"""

from __future__ import annotations

import logging

from partitioner.runtime.errors import PipelineRuntimeError
from partitioner.schedule import Schedule

__all__ = ["failure_grid", "log_failure"]

log = logging.getLogger("partitioner.runtime")


def failure_grid(schedule: Schedule, rank: int, action: str, context: int = 4) -> str | None:
    """The grid rows around ``action`` (its text, e.g. ``"1B0"``) in ``rank``'s list, or None
    when the rank does not run that action."""
    if not 0 <= rank < len(schedule.actions):
        return None
    step = next((i for i, a in enumerate(schedule.actions[rank]) if str(a) == action), None)
    if step is None:
        return None
    lines = schedule.grid(mark=(rank, step), comms=True).splitlines()
    header, rows = lines[0], lines[1:]
    at = next(i for i, row in enumerate(rows) if row.endswith(f"<-- rank {rank}"))
    lo, hi = max(0, at - context), min(len(rows), at + context + 1)
    cut = [header] + (["..."] if lo > 0 else []) + rows[lo:hi] + (["..."] if hi < len(rows) else [])
    return "\n".join(cut)


def log_failure(schedule: Schedule, error: PipelineRuntimeError, rank: int | None = None) -> None:
    """Log ``error`` with the grid around its action (``error.rank`` or ``rank``)."""
    where = error.rank if error.rank is not None else rank
    grid = failure_grid(schedule, where, error.action) if where is not None and error.action else None
    level = logging.INFO if error.secondary else logging.ERROR
    text = f"schedule {schedule.name!r}, rank {where}, action {error.action}: {error}"
    log.log(level, text + (f"\n{grid}" if grid else ""))
