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
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, NamedTuple

from partitioner import poly
from partitioner.comms import Lowered, lower
from partitioner.cost_models.devices import LinkSpec
from partitioner.data_parallel import boundary_links, boundary_time
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
    #: the events as ``simulate`` recorded them (rank, action, start, end), in its order
    raw_events: Sequence[tuple[int, Action, float, float]] = field(default=(), repr=False, compare=False)

    @cached_property
    def events(self) -> tuple[Event, ...]:
        """Every action's event, ordered by (start, rank); made on first use (most
        simulations are asked for their step only)."""
        out = [Event(*e) for e in self.raw_events]
        out.sort(key=lambda e: (e.start, e.rank))
        return tuple(out)


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


Key = tuple[str, int, int, int]
_KIND = {"F": 0, "B": 1, "I": 2, "W": 3}
#: per round: its batches (rank, batch id), its messages (sender's batch id, receiver's batch id,
#: forward?, src stage, dst stage, message id, the SEND and RECV actions, sender and receiver
#: rank) and its computes (rank, action, stage, kind index, ids of the messages it uses, change
#: of the stage's in-flight count); ids index flat per-simulation lists
Rounds = list[tuple[list[tuple[int, int]],
                    list[tuple[int, int, bool, int, int, int, Action, Action, int, int]],
                    list[tuple[int, Action, int, int, tuple[int, ...], int]]]]

#: the lowerings of live schedules, by id (an entry leaves when its schedule is collected, so
#: an id is never reused while cached; the planner's candidates share schedule objects, the
#: step search simulates one hundreds of times), oldest first beyond ``_KEPT_ACTIONS``
_LOWERED: dict[int, tuple[weakref.ref[Schedule], Lowered, Rounds, int, int, int]] = {}
_KEPT_ACTIONS = 2_000_000  # actions over every cached schedule (a 1,000-action lowering is about 1 MB)
_held = [0]  # the actions cached now


def _forget(key: int) -> None:
    hit = _LOWERED.pop(key, None)
    if hit is not None:
        _held[0] -= hit[5]


def _lowered(schedule: Schedule) -> tuple[Lowered, Rounds, int, int]:
    """The schedule's lowering (``partitioner.comms.lower``, after ``schedule.replay`` has
    validated the lists), arranged by round with every key resolved to a flat index (batches,
    messages), and the batch and message counts: it depends on the lists only, not on the
    times, so it is computed once per schedule object and each simulation is a walk over
    plain tuples and lists (the step search simulates one schedule hundreds of times)."""
    hit = _LOWERED.get(id(schedule))
    if hit is not None and hit[0]() is schedule:
        return hit[1], hit[2], hit[3], hit[4]
    replay(schedule)
    low = lower(schedule)
    rounds: Rounds = [([], [], []) for _ in range(low.n_rounds)]
    bid: dict[tuple[int, int], int] = {}
    for r in range(schedule.n_ranks):
        for j, b in enumerate(low.batches[r]):
            bid[r, j] = len(bid)
    receiver: dict[Key, tuple[int, int]] = {}
    for r in range(schedule.n_ranks):
        for j, b in enumerate(low.batches[r]):
            rounds[b.round][0].append((r, bid[r, j]))
            for key, _ in b.recvs:
                receiver[key] = (r, j)
    mid: dict[Key, int] = {}
    for r in range(schedule.n_ranks):
        for j, b in enumerate(low.batches[r]):
            for key, _ in b.sends:
                d, src, dst, mb = key
                rr, rj = receiver[key]
                mid[key] = len(mid)
                rounds[b.round][1].append((bid[r, j], bid[rr, rj], d == "F", src, dst, mid[key],
                                           Action(src, "SEND_" + d, mb), Action(dst, "RECV_" + d, mb), r, rr))
    for r in range(schedule.n_ranks):
        for k, t in enumerate(low.rounds[r]):
            a = low.computes[r][k]
            delta = 1 if a.kind == "F" else -1 if a.kind in ("B", "W") else 0
            rounds[t][2].append((r, a, a.stage, _KIND[a.kind], tuple(mid[key] for key in low.needs[r][k]), delta))
    size = sum(map(len, schedule.actions))
    while _LOWERED and _held[0] + size > _KEPT_ACTIONS:
        _forget(next(iter(_LOWERED)))
    _forget(id(schedule))
    _LOWERED[id(schedule)] = (weakref.ref(schedule), low, rounds, len(bid), len(mid), size)
    _held[0] += size
    weakref.finalize(schedule, _forget, id(schedule))
    return low, rounds, len(bid), len(mid)


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
    _, rounds, n_batches, n_messages = _lowered(schedule)
    durations = (fwd, bwd, igrad, [b - i for b, i in zip(bwd, igrad)])

    p = schedule.n_ranks
    clock = [0.0] * p  # when the rank's last compute ends
    stream = [0.0] * p  # when the rank's last batch of messages completes (its communicator)
    busy = [0.0] * p
    ready = [0.0] * n_messages  # message -> its receive's batch has completed
    arrive = [0.0] * n_messages  # message -> it has landed
    began, issued, ends = [0.0] * n_batches, [0.0] * n_batches, [0.0] * n_batches
    inflight, peak = [0] * n, [0] * n
    raw: list[tuple[int, Action, float, float]] = []  # the events, in the order they happen here

    for batches, messages, computes in rounds:
        # This instant's batches (placed before the computes that start at it): each starts
        # once its rank's previous batch has completed (one in-order communicator per rank);
        # a message moves once the batches at both ends run, and a batch completes with its
        # last message (a wait covers the whole batch).
        for r, j in batches:
            c = clock[r]
            began[j] = ends[j] = c if c >= stream[r] else stream[r]
            issued[j] = c
        for snd, rcv, fw, src, dst, m, _, _, _, _ in messages:
            end = arrive[m] = (began[snd] if began[snd] >= began[rcv] else began[rcv]) + (fsend[src] if fw else bsend[dst])
            if end > ends[snd]:
                ends[snd] = end
            if end > ends[rcv]:
                ends[rcv] = end
        for r, j in batches:
            stream[r] = ends[j]
        for snd, rcv, _, _, _, m, send, recv, rs, rr in messages:
            ready[m] = ends[rcv]
            raw.append((rs, send, began[snd], arrive[m]))
            raw.append((rr, recv, issued[rcv], ends[rcv]))
        for r, a, st, kind, needs, delta in computes:
            start = clock[r]
            for m in needs:
                if ready[m] > start:
                    start = ready[m]
            dur = durations[kind][st]
            clock[r] = start + dur
            busy[r] += dur
            # A micro-batch's activations live until its last backward piece (W needs
            # the stage inputs), so I alone does not release it.
            if delta:
                inflight[st] += delta
                if inflight[st] > peak[st]:
                    peak[st] = inflight[st]
            raw.append((r, a, start, clock[r]))
    step = max(max(clock), max(stream))
    bubble = 1 - sum(busy) / (p * step) if step > 0 else 0.0
    return SimResult(step, bubble, tuple(busy), tuple(peak), raw)


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
    link = LinkSpec.from_dict(plan.link)
    mesh = plan.mesh
    inter = LinkSpec.from_dict(mesh.inter_link) if mesh.inter_link is not None else link
    links = boundary_links(replace(mesh, pp=plan.pp_ranks), [st.rank for st in plan.stages], link, inter)  # the link each cut crosses
    fwd, grad = boundary_bytes(plan.boundaries, plan.prediction.microbatch_size, plan.symbols.get("S", 1))
    return predict_step(schedule, [s.cost.fwd_time_s for s in plan.stages], [s.cost.bwd_time_s for s in plan.stages],
                        [boundary_time(lk, mesh.tp, link, sequence_parallel=bool(plan.options.get("sequence_parallel")))
                         for lk in links], fwd, grad)


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
