"""Schedule-aware cuts: minimise the predicted step time of the chosen schedule.

``solver.solve`` minimises the slowest stage (compute plus both its cuts' transfers). The
step time the simulator predicts (``partitioner.simulator``) is a different function of the
same cuts: sends cost their rank nothing (the message lands later), so a cut's transfer
sits on the fill/drain path rather than in every micro-batch's stage time; stages differ in
forward/backward ratio; interleaved and zero-bubble placements load ranks, not stages.
``partition(..., objective="step")`` uses this module.

Search (``step_search``): the simulator is the arbiter among candidates, all feasible under
the solver's additive memory model:

1. the min-bottleneck split (after ``refine``): the answer is never predicted slower than it;
   and the min-bottleneck split of compute alone, transfers ignored (the baseline of PyTorch's
   proposed ``auto_partition``);
2. for thresholds ``T = T* (1 + d)``, ``d`` in ``_LADDER``, the split with every stage <= ``T``
   that minimises the total transfer time of its cuts (exact: the solver's reachability
   bands and its min-cost DP over cut pairs, ``solver.min_cost_at``). Under the 1F1B
   critical-path estimate "step ~ sum of stage times + (m - 1) x slowest stage", the best
   split is one of these (for the ``T`` it ends up with);
3. a local search from the best of those: each cut moves to another allowed position (any,
   up to 32 allowed cuts; else 1, 2, 4, 8 allowed positions away) while the simulated step
   drops, at most ``max_evals`` simulations.

The bound this gives, and what the tests check: the result's simulated step is <= that of
the min-bottleneck split (it is a candidate) and of every ladder split; it is a local
optimum of the simulated step under those single-cut moves (unless
``max_evals`` ran out, which the report says). It is not proven globally optimal:
tests/partitioner/test_objective.py compares it with brute force on small instances and
benchmarks/schedule_aware_bench.py reports the gaps.

``fewer_stages`` answers the other planning question: would fewer pipeline ranks be predicted
faster (the cuts' transfers outweighing the compute they spread)?
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from partitioner.refine import refine, score
from partitioner.schedule import Schedule, ScheduleError, build_schedule
from partitioner.simulator import simulate
from partitioner.solver import InfeasibleError, Solution, SolverInput, memo, min_cost_at, solve

__all__ = ["OBJECTIVES", "StepModel", "StepReport", "fewer_stages", "pipeline_floor", "resolve_objective", "step_of",
           "step_search"]

#: ``partition(objective=...)``: "bottleneck" minimises the slowest stage (then bytes cut),
#: "step" the schedule's simulated step time, "auto" (the default) the step where the slowest
#: stage is not a good proxy for it (``resolve_objective``).
OBJECTIVES = ("auto", "bottleneck", "step")
#: simulated actions ``objective="auto"`` may spend on the step search (evaluations x actions
#: per simulation), so a large pipeline (many stages x micro-batches) plans in seconds
_AUTO_ACTIONS = 20_000
_LADDER = (0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
_MOVES = (1, 2, 4, 8)
_ALL_MOVES = 32  # up to this many allowed cuts, a cut may move to any of them


@dataclass(frozen=True)
class StepModel:
    """What the simulator needs beyond the solver input, per position and per cut (time units)."""

    fwd: Sequence[int]  # per position: forward time (backward = option compute - forward)
    send: Sequence[int]  # n+1: time for the activations crossing cut k to land
    bsend: Sequence[int]  # n+1: time for their gradients to land
    schedule: Schedule


@dataclass(frozen=True)
class StepReport:
    step: float  # simulated step of the answer (time units)
    bottleneck_step: float  # simulated step of the min-bottleneck split
    evaluations: int  # simulations run
    local_optimum: bool  # no single-cut move in _MOVES improves it (False: max_evals ran out)


def step_of(inp: SolverInput, model: StepModel, sol: Solution) -> float:
    """Simulated step of ``sol``'s cuts, each stage under its chosen option."""
    n = len(inp.compute)
    bounds = [0, *sol.cuts, n]
    opts = inp.choices()
    F = np.concatenate([[0], np.cumsum(np.asarray(model.fwd, np.int64))])
    fwd, bwd = [], []
    for (a, b), j in zip(itertools.pairwise(bounds), sol.stage_option or (0,) * (len(bounds) - 1)):
        f = int(F[b] - F[a])
        fwd.append(float(f))
        bwd.append(float(sum(opts[j].compute[a:b]) - f))
    send = [float(model.send[k]) for k in bounds[1:-1]]
    bsend = [float(model.bsend[k]) for k in bounds[1:-1]]
    return simulate(model.schedule, fwd, bwd, send, bsend).step_time


def pipeline_floor(work: float, m: int, ranks: int) -> float:
    """A floor under the step of any schedule that runs one stage per rank with a whole
    backward (1F1B, GPipe, interleaved 1F1B with one stage per rank), whatever the cuts:
    ``work`` is one micro-batch's forward plus backward through the whole model, ``m`` the
    micro-batches, ``ranks`` the pipeline's ranks.

    Why: rank ``r`` starts no earlier than one micro-batch's forward through the stages
    before it, then runs its ``m`` forwards and backwards one at a time (``m w_r``), and its
    last action, a backward, is followed by that micro-batch's backward through the stages
    before it. So the step is at least ``max_r (W_<r + m w_r)`` with ``W_<r`` the work of the
    stages before ``r`` (forward plus backward); over every split of ``work`` (divisible at
    will, which only lowers it) the least such maximum makes every term equal:
    ``w_r = w_0 q^r`` with ``q = (m - 1) / m``, so the floor is ``work / (1 - q^ranks)``
    (``m work`` for one rank, ``work`` for one micro-batch). Transfers, recompute, uneven
    nodes and replica communication only add. Scaled down by one part in 10^9 so that
    rounding never lifts it above a step it bounds."""
    if ranks <= 1 or m <= 1:
        return (m if ranks <= 1 else 1) * work * (1 - 1e-9)
    q = (m - 1) / m
    return work / (1 - q ** ranks) * (1 - 1e-9)


def _fits(inp: SolverInput, sol: Solution) -> bool:
    return all(m <= c for m, c in zip(sol.stage_mem, inp.capacity))


def resolve_objective(objective: str, schedule: Schedule) -> tuple[str, int, str]:
    """(objective used, the step search's simulation budget, why) for ``partition(objective=...)``.

    "auto" keeps the bottleneck for 1F1B with one stage per rank (its action order, under any
    name: interleaved 1F1B with one stage per rank is the same lists), whose steady state is
    (m - 1) x the slowest stage's forward + backward: there the two objectives predicted within
    0.6 % on every model tried (benchmarks/RESULTS.md). Elsewhere the slowest stage is a poor
    proxy for the step: GPipe runs all forwards, then all backwards (the forward and backward
    phases have their own slowest stage), interleaved 1F1B and zbv place several stages on a
    rank, zb-h1 and zbv defer weight gradients into the bubbles; there the step-aware cuts were
    predicted up to 8.8 % and measured up to 7 % faster, and "auto" searches the step, with a
    budget of ``_AUTO_ACTIONS`` simulated compute actions (at most 400 simulations). A pipeline
    too large for 20 simulations in that budget (e.g. 64 stages x 8 micro-batches) keeps the
    bottleneck, so planning it stays a matter of seconds."""
    if objective != "auto":
        return objective, 400, ""
    v = schedule.n_stages // max(1, schedule.n_ranks)
    split = any(a.kind == "W" for acts in schedule.actions for a in acts)
    compute = [[a for a in acts if a.is_compute] for acts in schedule.actions]
    if v == 1 and not split:
        try:  # 1F1B's order under any name (interleaved-1f1b with one stage per rank is 1F1B)
            ref = build_schedule("1f1b", schedule.n_ranks, schedule.n_microbatches, schedule.n_stages)
            if compute == [[a for a in acts if a.is_compute] for acts in ref.actions]:
                return "bottleneck", 0, ""
        except ScheduleError:
            pass
    budget = min(400, _AUTO_ACTIONS // max(1, sum(map(len, compute))))
    if budget < 20:
        return "bottleneck", 0, ""
    phases = all(all(a.kind == "F" for a in acts[:len(acts) // 2]) for acts in compute)
    why = (f"{v} stages per rank" if v > 1 else "split backward" if split
           else "forward and backward phases" if phases else "not 1F1B's order")
    return "step", budget, f" (auto: {schedule.name}, {why})"


def step_search(inp: SolverInput, n_stages: int, model: StepModel, first: Solution, *,
                max_evals: int = 400) -> tuple[list[Solution], StepReport]:
    """Candidate splits, fastest simulated step first (``first``, the min-bottleneck split,
    among them), and a report. The caller checks exact memory in that order."""
    mem = memo()
    if mem is not None:  # inside solver.remembered(): the same search met before is answered from the memo
        # the schedule by identity (a built schedule is immutable data), kept alive with the answer so
        # that its id is not reused while the entry lives
        key = ("step_search", mem.input_key(inp), n_stages, mem.field(model.fwd), mem.field(model.send),
               mem.field(model.bsend), id(model.schedule), first, max_evals, _LADDER, _MOVES, _ALL_MOVES)
        kept = mem.get(key, lambda: (model.schedule, _step_search(inp, n_stages, model, first, max_evals=max_evals)))
        cands, report = kept[1]
        return list(cands), report  # a list of its own: the caller may not change the remembered one
    return _step_search(inp, n_stages, model, first, max_evals=max_evals)


def _step_search(inp: SolverInput, n_stages: int, model: StepModel, first: Solution, *,
                 max_evals: int = 400) -> tuple[list[Solution], StepReport]:
    S, n = n_stages, len(inp.compute)
    seen: dict[tuple[int, ...], tuple[float, Solution]] = {}
    evals = [0]

    def visit(cuts: Sequence[int]) -> float | None:
        key = tuple(int(c) for c in cuts)
        if key in seen:
            return seen[key][0]
        sol = score(inp, key, lower_bound=first.lower_bound)
        if not _fits(inp, sol):
            return None
        evals[0] += 1
        t = step_of(inp, model, sol)
        seen[key] = (t, sol)
        return t

    base = visit(first.cuts)
    assert base is not None, "the min-bottleneck split must fit (it came from the solver)"
    if S > 1:
        try:  # the split that balances compute alone (transfers ignored), as PyTorch's auto_partition DP
            visit(solve(replace(inp, cut_cost=[0] * (n + 1), avoid=()), S).cuts)
        except InfeasibleError:
            pass
        cost = np.asarray(inp.cut_cost, np.int64)
        for d in _LADDER:
            cuts = min_cost_at(inp, S, int(first.bottleneck * (1 + d)), cost.tolist())
            if cuts is not None:
                visit(cuts)
    allowed = [k for k in range(1, n) if inp.allowed[k]]
    where = {k: i for i, k in enumerate(allowed)}
    pins = set(inp.pinned)
    computes = _computes(inp)
    C = np.concatenate([[0], np.cumsum(computes)])
    busy = all(C[b] > C[a] for a, b in itertools.pairwise([0, *first.cuts, n]))
    best = min(seen, key=lambda k: (seen[k][0], k))
    local = True
    moves = range(1, len(allowed)) if len(allowed) <= _ALL_MOVES else _MOVES
    while S > 1:
        improved = False
        for i, c in enumerate(best):
            if c in pins:
                continue
            for step in moves:
                for sign in (-1, 1):
                    j = where[c] + sign * step
                    if not 0 <= j < len(allowed):
                        continue
                    cand = list(best)
                    cand[i] = allowed[j]
                    bounds = [0, *cand, n]
                    if any(a >= b for a, b in itertools.pairwise(bounds)):
                        continue
                    if busy and any(C[b] == C[a] for a, b in itertools.pairwise(bounds)):
                        continue  # keep every stage computing, as the solver does
                    if evals[0] >= max_evals:
                        local = False
                        break
                    t = visit(cand)
                    if t is not None and t < seen[best][0]:
                        best, improved = tuple(cand), True
                        break
                if improved or not local:
                    break
            if improved or not local:
                break
        if not improved:
            break
    order = sorted(seen, key=lambda k: (seen[k][0], k))
    out = []
    for k in order:
        t, sol = seen[k]
        out.append(replace(sol, lower_bound=min(first.lower_bound, sol.bottleneck),
                           optimal=first.optimal and sol.bottleneck == first.bottleneck))
    return out, StepReport(seen[order[0]][0], base, evals[0], local)


def _computes(inp: SolverInput) -> np.ndarray:  # type: ignore[type-arg]
    if len(inp.has_compute):
        return np.asarray(inp.has_compute, bool)
    return np.min(np.asarray([o.compute for o in inp.choices()], np.int64), axis=0) > 0


def fewer_stages(inp: SolverInput, model: StepModel, current: float, *, n_gpus: int, stages_per_rank: int,
                 counts: Sequence[int] | None = None,
                 inflight_of: Callable[[Schedule], Sequence[int]] | None = None) -> list[tuple[int, float | None]]:
    """Predicted step per pipeline rank count below ``n_gpus`` (every count up to 8 GPUs, else
    one GPU and half of them): (ranks, step or None when it
    does not fit or the schedule does not allow it), each with the min-bottleneck split of the
    same costs under the same schedule, micro-batches and per-rank memory. ``current`` is the
    plan's own step: counts whose lower bound (each rank busy m x total work / ranks at least;
    one micro-batch's forward and backward through every stage) reaches it are not solved."""
    if inp.pinned:  # pinned cuts fix the stage structure: no comparison to make
        return []
    sched = model.schedule
    name, m = sched.name, sched.n_microbatches
    if counts is None:
        counts = list(range(1, n_gpus)) if n_gpus <= 8 else [1, n_gpus // 2]  # a solve per count: few
    work = min(sum(o.compute) for o in inp.choices())
    out: list[tuple[int, float | None]] = []
    for g in counts:
        S = g * stages_per_rank
        if S > len(inp.compute) or (S > 1 and sum(inp.allowed[1:-1]) < S - 1):
            continue
        if max(m * work / g, work) >= current:  # cannot be faster: not worth a solve
            continue
        try:
            sch = build_schedule(name, g, m, S)
        except ScheduleError:
            continue
        inflight = list(inflight_of(sch)) if inflight_of else list(simulate(sch, [1.0] * S, [2.0] * S).peak_inflight)
        sub = replace(inp, inflight=inflight, capacity=[inp.capacity[0]] * S)
        try:
            sol = refine(sub, S, solve(sub, S)) if S > 1 else score(sub, ())
        except InfeasibleError:
            out.append((g, None))
            continue
        if not _fits(sub, sol):
            out.append((g, None))
            continue
        out.append((g, step_of(sub, replace(model, schedule=sch), sol)))
    return out
