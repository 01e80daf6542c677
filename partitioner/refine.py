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

from partitioner.solver import InfeasibleError, Option, Solution, SolverInput, solve

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
        current = max(score(inp, tuple(bounds[1:-1])).stage_times[s0:s0 + k])
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
