"""Replay a schedule's action lists in simulated time.

The same lists the runtime executes (``schedule.replay`` walks them), so the predicted
timeline, bubble and in-flight activations describe what will actually run. The model:
a rank runs its actions in order; compute on stage s takes ``fwd_time[s]`` or
``bwd_time[s]``; a SEND costs its rank nothing (async) and its message lands after the
boundary's transfer time; a RECV waits until the message has landed. Links have no
contention; that is a known optimism for schedules that send both ways at once.

>>> from partitioner.schedule import build_schedule
>>> r = simulate(build_schedule("gpipe", 2, 4), fwd_time=[1, 1], bwd_time=[2, 2])
>>> r.step_time, round(r.bubble_fraction, 9), r.peak_inflight
(15.0, 0.2, (4, 4))

With uniform stages (f, b per stage, no comm) the builders hit the textbook figures
exactly: step time (v*m + p - 1) * (f + b), i.e. a bubble of (p - 1) * (f + b) per
rank, which is (p - 1) * (F + B) / v in terms of a rank's whole-chunk times F = v*f
and B = v*b (Narayanan et al. 2021, eq. for interleaving); bubble fraction
(p - 1) / (v*m + p - 1). tests/partitioner/test_simulator.py pins this.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from collections.abc import Callable
from typing import Any

from partitioner import poly
from partitioner.schedule import Action, Schedule, ScheduleError, replay

__all__ = ["Event", "SimResult", "boundary_bytes", "predict_plan", "predict_step", "simulate", "timeline"]


class Event(NamedTuple):
    rank: int
    action: Action
    start: float  # compute: start; SEND: posted; RECV: posted (waiting starts)
    end: float  # compute: end; SEND: message lands; RECV: data available


@dataclass(frozen=True)
class SimResult:
    step_time: float  # when the last rank finishes its list
    bubble_fraction: float  # 1 - busy compute / (n_ranks * step_time)
    busy: tuple[float, ...]  # compute time per rank
    peak_inflight: tuple[int, ...]  # per stage: max micro-batches forwarded, not yet backwarded
    events: tuple[Event, ...]  # ordered by (start, rank)


def _per_stage(what: str, times: Sequence[float], n: int, *, optional: bool = False) -> list[float]:
    if optional and len(times) == 0:
        return [0.0] * n  # comm not modelled
    if len(times) != n:
        raise ScheduleError(
            f"{what} needs {n} values ({'one per boundary' if optional else 'one per stage'}), got {len(times)}"
        )
    bad = [t for t in times if not (math.isfinite(t) and t >= 0)]
    if bad:
        raise ScheduleError(f"{what} must be finite and >= 0, got {bad[0]!r}")
    return [float(t) for t in times]


#: the last schedules' dependency orders (the schedule kept alive beside its order, so an
#: id is never reused while cached); the step search simulates one schedule hundreds of times
_ORDERS: dict[int, tuple[Schedule, list[tuple[int, Action]]]] = {}
_ORDERS_KEPT = 8


def _order(schedule: Schedule) -> list[tuple[int, Action]]:
    """(rank, action) in an order that respects every dependency, from ``schedule.replay``
    (which validates the lists and raises on any fault); it depends on the lists only, not
    on the times, so it is computed once per schedule object."""
    hit = _ORDERS.get(id(schedule))
    if hit is not None and hit[0] is schedule:
        return hit[1]
    order: list[tuple[int, Action]] = []
    replay(schedule, lambda r, _i, a: order.append((r, a)))
    if len(_ORDERS) >= _ORDERS_KEPT:
        del _ORDERS[next(iter(_ORDERS))]
    _ORDERS[id(schedule)] = (schedule, order)
    return order


def simulate(
    schedule: Schedule,
    fwd_time: Sequence[float],
    bwd_time: Sequence[float],
    send_time: Sequence[float] = (),
    bwd_send_time: Sequence[float] = (),
    igrad_time: Sequence[float] = (),
) -> SimResult:
    """Simulate one training step. ``send_time[i]`` / ``bwd_send_time[i]`` price the
    activation / gradient crossing boundary i (between stages i and i+1); empty = free.
    A split backward takes ``igrad_time[s]`` for I (default half of ``bwd_time[s]``)
    and the rest for W. Raises ScheduleError if the schedule is invalid."""
    n = schedule.n_stages
    fwd, bwd = _per_stage("fwd_time", fwd_time, n), _per_stage("bwd_time", bwd_time, n)
    fsend = _per_stage("send_time", send_time, n - 1, optional=True)
    bsend = _per_stage("bwd_send_time", bwd_send_time, n - 1, optional=True)
    igrad = [b / 2 for b in bwd] if len(igrad_time) == 0 else _per_stage("igrad_time", igrad_time, n)
    if any(i > b for i, b in zip(igrad, bwd)):
        raise ScheduleError(f"igrad_time must not exceed bwd_time per stage: {igrad} vs {bwd}")

    clock = [0.0] * schedule.n_ranks
    busy = [0.0] * schedule.n_ranks
    lands: dict[tuple[str, int, int], float] = {}
    inflight, peak = [0] * n, [0] * n
    events: list[Event] = []

    def visit(r: int, _step: int, a: Action) -> None:
        st, k, mb = a
        start = clock[r]
        if k == "SEND_F":
            lands[("F", st, mb)] = end = start + fsend[st]
        elif k == "SEND_B":
            lands[("B", st, mb)] = end = start + bsend[st - 1]
        elif k in ("RECV_F", "RECV_B"):
            src = st - 1 if k == "RECV_F" else st + 1
            end = clock[r] = max(start, lands[(k[-1], src, mb)])
        else:
            dur = {"F": fwd[st], "B": bwd[st], "I": igrad[st], "W": bwd[st] - igrad[st]}[k]
            end = clock[r] = start + dur
            busy[r] += dur
            # A micro-batch's activations live until its last backward piece (W needs
            # the stage inputs), so I alone does not release it.
            inflight[st] += 1 if k == "F" else -1 if k in ("B", "W") else 0
            peak[st] = max(peak[st], inflight[st])
        events.append(Event(r, a, start, end))

    for r, a in _order(schedule):
        visit(r, 0, a)
    step = max(clock)
    bubble = 1 - sum(busy) / (schedule.n_ranks * step) if step > 0 else 0.0
    events.sort(key=lambda e: (e.start, e.rank))
    return SimResult(step, bubble, tuple(busy), tuple(peak), tuple(events))


def boundary_bytes(boundaries: Sequence[Any], microbatch: int, seq: int = 1) -> tuple[list[int], list[int]]:
    """Per plan ``Boundary``: (bytes sent forward, gradient bytes sent back) at one micro-batch.
    A gradient comes back for every floating tensor that requires one; integer tensors (token
    ids, masks) and Python values send nothing back."""
    fwd = [int(b.bytes) for b in boundaries]
    grad = [sum(poly.evaluate(poly.from_text(v.bytes), microbatch, seq) for v in b.values
                if v.kind == "tensor" and v.requires_grad and v.dtype.startswith(("float", "bfloat", "complex")))
            for b in boundaries]
    return fwd, grad


def predict_step(schedule: Schedule, fwd_time: Sequence[float], bwd_time: Sequence[float],
                 transfer_time: Callable[[float], float] | Sequence[Callable[[float], float]],
                 fwd_bytes: Sequence[int], grad_bytes: Sequence[int]) -> SimResult:
    """The predicted step: ``simulate`` with each boundary's transfers priced by the link
    (``LinkSpec.transfer_time``; one per boundary when ranks span nodes). The plan's
    ``prediction`` and ``partitioner timeline`` both come from here, on the same inputs
    (``predict_plan``), so they agree to the last digit; with data parallelism the plan's
    step adds the replicas' exposed all-reduce (``plan.mesh.exposed_s``) to this pipeline step."""
    per = list(transfer_time) if isinstance(transfer_time, Sequence) else [transfer_time] * len(fwd_bytes)
    send = [t(b) for t, b in zip(per, fwd_bytes)]
    bsend = [t(g) if g else 0.0 for t, g in zip(per, grad_bytes)]
    return simulate(schedule, fwd_time, bwd_time, send, bsend)


def predict_plan(plan: Any, schedule: Schedule) -> SimResult:
    """Re-simulate a loaded ``Plan`` from its own records: per-stage times, boundaries and link."""
    from cost_models.devices import LinkSpec

    from dataclasses import replace

    from partitioner.data_parallel import boundary_links

    link = LinkSpec.from_dict(plan.link)
    mesh = plan.mesh
    inter = LinkSpec.from_dict(mesh.inter_link) if mesh.inter_link is not None else link
    links = boundary_links(replace(mesh, pp=plan.pp_ranks), [st.rank for st in plan.stages], link, inter)  # the link each cut crosses
    fwd, grad = boundary_bytes(plan.boundaries, plan.prediction.microbatch_size, plan.symbols.get("S", 1))
    return predict_step(schedule, [s.cost.fwd_time_s for s in plan.stages], [s.cost.bwd_time_s for s in plan.stages],
                        [lk.transfer_time for lk in links], fwd, grad)


def timeline(result: SimResult, n_ranks: int, unit: float = 1.0) -> str:
    """ASCII picture, one row per rank, one column per ``unit`` of time; compute cells
    show the action ("1F0"), idle cells show "." (the bubble)."""
    cols = math.ceil(max((e.end for e in result.events), default=0) / unit - 1e-9)
    rows = [["."] * cols for _ in range(n_ranks)]
    for e in result.events:
        if e.action.is_compute:
            for c in range(round(e.start / unit), round(e.end / unit)):
                rows[e.rank][c] = str(e.action)
    w = max([1, *(len(c) for row in rows for c in row)])
    return "\n".join(f"rank {r}: " + " ".join(f"{c:<{w}}" for c in row).rstrip() for r, row in enumerate(rows))
