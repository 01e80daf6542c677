"""Emission: a solved split made into stage modules (with recompute where chosen), their symbolic costs and the plan; a saved plan re-applied without a search.

``emit`` assigns each node its stage, splits the graph (``passes.split``), wraps recomputed
stages, and builds the plan (``plan_builder``) with the mesh priced by ``layout.replicated``.
``reapply`` prices a saved plan's cuts and recompute the same way and emits them as they are.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import Any, Sequence

import sympy
from torch import fx

from partitioner import plan_builder
from partitioner.layout import Solved, replicated
from partitioner.passes.attention import mark_size_only
from partitioner.passes.manager import Snapshot, graph_text, node_summary
from partitioner.passes.meta import STAGE, SYMBOLIC
from partitioner.passes.recompute import with_recompute
from partitioner.passes.split import split_graph
from partitioner.pipe import Pipe
from partitioner.plan import Plan
from partitioner.plan_builder import StageMemory
from partitioner.pricing import TIME_UNIT, to_units
from partitioner.problem import Context, Problem, StageFit, build_problem
from partitioner.refine import score
from partitioner.search import rescore
from partitioner.solver import _fmt_bytes

__all__ = ["emit", "reapply", "fingerprint"]


def fingerprint(gm: fx.GraphModule) -> str:
    """Hash of the graph's structure and its parameters' names, shapes and dtypes."""
    h = hashlib.sha256()
    for n in gm.graph.nodes:
        target = n.target if isinstance(n.target, str) else getattr(n.target, "__qualname__", str(n.target))
        mod = getattr(n.target, "__module__", "") if not isinstance(n.target, str) else ""
        h.update(f"{n.op}|{n.name}|{mod}.{target}|{n.args}|{sorted(n.kwargs.items())}\n".encode())
    for name, t in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}\n".encode())
    return "sha256:" + h.hexdigest()


def emit(ctx: Context, solved: Solved) -> Pipe:
    """Stage modules (with recompute where chosen) and the plan."""
    prob, solution, fits, layout = solved
    gm, priced, opts = prob.gm, prob.priced, prob.opts
    n = len(priced.order)
    assignment: dict[str, int] = {}
    bounds = [0, *solution.cuts, n]
    for s in range(opts.n_stages):
        for node in priced.order[bounds[s]:bounds[s + 1]]:
            assignment[node.name] = s
            node.meta[STAGE] = s
    split = split_graph(gm, assignment, opts.n_stages)
    stages = list(split.stages)
    mark_size_only(gm, stages)  # a mask made in one stage from sizes and read in another: provable there
    for s, fit in enumerate(fits):
        if fit.mode != "none" and prob.acts is not None:
            regions = [[priced.order[p].name for p in range(a, b)]
                       for a, b in prob.acts._pieces(bounds[s], bounds[s + 1], fit.mode)]
            stages[s] = with_recompute(stages[s], regions, fit.mode)
    if ctx.request.keep_snapshots:  # the solver is not a graph pass, but its answer is node meta (pp.stage)
        prob.pm.snapshots.append(Snapshot("solve", graph_text(gm), node_summary(gm)))
    memory = [StageMemory(fit.mode, fit.static, kept_expr, extra_expr)
              for fit, (kept_expr, extra_expr) in zip(fits, symbolic(prob, bounds, fits))]
    for ld in (x for x in prob.rank_loads() if len(x.stages) > 1):  # a stage's memory_bytes is its own
        note = (f"rank {prob.sched.rank_of(ld.stages[0])} holds stages {', '.join(map(str, ld.stages))}: "
                f"{_fmt_bytes(prob.rank_need(ld, fits))} at its peak together (the device holds "
                f"{_fmt_bytes(prob.capacity)})")
        if note not in prob.notes:
            prob.notes.append(note)
    plan = plan_builder.build_plan(
        plan_builder.PlanSource(type(ctx.model).__name__, fingerprint(ctx.cap.gm), ctx.cap.route, ctx.specs,
                                prob.symbols, opts.to_dict(), prob.notes,
                                static_shapes=bool(specs_static(gm)), rankings=prob.rankings),
        plan_builder.Hardware(prob.dev, prob.lnk),
        plan_builder.SolvedSplit(gm, priced, bounds, split, prob.sched, prob.micro, solution, prob.comm, memory,
                                 TIME_UNIT),
    )
    step, mesh, sim = replicated(prob, solution, layout)
    plan = replace(plan, mesh=mesh, prediction=replace(plan.prediction,
                                                       rank_memory_bytes=tuple(prob.rank_peaks(fits))))
    if layout.dp > 1 or layout.n_nodes > 1:  # the replicas' all-reduce; cuts priced on the links they cross
        plan = replace(plan, prediction=replace(plan.prediction, step_time_s=step,
                                                bubble_fraction=sim.bubble_fraction))
    return Pipe(ctx.cap, stages, plan, graph=gm, snapshots=prob.pm.snapshots, model=ctx.model)


def symbolic(prob: Problem, bounds: Sequence[int],
             fits: Sequence[StageFit]) -> list[tuple[sympy.Expr | int, sympy.Expr | int]]:
    """Kept and transient bytes of each stage as polynomials in B and S (for the plan)."""
    out = []
    for (a, b), x in zip(zip(bounds, bounds[1:]), fits):
        out.append(prob.acts.stage_saved(a, b, x.mode, prob.ev) if prob.acts else (0, 0))
    return out


def specs_static(gm: Any) -> bool:
    """Did symbolic shape propagation fail (shapes hold for the example sizes only)?"""
    return SYMBOLIC in gm.meta and not gm.meta[SYMBOLIC]


def reapply(ctx: Context, plan: Plan) -> Pipe:
    """Re-apply ``plan``: its cuts and recompute, priced the same way, no search."""
    opts = ctx.request.opts
    prob = build_problem(ctx, opts, opts.n_microbatches, dims=tuple(plan.mesh.dims))
    forced = {name: st.index for st in plan.stages for name in st.nodes}
    stage_of = [forced[n.name] for n in prob.priced.order]
    cuts = tuple(stage_of.index(s) for s in range(1, opts.n_stages))
    fits = prob.exact(cuts, [st.recompute for st in plan.stages])
    first = score(prob.sin, cuts)
    sol = rescore(prob, first, fits, optimal=plan.solver.optimal)
    sol = replace(sol, lower_bound=to_units([plan.solver.lower_bound_s])[0])
    pipe = emit(ctx, Solved(prob, sol, fits, prob.layout))
    pipe.plan = replace(pipe.plan, notes=plan.notes, solver=plan.solver, rankings=plan.rankings)
    return pipe
