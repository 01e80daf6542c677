"""Balance the stages the bottleneck does not decide.

``solver.solve`` minimises the slowest stage; when one stage is bound to be slow (say a
50k-vocabulary ``lm_head`` alone outweighs a fair share), every split that keeps the
other stages under that bound is "optimal", including ones with near-empty stages.
``refine`` keeps the bottleneck stage where the solver put it and re-solves the parts to
its left and right for their own bottlenecks, recursively: a greedy step towards the
lexicographic min-max (the sorted stage times as small as they can be, largest first).
The global bottleneck never grows: the first solution is a witness for every sub-problem.
"""

from __future__ import annotations

from partitioner.solver import InfeasibleError, Solution, SolverInput, solve

__all__ = ["refine", "score"]

#: Sub-solves allowed per call: a 64-stage, 10,000-node refine stays near one second.
_MAX_SOLVES = 8
#: A part already this close to an even split (its inner cut costs aside) is left alone.
_SLACK = 0.05


def _sub(inp: SolverInput, lo: int, hi: int, s0: int, k: int) -> SolverInput:
    """Positions [lo, hi) as their own instance of ``k`` stages, global stages s0..s0+k-1.

    The cut costs at lo and hi are paid whatever the split inside, by the first and the
    last stage: they are folded into the first and last position's compute.
    """
    compute = list(inp.compute[lo:hi])
    compute[0] += inp.cut_cost[lo]
    compute[-1] += inp.cut_cost[hi]
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
    )


def refine(inp: SolverInput, n_stages: int, first: Solution) -> Solution:
    """``first`` (from ``solve``) with its non-bottleneck stages re-balanced."""
    bounds = [0, *first.cuts, len(inp.compute)]
    budget = [_MAX_SOLVES]

    def balance(s0: int, k: int) -> None:
        """Re-solve stages s0..s0+k-1 (currently bounds[s0]..bounds[s0+k]) in place."""
        if k < 2 or budget[0] <= 0:
            return
        lo, hi = bounds[s0], bounds[s0 + k]
        current = max(sum(inp.compute[a:b]) + inp.cut_cost[a] + inp.cut_cost[b]
                      for a, b in zip(bounds[s0:s0 + k], bounds[s0 + 1:s0 + k + 1]))
        even = (sum(inp.compute[lo:hi]) + inp.cut_cost[lo] + inp.cut_cost[hi]) / k
        if current <= even * (1 + _SLACK):  # already within 5 % of an even split: little to gain
            return
        budget[0] -= 1
        try:
            sol = solve(_sub(inp, lo, hi, s0, k), k)
        except InfeasibleError:  # cannot happen (the current split is feasible); keep it
            return
        bounds[s0 + 1:s0 + k] = [lo + c for c in sol.cuts]
        worst = max(range(k), key=lambda i: sol.stage_times[i])
        balance(s0, worst)
        balance(s0 + worst + 1, k - worst - 1)

    worst = max(range(n_stages), key=lambda i: first.stage_times[i])
    balance(0, worst)
    balance(worst + 1, n_stages - worst - 1)
    return score(inp, tuple(bounds[1:-1]), lower_bound=first.lower_bound, optimal=first.optimal)


def score(inp: SolverInput, cuts: tuple[int, ...], *, lower_bound: int | None = None,
          optimal: bool = False) -> Solution:
    """The Solution that ``cuts`` give on ``inp``: stage times, memory, bytes (no search)."""
    bounds = [0, *cuts, len(inp.compute)]
    times = tuple(sum(inp.compute[a:b]) + inp.cut_cost[a] + inp.cut_cost[b] for a, b in zip(bounds, bounds[1:]))
    mem = tuple(sum(inp.static_mem[a:b]) + inp.inflight[i] * sum(inp.act_mem[a:b])
                for i, (a, b) in enumerate(zip(bounds, bounds[1:])))
    return Solution(cuts, max(times), times, mem, sum(inp.cut_bytes[c] for c in cuts),
                    max(times) if lower_bound is None else lower_bound, optimal)
