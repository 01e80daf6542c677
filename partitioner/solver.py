"""Exact min-bottleneck partition of a linear order into pipeline stages.

Positions ``0..n-1`` are cut into exactly ``S`` contiguous, non-empty stages. Stage
``i = [a, b)`` costs ``P[b] - P[a] + cut_cost[a] + cut_cost[b]`` time (``P`` = prefix
sums of compute) and ``sum(static_mem[a:b]) + inflight[i] * sum(act_mem[a:b])`` bytes,
which must fit ``capacity[i]``. We minimise the largest stage time, then, among the
bottleneck-optimal partitions, the total ``cut_bytes`` of the chosen cuts.

Algorithm (the bottleneck-threshold idea of torchgpipe's ``blockpartition.solve``,
after Bokhari 1988 / Pinar & Aykanat 2004 "Fast optimal load balancing algorithms
for 1D partitioning", extended with per-cut costs, per-stage memory and a fixed
stage count):

1. ``feasible(T)``: reachability per stage count. ``R_i`` = the ends ``b`` such that
   ``[0, b)`` splits into ``i`` valid stages of time <= T. Memory is monotone in the
   start ``a`` (all sizes >= 0), so for stage ``i`` and end ``b`` it gives a lower limit
   on ``a`` (one ``searchsorted``); pinned cuts raise it further. The time test
   ``cost(a, b) <= T`` is ``P[a] - cut_cost[a] >= P[b] + cut_cost[b] - T``, so one
   range maximum of ``P[a] - cut_cost[a]`` over the reachable ``a`` in the window
   answers it for every ``b`` at once (numpy sparse table). Most ends need less: the last
   reachable start before ``b`` decides ``b`` unless it fails by its own cut cost alone
   (``P`` is monotone, so where its ``P`` is below the threshold every earlier start fails
   too), and where ``T`` exceeds every stage time only memory and pins are tested, on that
   last start; all options are tested in the same numpy calls. Stage ``i`` can only end
   where ``P[b] <= (i+1) T`` and ``P[n] - P[b] <= (S-1-i) T``, a band of about
   ``(S T - P[n]) / P[n] * n + 2 n / S`` positions, so a test near the optimum costs
   ``O(n log w + S)`` numpy work (``w`` = widest window, about ``n / S``), and at
   worst ``O(S n log n)``.
2. Search on the integer ``T`` from the lower bound: gallop up (doubling steps) until
   feasible, then bisect; every feasible test snaps the upper end down to the
   witness's actual bottleneck. ``O(log(T* - LB))`` tests, all near the optimum. Once
   bisecting, the stage times that lie in the bracket are listed (when at most
   ``_VALUE_BUDGET`` (start, end) pairs must be looked at) and the bisection runs over
   them: the optimum is one of them, so the integer steps between them (about half the
   tests on the planner's 10^11-unit times) are skipped; the answer is the same.
3. Tie-break at the optimal ``T*``: positions that are both forward-reachable with
   ``i`` stages and backward-reachable (the mirrored instance) with ``S - i`` (``F_i``)
   are the only possible ``i``-th cuts. A min-bytes DP over pairs
   ``(a in F_{i-1}, b in F_i)`` is exact and costs ``O(sum_i |F_{i-1} x F_i|)``; at
   the optimum the ``F_i`` are narrow bands. Degenerate inputs (long runs of
   zero-cost positions, huge slack) widen them towards ``O(S n^2)``. Only the pairs whose
   time test depends on the start's cut cost are listed (``P[a]`` within the largest cut
   cost of the threshold); the starts past them all pass and are answered by one range
   minimum each, which keeps the same first start among equal costs.
   Approximation: when ``n > 2000`` and that pair count exceeds ``_PAIR_BUDGET``, each
   window is cut to its ``_APPROX_WIDTH`` nearest predecessors plus its largest-slack
   one, so the answer stays bottleneck-optimal and feasible but its byte total may
   not be minimal. For ``n <= 2000`` the tie-break is always exact.

Per-stage options (recomputation): ``SolverInput.options`` may list alternative ways to
run a stage, each with its own per-position compute and activation memory and a reserve
of bytes (the transient peak of recomputing during backward). A stage ``[a, b)`` is then
valid at ``T`` when *some* option fits both time and memory: reachability is the union
over options, the tie-break takes the cheapest pair over options, and the solution
records, per stage, the first listed option that fits (list the fastest first). This is
exact for the min-bottleneck problem over cuts x options, since the choice of option is
local to a stage.

All search arithmetic is int64; inputs whose totals could overflow are rejected.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from partitioner.cost_models.errors import PartitionError

logger = logging.getLogger(__name__)

__all__ = ["InfeasibleError", "Memo", "Option", "Solution", "SolverInput", "SolverInputError", "feasible", "memo",
           "min_cost_at", "remembered", "solve"]

_I64 = npt.NDArray[np.int64]
_Ix = npt.NDArray[np.intp]
_NEG = np.int64(-(2**62))  # "unreachable" in range maxima; below every real value
_LIMIT = 2**61  # totals must stay below this so sums of two never overflow int64
_PAIR_BUDGET = 30_000_000
_APPROX_WIDTH = 64
_CHUNK_PAIRS = 4_000_000  # pairs per numpy batch in the tie-break: bounds its memory
_STEPS_BACK = 3  # earlier starts ``_valid_ends`` tries one by one before its range maxima
_VALUE_BUDGET = 300_000  # (start, end) pairs ``solve`` examines to list the stage times it bisects over
_FIX = ("use more GPUs, a device with more memory, fewer micro-batches in flight, "
        "or activation checkpointing")


class SolverInputError(PartitionError):
    """The solver was given inconsistent input (lengths, signs, pinned cuts)."""


class InfeasibleError(PartitionError):
    """No partition into the requested stages satisfies the constraints."""


@dataclass(frozen=True)
class Option:
    """One way to run a stage (e.g. with recomputation): its own time and memory per position."""

    compute: Sequence[int]  # per position: forward+backward time under this option
    act_mem: Sequence[int]  # per position: activation bytes per in-flight micro-batch
    reserve: int = 0  # bytes held once per stage on top (the recompute's transient peak)


@dataclass(frozen=True)
class SolverInput:
    compute: Sequence[int]  # per position: forward+backward time (integer units), >= 0
    cut_cost: Sequence[int]  # n+1: time a stage spends on cut k; [0] and [n] must be 0
    cut_bytes: Sequence[int]  # n+1: bytes crossing cut k (tie-break objective)
    allowed: Sequence[bool]  # n+1: may we cut at k? ([0] and [n] ignored)
    static_mem: Sequence[int]  # per position: weights, grads, optimizer state bytes
    act_mem: Sequence[int]  # per position: activation bytes per in-flight micro-batch
    inflight: Sequence[int]  # S: micro-batches in flight on stage i (1F1B: S - i)
    capacity: Sequence[int]  # S: device memory of stage i in bytes
    pinned: Sequence[int] = ()  # cut positions that must be used
    #: alternatives to (compute, act_mem); empty: the one option (compute, act_mem, 0)
    options: Sequence[Option] = ()
    #: n+1: cuts that send a non-tensor value (a Python int such as a sym size); empty: none.
    #: Among partitions of equal bottleneck they lose to cuts that send tensors only.
    avoid: Sequence[bool] = ()
    #: per position: does it compute anything? Empty: the cheapest option's compute > 0.
    #: Every stage gets at least one such position when the instance allows it.
    has_compute: Sequence[bool] = ()

    def choices(self) -> list[Option]:
        return list(self.options) or [Option(self.compute, self.act_mem, 0)]


@dataclass(frozen=True)
class Solution:
    cuts: tuple[int, ...]  # the S-1 interior cut positions, increasing
    bottleneck: int  # max stage time
    stage_times: tuple[int, ...]
    stage_mem: tuple[int, ...]
    total_cut_bytes: int  # sum of cut_bytes over the interior cuts
    lower_bound: int  # bound on the bottleneck computed apart from the search
    optimal: bool  # the bottleneck is proven optimal for this order
    stage_option: tuple[int, ...] = ()  # per stage: index into SolverInput.choices()


@dataclass(frozen=True)
class _Opt:
    """One option's arrays."""

    P: _I64  # prefix compute, n+1
    g: _I64  # P[a] - cut_cost[a]: what a stage start contributes to the time test
    f: _I64  # P[b] + cut_cost[b]: what a stage end contributes
    AM: _I64  # prefix activation memory, n+1
    cap: list[int]  # per stage: capacity less the option's reserve, clamped to fit int64
    free: list[bool]  # per stage: the whole model fits, so the memory test can be skipped


@dataclass(frozen=True)
class _Prep:
    """Integer arrays for one direction of the instance (forward or mirrored)."""

    n: int
    S: int
    P: _I64  # prefix of the cheapest compute over options, n+1 (bands, bounds)
    SM: _I64  # prefix static memory, n+1
    opts: list[_Opt]
    inflight: list[int]
    pin_lo: _Ix  # last pinned cut before b: a stage may not straddle a pin
    cuts: _Ix  # allowed interior cut positions, increasing
    P_cuts: _I64  # P at those positions (non-decreasing too)
    lg: _Ix  # floor(log2(x)) for x in 0..n+1, integer-only
    top: _Ix  # n+1: a stage ending at b starts before top[b] (b, or 1 + its last computing position)
    min_cut: int  # the cheapest cut_cost among allowed interior cuts
    G: _I64  # options x (n+1): every option's g, stacked (``_valid_ends`` tests all options at once)
    PP: _I64  # options x (n+1): every option's P, stacked
    F: _I64  # options x (n+1): every option's f, stacked
    T_free: int  # from this threshold on, every stage [a, b) of every option passes the time test
    #: stage -> options x (n+1): per end b, the smallest start memory and pins allow (``_floors``)
    floors: dict[int, _Ix] = field(default_factory=dict)


class Memo:
    """Answers of the solver's pure functions, shared inside ``remembered()``: the joint
    layout search solves the same input again for other candidates (an FSDP mode, a schedule
    with the same in-flight counts, a retry at capacities met before) and the step search's
    ladder meets thresholds again.

    A key holds everything the answer depends on, never less: every field of the
    ``SolverInput`` (each list by its exact int64 bytes, interned to a small number so that
    a key stays small while two inputs share a key only when every entry is equal), the
    stage count, the call's other arguments, and the module settings that change an answer
    (``_PAIR_BUDGET``, ``_APPROX_WIDTH``). A refusal (``InfeasibleError``) is remembered too
    and raised again as a new exception with the same message and ``closest``."""

    def __init__(self, max_entries: int = 20_000) -> None:
        self.entries: dict[Any, Any] = {}
        self.fields: dict[bytes, int] = {}
        self.max_entries = max_entries
        self.hits = 0
        self.misses = 0

    def field(self, xs: Any) -> int:
        b = np.asarray(xs, np.int64).tobytes()  # the length is in the byte count; bools as 0 / 1
        return self.fields.setdefault(b, len(self.fields))

    def input_key(self, inp: SolverInput) -> tuple[Any, ...]:
        f = self.field
        return (f(inp.compute), f(inp.cut_cost), f(inp.cut_bytes), f(inp.allowed), f(inp.static_mem),
                f(inp.act_mem), f(inp.inflight), f(inp.capacity), f(inp.pinned), f(inp.avoid), f(inp.has_compute),
                tuple((f(o.compute), f(o.act_mem), int(o.reserve)) for o in inp.options),
                _PAIR_BUDGET, _APPROX_WIDTH)

    def get(self, key: Any, compute: Any) -> Any:
        if key in self.entries:
            self.hits += 1
            kind, value = self.entries[key]
        else:
            self.misses += 1
            try:
                kind, value = "ok", compute()
            except InfeasibleError as e:
                kind, value = "refused", (str(e), getattr(e, "closest", None))
            if len(self.entries) >= self.max_entries:  # bounded: start again rather than grow
                self.entries.clear()
                self.fields.clear()  # the key just made used the old numbering: not stored
            else:
                self.entries[key] = (kind, value)
        if kind == "refused":
            err = InfeasibleError(value[0])
            if value[1] is not None:
                err.closest = value[1]  # type: ignore[attr-defined]
            raise err
        return value


_active: list[Memo] = []


@contextlib.contextmanager
def remembered() -> Iterator[Memo]:
    """Inside: ``solve``, ``feasible``, ``min_cost_at``, ``refine.refine`` and
    ``objective.step_search`` answer an input met before from a ``Memo`` (the same answer,
    not recomputed). Outside (the default): every call computes."""
    memo = Memo()
    _active.append(memo)
    try:
        yield memo
    finally:
        _active.pop()


def memo() -> Memo | None:
    """The ``Memo`` of the innermost ``remembered()``, or None."""
    return _active[-1] if _active else None


def _fmt_bytes(x: int) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(x) >= size:
            return f"{x / size:.1f} {unit}"
    return f"{x} B"


def _check(inp: SolverInput, S: int) -> tuple[int, list[int]]:
    if S < 1:
        raise SolverInputError(f"n_gpus must be >= 1, got {S}")
    n = len(inp.compute)
    for name, want in (("cut_cost", n + 1), ("cut_bytes", n + 1), ("allowed", n + 1),
                       ("static_mem", n), ("act_mem", n), ("inflight", S), ("capacity", S)):
        got = len(getattr(inp, name))
        if got != want:
            raise SolverInputError(f"{name} has length {got}, expected {want} (n = {n} "
                                   f"positions, {S} stages); build every input from the "
                                   f"same order and stage count")
    for name, want in (("avoid", n + 1), ("has_compute", n)):
        got = len(getattr(inp, name))
        if got not in (0, want):
            raise SolverInputError(f"{name} has length {got}, expected {want} or 0 (n = {n} positions)")
    for k, o in enumerate(inp.options):
        for name in ("compute", "act_mem"):
            if len(getattr(o, name)) != n:
                raise SolverInputError(f"options[{k}].{name} has length {len(getattr(o, name))}, expected {n}")
        if o.reserve < 0 or min(o.compute, default=0) < 0 or min(o.act_mem, default=0) < 0:
            raise SolverInputError(f"options[{k}] has a negative cost or size; they must be >= 0")
    for name in ("compute", "cut_cost", "cut_bytes", "static_mem", "act_mem", "inflight",
                 "capacity"):
        if min(getattr(inp, name), default=0) >= 0:  # the common case, without listing
            continue
        bad = [i for i, v in enumerate(getattr(inp, name)) if v < 0]
        if bad:
            raise SolverInputError(f"{name}[{bad[0]}] = {getattr(inp, name)[bad[0]]} is "
                                   f"negative; costs and sizes must be >= 0")
    if n and (inp.cut_cost[0] != 0 or inp.cut_cost[n] != 0):
        raise SolverInputError(f"cut_cost[0] and cut_cost[n] must be 0 (nothing crosses the "
                               f"ends of the model), got {inp.cut_cost[0]} and {inp.cut_cost[n]}")
    if n < S:
        raise InfeasibleError(f"cannot make {S} stages from {n} nodes ({n} < {S}); "
                              f"use at most {n} GPUs")
    n_allowed = sum(1 for k in range(1, n) if inp.allowed[k])
    if n_allowed < S - 1:
        raise InfeasibleError(f"cannot make {S} stages from {n} nodes: only {n_allowed} cut "
                              f"positions are allowed but {S - 1} are needed; use at most "
                              f"{n_allowed + 1} GPUs or allow more cut positions")
    pins = sorted({int(p) for p in inp.pinned})
    for p in pins:
        if not 1 <= p <= n - 1:
            raise SolverInputError(f"pinned cut {p} is out of range; cuts lie in 1..{n - 1}")
        if not inp.allowed[p]:
            raise SolverInputError(f"pinned cut {p} is not an allowed cut position; "
                                   f"allow it or unpin it")
    if len(pins) > S - 1:
        raise InfeasibleError(f"{len(pins)} pinned cuts need at least {len(pins) + 1} stages "
                              f"but {S} were asked for; use more GPUs or pin fewer cuts")
    time_total = max(sum(o.compute) for o in inp.choices()) + 2 * max(inp.cut_cost, default=0)
    mem_total = sum(inp.static_mem) + max(max(inp.inflight) * sum(o.act_mem) + o.reserve for o in inp.choices())
    bytes_total = sum(inp.cut_bytes)
    if max(time_total, mem_total, bytes_total) >= _LIMIT:
        raise SolverInputError(f"totals too large for the int64 search (time {time_total}, "
                               f"memory {mem_total}, cut bytes {bytes_total}); use coarser units")
    return n, pins


def _prefix(xs: Sequence[int]) -> _I64:
    x = np.zeros(len(xs) + 1, np.int64)
    np.cumsum(np.asarray(xs, np.int64), out=x[1:])
    return x


def _prepare(inp: SolverInput, S: int, pins: list[int], slack: int = 0, need_compute: bool = False) -> _Prep:
    n = len(inp.compute)
    SM = _prefix(inp.static_mem)
    cc = np.asarray(inp.cut_cost, np.int64)
    inflight = [int(x) for x in inp.inflight]
    opts = []
    for o in inp.choices():
        P, AM = _prefix(o.compute), _prefix(o.act_mem)
        opts.append(_Opt(P, P - cc, P + cc, AM, *_caps(inp, SM, AM, inflight, o.reserve, slack)))
    Pmin = _prefix(np.min(np.asarray([o.compute for o in inp.choices()], np.int64), axis=0)) if n else _prefix([])
    pin_arr = np.asarray([0, *pins], np.intp)
    pin_lo = pin_arr[np.maximum(np.searchsorted(pin_arr, np.arange(n + 1), "left") - 1, 0)]
    cuts = np.flatnonzero(np.asarray(inp.allowed, bool)[1:n]) + 1
    lg = np.zeros(n + 2, np.intp)
    k = 1
    while (1 << k) <= n + 1:
        lg[1 << k:] += 1
        k += 1
    top = np.arange(n + 1, dtype=np.intp)
    if need_compute:  # [a, b) computes iff a <= its last computing position
        comp = _computes(inp)
        last = np.where(comp, np.arange(n), -1)
        top[1:] = np.maximum.accumulate(last) + 1 if n else top[1:]
    min_cut = int(cc[cuts].min()) if len(cuts) else 0
    G, F = np.stack([o.g for o in opts]), np.stack([o.f for o in opts])
    T_free = max(int(f.max()) - int(g.min()) for f, g in zip(F, G))  # f[b] - g[a] <= T for every a, b
    return _Prep(n, S, Pmin, SM, opts, inflight, pin_lo, cuts, Pmin[cuts], lg, top, min_cut, G,
                 np.stack([o.P for o in opts]), F, T_free)


def _caps(inp: SolverInput, SM: _I64, AM: _I64, inflight: list[int], reserve: int, slack: int
          ) -> tuple[list[int], list[bool]]:
    """One option's per-stage capacities (less its reserve, clamped to the whole model's need)
    and whether the whole model fits each stage."""
    n = len(SM) - 1
    cap = [max(min(int(c) + slack - int(reserve), int(SM[n]) + k * int(AM[n])), -1)
           for c, k in zip(inp.capacity, inflight)]
    whole = [int(SM[n]) + k * int(AM[n]) for k in inflight]
    return cap, [c >= w for c, w in zip(cap, whole)]


def _with_slack(pr: _Prep, inp: SolverInput, slack: int) -> _Prep:
    """``pr`` (prepared with no slack) as ``_prepare(..., slack=slack)`` would make it: only the
    capacities change."""
    opts = []
    for o, src in zip(pr.opts, inp.choices()):
        cap, free = _caps(inp, pr.SM, o.AM, pr.inflight, src.reserve, slack)
        opts.append(replace(o, cap=cap, free=free))
    return replace(pr, opts=opts, floors={})


def _computes(inp: SolverInput) -> npt.NDArray[np.bool_]:
    """Per position: does it compute (``has_compute``, else the cheapest option's time > 0)?"""
    if len(inp.has_compute):
        return np.asarray(inp.has_compute, bool)
    return np.min(np.asarray([o.compute for o in inp.choices()], np.int64), axis=0) > 0


def _lo(pr: _Prep, o: _Opt, i: int, b: _Ix, T: int) -> _Ix:
    """Smallest start of stage ``i`` ending at each ``b`` under option ``o`` (memory, pins,
    P[b]-P[a] <= T)."""
    loT = np.searchsorted(o.P, o.P[b] - T, "left")  # implied by the time test; narrows
    if o.free[i]:  # any stage fits: no memory limit to compute
        return np.maximum(loT, pr.pin_lo[b])
    # Memory grows as the start moves left, so its limit is one searchsorted; the
    # prefix W is built only over the positions these windows can touch.
    a0, a1 = int(loT.min()), int(b.max()) + 1
    k = pr.inflight[i]
    W = pr.SM[a0:a1] + k * o.AM[a0:a1]
    lom = a0 + np.searchsorted(W, pr.SM[b] + k * o.AM[b] - o.cap[i], "left")
    return np.maximum(np.maximum(lom, loT), pr.pin_lo[b])


def _floors(pr: _Prep, i: int) -> _Ix:
    """Per option and every end ``b`` in 0..n: the smallest start of stage ``i`` that memory
    and pins allow (``_lo`` without the time test). It does not depend on the threshold, so
    it is computed once per prepared instance and stage, not at each feasibility test. Where
    the memory limit lies before the window ``_lo`` searches, ``_lo``'s time limit is the
    larger anyway; where it lies past ``b`` the stage is invalid either way."""
    hit = pr.floors.get(i)
    if hit is None:
        k = pr.inflight[i]
        rows = []
        for o in pr.opts:
            if o.free[i]:  # any stage fits: no memory limit
                rows.append(pr.pin_lo)
                continue
            W = pr.SM + k * o.AM
            rows.append(np.maximum(np.searchsorted(W, W - o.cap[i], "left"), pr.pin_lo))
        hit = pr.floors[i] = np.stack(rows)
    return hit


def _ends(pr: _Prep, i: int, T: int) -> _Ix:
    """Where stage ``i`` may end at threshold ``T``."""
    n, S, total = pr.n, pr.S, int(pr.P[pr.n])
    if i == S - 1:
        return np.array([n] if S * T >= total else [], np.intp)
    # The compute before b must fit i+1 stages and the compute after the S-1-i others:
    # near the optimum a band of about 2n/S positions, so a sweep is O(n log w), not
    # O(S n log w). Positions also leave one node for each stage still to come.
    # Every stage pays at least the cheapest allowed cut (m) on each interior side: the
    # i+1 stages up to b pay 2i+1 of them, the S-1-i after it 2(S-1-i)-1.
    m = pr.min_cut
    lo_p = max(total - (S - 1 - i) * T + (2 * (S - 1 - i) - 1) * m, 0)
    hi_p = min((i + 1) * T - (2 * i + 1) * m, total)
    c, Pc = pr.cuts, pr.P_cuts
    j0 = max(int(np.searchsorted(c, i + 1, "left")), int(np.searchsorted(Pc, lo_p, "left")))
    j1 = min(int(np.searchsorted(c, n - (S - 1 - i), "right")),
             int(np.searchsorted(Pc, hi_p, "right")))
    return c[j0:max(j0, j1)]


def _reach(pr: _Prep, T: int) -> list[_Ix] | None:
    """Positions reachable with 0..S stages of time <= T, each sorted; None if infeasible."""
    R = np.zeros(1, np.intp)
    out = [R]
    for i in range(pr.S):
        b = _ends(pr, i, T)
        if len(b) == 0:
            return None
        R = b[_valid_ends(pr, i, b, R, T)]
        if len(R) == 0:
            return None
        out.append(R)
    return out


def _valid_ends(pr: _Prep, i: int, b: _Ix, R: _Ix, T: int) -> npt.NDArray[np.bool_]:
    """Which ends ``b`` a stage ``i`` reaches from a start in ``R`` under some option.

    A start ``a`` is valid for ``b`` when it lies in ``[lo, top[b])`` (memory, pins) and
    ``g[a] >= f[b] - T`` (time). The last reachable start before ``top[b]`` decides most ends
    at once: outside the window, no start is in it; passing, ``b`` is reached; with
    ``P[a] < f[b] - T`` every earlier start fails too (``g <= P`` and ``P`` is monotone). An
    end whose last start fails by its own cut cost alone is tested the same way on the next
    ``_STEPS_BACK`` earlier reachable starts; only the ends still undecided then need the range
    maxima over the whole window (``_valid_ends_table``)."""
    top_b = pr.top[b]
    if T >= pr.T_free:
        return _valid_ends_untimed(pr, i, b, R, top_b)
    idx = np.searchsorted(R, top_b, "left") - 1  # the last reachable start before top[b]
    a = R[np.maximum(idx, 0)]
    inside = (idx >= 0) & (a >= _floors(pr, i)[:, b])  # options x ends: it lies in the window
    thr = pr.F[:, b] - T
    passes = inside & (pr.G[:, a] >= thr)
    ok: npt.NDArray[np.bool_] = np.asarray(passes.any(axis=0))
    unsure = inside & ~passes & (pr.PP[:, a] >= thr)  # options x ends: an earlier start may pass
    cols = np.flatnonzero(unsure.any(axis=0) & ~ok)
    for back in range(1, _STEPS_BACK + 1):  # the next earlier reachable starts, the same three ways
        if not len(cols):
            return ok
        j = idx[cols] - back
        a = R[np.maximum(j, 0)]
        thr_c = thr[:, cols]
        inside = unsure[:, cols] & (j >= 0) & (a >= _floors(pr, i)[:, b[cols]])
        passes = inside & (pr.G[:, a] >= thr_c)
        hit = passes.any(axis=0)
        ok[cols[hit]] = True
        still = inside & ~passes & (pr.PP[:, a] >= thr_c)
        unsure[:, cols] = still
        cols = cols[still.any(axis=0) & ~hit]
    if len(cols):
        ok[cols] = _valid_ends_table(pr, i, b[cols], R, T)
    return ok


def _valid_ends_table(pr: _Prep, i: int, b: _Ix, R: _Ix, T: int) -> npt.NDArray[np.bool_]:
    """``_valid_ends`` by range maxima: the largest ``g`` over the reachable starts in each
    window. The windows are taken in ``R``'s own indices (only reachable starts enter the
    maxima) and all options share one sparse table of shape (levels, options, starts)."""
    k = len(pr.opts)
    top_b = pr.top[b]
    lo = _floors(pr, i)[:, b]
    for j, o in enumerate(pr.opts):  # the time test's implied limit narrows the windows (as ``_lo``)
        np.maximum(lo[j], np.searchsorted(o.P, o.P[b] - T, "left"), out=lo[j])
    np.maximum(lo, int(R[0]), out=lo)  # nothing reachable before R[0]
    L = np.searchsorted(R, lo, "left")  # options x ends: the first reachable start >= lo
    H = np.searchsorted(R, top_b, "left")  # per end: the first reachable start >= top[b]
    count = H - L
    r0, r1 = int(L.min()), int(H.max())
    m = r1 - r0
    if m <= 0:
        return np.zeros(len(b), bool)
    top = int(pr.lg[max(int(count.max()), 1)])
    table = np.empty((top + 1, k, m), np.int64)  # table[l, j, x] = max(g_j[R[r0 + x : r0 + x + 2^l]])
    table[0] = pr.G[:, R[r0:r1]]
    for lev in range(1, top + 1):
        h = 1 << (lev - 1)
        np.maximum(table[lev - 1, :, : m - h], table[lev - 1, :, h:], out=table[lev, :, : m - h])
        table[lev, :, m - h:] = _NEG  # never read by a valid query; keeps garbage out
    lvl = pr.lg[np.maximum(count, 1)]
    left = np.minimum(L - r0, m - 1)
    right = np.maximum(H - r0 - (1 << lvl), 0)
    rows = np.arange(k)[:, None]
    best = np.maximum(table[lvl, rows, left], table[lvl, rows, right])
    ok = ((count >= 1) & (best >= pr.F[:, b] - T)).any(axis=0)
    return ok


def _valid_ends_untimed(pr: _Prep, i: int, b: _Ix, R: _Ix, top_b: _Ix) -> npt.NDArray[np.bool_]:
    """``_valid_ends`` where every stage passes the time test: ``b`` is reached when some
    reachable start in ``[lo, top[b])`` fits memory and pins. Memory only grows as the start
    moves left, so that holds exactly when the last reachable start before ``top[b]`` fits:
    one look-up per end, no search over the positions (the test ``solve`` and ``feasible``
    start with and the one the closest-split search of a refusal repeats)."""
    idx = np.searchsorted(R, top_b, "left") - 1  # the last reachable start before top[b]
    a = R[np.maximum(idx, 0)]
    ok = (idx >= 0) & (a >= pr.pin_lo[b])
    k = pr.inflight[i]
    fits = np.zeros(len(b), bool)
    static = pr.SM[b] - pr.SM[a]
    for o in pr.opts:
        if o.free[i]:  # any stage fits
            return ok
        fits |= static + k * (o.AM[b] - o.AM[a]) <= o.cap[i]
    return ok & fits


def _witness(pr: _Prep, R: list[_Ix], T: int) -> list[int]:
    """Backtrack one feasible partition; returns cuts c_0=0..c_S=n. Each stage starts at the
    last reachable start that fits it under some option (memory and pins by ``_floors``; the
    time test itself, which implies ``_lo``'s time limit), all options tested at once."""
    cuts = [pr.n]
    b = pr.n
    for i in range(pr.S - 1, -1, -1):
        fl = _floors(pr, i)[:, b]
        Ri = R[i]
        a = Ri[np.searchsorted(Ri, int(fl.min()), "left"):np.searchsorted(Ri, int(pr.top[b]), "left")]
        valid = ((a >= fl[:, None]) & (pr.G[:, a] >= (pr.F[:, b] - T)[:, None])).any(axis=0)
        hits = a[valid]
        b = int(hits[-1]) if len(hits) else -1
        cuts.append(b)
    return cuts[::-1]


def _pick(pr: _Prep, cuts: Sequence[int], T: int | None) -> list[int]:
    """Per stage, the first option under which it fits memory (and time ``T`` if given)."""
    out = []
    for i, (a, b) in enumerate(itertools.pairwise(cuts)):
        k = pr.inflight[i]
        chosen = None
        for j, o in enumerate(pr.opts):
            t = int(o.f[b] - o.g[a]) if a < b else 0
            mem = int(pr.SM[b] - pr.SM[a] + k * (o.AM[b] - o.AM[a]))
            if mem <= o.cap[i] and (T is None or t <= T):
                chosen = j
                break
        if chosen is None:  # fits nothing: report it under the option that needs least memory
            chosen = min(range(len(pr.opts)), key=lambda j: int(k * (pr.opts[j].AM[b] - pr.opts[j].AM[a]))
                         - pr.opts[j].cap[i])
        out.append(chosen)
    return out


def _times(pr: _Prep, cuts: list[int], choice: Sequence[int] | None = None) -> _I64:
    c = np.asarray(cuts)
    if choice is None:  # the cheapest compute: a lower estimate, used by the search only
        cc = pr.opts[0].f - pr.opts[0].P
        t: _I64 = pr.P[c[1:]] - pr.P[c[:-1]] + cc[c[1:]] + cc[c[:-1]]
        return t
    return np.asarray([int(pr.opts[j].f[b] - pr.opts[j].g[a])
                       for j, (a, b) in zip(choice, itertools.pairwise(cuts))], np.int64)


def _range_argmax(vals: _I64, s: npt.NDArray[np.intp], e: npt.NDArray[np.intp]
                  ) -> npt.NDArray[np.intp]:
    """Index of the maximum of ``vals[s_j:e_j]`` for each j (windows non-empty)."""
    m = len(vals)
    lg = np.zeros(m + 1, np.intp)
    for k in range(1, m.bit_length()):
        lg[1 << k:] += 1
    idx = [np.arange(m)]
    k = 1
    while (1 << k) <= m:
        prev, h = idx[-1], 1 << (k - 1)
        left, right = prev[: m - 2 * h + 1], prev[h: m - h + 1]
        idx.append(np.where(vals[left] >= vals[right], left, right))
        k += 1
    out = np.empty(len(s), np.intp)
    kk = lg[e - s]
    for k in np.unique(kk):
        sel = kk == k
        left, right = idx[k][s[sel]], idx[k][e[sel] - (1 << k)]
        out[sel] = np.where(vals[left] >= vals[right], left, right)
    return out


def _min_bytes(pr: _Prep, bands: list[_Ix], cb: _I64, T: int) -> list[int]:
    """Min-``cut_bytes`` partition among those with every stage time <= T (see step 3)."""
    n, S, INF = pr.n, pr.S, np.int64(2**62)
    cb = cb.copy()
    cb[n] = 0
    spans: list[list[tuple[_Ix, _Ix]]] = []
    for i in range(1, S + 1):
        Fa, Fb = bands[i - 1], bands[i]
        spans.append([(np.searchsorted(Fa, _lo(pr, o, i - 1, Fb, T), "left"), np.searchsorted(Fa, pr.top[Fb], "left"))
                      for o in pr.opts])
    approx = n > 2000 and sum(int((e - s).sum()) for sp in spans for s, e in sp) > _PAIR_BUDGET
    best = np.zeros(1, np.int64)
    preds: list[npt.NDArray[np.intp]] = []
    for i in range(1, S + 1):
        Fa, Fb = bands[i - 1], bands[i]
        new_best = np.full(len(Fb), INF)
        pred = np.zeros(len(Fb), np.intp)  # index into Fa
        if approx:
            for o, (s, e) in zip(pr.opts, spans[i - 1]):
                nb, pd = _pairs(o, Fa, Fb, s, e, best, T, approx)
                take = nb < new_best
                new_best = np.where(take, nb, new_best)
                pred = np.where(take, pd, pred)
        else:
            new_best, pred = _pairs_split(pr, Fa, Fb, spans[i - 1], best, T)
        best = new_best + cb[Fb]
        preds.append(pred)
    cuts = [n]
    j = 0  # index of n in the last band
    for i in range(S, 0, -1):
        j = int(preds[i - 1][j])
        cuts.append(int(bands[i - 1][j]))
    return cuts[::-1]


def _argmin_table(vals: _I64) -> _Ix:
    """Sparse table of range minima: ``t[k, x]`` is the smallest index of the minimum of
    ``vals[x : x + 2^k]`` (entries with ``x > len(vals) - 2^k`` are never read)."""
    m = len(vals)
    levels = max(m.bit_length(), 1)
    t = np.zeros((levels, m), np.intp)
    t[0] = np.arange(m)
    for k in range(1, levels):
        h = 1 << (k - 1)
        left, right = t[k - 1, : m - 2 * h + 1], t[k - 1, h: m - h + 1]
        t[k, : m - 2 * h + 1] = np.where(vals[left] <= vals[right], left, right)
    return t


def _pairs_split(pr: _Prep, Fa: _Ix, Fb: _Ix, spans: list[tuple[_Ix, _Ix]], best: _I64, T: int
                 ) -> tuple[_I64, npt.NDArray[np.intp]]:
    """For each end in ``Fb``: the cheapest valid start in ``Fa`` over the options, as
    ``_pairs`` (exact) per option merged in order (a tie keeps the earlier option's), without
    listing every pair. A start ``a`` passes the time test when
    ``g[a] = P[a] - cut_cost[a] >= f[b] - T``: it fails wherever ``P[a] < f[b] - T`` and
    passes wherever ``P[a] >= f[b] - T + max cut_cost``, and ``P`` is monotone, so each window
    splits into a failing head, a short strip tested pair by pair and a passing tail answered
    by one range minimum over ``best`` (a sparse table shared by the options, whose costs are
    the same). The tail's indices follow the strip's, so the strip wins a tie: the same cost
    and the same first start at that cost as ``_pairs``, wherever that cost is below ``INF``
    (a cost not below ``INF`` is never taken). All options are handled in the same calls."""
    INF = np.int64(2**62)
    k, nb = len(pr.opts), len(Fb)
    e = spans[0][1]  # the same for every option: starts before top[b]
    s = np.stack([sp[0] for sp in spans])
    thr = pr.F[:, Fb] - T  # options x ends
    Pa, gk = pr.PP[:, Fa], pr.G[:, Fa]
    cmax = int((Pa[0] - gk[0]).max()) if len(Fa) else 0  # the largest cut cost among the starts
    a0, a1 = np.empty_like(s), np.empty_like(s)
    for j in range(k):
        a0[j] = np.searchsorted(Pa[j], thr[j], "left")  # before it: P[a] < f[b] - T, fails
        a1[j] = np.searchsorted(Pa[j], thr[j] + cmax, "left")  # from it on: passes
    np.maximum(a0, s, out=a0)
    np.maximum(a1, s, out=a1)
    cost, pred = _cheapest(gk, np.repeat(np.arange(k), nb), a0.ravel(), np.minimum(e, a1).ravel(), thr.ravel(), best)
    tail = np.flatnonzero((e > a1).ravel())  # (option, end) rows whose window has a passing tail
    if len(tail):
        table = _argmin_table(best)
        lft, rgt = a1.ravel()[tail], e[tail % nb]
        width = (rgt - lft).astype(np.int64)
        lvl = np.zeros(len(width), np.intp)
        while True:  # floor(log2(width)), integer-only
            up = (np.int64(1) << (lvl + 1)) <= width
            if not up.any():
                break
            lvl += up
        i1, i2 = table[lvl, lft], table[lvl, rgt - (np.int64(1) << lvl)]
        idx = np.where(best[i1] <= best[i2], i1, i2)
        val = best[idx]
        take = val < cost[tail]  # a tie keeps the strip's (earlier) start
        cost[tail] = np.where(take, val, cost[tail])
        pred[tail] = np.where(take, idx, pred[tail])
    cost, pred = cost.reshape(k, nb), pred.reshape(k, nb)
    j = np.argmin(cost, axis=0)  # the first option with the least cost
    cols = np.arange(nb)
    least = cost[j, cols]
    keep = least < INF
    return np.where(keep, least, INF), np.where(keep, pred[j, cols], 0)


def _cheapest(gk: _I64, opt: _Ix, s: _Ix, e: _Ix, thr: _I64, best: _I64) -> tuple[_I64, npt.NDArray[np.intp]]:
    """Per row ``r``: the least ``best[a]`` over starts ``a`` in ``[s_r, e_r)`` (indices into
    the band) with ``gk[opt_r, a] >= thr_r``, and the first such ``a`` (``INF`` and an
    arbitrary index where none), listing every pair in chunks of ``_CHUNK_PAIRS``."""
    INF = np.int64(2**62)
    rows = len(s)
    width = np.maximum(e - s, 0)
    new_best = np.full(rows, INF)
    pred = np.zeros(rows, np.intp)
    ends = np.cumsum(width)
    chunk_lo = 0
    while chunk_lo < rows:
        base = ends[chunk_lo - 1] if chunk_lo else 0
        chunk_hi = max(int(np.searchsorted(ends, base + _CHUNK_PAIRS, "right")), chunk_lo + 1)
        w = width[chunk_lo:chunk_hi]
        total = int(w.sum())
        if total:
            nz = np.flatnonzero(w)  # rows with at least one candidate
            wn = w[nz]
            starts = np.cumsum(wn) - wn
            row = np.repeat(np.arange(len(wn)), wn)
            ai = np.repeat(s[chunk_lo:chunk_hi][nz] - starts, wn) + np.arange(total)
            ok = gk[opt[chunk_lo:chunk_hi][nz][row], ai] >= thr[chunk_lo:chunk_hi][nz][row]
            cost = np.where(ok, best[ai], INF)
            seg = np.minimum.reduceat(cost, starts)
            first = np.minimum.reduceat(np.where(cost == seg[row], np.arange(total), total), starts)
            new_best[chunk_lo + nz] = seg
            pred[chunk_lo + nz] = ai[first]
        chunk_lo = chunk_hi
    return new_best, pred


def _pairs(o: _Opt, Fa: _Ix, Fb: _Ix, s: _Ix, e: _Ix, best: _I64, T: int, approx: bool
           ) -> tuple[_I64, npt.NDArray[np.intp]]:
    """For each end in ``Fb``: the cheapest valid start in ``Fa`` under option ``o``."""
    s_full = s
    if approx:
        s = np.maximum(s, e - _APPROX_WIDTH)
    thr = o.f[Fb] - T
    # one option: ``_cheapest`` with a single row of slack over the band's starts
    new_best, pred = _cheapest(o.g[Fa][None, :], np.zeros(len(Fb), np.intp), s, e, thr, best)
    if approx:  # the largest-slack predecessor keeps every reachable b reachable
        has = e > s_full
        if has.any():
            idx = np.flatnonzero(has)
            am = _range_argmax(o.g[Fa], s_full[idx], e[idx])
            c_am = best[am]
            take = (o.g[Fa[am]] >= thr[idx]) & (c_am < new_best[idx])
            new_best[idx] = np.where(take, c_am, new_best[idx])
            pred[idx] = np.where(take, am, pred[idx])
    return new_best, pred


def _mirror(inp: SolverInput, n: int) -> SolverInput:
    """The same instance read right to left: stage i becomes stage S-1-i."""
    def r(xs: Sequence[Any]) -> list[Any]:
        return list(reversed(list(xs)))

    return SolverInput(r(inp.compute), r(inp.cut_cost), r(inp.cut_bytes), r(inp.allowed),
                       r(inp.static_mem), r(inp.act_mem), r(inp.inflight), r(inp.capacity),
                       [n - int(p) for p in inp.pinned],
                       [Option(r(o.compute), r(o.act_mem), o.reserve) for o in inp.options],
                       r(inp.avoid), r(inp.has_compute))


def _memory_error(inp: SolverInput, S: int, pins: list[int], T_inf: int) -> InfeasibleError:
    # Report the worst stage of the partition that minimises the largest overflow
    # (bytes over capacity): it is the partition closest to fitting, so its worst
    # stage shows the smallest change that would make the model fit.
    lo, hi = 1, sum(inp.static_mem) + max(max(inp.inflight) * sum(o.act_mem) + o.reserve for o in inp.choices()) + 1
    pr0 = _prepare(inp, S, pins)
    while lo < hi:
        mid = (lo + hi) // 2
        if _reach(_with_slack(pr0, inp, mid), T_inf) is None:
            lo = mid + 1
        else:
            hi = mid
    pr = _with_slack(pr0, inp, lo)
    R = _reach(pr, T_inf)
    assert R is not None  # slack lo is feasible by construction of the search
    cuts = _witness(pr, R, T_inf)
    choice = _pick(pr0, cuts, None)
    opts = inp.choices()
    worst, over, parts = 0, None, (0, 0, 0, 0)
    for i in range(S):
        a, b = cuts[i], cuts[i + 1]
        o = opts[choice[i]]
        w, act = sum(inp.static_mem[a:b]), sum(o.act_mem[a:b])
        need = w + inp.inflight[i] * act + o.reserve
        if over is None or need - inp.capacity[i] > over:
            worst, over, parts = i, need - inp.capacity[i], (need, w, act, o.reserve)
    need, w, act, extra = parts
    more = f" + {_fmt_bytes(extra)} recomputed during backward" if extra else ""
    err = InfeasibleError(
        f"stage {worst} needs {_fmt_bytes(need)} (weights {_fmt_bytes(w)} + "
        f"{inp.inflight[worst]} micro-batches x {_fmt_bytes(act)} activations{more}) but the device "
        f"holds {_fmt_bytes(inp.capacity[worst])}; {_FIX}")
    err.closest = (tuple(cuts[1:-1]), tuple(choice))  # type: ignore[attr-defined]
    return err


def _tie_costs(inp: SolverInput, S: int) -> _I64:
    """Per cut, what the tie-break minimises: its bytes, plus a penalty above any byte total
    where it sends a non-tensor value (``avoid``), so that fewer such cuts always win."""
    cb = np.asarray(inp.cut_bytes, np.int64)
    if not len(inp.avoid) or not any(inp.avoid):
        return cb
    penalty = min(int(cb.sum()) + 1, _LIMIT // (S + 1))  # S cuts of penalty stay in int64
    return cb + penalty * np.asarray(inp.avoid, np.int64)


def _lower_bound(inp: SolverInput, S: int, n: int) -> int:
    # Every stage but a lone one touches >= 1 interior cut and S-1 cuts are each paid
    # twice, so the cheapest allowed cut cost lifts both the average and the max bound.
    m = min((inp.cut_cost[k] for k in range(1, n) if inp.allowed[k]), default=0) if S > 1 else 0
    compute = np.min(np.asarray([o.compute for o in inp.choices()], np.int64), axis=0) if n else np.zeros(0, np.int64)
    total = int(compute.sum()) + 2 * (S - 1) * m
    return max(-(-total // S), int(compute.max(initial=0)) + m)


def _stage_times_between(pr: _Prep, lo: int, hi: int, budget: int) -> _I64 | None:
    """Every time in ``[lo, hi)`` that some stage ``[a, b)`` takes under some option (``a`` 0 or
    an allowed cut, ``b`` an allowed cut or ``n``, ``a < b``), sorted and unique; None when more
    than ``budget`` (start, end) pairs would have to be examined.

    The bottleneck of a partition is one of its stage times, and whether a threshold is
    feasible changes only where it crosses a stage time, so the least feasible threshold
    in ``[lo, hi]`` is ``hi`` or one of these values: ``solve`` bisects over them instead of
    over every integer (about half the feasibility tests, the same answer). A superset is
    harmless (memory, pins and idle stages are not checked here)."""
    starts = np.concatenate([[0], pr.cuts]).astype(np.intp)
    ends = np.concatenate([pr.cuts, [pr.n]]).astype(np.intp)
    first = np.searchsorted(starts, ends, "left")  # starts before each end: [0, first)
    spans = []
    total = 0
    for o in pr.opts:
        cut_max = int((o.f - o.P).max())  # the largest cut cost: g = P - cut <= P <= g + cut_max
        Ps, fb = o.P[starts], o.f[ends]
        # f[b] - g[a] in [lo, hi)  =>  P[a] >= g[a] > f[b] - hi  and  P[a] <= f[b] - lo + cut_max
        s = np.searchsorted(Ps, fb - hi, "right")
        e = np.minimum(np.searchsorted(Ps, fb - lo + cut_max, "right"), first)
        w = np.maximum(e - s, 0)
        total += int(w.sum())
        if total > budget:
            return None
        spans.append((o, s, w))
    out = [np.zeros(0, np.int64)]
    for o, s, w in spans:
        nz = np.flatnonzero(w)
        if not len(nz):
            continue
        wn = w[nz]
        offs = np.cumsum(wn) - wn
        ai = np.repeat(s[nz], wn) + np.arange(int(wn.sum())) - np.repeat(offs, wn)
        v = o.f[np.repeat(ends[nz], wn)] - o.g[starts[ai]]
        out.append(v[(v >= lo) & (v < hi)])
    # sorted and unique, as np.unique, whose hash-based path is several times slower on these
    vals = np.sort(np.concatenate(out))
    return vals[np.concatenate(([True], vals[1:] != vals[:-1]))] if len(vals) else vals


def solve(inp: SolverInput, n_stages: int) -> Solution:
    """Cut ``inp`` into ``n_stages`` stages minimising the bottleneck, then cut bytes.

    >>> s = solve(SolverInput([3, 1, 1, 3], [0, 0, 0, 0, 0], [0, 5, 1, 5, 0], [True] * 5,
    ...                       [0] * 4, [0] * 4, [1, 1], [100, 100]), 2)
    >>> s.cuts, s.bottleneck, s.total_cut_bytes
    ((2,), 4, 1)
    """
    m = memo()
    if m is not None:
        return m.get(("solve", m.input_key(inp), n_stages), lambda: _solve(inp, n_stages))  # type: ignore[no-any-return]
    return _solve(inp, n_stages)


def _solve(inp: SolverInput, n_stages: int) -> Solution:
    S = n_stages
    n, pins = _check(inp, S)
    need = S > 1  # every stage computes something, where the instance allows it
    fw = _prepare(inp, S, pins, need_compute=need)
    T_inf = max(int(o.P[n]) for o in fw.opts) + 2 * int(max(inp.cut_cost)) + 1
    R = _reach(fw, T_inf)
    if R is None and need:  # too few computing positions (or pins, memory): allow idle stages
        need = False
        fw = _prepare(inp, S, pins)
        R = _reach(fw, T_inf)
    if R is None:
        logger.debug("solve: %d positions, %d stages: no split fits memory", n, S)
        raise _memory_error(inp, S, pins, T_inf)
    lb = _lower_bound(inp, S, n)

    def achieved(R: list[_Ix], T: int) -> int:
        w = _witness(fw, R, T)
        return int(_times(fw, w, _pick(fw, w, T)).max())

    hi = achieved(R, T_inf)
    lo = min(lb, hi)
    # Gallop up from the lower bound before bisecting: tests near the optimum only touch
    # narrow bands (see _ends), while a midpoint near the first witness touches all n.
    step = max(1, lb >> 6)
    values: _I64 | None = None  # the stage times in [lo, hi), once few enough to list
    reached = {T_inf: R}  # threshold -> its reachable sets, for the final tie-break at the optimum
    while lo < hi:
        if step >= hi and values is None:  # bisecting: list the values the optimum can take
            values = _stage_times_between(fw, lo, hi, _VALUE_BUDGET)
        if values is not None:
            inside = values[np.searchsorted(values, lo, "left"):np.searchsorted(values, hi, "left")]
            if not len(inside):  # no stage takes a time in [lo, hi): the optimum is hi
                break
            mid = int(inside[len(inside) // 2])
        else:
            mid = min(lo + step, (lo + hi) // 2)
        R = _reach(fw, mid)
        if R is None:
            lo, step = mid + 1, 2 * step
        else:  # snap to what the witness really achieves (often below mid), then bisect
            reached[mid] = R
            hi, step = achieved(R, mid), hi
    T = hi
    R = reached[T] if T in reached else _reach(fw, T)  # often the last test's own threshold
    Rm = _reach(_prepare(_mirror(inp, n), S, [n - p for p in pins], need_compute=need), T)
    assert R is not None and Rm is not None  # T was proven feasible above
    F = [np.intersect1d(R[i], n - Rm[S - i], assume_unique=True) for i in range(S + 1)]
    cuts = _min_bytes(fw, F, _tie_costs(inp, S), T)
    choice = _pick(fw, cuts, T)
    times = tuple(int(t) for t in _times(fw, cuts, choice))
    logger.debug("solve: %d positions, %d stages, %d options: bottleneck %d (lower bound %d), cuts %s, options %s",
                 n, S, len(fw.opts), T, lb, list(cuts[1:-1]), list(choice))
    opts = inp.choices()
    mems = tuple(int(sum(inp.static_mem[a:b]) + inp.inflight[i] * sum(opts[j].act_mem[a:b]) + opts[j].reserve)
                 for i, ((a, b), j) in enumerate(zip(itertools.pairwise(cuts), choice)))
    return Solution(cuts=tuple(cuts[1:-1]), bottleneck=max(times), stage_times=times,
                    stage_mem=mems,
                    total_cut_bytes=int(sum(inp.cut_bytes[k] for k in cuts[1:-1])),
                    lower_bound=int(lb), optimal=True, stage_option=tuple(choice))


def feasible(inp: SolverInput, n_stages: int) -> bool:
    """Does ``solve(inp, n_stages)`` find a split (rather than raise a ``PartitionError``)?
    The same checks and reachability test, without the search for the best split or, when
    there is none, the search for the closest one that the error reports."""
    m = memo()
    if m is not None:
        return m.get(("feasible", m.input_key(inp), n_stages), lambda: _feasible(inp, n_stages))  # type: ignore[no-any-return]
    return _feasible(inp, n_stages)


def _feasible(inp: SolverInput, n_stages: int) -> bool:
    S = n_stages
    try:
        n, pins = _check(inp, S)
    except PartitionError:
        return False
    for need in ((True, False) if S > 1 else (False,)):  # as solve: every stage computing, else idle ones allowed
        fw = _prepare(inp, S, pins, need_compute=need)
        if _reach(fw, max(int(o.P[n]) for o in fw.opts) + 2 * int(max(inp.cut_cost)) + 1) is not None:
            return True
    return False


def min_cost_at(inp: SolverInput, n_stages: int, T: int, costs: Sequence[int]) -> tuple[int, ...] | None:
    """The interior cuts minimising ``sum(costs[k])`` over partitions whose every stage takes
    <= ``T`` and fits memory (every stage computing where possible), or None if there is none.
    Exact: the tie-break DP of ``solve`` at a given threshold with other per-cut costs
    (``partitioner.objective`` uses the cuts' transfer times)."""
    m = memo()
    if m is not None:
        return m.get(("min_cost_at", m.input_key(inp), n_stages, int(T), m.field(costs)),  # type: ignore[no-any-return]
                     lambda: _min_cost_at(inp, n_stages, T, costs))
    return _min_cost_at(inp, n_stages, T, costs)


def _min_cost_at(inp: SolverInput, n_stages: int, T: int, costs: Sequence[int]) -> tuple[int, ...] | None:
    S = n_stages
    n, pins = _check(inp, S)
    c = np.asarray(costs, np.int64)
    if len(c) != n + 1 or (len(c) and int(c.min()) < 0) or int(c.sum()) >= _LIMIT:
        raise SolverInputError(f"costs needs {n + 1} non-negative entries with a total below 2^61")
    for need in ((True, False) if S > 1 else (False,)):
        fw = _prepare(inp, S, pins, need_compute=need)
        R = _reach(fw, T)
        if R is None:
            continue
        Rm = _reach(_prepare(_mirror(inp, n), S, [n - p for p in pins], need_compute=need), T)
        assert Rm is not None  # the mirror of a feasible instance is feasible
        F = [np.intersect1d(R[i], n - Rm[S - i], assume_unique=True) for i in range(S + 1)]
        return tuple(int(x) for x in _min_bytes(fw, F, c, T)[1:-1])
    return None
