"""Balance the stages the bottleneck does not decide.

``solver.solve`` minimises the slowest stage; when one stage is bound to be slow (say a
50k-vocabulary ``lm_head`` alone outweighs a fair share), every split that keeps the
other stages under that bound is "optimal", including ones with near-empty stages.
``refine`` keeps the bottleneck stage where the solver put it and re-solves the parts to
its left and right for their own bottlenecks, recursively: a greedy step towards the
lexicographic min-max (the sorted stage times as small as they can be, largest first).
The global bottleneck never grows: the first solution is a witness for every sub-problem.

A part is re-solved only when its slowest stage is more than ``_SLACK`` above the part's
own lower bound (its compute and end cuts, plus the cheapest inner cut paid twice per inner
boundary, over its stage count; or its largest node): a part already that close to even
cannot gain much, and the bound costs two prefix-sum lookups where a re-solve costs a search.
The parts around its slowest stage are still examined the same way. Sub-problems keep the
solver's rules: every stage computes something where possible, and cuts that send Python
ints lose ties to cuts that send tensors only.
"""

from __future__ import annotations

import numpy as np

from partitioner.solver import InfeasibleError, Option, Solution, SolverInput, memo, solve

__all__ = ["refine", "score"]

#: Sub-solves allowed per call: a 64-stage, 10,000-node refine stays near one second.
_MAX_SOLVES = 8
#: A part whose slowest stage is within this fraction of the part's lower bound is not re-solved.
_SLACK = 0.05


def _sub(inp: SolverInput, lo: int, hi: int, s0: int, k: int) -> SolverInput:
    """Positions [lo, hi) as their own instance of ``k`` stages, global stages s0..s0+k-1.

    The cut costs at lo and hi are paid whatever the split inside, by the first and the
    last stage: they are folded into the first and last position's compute.
    """
    def fold(xs: object) -> list[int]:
        out = list(xs[lo:hi])  # type: ignore[index]
        out[0] += inp.cut_cost[lo]
        out[-1] += inp.cut_cost[hi]
        return out

    compute = fold(inp.compute)
    return SolverInput(
        compute=compute,
        cut_cost=[0, *inp.cut_cost[lo + 1:hi], 0],
        cut_bytes=[0, *inp.cut_bytes[lo + 1:hi], 0],
        allowed=[True, *inp.allowed[lo + 1:hi], True],
        static_mem=inp.static_mem[lo:hi],
        act_mem=inp.act_mem[lo:hi],
        inflight=inp.inflight[s0:s0 + k],
        capacity=inp.capacity[s0:s0 + k],
        pinned=[p - lo for p in inp.pinned if lo < p < hi],
        options=[Option(fold(o.compute), o.act_mem[lo:hi], o.reserve) for o in inp.options],
        avoid=[False, *inp.avoid[lo + 1:hi], False] if len(inp.avoid) else (),
        # folding the end cuts into the first and last position must not make them "compute"
        has_compute=list(_computes(inp)[lo:hi]),
    )


def _computes(inp: SolverInput) -> np.ndarray:  # type: ignore[type-arg]
    if len(inp.has_compute):
        return np.asarray(inp.has_compute, bool)
    return np.min(np.asarray([o.compute for o in inp.choices()], np.int64), axis=0) > 0


def refine(inp: SolverInput, n_stages: int, first: Solution) -> Solution:
    """``first`` (from ``solve``) with its non-bottleneck stages re-balanced."""
    m = memo()
    if m is not None:  # inside solver.remembered(): an input met before is answered from the memo
        key = ("refine", m.input_key(inp), n_stages, first, _MAX_SOLVES, _SLACK)
        return m.get(key, lambda: _refine(inp, n_stages, first))  # type: ignore[no-any-return]
    return _refine(inp, n_stages, first)


def _refine(inp: SolverInput, n_stages: int, first: Solution) -> Solution:
    bounds = [0, *first.cuts, len(inp.compute)]
    budget = [_MAX_SOLVES]  # sub-solves left
    n = len(inp.compute)
    cheap = np.min(np.asarray([o.compute for o in inp.choices()], np.int64), axis=0) if n else np.zeros(0, np.int64)
    P = np.concatenate([[0], np.cumsum(cheap)])
    cc = np.asarray(inp.cut_cost, np.int64)
    ok = np.asarray(inp.allowed, bool).copy()
    ok[0] = ok[-1] = False
    # the cheapest allowed cut anywhere: no window's cheapest inner cut is below it
    m_all = int(cc[ok].min()) if ok.any() else 0

    def lower_bound(lo: int, hi: int, k: int) -> int:
        total = int(P[hi] - P[lo]) + int(cc[lo]) + int(cc[hi]) + 2 * (k - 1) * m_all
        return max(-(-total // k), int(cheap[lo:hi].max(initial=0)) + (m_all if k > 1 else 0))

    times = list(first.stage_times)
    todo: list[tuple[int, int]] = []  # parts (first stage, stage count) still to examine

    def around_worst(s0: int, k: int) -> None:
        """Queue the parts left and right of the slowest stage of s0..s0+k-1 (left first)."""
        part = times[s0:s0 + k]
        worst = part.index(max(part))
        todo.append((s0 + worst + 1, k - worst - 1))
        todo.append((s0, worst))

    around_worst(0, n_stages)
    while todo:  # depth-first, left part first; a loop, since a part can nest S deep
        s0, k = todo.pop()
        if k < 2:
            continue
        lo, hi = bounds[s0], bounds[s0 + k]
        if max(times[s0:s0 + k]) > lower_bound(lo, hi, k) * (1 + _SLACK) and budget[0] > 0:
            budget[0] -= 1
            try:
                sol = solve(_sub(inp, lo, hi, s0, k), k)
            except InfeasibleError:  # cannot happen (the current split is feasible); keep it
                sol = None
            if sol is not None:
                bounds[s0 + 1:s0 + k] = [lo + c for c in sol.cuts]
                times[s0:s0 + k] = sol.stage_times
        around_worst(s0, k)
    return score(inp, tuple(bounds[1:-1]), lower_bound=first.lower_bound, optimal=first.optimal)


def score(inp: SolverInput, cuts: tuple[int, ...], *, lower_bound: int | None = None,
          optimal: bool = False) -> Solution:
    """The Solution that ``cuts`` give on ``inp``: stage times, memory, bytes (no search)."""
    bounds = [0, *cuts, len(inp.compute)]
    opts = inp.choices()
    times, mem, choice = [], [], []
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        static = sum(inp.static_mem[a:b])
        need = [static + inp.inflight[i] * sum(o.act_mem[a:b]) + o.reserve for o in opts]
        # the first option that fits (options are listed fastest first), else the smallest
        j = next((j for j, m in enumerate(need) if m <= inp.capacity[i]), min(range(len(opts)), key=need.__getitem__))
        choice.append(j)
        mem.append(need[j])
        times.append(sum(opts[j].compute[a:b]) + inp.cut_cost[a] + inp.cut_cost[b])
    return Solution(cuts, max(times), tuple(times), tuple(mem), sum(inp.cut_bytes[c] for c in cuts),
                    max(times) if lower_bound is None else lower_bound, optimal, tuple(choice))
