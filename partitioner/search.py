"""The cut search: cuts and per-stage recompute under the exact memory, the objective, and why nothing fits.

``search`` runs the solver on the problem's additive costs, checks each answer stage by
stage with the exact memory (``Problem.exact``) and, where a stage is over, lowers its
capacity by the excess and searches again; ``objective="step"`` then picks the candidate
with the fastest simulated step that fits. When nothing fits, ``explain`` says what would
(more GPUs, recompute, fewer micro-batches in flight), each tried on the same costs.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

from partitioner.cost_models.cost import NodeCost
from partitioner.cost_models.errors import PartitionError
from partitioner.memory import bytes_per_param
from partitioner.objective import StepModel, fewer_stages, resolve_objective, step_of, step_search
from partitioner.passes.liveness import Liveness
from partitioner.passes.meta import COST, DESC
from partitioner.pricing import TIME_UNIT, Priced, to_units, wire_kind
from partitioner.problem import Problem, StageFit, cut_link_units, unit_schedule
from partitioner.refine import refine, score
from partitioner.schedule import Schedule
from partitioner.solver import InfeasibleError, Option, Solution, SolverInput, _fmt_bytes, feasible, solve

__all__ = ["finish_notes", "search", "rescore"]

#: A split: the solver's answer and each stage's exact memory.
Fitted = tuple[Solution, list[StageFit]]

_RETRIES = 6
_UNBOUNDED = 2**60  # a capacity no stage reaches (the solver clamps it to the model's total)


def search(prob: Problem, *, defer_notes: bool = False, explain_limit: int | None = None) -> Fitted:
    """Cuts and per-stage recompute minimising the bottleneck under memory.

    The solver works on additive costs; each solution is then checked stage by stage with
    the exact memory (storages and tied weights once per stage). Where a stage is over, its
    capacity is lowered by the excess and the search runs again (at most ``_RETRIES`` times).

    ``defer_notes``: the "fewer stages would be faster" note (``note_fewer_stages``, a solve
    per smaller rank count) is not computed here but recorded in ``prob.pending``;
    ``finish_notes`` adds it where it would have gone. A search that solves many candidates
    and keeps one (``layout.joint``) pays for the note of the one it keeps only.
    ``explain_limit``: as ``explain``'s ``limit``, for a caller that shows only the start of a refusal.
    """
    check_enough_cuts(prob.priced, prob.opts.n_stages)
    names = tuple(n.name for n in prob.priced.order)
    # per graph (and micro-batch size), not per candidate: shared by the problems of one compilation
    avoid = prob.cached(("avoid", prob.opts.tensor_parallel, names), lambda: non_tensor_cuts(prob))
    has_compute = prob.cached(("computing", prob.opts.tensor_parallel, names, prob.micro, prob.symbols.get("S")),
                              lambda: computing(prob))
    sin = replace(prob.sin, pinned=prob.pins, avoid=avoid, has_compute=has_compute)
    sol, fits = search_cuts(prob, sin, explain_limit=explain_limit)
    used, budget, why = resolve_objective(prob.opts.objective, prob.sched)
    if used == "step":
        sol, fits = step_objective(prob, sin, sol, fits, budget, why)
    if defer_notes:
        prob.pending = (len(prob.notes), sin, sol)
    else:
        note_fewer_stages(prob, sin, sol)
    return sol, fits


def finish_notes(prob: Problem) -> None:
    """Add the note ``search(prob, defer_notes=True)`` left out, at the place in
    ``prob.notes`` it would have taken (the notes added since stay after it)."""
    if prob.pending is None:
        return
    at, sin, sol = prob.pending
    prob.pending = None
    tail = prob.notes[at:]
    del prob.notes[at:]
    note_fewer_stages(prob, sin, sol)
    prob.notes.extend(tail)


def check_enough_cuts(priced: Priced, n_stages: int) -> None:
    """Refuse, naming why, when fewer positions can be cut than the stages need."""
    n_allowed = sum(priced.allowed[1:-1])
    if n_allowed >= n_stages - 1 or n_stages > len(priced.order):
        return  # enough cuts, or too few nodes: the solver's own error says so
    reasons = sorted({r for r in priced.blocked_by if r})
    shown = "; ".join(reasons[:3]) + (f"; and {len(reasons) - 3} more" if len(reasons) > 3 else "")
    raise PartitionError(
        f"{n_stages} stages need {n_stages - 1} cuts but only {n_allowed} positions can be cut "
        f"({shown}); use fewer GPUs, a coarser/finer cut_at, or make those values tensors")


def computing(prob: Problem) -> list[bool]:
    """Per position: does it count FLOPs? (A view, a flatten or a sym size does not: the solver
    gives every stage at least one computing node where it can.) Without example inputs: ()."""
    if prob.acts is None:
        return []
    return [prob.ev(c.fwd_flops) + prob.ev(c.bwd_flops) > 0
            for c in (n.meta.get(COST, NodeCost()) for n in prob.priced.order)]


def non_tensor_cuts(prob: Problem) -> list[bool]:
    """Per cut: does a non-tensor value (a Python int such as a sym size) cross it?"""
    order = prob.priced.order
    n = len(order)
    crossing = Liveness(prob.gm, order).count(lambda v: wire_kind(v.meta.get(DESC)) not in ("tensor", None))
    return [0 < k < n and c > 0 for k, c in enumerate(crossing)]


def fmt_time(units: float) -> str:
    s = units * TIME_UNIT
    return f"{s * 1e3:.4g} ms" if s >= 1e-3 else f"{s * 1e6:.4g} us"


def step_model(prob: Problem, sched: Schedule | None = None) -> StepModel:
    """The pipeline's step as the objective simulates it: forward times, and each cut's
    link price forward (values) and backward (gradients)."""
    tp, pr, sp = prob.opts.tensor_parallel, prob.priced, prob.opts.sequence_parallel
    send = prob.cached(("send", prob.lnk, tp, sp, pr.cut_bytes),
                       lambda: cut_link_units(prob.lnk, pr.cut_bytes, tp=tp, sequence_parallel=sp))
    bsend = prob.cached(("send", prob.lnk, tp, sp, pr.cut_grad_bytes),
                        lambda: cut_link_units(prob.lnk, pr.cut_grad_bytes, tp=tp, sequence_parallel=sp))
    fwd = prob.cached(("fwd units", pr.fwd_s), lambda: to_units(pr.fwd_s))
    return StepModel(fwd, send, bsend, sched or prob.sched)


def step_objective(prob: Problem, sin: SolverInput, sol: Solution, fits: list[StageFit],
                   budget: int, why: str) -> Fitted:
    """``objective="step"``: the candidate with the fastest simulated step that fits exactly."""
    model = step_model(prob)
    cands, rep = step_search(sin, prob.opts.n_stages, model, sol, max_evals=budget)
    for cand in cands:
        ex = fits if cand.cuts == sol.cuts else prob.exact(cand.cuts)
        if prob.fits(ex):
            chosen = rescore(prob, cand, ex, optimal=cand.optimal)
            gain = 1 - rep.step / rep.bottleneck_step if rep.bottleneck_step else 0.0
            prob.notes.append(f"objective step{why}: predicted step {fmt_time(rep.step)} vs "
                              f"{fmt_time(rep.bottleneck_step)} for the min-bottleneck cuts "
                              f"({gain:.1%} faster; {rep.evaluations} simulations"
                              f"{'' if rep.local_optimum else ', search budget reached'})")
            return chosen, ex
    return sol, fits


def note_fewer_stages(prob: Problem, sin: SolverInput, sol: Solution) -> None:
    """A plan note when fewer pipeline ranks are predicted faster on the same costs."""
    if prob.opts.custom is not None or prob.opts.n_gpus < 2:
        return
    ranks = prob.sched.n_ranks
    v = prob.opts.n_stages // ranks
    model = step_model(prob)
    here = step_of(sin, model, sol)
    rows = fewer_stages(sin, model, here, n_gpus=ranks, stages_per_rank=v)
    faster = [(g, t) for g, t in rows if t is not None and t < here]
    if not faster:
        return

    def gpus(g: int) -> str:
        return f"{g} GPU{'s' if g > 1 else ''}"

    table = ", ".join(f"{gpus(g)} {fmt_time(t)}" if t is not None else f"{gpus(g)} does not fit" for g, t in rows)
    best = min(faster, key=lambda r: (r[1], r[0]))
    prob.notes.append(f"fewer stages would be predicted faster: {gpus(best[0])} per pipeline {fmt_time(best[1])} "
                      f"vs {fmt_time(here)} with {ranks} (predicted step per pipeline GPU count, "
                      f"{prob.sched.name} m={prob.sched.n_microbatches}: {table}; {ranks} GPUs {fmt_time(here)})")


def search_cuts(prob: Problem, sin: SolverInput, *, explain_limit: int | None = None) -> Fitted:
    """Min-bottleneck cuts under exact memory (the loop described in ``search``)."""
    if len(prob.modes) > 1 and prob.modes[0] == "none":
        # Recompute only adds compute: if the best split without it, memory ignored, fits
        # exactly, no split with recompute can beat it (and none is needed). The common case,
        # and one option instead of three for the search.
        base = sin.choices()[0]
        free = replace(sin, options=[], compute=base.compute, act_mem=base.act_mem,
                       capacity=[_UNBOUNDED] * len(sin.capacity))
        sol = free_split(prob, free)
        fits = prob.exact(sol.cuts, ["none"] * prob.opts.n_stages)
        if prob.fits(fits):
            return rescore(prob, sol, fits, optimal=sol.optimal), fits
    caps = list(sin.capacity)
    last: Fitted | None = None
    for _ in range(_RETRIES):
        try:
            first = solve(replace(sin, capacity=caps), prob.opts.n_stages)
        except InfeasibleError as e:
            raise explain(prob, e, last, explain_limit) from None
        sol = refine(replace(sin, capacity=caps), prob.opts.n_stages, first)
        fits = prob.exact(sol.cuts)
        over = prob.over(fits)
        last = (sol, fits)
        if max(over) <= 0:
            return rescore(prob, sol, fits, optimal=sol.optimal), fits
        caps = [c - max(o, 0) for c, o in zip(caps, over)]
    raise explain(prob, InfeasibleError("the exact memory check kept finding stages over capacity"), last,
                  explain_limit)


def free_split(prob: Problem, free: SolverInput) -> Solution:
    """``refine(free, S, solve(free, S))`` for a problem whose memory does not bind (every
    capacity unbounded). Its cuts then depend only on the times, cut costs and bytes, the
    allowed, pinned and avoided cuts, the computing positions and ``S``, never on the
    memory or the schedule (the solver skips a memory test that cannot fail); candidates
    that share those (ZeRO levels, schedules with the same stages, micro-batch counts with
    the same micro-batch size) share one solve, and each gets the Solution its own input
    gives those cuts (``refine.score``, as ``refine`` itself returns it)."""
    S = prob.opts.n_stages
    key = ("free split", S, *(tuple(x) for x in (free.compute, free.cut_cost, free.cut_bytes, free.allowed,
                                                  free.pinned, free.avoid, free.has_compute)))
    if key not in prob.memo:
        sol = refine(free, S, solve(free, S))
        prob.memo[key] = (sol.cuts, sol.lower_bound, sol.optimal)
        return sol
    cuts, lower_bound, optimal = prob.memo[key]
    return score(free, cuts, lower_bound=lower_bound, optimal=optimal)


def rescore(prob: Problem, sol: Solution, fits: Sequence[StageFit], *, optimal: bool) -> Solution:
    """``sol`` with the stage times and memory of the recompute modes really chosen."""
    bounds = [0, *sol.cuts, len(prob.priced.order)]
    index = {m: j for j, m in enumerate(prob.modes)}
    opts = prob.sin.choices()
    times, chosen = [], []
    for (a, b), x in zip(zip(bounds, bounds[1:]), fits):
        j = index.get(x.mode, 0)
        chosen.append(j)
        times.append(sum(opts[j].compute[a:b]) + prob.comm[a] + prob.comm[b])
    same = tuple(chosen) == tuple(sol.stage_option or (0,) * len(chosen))
    return Solution(sol.cuts, max(times), tuple(times), tuple(prob.need(i, x) for i, x in enumerate(fits)),
                    sol.total_cut_bytes, min(sol.lower_bound, max(times)), optimal and same, tuple(chosen))


def explain(prob: Problem, err: InfeasibleError, last: Fitted | None, limit: int | None = None) -> InfeasibleError:
    """The solver's refusal, with what would fit: more GPUs, recompute, fewer micro-batches
    in flight, a smaller micro-batch (each tried on the same costs).

    ``limit``: the caller reads only the first ``limit`` characters of the message with its
    whitespace collapsed (``layout.joint``'s ranking); when what comes before the hints is
    that long already, the hints (a solve each) are not tried and the message says so."""
    hints = []
    S = prob.opts.n_stages
    base = replace(prob.sin, pinned=prob.pins)
    text = str(err)
    closest = getattr(err, "closest", None)
    worst_fits = last[1] if last is not None else None
    if worst_fits is None and closest is not None:  # the solver's split closest to fitting, checked exactly
        cuts, choice = closest
        worst_fits = prob.exact(cuts, [prob.modes[j] for j in choice])
    if worst_fits is not None:
        exact = worst_fits
        worst = max(range(len(exact)), key=lambda i: prob.need(i, exact[i]) - prob.capacity)
        mode, static, kept, extra, _ = exact[worst]
        text = (f"stage {worst} needs {_fmt_bytes(prob.need(worst, exact[worst]))} (static {_fmt_bytes(static)} = "
                f"weights, gradients and optimizer state at {bytes_per_param(prob.opts.precision, prob.opts.optimizer)} "
                f"B/param ({prob.opts.precision}, {prob.opts.optimizer}) + {prob.sin.inflight[worst]} micro-batches x "
                f"{_fmt_bytes(kept)} activations" + (f" + {_fmt_bytes(extra)} working set (temporaries, gradients, recompute)" if extra else "")
                + f", recompute {mode!r}) but the device holds {_fmt_bytes(prob.capacity)}")
        loads = [ld for ld in prob.rank_loads() if prob.rank_need(ld, exact) > prob.capacity]
        if loads and prob.need(worst, exact[worst]) <= prob.capacity:  # each stage fits alone, a rank does not
            ld = max(loads, key=lambda x: prob.rank_need(x, exact))
            text = (f"rank {prob.sched.rank_of(ld.stages[0])} holds stages "
                    f"{', '.join(map(str, ld.stages))}, which fit one by one but need "
                    f"{_fmt_bytes(prob.rank_need(ld, exact))} together (static "
                    f"{_fmt_bytes(sum(exact[st].static for st in ld.stages))}, the activations in flight on them "
                    f"at once, the largest working set; recompute "
                    f"{', '.join(repr(exact[st].mode) for st in ld.stages)}) but the device holds "
                    f"{_fmt_bytes(prob.capacity)}")
    advice = "use more GPUs, a device with more memory, fewer micro-batches in flight, recompute or a smaller micro-batch"
    if limit is not None and len(" ".join(f"{text}; {advice}".split())) >= limit:
        return InfeasibleError(f"{text}; {advice} (what would fit was not tried)")

    def fits(sin: SolverInput, stages: int) -> bool:
        return feasible(sin, stages)  # whether solve() finds a split, without searching for the best one

    if prob.opts.recompute in ("none", "selective") and prob.acts is not None:
        act, redo, reserve = prob.acts.arrays("full", prob.ev)
        full = Option([c + (f if r else 0) for c, f, r in zip(prob.sin.compute, to_units(prob.priced.fwd_s), redo)],
                      act, reserve)
        if fits(replace(base, options=[full]), S):
            hints.append("recompute='full' (or 'auto') fits")
    if max(prob.sin.inflight) > 1 and fits(replace(base, inflight=[1] * S), S):
        hints.append(f"with one micro-batch in flight per stage it fits (today up to {max(prob.sin.inflight)}: "
                     "fewer micro-batches, or schedule='gpipe' with n_microbatches=1)")
    if not prob.pins:
        for more in sorted({S + 1, S + 2, 2 * S, 4 * S, 8 * S}):
            if more > len(prob.priced.order):
                break
            name = prob.opts.schedule if prob.opts.schedule in ("gpipe", "1f1b", "zb-h1") else "1f1b"
            m = prob.opts.n_microbatches
            inflight = list(prob.cached(("schedule", name, more, m, more),
                                        lambda: unit_schedule(name, more, m, more))[1])  # shared with build_problem
            if fits(replace(base, inflight=inflight, capacity=[prob.capacity] * more), more):
                hints.append(f"{more} GPUs fit this configuration")
                break
    tried = (f" (tried on these costs: {'; '.join(hints)})" if hints else
             " (tried on these costs, none fits: up to 8x the GPUs, recompute='full', one micro-batch in flight)")
    return InfeasibleError(f"{text}; {advice}{tried}")
