"""Layout choice: schedule and micro-batch count (when "auto"), data-parallel degree, placement on nodes, replica pricing.

``choose`` solves the pipeline (``search``) for each candidate the request leaves open
(every registry schedule and batch divisor for ``schedule="auto"`` / ``n_microbatches="auto"``;
every divisor of ``n_gpus`` for ``data_parallel="auto"``), prices each candidate's step with
the replicas' gradient all-reduce on the links the mesh uses (``replicated``), and keeps the
predicted-fastest that fits. The rankings go into the plan's notes (``AUTO_NOTE``, ``DP_NOTE``).
"""

from __future__ import annotations

from dataclasses import replace
from math import gcd
from typing import Any, NamedTuple, Sequence

from partitioner.cost_models.errors import PartitionError
from partitioner.data_parallel import boundary_links, divisors, placements, price_replicas, reduction_windows
from partitioner.passes import tensor_parallel
from partitioner.plan import Mesh
from partitioner.pricing import TIME_UNIT
from partitioner.problem import Context, Options, Problem, StageFit, batch_size, build_problem
from partitioner.schedule import SCHEDULES, ScheduleError, check_counts
from partitioner.search import search
from partitioner.simulator import SimResult, predict_step
from partitioner.solver import InfeasibleError, Solution, _fmt_bytes

__all__ = ["AUTO_NOTE", "DP_NOTE", "TP_NOTE", "Solved", "choose", "replicated"]

#: Plan notes that record the automatic choice start with this (``partitioner plan --explain``).
AUTO_NOTE = "auto:"
#: Plan notes that record the data-parallel degree and placement chosen start with this.
DP_NOTE = "dp:"
#: Plan notes that record the tensor-parallel degree chosen (``tensor_parallel="auto"``) start with this.
TP_NOTE = "tp:"


class Solved(NamedTuple):
    """One pipeline solved: its problem, the chosen cuts, each stage's exact memory, and
    where its ranks sit."""

    prob: Problem
    solution: Solution
    fits: list[StageFit]
    layout: Mesh


class Replicated(NamedTuple):
    """A solved pipeline's step under one mesh layout."""

    step: float  # seconds: the pipeline's simulated step with the exposed all-reduce
    mesh: Mesh  # the plan's mesh, with its prices
    sim: SimResult  # the pipeline's simulation


def ranked(rows: Sequence[tuple[str, float, str]], refused: Sequence[str] = ()) -> list[dict[str, Any]]:
    """A ranking as ``Plan.rankings`` holds it: (label, step, text) fastest first, the first
    picked, then the candidates refused ("label: why")."""
    out: list[dict[str, Any]] = [{"label": label, "step_s": step, "picked": i == 0, "refused": None, "text": text}
                                 for i, (label, step, text) in enumerate(rows)]
    for r in refused:
        label, _, why = r.partition(": ")
        out.append({"label": label, "step_s": None, "picked": False, "refused": why, "text": r})
    return out


def tensor_parallel_degrees(ctx: Context) -> list[int]:
    """The tensor-parallel degrees to solve: the one asked for, or with ``"auto"`` 1 and every
    degree that divides the GPUs (of a node, where ``gpus_per_node`` is given: tensor
    parallelism stays inside a node), leaves whole replicas, and shards at least one region
    of the graph (``passes.tensor_parallel``)."""
    asked = ctx.request.tensor_parallel
    if asked != "auto":
        return [int(asked)]
    opts = ctx.request.opts
    fixed_dp = ctx.request.data_parallel if ctx.request.data_parallel != "auto" else 1
    group = gcd(opts.n_gpus, opts.gpus_per_node) if opts.gpus_per_node else opts.n_gpus
    out = [1]
    for t in divisors(group):
        if t > 1 and opts.n_gpus % (t * int(fixed_dp)) == 0 and tensor_parallel.shard(
                ctx.annotation().gm, t).regions:
            out.append(t)
    return out


def choose(ctx: Context) -> Solved:
    """Solve: cuts and recompute chosen by the search; the layout on nodes (and with
    ``data_parallel="auto"`` the replica count, with ``tensor_parallel="auto"`` the
    tensor-parallel degree) chosen by the predicted step."""
    degrees = tensor_parallel_degrees(ctx)
    base = ctx.request.opts
    v = base.n_stages // base.pp
    if len(degrees) == 1:
        t = degrees[0]
        return _choose_replicas(ctx, replace(base, tensor_parallel=t, n_stages=base.n_gpus // (base.data_parallel * t) * v))
    rows: list[tuple[float, int, Solved]] = []
    refused: list[str] = []
    for t in degrees:
        opts = replace(base, tensor_parallel=t, n_stages=base.n_gpus // (base.data_parallel * t) * v)
        try:
            solved = _choose_replicas(ctx, opts)
        except PartitionError as e:
            refused.append(f"T={t}: {' '.join(str(e).split())[:160]}")
            continue
        rows.append((replicated(solved.prob, solved.solution, solved.layout).step, t, solved))
    if not rows:
        raise InfeasibleError(f"no tensor-parallel degree fits {base.n_gpus} GPUs: " + "; ".join(refused[:6]))
    rows.sort(key=lambda r: r[:2])
    step, _, best = rows[0]
    why = (f"the fastest predicted step of {len(rows)} degrees that fit; #2 is {rows[1][0] / step - 1:.1%} slower"
           if len(rows) > 1 else "the only degree that fits")
    labels = [(f"T={t} D={sv.layout.dp} P={sv.layout.pp} m={sv.prob.opts.n_microbatches} {sv.prob.opts.schedule}", st)
              for st, t, sv in rows]
    best.prob.rankings["tp"] = ranked([(lb, st, f"{lb}: predicted step {st * 1e3:.4g} ms") for lb, st in labels],
                                      refused)
    best.prob.notes = list(best.prob.notes) + [
        f"{TP_NOTE} picked T={rows[0][1]}: {why}"] + [
        f"{TP_NOTE} #{i + 1} T={t} D={s.layout.dp} P={s.layout.pp} m={s.prob.opts.n_microbatches} "
        f"{s.prob.opts.schedule}: predicted step {st * 1e3:.4g} ms" for i, (st, t, s) in enumerate(rows)] + [
        f"{TP_NOTE} -- {r}" for r in refused]
    return best


def _choose_replicas(ctx: Context, opts: Options) -> Solved:
    """``choose`` at one tensor-parallel degree (``opts.tensor_parallel``)."""
    tp = opts.tensor_parallel
    if ctx.request.data_parallel != "auto":
        if opts.n_gpus % (opts.data_parallel * tp):
            raise PartitionError(f"n_gpus={opts.n_gpus} does not split into data_parallel={opts.data_parallel} "
                                 f"x tensor_parallel={tp}")
        prob, sol, fits, _ = solve_pipeline(ctx, opts)
        placed = sorted(((replicated(prob, sol, lay).step, i, lay) for i, lay in
                         enumerate(placements(opts.data_parallel, opts.pp, opts.gpus_per_node, tp))),
                        key=lambda r: r[:2])
        if len(placed) > 1:
            prob.rankings["placement"] = ranked([(f"mesh ({', '.join(lay.dims)})", t, f"placement {lay.describe()}: "
                                                  f"predicted step {t * 1e3:.4g} ms") for t, _, lay in placed])
            prob.notes = list(prob.notes) + [f"{DP_NOTE} placement {lay.describe()}: predicted step {t * 1e3:.4g} ms"
                                             for t, _, lay in placed]
        return Solved(prob, sol, fits, placed[0][2])
    v = opts.n_stages // opts.pp
    batch = batch_size(ctx.specs) if ctx.specs else None
    rows: list[tuple[float, int, int, int, Solved, Replicated]] = []
    refused: list[str] = []
    for d in divisors(opts.n_gpus // tp):
        label = f"D={d} P={opts.n_gpus // (d * tp)}" + (f" T={tp}" if tp > 1 else "")
        if batch is not None and batch % d:
            refused.append(f"{label}: the batch of {batch} does not split into {d} replicas")
            continue
        o = replace(opts, data_parallel=d, n_stages=(opts.n_gpus // (d * tp)) * v)
        try:
            prob, sol, fits, _ = solve_pipeline(ctx, o)
        except PartitionError as e:  # infeasible, too few cuts, a schedule that does not fit the counts
            refused.append(f"{label}: {' '.join(str(e).split())[:160]}")
            continue
        peak = max(prob.need(i, x) for i, x in enumerate(fits))
        for lay in placements(d, o.pp, o.gpus_per_node, tp):
            rep = replicated(prob, sol, lay)
            rows.append((rep.step, peak, -d, len(rows), Solved(prob, sol, fits, lay), rep))
    if not rows:
        raise InfeasibleError(f"no data-parallel degree fits {opts.n_gpus} GPUs: " + "; ".join(refused[:6]))
    rows.sort(key=lambda r: r[:4])
    step, _, _, _, best, _ = rows[0]

    def line(r: tuple[float, int, int, int, Solved, Replicated]) -> str:
        t, _, _, _, (pr, _, _, ly), rep = r
        return (f"D={ly.dp} P={ly.pp} m={pr.opts.n_microbatches} {pr.opts.schedule}"
                + (f" ({ly.describe()})" if ly.n_nodes > 1 else "")
                + f": predicted step {t * 1e3:.4g} ms (all-reduce exposed {rep.mesh.exposed_s * 1e3:.3g} ms, "
                f"bubble {rep.sim.bubble_fraction:.1%}), peak memory {_fmt_bytes(r[1])}")
    why = (f"the fastest predicted step of {len(rows)} that fit; #2 is {rows[1][0] / step - 1:.1%} slower"
           if len(rows) > 1 else "the only candidate that fits")
    best.prob.rankings["dp"] = ranked([(line(r).split(": predicted step")[0], r[0], line(r)) for r in rows], refused)
    best.prob.notes = list(best.prob.notes) + [f"{DP_NOTE} picked {line(rows[0])}: {why}"] + [
        f"{DP_NOTE} #{i + 1} {line(r)}" for i, r in enumerate(rows)] + [f"{DP_NOTE} -- {r}" for r in refused]
    return best


def solve_pipeline(ctx: Context, opts: Options) -> Solved:
    """One pipeline (``opts.pp`` ranks on each replica's share of the batch), solved; the
    layout is the problem's own (placement is chosen by ``choose``)."""
    n_microbatches = ctx.request.n_microbatches
    if opts.schedule == "auto" or n_microbatches == "auto":
        return auto(ctx, opts)
    assert not isinstance(n_microbatches, str)
    prob = build_problem(ctx, opts, n_microbatches)
    solution, fits = search(prob)
    return Solved(prob, solution, fits, prob.layout)


def auto(ctx: Context, opts: Options) -> Solved:
    """``schedule="auto"`` / ``n_microbatches="auto"``: solve every candidate (each registry
    schedule, at its default stages per rank unless ``virtual_stages`` > 1 was given; each
    divisor of the batch) and keep the predicted-fastest that fits memory. The ranking goes
    into the plan's notes, one line per candidate, best first."""
    n_microbatches = ctx.request.n_microbatches
    whole = batch_size(ctx.specs) if ctx.specs else None
    batch = whole // opts.data_parallel if whole is not None else None
    v_given = opts.n_stages // opts.pp
    names = [opts.schedule] if opts.schedule != "auto" else [
        n for n, sp in SCHEDULES.items() if not sp.whole_batch
        and (sp.stages_per_rank is None or (v_given if v_given > 1 else sp.default_stages_per_rank) in sp.stages_per_rank)]
    ms: list[int | None]
    if n_microbatches == "auto":
        ms = [d for d in range(1, (batch or 1) + 1) if (batch or 1) % d == 0]
    else:
        assert not isinstance(n_microbatches, str)  # partition() accepts no other string
        ms = [n_microbatches]
    ranked_: list[tuple[float, str, Solved]] = []
    refused: list[str] = []
    for name in names:
        spec = SCHEDULES[name]
        v = v_given if v_given > 1 or spec.stages_per_rank is None else spec.default_stages_per_rank
        v = v if spec.stages_per_rank is None or v in spec.stages_per_rank else spec.stages_per_rank[0]
        for m in ms:
            label = f"{name} m={m if m is not None else 'default'}"
            o = replace(opts, schedule=name, n_stages=opts.pp * v)
            try:
                check_counts(name, o.pp, m if isinstance(m, int) else 1, o.n_stages)
                prob = build_problem(ctx, o, m)
                sol, fits = search(prob)
            except (ScheduleError, InfeasibleError) as e:
                refused.append(f"{label}: {'does not fit' if isinstance(e, InfeasibleError) else 'not allowed'} "
                               f"({' '.join(str(e).split())[:160]})")
                continue
            ranked_.append((predicted_step(prob, sol), label, Solved(prob, sol, fits, prob.layout)))
    if not ranked_:
        raise InfeasibleError("no candidate schedule / micro-batch count fits: " + "; ".join(refused[:6]))
    ranked_.sort(key=lambda r: (r[0], r[1]))
    best_t, best_label, best = ranked_[0]
    best.prob.rankings["auto"] = ranked([(label, t, f"{label}: predicted step {t * 1e3:.4g} ms")
                                         for t, label, _ in ranked_], refused)
    best.prob.notes = list(best.prob.notes) + [
        f"{AUTO_NOTE} picked {best_label} of {len(ranked_)} fitting candidates (predicted step {best_t * 1e3:.4g} ms)"
    ] + [f"{AUTO_NOTE} #{i + 1} {label}: predicted step {t * 1e3:.4g} ms" for i, (t, label, _) in enumerate(ranked_)] \
      + [f"{AUTO_NOTE} -- {r}" for r in refused]
    return best


def predicted_step(prob: Problem, sol: Solution) -> float:
    """The step time the plan will record: the pipeline's simulated step (plan_builder's
    stage times, the same simulation), with what the replicas' gradient all-reduce adds to it."""
    return replicated(prob, sol).step


def replicated(prob: Problem, sol: Solution, layout: Mesh | None = None) -> Replicated:
    """The step, the plan's ``mesh`` with its prices, and the pipeline's simulation under
    ``layout`` (default: the problem's): each cut priced on the link it crosses, each pipeline
    rank's bucketed all-reduce overlapped with its stages' final backwards
    (``partitioner.data_parallel``)."""
    layout = layout or prob.layout
    bounds = [0, *sol.cuts, len(prob.priced.order)]
    fwd, bwd = [], []
    for s, (a, b) in enumerate(zip(bounds, bounds[1:])):
        f, bw = sum(prob.priced.fwd_s[a:b]), sum(prob.priced.bwd_s[a:b])
        redo = (sol.stage_times[s] - prob.comm[a] - prob.comm[b]) * TIME_UNIT - f - bw
        fwd.append(f)
        bwd.append(bw + max(redo, 0.0))
    inter = prob.opts.inter_link or prob.lnk
    stage_rank = [prob.sched.rank_of(s) for s in range(prob.opts.n_stages)]
    links = boundary_links(layout, stage_rank, prob.lnk, inter)
    sim = predict_step(prob.sched, fwd, bwd, [lk.transfer_time for lk in links],
                       [prob.priced.cut_bytes[k] for k in bounds[1:-1]], [prob.priced.cut_grad_bytes[k] for k in bounds[1:-1]])
    inter_dict = prob.opts.inter_link.to_dict() if prob.opts.inter_link is not None else None
    if layout.dp == 1:
        return Replicated(sim.step_time, replace(layout, zero=prob.opts.zero, inter_link=inter_dict), sim)
    held: list[set[int]] = [set() for _ in range(layout.pp)]  # each tensor once per rank
    params: list[list[tuple[int, int]]] = []  # per stage: trainable tensors in first-use order, gradient bytes
    for s, (a, b) in enumerate(zip(bounds, bounds[1:])):
        ids = list(dict.fromkeys(i for p in range(a, b) for i in prob.shard.uses[p] if i in prob.shard.numel))
        params.append([(i, prob.shard.numel[i] * prob.shard.grad_width) for i in ids])
        held[stage_rank[s]].update(ids)
    weights = [sum(prob.shard.numel[i] for i in ids) * prob.shard.grad_width for ids in held]  # ZeRO-1's gather
    windows = reduction_windows(sim.events, stage_rank, params, layout.pp)  # overlapped with each final backward
    times, step = price_replicas(layout, prob.opts.zero, prob.lnk, inter, windows, weights, sim.step_time)
    return Replicated(step, replace(layout, zero=prob.opts.zero, inter_link=inter_dict, allreduce_s=tuple(times),
                                    exposed_s=step - sim.step_time), sim)
