"""Layout choice: schedule and micro-batch count (when "auto"), data-parallel degree, placement on nodes, replica pricing.

``choose`` solves the pipeline (``search``) for each candidate the request leaves open
(every registry schedule and batch divisor for ``schedule="auto"`` / ``n_microbatches="auto"``;
every divisor of ``n_gpus`` for ``data_parallel="auto"``), prices each candidate's step with
the replicas' gradient all-reduce on the links the mesh uses (``replicated``), and keeps the
predicted-fastest that fits. The rankings go into the plan's notes (``AUTO_NOTE``, ``DP_NOTE``).
With ``zero="auto"`` ``joint`` chooses every open choice together instead, ZeRO level included,
pruned by a memory floor and a step bound (``rankings["layout"]``).
"""

from __future__ import annotations

import heapq
from dataclasses import replace
from math import gcd
from typing import Any, NamedTuple, Sequence

from partitioner.cost_models.cost import NodeCost
from partitioner.cost_models.errors import PartitionError
from partitioner.data_parallel import (
    boundary_links,
    divisors,
    hsdp_shards,
    placements,
    price_replicas,
    reduction_windows,
    splits_backward,
)
from partitioner.memory import PRECISIONS, bytes_per_param
from partitioner.objective import pipeline_floor
from partitioner.passes import tensor_parallel
from partitioner.passes.meta import COST, TP
from partitioner.passes.split import compute_nodes
from partitioner.plan import Mesh
from partitioner.pricing import TIME_UNIT, with_shape
from partitioner.problem import (
    Context,
    Options,
    Problem,
    StageFit,
    batch_size,
    build_problem,
    node_timer,
    unit_schedule,
)
from partitioner.schedule import SCHEDULES, ScheduleError, check_counts, default_microbatches
from partitioner.search import finish_notes, search
from partitioner.simulator import SimResult, predict_step, simulate
from partitioner.solver import InfeasibleError, Solution, _fmt_bytes, remembered
from partitioner.tensor_parallel import boundary_time

__all__ = ["AUTO_NOTE", "DP_NOTE", "FSDP_NOTE", "LAYOUT_NOTE", "TP_NOTE", "Solved", "choose", "joint", "replicated", "solve_fsdp",
           "zero_levels"]

#: Plan notes that record the automatic choice start with this (``partitioner plan --explain``).
AUTO_NOTE = "auto:"
#: Plan notes that record the data-parallel degree and placement chosen start with this.
DP_NOTE = "dp:"
#: Plan notes that record the tensor-parallel degree chosen (``tensor_parallel="auto"``) start with this.
TP_NOTE = "tp:"
#: The plan note that records the joint choice (``zero="auto"``: ``joint``) starts with this.
LAYOUT_NOTE = "layout:"
#: Plan notes that record the FSDP mode chosen (``fsdp_reshard="auto"``: ``solve_fsdp``) start with this.
FSDP_NOTE = "fsdp:"


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
        # the rank view keeps its shard (gm.meta[TP]): one find_regions per degree, not two
        if t > 1 and opts.n_gpus % (t * int(fixed_dp)) == 0 and ctx.rank_view(t).meta[TP].regions:
            out.append(t)
    return out


def choose(ctx: Context) -> Solved:
    """Solve: cuts and recompute chosen by the search; the layout on nodes (and with
    ``data_parallel="auto"`` the replica count, with ``tensor_parallel="auto"`` the
    tensor-parallel degree) chosen by the predicted step."""
    if ctx.request.zero == "auto":
        with remembered():  # candidates share the answers of equal solver inputs (solver.Memo)
            return joint(ctx)
    degrees = tensor_parallel_degrees(ctx)
    base = ctx.request.opts
    v = base.n_stages // base.pp
    if len(degrees) == 1:
        t = degrees[0]
        return _choose_replicas(ctx, replace(base, tensor_parallel=t,
                                             n_stages=base.n_gpus // (base.data_parallel * t) * v))[0]
    rows: list[tuple[float, int, Solved]] = []
    refused: list[str] = []
    for t in degrees:
        opts = replace(base, tensor_parallel=t, n_stages=base.n_gpus // (base.data_parallel * t) * v)
        try:
            solved, step = _choose_replicas(ctx, opts)  # its step as ranked there, not simulated again
        except PartitionError as e:
            refused.append(f"T={t}: {' '.join(str(e).split())[:160]}")
            continue
        rows.append((step, t, solved))
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


def _choose_replicas(ctx: Context, opts: Options) -> tuple[Solved, float]:
    """``choose`` at one tensor-parallel degree (``opts.tensor_parallel``): the pick and its
    predicted step."""
    tp = opts.tensor_parallel
    if ctx.request.data_parallel != "auto":
        if opts.n_gpus % (opts.data_parallel * tp):
            raise PartitionError(f"n_gpus={opts.n_gpus} does not split into data_parallel={opts.data_parallel} "
                                 f"x tensor_parallel={tp}")
        if opts.zero == 1 and tp > 1 and opts.data_parallel > 1:
            raise PartitionError(f"zero=1 with data_parallel={opts.data_parallel} is {ZERO1_TP}")
        solved = []
        for o in _hsdp_options(ctx, opts, opts.data_parallel):
            try:
                solved.append(solve_pipeline(ctx, o))
            except PartitionError:
                if o is opts:  # the layout asked for (plain FSDP, or an explicit fsdp_shard): its error stands
                    raise
                continue  # an HSDP candidate the search added that does not fit: the asked-for one was solved
        placed = sorted(((replicated(sv.prob, sv.solution, lay).step, i, j, lay, sv) for j, sv in enumerate(solved)
                         for i, lay in enumerate(placements(opts.data_parallel, opts.pp, opts.gpus_per_node, tp))),
                        key=lambda r: r[:3])
        best = placed[0][4]
        if len(placed) > 1:
            prob = best.prob
            listed = [(t, lay, _hsdp_suffix(lay.dp, sv.prob.shard.shard)) for t, _, _, lay, sv in placed]
            prob.rankings["placement"] = ranked([(f"mesh ({', '.join(lay.dims)}){hs}", t,
                                                  f"placement {lay.describe()}{hs}: predicted step {t * 1e3:.4g} ms")
                                                 for t, lay, hs in listed])
            prob.notes = list(prob.notes) + [
                f"{DP_NOTE} placement {lay.describe()}{hs}: predicted step {t * 1e3:.4g} ms" for t, lay, hs in listed]
        return Solved(best.prob, best.solution, best.fits, placed[0][3]), placed[0][0]
    v = opts.n_stages // opts.pp
    batch = batch_size(ctx.specs) if ctx.specs else None
    rows: list[tuple[float, int, int, int, Solved, Replicated]] = []
    refused: list[str] = []
    for d in divisors(opts.n_gpus // tp):
        label = f"D={d} P={opts.n_gpus // (d * tp)}" + (f" T={tp}" if tp > 1 else "")
        if opts.zero == 1 and tp > 1 and d > 1:
            refused.append(f"{label}: zero=1 {ZERO1_TP}")
            continue
        if batch is not None and batch % d:
            refused.append(f"{label}: the batch of {batch} does not split into {d} replicas")
            continue
        for o in _hsdp_options(ctx, replace(opts, data_parallel=d, n_stages=(opts.n_gpus // (d * tp)) * v), d):
            lab = label + _hsdp_suffix(d, o.fsdp_shard)
            try:
                prob, sol, fits, _ = solve_pipeline(ctx, o)
            except PartitionError as e:  # infeasible, too few cuts, a schedule that does not fit the counts
                refused.append(f"{lab}: {' '.join(str(e).split())[:160]}")
                continue
            peak = prob.peak(fits)
            for lay in placements(d, o.pp, o.gpus_per_node, tp):
                rep = replicated(prob, sol, lay)
                rows.append((rep.step, peak, -d, len(rows), Solved(prob, sol, fits, lay), rep))
    if not rows:
        raise InfeasibleError(f"no data-parallel degree fits {opts.n_gpus} GPUs: " + "; ".join(refused[:6]))
    rows.sort(key=lambda r: r[:4])
    step, _, _, _, best, _ = rows[0]

    def line(r: tuple[float, int, int, int, Solved, Replicated]) -> str:
        t, _, _, _, (pr, _, _, ly), rep = r
        return (f"D={ly.dp} P={ly.pp}" + _hsdp_suffix(ly.dp, pr.shard.shard)
                + f" m={pr.opts.n_microbatches} {pr.opts.schedule}"
                + (f" ({ly.describe()})" if ly.n_nodes > 1 else "")
                + f": predicted step {t * 1e3:.4g} ms (all-reduce exposed {rep.mesh.exposed_s * 1e3:.3g} ms, "
                f"bubble {rep.sim.bubble_fraction:.1%}), peak memory {_fmt_bytes(r[1])}")
    why = (f"the fastest predicted step of {len(rows)} that fit; #2 is {rows[1][0] / step - 1:.1%} slower"
           if len(rows) > 1 else "the only candidate that fits")
    best.prob.rankings["dp"] = ranked([(line(r).split(": predicted step")[0], r[0], line(r)) for r in rows], refused)
    best.prob.notes = list(best.prob.notes) + [f"{DP_NOTE} picked {line(rows[0])}: {why}"] + [
        f"{DP_NOTE} #{i + 1} {line(r)}" for i, r in enumerate(rows)] + [f"{DP_NOTE} -- {r}" for r in refused]
    return best, step


def _hsdp_suffix(d: int, shard: int | None) -> str:
    """What a ranking adds to a layout's label where it is hybrid-sharded (`` zero=3 HSDP RxS``),
    nothing for plain FSDP or no sharding."""
    return f" {zero_label(3, d, shard)}" if shard else ""


def _hsdp_options(ctx: Context, opts: Options, d: int) -> list[Options]:
    """The sharding layouts ``choose`` solves at ``d`` replicas: ``opts`` itself, and with
    ``zero=3`` asked for explicitly (``zero="auto"`` goes through ``joint``, which lists them
    the same way), no ``fsdp_shard`` given and the replicas or the tensor-parallel degree left
    to the planner, also each hybrid-sharding group size (HSDP) that ``joint`` would try there:
    ``data_parallel.hsdp_shards``, where the replicas span nodes."""
    req = ctx.request
    if (req.zero != 3 or opts.fsdp_shard is not None or d <= 1
            or (req.data_parallel != "auto" and req.tensor_parallel != "auto")):
        return [opts]
    return [opts, *(replace(opts, fsdp_shard=s) for s in hsdp_shards(d, opts.pp, opts.gpus_per_node,
                                                                      opts.tensor_parallel))]


def solve_pipeline(ctx: Context, opts: Options) -> Solved:
    """One pipeline (``opts.pp`` ranks on each replica's share of the batch), solved; the
    layout is the problem's own (placement is chosen by ``choose``)."""
    n_microbatches = ctx.request.n_microbatches
    if opts.schedule == "auto" or n_microbatches == "auto":
        return auto(ctx, opts)
    assert not isinstance(n_microbatches, str)
    prob, solution, fits = solve_fsdp(ctx, opts, n_microbatches)
    return Solved(prob, solution, fits, prob.layout)


def solve_fsdp(ctx: Context, opts: Options, m: int | None, *, defer_notes: bool = False,
               explain_limit: int | None = None) -> tuple[Problem, Solution, list[StageFit]]:
    """``build_problem`` + ``search``; with ``fsdp_reshard="auto"`` where it is a choice
    (``zero=3``, replicas, a whole-backward schedule) both FSDP modes are solved, each priced
    as it runs (``ZeroShard.per_step``: memory; ``price_fsdp``: traffic), and the per-step mode
    is kept only where it fits and is strictly faster (``rankings["fsdp"]``, ``FSDP_NOTE``).
    ``defer_notes``: as ``search``'s (``search.finish_notes`` completes the one kept);
    ``explain_limit``: as ``search``'s."""
    sched = opts.custom or opts.schedule
    if opts.fsdp_reshard != "auto" or opts.zero != 3 or opts.data_parallel <= 1 or splits_backward(sched):
        prob = build_problem(ctx, replace(opts, fsdp_reshard=None) if opts.fsdp_reshard == "auto" else opts, m)
        return (prob, *search(prob, defer_notes=defer_notes, explain_limit=explain_limit))
    rows: list[tuple[float, int, str, tuple[Problem, Solution, list[StageFit]]]] = []
    refused: list[str] = []
    for i, how in enumerate(("unit", "step")):
        try:
            prob = build_problem(ctx, replace(opts, fsdp_reshard=how), m)
            sol, fits = search(prob, defer_notes=defer_notes, explain_limit=explain_limit)
        except InfeasibleError as e:
            refused.append(f"{how}: does not fit ({' '.join(str(e).split())[:160]})")
            continue
        rows.append((predicted_step(prob, sol), i, how, (prob, sol, fits)))
    if not rows:
        raise InfeasibleError("neither FSDP mode fits: " + "; ".join(refused))
    rows.sort(key=lambda r: r[:2])  # a tie keeps "unit" (less memory)
    best = rows[0][3][0]
    best.rankings["fsdp"] = ranked([(how, t, f"{how}: predicted step {t * 1e3:.4g} ms") for t, _, how, _ in rows],
                                   refused)
    best.notes = list(best.notes) + [f"{FSDP_NOTE} picked {rows[0][2]} ({len(rows)} fit)"] + [
        f"{FSDP_NOTE} #{i + 1} {how}: predicted step {t * 1e3:.4g} ms" for i, (t, _, how, _) in enumerate(rows)] + [
        f"{FSDP_NOTE} -- {r}" for r in refused]
    return rows[0][3]


def auto(ctx: Context, opts: Options) -> Solved:
    """``schedule="auto"`` / ``n_microbatches="auto"``: solve every candidate (each registry
    schedule, at its default stages per rank unless ``virtual_stages`` > 1 was given; each
    divisor of the batch) and keep the predicted-fastest that fits memory. The ranking goes
    into the plan's notes, one line per candidate, best first."""
    n_microbatches = ctx.request.n_microbatches
    whole = batch_size(ctx.specs) if ctx.specs else None
    batch = whole // opts.data_parallel if whole is not None else None
    ms: list[int | None]
    if n_microbatches == "auto":
        ms = [d for d in range(1, (batch or 1) + 1) if (batch or 1) % d == 0]
    else:
        assert not isinstance(n_microbatches, str)  # partition() accepts no other string
        ms = [n_microbatches]
    ranked_: list[tuple[float, str, Solved]] = []
    refused: list[str] = []
    for name, v in schedule_candidates(opts, opts.n_stages // opts.pp):
        for m in ms:
            label = f"{name} m={m if m is not None else 'default'}"
            o = replace(opts, schedule=name, n_stages=opts.pp * v)
            try:
                check_counts(name, o.pp, m if isinstance(m, int) else 1, o.n_stages)
                prob, sol, fits = solve_fsdp(ctx, o, m)
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
    layout = replace(layout or prob.layout, shard=prob.shard.shard)  # zero=3 hybrid sharding (HSDP)
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
    sp = prob.opts.sequence_parallel
    sim = predict_step(prob.sched, fwd, bwd, [boundary_time(lk, layout.tp, prob.lnk, sequence_parallel=sp) for lk in links],
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
    fsdp = ""  # mesh.fsdp: set only where it differs from the schedule's default (old plans stay as they were)
    if prob.opts.zero == 3 and prob.shard.per_step and not splits_backward(prob.sched):
        windows = [[replace(w, split=True) for w in ws] for ws in windows]  # priced once per step, as it runs
        fsdp = "step"
    # FSDP reduce-scatters in fp32 under a mixed precision (runtime.fsdp.policy)
    scale = 4 / prob.shard.grad_width if prob.opts.zero == 3 and PRECISIONS[prob.opts.precision][1] else 1.0
    times, step = price_replicas(layout, prob.opts.zero, prob.lnk, inter, windows, weights, sim.step_time,
                                 reduce_scale=scale)
    return Replicated(step, replace(layout, zero=prob.opts.zero, inter_link=inter_dict, allreduce_s=tuple(times),
                                    exposed_s=step - sim.step_time, fsdp=fsdp), sim)


#: Why automatic choices skip ZeRO-1 with tensor parallelism and replicas: the runtime refuses
#: it (ZeroRedundancyOptimizer broadcasts parameters, which DTensor has no rule for).
ZERO1_TP = "not run with tensor parallelism and replicas (ZeroRedundancyOptimizer cannot shard DTensors; zero=0 or 3 can)"


def zero_levels(ctx: Context, dp: int) -> list[int]:
    """The ZeRO levels to solve at ``dp`` replicas: the one asked for, or with ``zero="auto"``
    0, 1 and 3 (with one replica only 0: ZeRO shards over the replicas, there is nothing to
    shard)."""
    if ctx.request.zero != "auto":
        return [ctx.request.opts.zero]
    return [0, 1, 3] if dp > 1 else [0]


def schedule_candidates(opts: Options, v_given: int) -> list[tuple[str, int]]:
    """(schedule, stages per rank) to solve, as ``auto`` chooses them: the one given, or every
    registry schedule that runs micro-batches, at its default stages per rank unless
    ``virtual_stages`` > 1 was given."""
    if opts.custom is not None:
        return [(opts.schedule, v_given)]
    names = [opts.schedule] if opts.schedule != "auto" else [
        n for n, sp in SCHEDULES.items() if not sp.whole_batch
        and (sp.stages_per_rank is None or (v_given if v_given > 1 else sp.default_stages_per_rank) in sp.stages_per_rank)]
    out = []
    for name in names:
        spec = SCHEDULES[name]
        v = v_given if v_given > 1 or spec.stages_per_rank is None else spec.default_stages_per_rank
        out.append((name, v if spec.stages_per_rank is None or v in spec.stages_per_rank else spec.stages_per_rank[0]))
    return out


#: The share of the balanced simulation (``joint``) that counts in a combination's bound. A
#: heuristic, not a floor: with a split backward and few micro-batches uneven cuts can finish
#: sooner than even ones (one micro-batch, two stages, zb-h1: f + b / 2 + b_0 against
#: f + 3 b / 4, up to a fifth sooner when stage 0 is nearly empty). On the GPT fixture's joint
#: search (tests/partitioner/test_zero_auto.py) no solved step is under its bound.
BALANCED_SHARE = 0.9


#: The characters of a refusal's message (whitespace collapsed) that ``joint``'s ranking shows:
#: the search does not try what would fit where that text would be cut off (``search.explain``)
_SHOWN = 160


#: False: ``joint`` solves every candidate (no bound prunes one): the exhaustive search the
#: bounds shorten, which the tests compare the pruned one with
PRUNE = True


class Candidate(NamedTuple):
    """One layout of the joint search, with its bound (``joint``)."""

    bound: float  # seconds: the floor the search prunes by (``joint``)
    t: int
    d: int
    zero: int
    schedule: str
    v: int  # stages per rank
    m: int | None
    refined: bool = True  # the balanced simulation is in the bound (or there is none to add)
    mm: int = 1  # the micro-batch count m stands for (the schedule's default where m is None)
    s: int = 0  # zero=3 hybrid sharding (HSDP): replicas per shard group (mesh.shard); 0: FSDP over all d

    def label(self, pp: int) -> str:
        return (f"T={self.t} D={self.d} P={pp} {zero_label(self.zero, self.d, self.s)} "
                f"m={self.m if self.m is not None else 'default'} {self.schedule}")


def zero_label(zero: int, d: int, s: int = 0) -> str:
    """A ZeRO level as rankings name it: ``zero=3 HSDP 2x4`` for hybrid sharding, replicate x
    shard (``d / s`` groups replicating shards over ``s`` replicas, torchtitan's
    ``dp_replicate`` x ``dp_shard``)."""
    return f"zero={zero}" + (f" HSDP {d // s}x{s}" if s else "")


def static_floor(ctx: Context, t: int, d: int, pp: int, zero: int) -> int:
    """A floor under the static bytes (weights, gradients, optimizer state) the fullest rank
    holds: one ``pp``-th of a tensor-parallel rank's trainable parameters, with ZeRO's
    sharding over ``d`` replicas. Activations, gathered units, frozen and tied copies only add."""
    opts = ctx.request.opts
    gm = ctx.rank_view(t) if t > 1 else ctx.annotation().gm
    divisor = tensor_parallel.param_divisor(gm)
    numel = {id(p): p.numel() // divisor.get(name, 1)
             for name, p in gm.named_parameters(remove_duplicate=False) if p.requires_grad}
    width = PRECISIONS[opts.precision][0]
    per = bytes_per_param(opts.precision, opts.optimizer)
    opt = per - 2 * width
    n = sum(numel.values())
    per_rank = {0: n * per, 1: n * 2 * width + -(-n * opt // d), 3: -(-n * per // d)}[zero]
    return per_rank // pp


def joint(ctx: Context) -> Solved:
    """``zero="auto"``: the tensor-parallel degree, replicas, ZeRO level, schedule and
    micro-batch count chosen together (each open where the request left it open; the cuts
    and recompute by the search), the predicted-fastest that fits memory kept.

    Every combination is listed first and two rules keep the search short:

    - memory: a combination whose ``static_floor`` exceeds the device is refused unsolved
      (a true floor: it never refuses one that fits);
    - bound: from the compute of one micro-batch on one tensor-parallel rank (priced at the
      combination's micro-batch size, the group's all-reduces included; no recompute, no
      transfers, no replica communication), the larger of: each rank's share of the
      step's compute, ``m (f + b) / P``; one micro-batch's forward then backward chain
      through every stage, ``f + b`` (``f + b / 2`` for a split backward: its input
      gradients); with one stage per rank and a whole backward, ``objective.pipeline_floor``
      (``(f + b) / (1 - ((m - 1) / m)^P)``, a floor under any cuts); and ``BALANCED_SHARE``
      of the schedule simulated with every stage given
      an equal share. The first three are true floors under any cuts; the balanced
      simulation is not one for every schedule (uneven cuts can shorten a split backward's
      critical path with few micro-batches), so only that share of it counts, which makes
      this rule a heuristic: it can prune a candidate that would have been a little
      faster, never one that is needed to fit. The
      combinations are solved in order of their bound and a combination whose bound is no
      lower than the fastest step found is not solved (listed as pruned in the ranking,
      with its bound). The balanced simulation is run only for a combination that reaches
      the front of the queue on the first two terms (it is then queued again with it).

    ``rankings["layout"]`` holds every solved candidate (label: T, D, P, ZeRO level, m,
    schedule) fastest first, then those refused or pruned. ZeRO-3 is also tried as hybrid
    sharding where the replicas span nodes (``data_parallel.hsdp_shards``; ``zero_label``)."""
    base = ctx.request.opts
    n_gpus = base.n_gpus
    batch = batch_size(ctx.specs) if ctx.specs else None
    v_given = base.n_stages // base.pp
    capacity = base.memory_limit if base.memory_limit is not None else ctx.request.dev.memory_bytes
    seq = next((s.shape[d] for s in ctx.specs for d, sym in s.dims if sym == "S"), 1)
    work: dict[tuple[int, int], tuple[float, float]] = {}

    def per_microbatch(t: int, micro: int) -> tuple[float, float]:  # one rank's forward, backward seconds
        if (t, micro) not in work:
            gm = ctx.rank_view(t) if t > 1 else ctx.annotation().gm
            timer, seen = node_timer(ctx, gm, base.precision), {}
            f = b = 0.0
            for node in compute_nodes(gm):
                cost = node.meta.get(COST, NodeCost())
                if id(cost) not in seen:
                    seen[id(cost)] = timer(with_shape(node, cost), {"B": micro, "S": seq})
                f, b = f + seen[id(cost)][0], b + seen[id(cost)][1]
            work[t, micro] = (f, b)
        return work[t, micro]

    cands: list[Candidate] = []
    refused: list[str] = []
    fixed_dp = ctx.request.data_parallel != "auto"
    for t in tensor_parallel_degrees(ctx):
        for d in ([base.data_parallel] if fixed_dp else divisors(n_gpus // t)):
            if n_gpus % (d * t):
                refused.append(f"T={t} D={d}: {n_gpus} GPUs do not split into {d} replicas x {t}")
                continue
            pp = n_gpus // (d * t)
            if batch is not None and batch % d:
                refused.append(f"T={t} D={d} P={pp}: the batch of {batch} does not split into {d} replicas")
                continue
            share = batch // d if batch is not None else None
            # zero=3 also as HSDP where the replicas span nodes (data_parallel.hsdp_shards)
            for z, s in [(z, s) for z in zero_levels(ctx, d)
                         for s in [0, *(hsdp_shards(d, pp, base.gpus_per_node, t) if z == 3 else ())]]:
                if z == 1 and t > 1 and d > 1:
                    refused.append(f"T={t} D={d} P={pp} zero=1: {ZERO1_TP}")
                    continue
                floor = static_floor(ctx, t, s or d, pp, z)  # HSDP's shards are 1/s
                if floor > capacity:
                    refused.append(f"T={t} D={d} P={pp} {zero_label(z, d, s)}: does not fit (weights, gradients and optimizer "
                                   f"state alone need at least {_fmt_bytes(floor)} on a rank, the device holds "
                                   f"{_fmt_bytes(capacity)})")
                    continue
                ms: list[int | None]
                if ctx.request.n_microbatches == "auto":
                    ms = [k for k in divisors(share or 1)]
                else:
                    ms = [ctx.request.n_microbatches]  # type: ignore[list-item]  # partition() checked it
                for name, v in schedule_candidates(base, v_given):
                    for m in ms:
                        lab = Candidate(0.0, t, d, z, name, v, m, s=s).label(pp)
                        bound = 0.0
                        if base.custom is None:
                            mm = m if m is not None else default_microbatches(name, share, pp)
                            mm = 1 if name == "naive" else mm
                            try:
                                check_counts(name, pp, mm, pp * v)
                            except ScheduleError as e:
                                refused.append(f"{lab}: not allowed ({' '.join(str(e).split())[:160]})")
                                continue
                            if share is not None and share % mm == 0:
                                f, b = per_microbatch(t, share // mm)
                                chain = f + (b / 2 if SCHEDULES[name].split_backward else b)
                                bound = max(mm * (f + b) / pp, chain)
                                if v == 1 and not SCHEDULES[name].split_backward:  # a true floor, no simulation
                                    bound = max(bound, pipeline_floor(f + b, mm, pp))
                                cands.append(Candidate(bound, t, d, z, name, v, m, False, mm, s))
                                continue
                        cands.append(Candidate(bound, t, d, z, name, v, m, True, s=s))
    # cheapest bound first; the balanced simulation (the costly term) only for a candidate
    # that reaches the front of the queue, which is then queued again with it
    queue = [(c.bound, c.t, -c.d, c.zero, c.schedule, c.m or 0, i, c) for i, c in enumerate(cands)]
    heapq.heapify(queue)
    rows: list[tuple[float, int, str, Solved]] = []
    best = float("inf")
    pruned: list[str] = []
    while queue:
        c = heapq.heappop(queue)[-1]
        pp = n_gpus // (c.d * c.t)
        if c.bound >= best and PRUNE:
            pruned.append(f"{c.label(pp)}: pruned (its bound {c.bound * 1e3:.4g} ms is no faster than the best "
                          f"found, {best * 1e3:.4g} ms)")
            continue
        if not c.refined and PRUNE:
            f, b = per_microbatch(c.t, (batch or 1) // c.d // c.mm)
            n_st = pp * c.v
            sched = ctx.memo(("schedule", c.schedule, pp, c.mm, n_st),
                             lambda: unit_schedule(c.schedule, pp, c.mm, n_st))[0]  # shared with build_problem
            # candidates that differ only in ZeRO level or hybrid sharding have the same
            # schedule and times: one simulation each (free transfers: it depends on nothing else)
            balanced = ctx.memo(("balanced", c.schedule, pp, c.mm, n_st, f, b),
                                lambda: simulate(sched, [f / n_st] * n_st, [b / n_st] * n_st).step_time)
            c = c._replace(bound=max(c.bound, BALANCED_SHARE * balanced), refined=True)
            heapq.heappush(queue, (c.bound, c.t, -c.d, c.zero, c.schedule, c.m or 0, len(cands), c))
            cands.append(c)
            continue
        o = replace(base, tensor_parallel=c.t, data_parallel=c.d, zero=c.zero, schedule=c.schedule, n_stages=pp * c.v,
                    fsdp_shard=c.s or None)
        try:
            prob, sol, fits = solve_fsdp(ctx, o, c.m, defer_notes=True, explain_limit=_SHOWN)
        except PartitionError as e:  # infeasible, too few cuts, the batch does not split
            refused.append(f"{c.label(pp)}: {' '.join(str(e).split())[:_SHOWN]}")
            continue
        peak = prob.peak(fits)
        for lay in placements(c.d, pp, base.gpus_per_node, c.t):
            step = replicated(prob, sol, lay).step
            best = min(best, step)
            label = c.label(pp) + (f" ({lay.describe()})" if lay.n_nodes > 1 else "")
            rows.append((step, len(rows), label + f": predicted step {step * 1e3:.4g} ms, peak memory "
                         f"{_fmt_bytes(peak)}, bound {c.bound * 1e3:.4g} ms", Solved(prob, sol, fits, lay)))
    if not rows:
        raise InfeasibleError(f"no layout fits {n_gpus} GPUs: " + "; ".join(refused[:6]))
    rows.sort(key=lambda r: r[:2])
    picked = rows[0][3]
    finish_notes(picked.prob)  # the losers' notes are never read: only the pick's is computed
    picked.prob.rankings["layout"] = ranked([(text.split(": predicted step")[0], st, text)
                                             for st, _, text, _ in rows], refused + pruned)
    why = (f"the fastest predicted step of {len(rows)} solved; #2 is {rows[1][0] / rows[0][0] - 1:.1%} slower"
           if len(rows) > 1 else "the only candidate that fits")
    picked.prob.notes = list(picked.prob.notes) + [
        f"{LAYOUT_NOTE} picked {rows[0][2]}: {why}; {len(pruned)} pruned by their bound, {len(refused)} refused"]
    return picked
