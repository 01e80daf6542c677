"""What really ran, as a Chrome/Perfetto trace, beside what the simulator predicts.

Real events keep ``pid = rank`` (one row per rank, waits on receives on a second
thread row). The prediction is ``partitioner.simulator`` replaying the same action
lists with each stage's forward and backward time set to the mean measured in this
run, so the two timelines differ only by what the simulator leaves out (transfer
time, launch overhead, contention): the gap is the runtime's own cost.
Open the file at https://ui.perfetto.dev or chrome://tracing.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Any, Iterable

from partitioner.plan import write_atomic
from partitioner.runtime.interpreter import TraceEvent
from partitioner.schedule import Action, Schedule
from partitioner.simulator import SimResult, simulate

__all__ = ["write_trace", "trace_json", "measured_stage_times", "breakdown", "PREDICTED_PID"]

PREDICTED_PID = 1000  # + rank: the simulator's rows sort after the real ones


def measured_stage_times(events: Iterable[TraceEvent], n_stages: int) -> tuple[list[float], list[float]]:
    """Mean forward and backward seconds per stage over ``events``."""
    acc: dict[tuple[int, str], list[float]] = defaultdict(list)
    for ev in events:
        if ev.name.startswith("wait"):
            continue
        a = Action.parse(ev.name)
        if a.kind in ("F", "B"):
            acc[(a.stage, a.kind)].append((ev.end_ns - ev.start_ns) / 1e9)
    mean = {k: sum(v) / len(v) for k, v in acc.items()}
    return [mean.get((s, "F"), 0.0) for s in range(n_stages)], [mean.get((s, "B"), 0.0) for s in range(n_stages)]


def breakdown(events: Iterable[TraceEvent]) -> dict[str, float]:
    """One rank's traced step (``Runner.events``) by action kind, in seconds: compute per
    kind (``"F"``, ``"B"``, ``"I"``, ``"W"``), ``"wait F"`` / ``"wait B"`` (blocked on a
    peer's activations / gradients), each communication kind's own time (``"SEND_F"``,
    ``"RECV_B"``, ...: the Python and the transport calls), ``"between"`` (time no event
    covers: the interpreter's loop) and ``"wall"`` (first start to last end), so
    wall = the sum of the others."""
    evs = list(events)
    if len({e.rank for e in evs}) > 1:
        raise ValueError(f"breakdown takes one rank's events, got ranks {sorted({e.rank for e in evs})}")
    out: dict[str, float] = {}
    for e in evs:
        k = "wait " + e.name.split()[1][0] if e.name.startswith("wait") else Action.parse(e.name).kind
        out[k] = out.get(k, 0.0) + (e.end_ns - e.start_ns) / 1e9
    wall = (max(e.end_ns for e in evs) - min(e.start_ns for e in evs)) / 1e9 if evs else 0.0
    out["between"] = wall - sum(out.values())
    out["wall"] = wall
    return out


def _meta(pid: int, name: str, sort: int) -> list[dict[str, Any]]:
    return [{"ph": "M", "pid": pid, "name": "process_name", "args": {"name": name}},
            {"ph": "M", "pid": pid, "name": "process_sort_index", "args": {"sort_index": sort}}]


def trace_json(events: Iterable[TraceEvent], schedule: Schedule, predicted: SimResult | None = None) -> dict[str, Any]:
    evs = sorted(events, key=lambda e: (e.start_ns, e.rank))
    t0 = evs[0].start_ns if evs else 0
    out: list[dict[str, Any]] = []
    for r in range(schedule.n_ranks):
        out += _meta(r, f"rank {r}", r)
    for ev in evs:
        wait = ev.name.startswith("wait")
        kind = "wait" if wait else Action.parse(ev.name).kind
        out.append({"name": ev.name, "cat": kind, "ph": "X", "pid": ev.rank, "tid": 1 if wait else 0,
                    "ts": (ev.start_ns - t0) / 1e3, "dur": max(ev.end_ns - ev.start_ns, 0) / 1e3})
    if predicted is None and evs:
        fwd, bwd = measured_stage_times(evs, schedule.n_stages)
        predicted = simulate(schedule, fwd, bwd)
    if predicted is not None:
        for r in range(schedule.n_ranks):
            out += _meta(PREDICTED_PID + r, f"predicted rank {r}", PREDICTED_PID + r)
        for e in predicted.events:
            if e.action.is_compute:
                out.append({"name": str(e.action), "cat": e.action.kind, "ph": "X", "pid": PREDICTED_PID + e.rank,
                            "tid": 0, "ts": e.start * 1e6, "dur": (e.end - e.start) * 1e6})
    real_s = (max(e.end_ns for e in evs) - t0) / 1e9 if evs else 0.0
    return {"traceEvents": out, "displayTimeUnit": "ms",
            "otherData": {"schedule": schedule.name, "n_microbatches": schedule.n_microbatches,
                          "measured_step_s": real_s,
                          "predicted_step_s": predicted.step_time if predicted else None}}


def write_trace(path: str | os.PathLike[str], events: Iterable[TraceEvent], schedule: Schedule,
                predicted: SimResult | None = None) -> None:
    """Write every rank's ``events`` (one list, merged) as one trace JSON, atomically."""
    write_atomic(path, json.dumps(trace_json(events, schedule, predicted)))
