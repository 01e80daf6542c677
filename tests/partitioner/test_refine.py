"""Refinement keeps the optimal bottleneck and balances what the bottleneck leaves free."""

from __future__ import annotations

import itertools
import random

from partitioner.refine import refine
from partitioner.solver import InfeasibleError, SolverInput, solve


def _inp(compute: list[int], S: int, *, cut: int = 0, cap: int = 10**12, act: int = 0) -> SolverInput:
    n = len(compute)
    return SolverInput(compute=compute, cut_cost=[0] + [cut] * (n - 1) + [0], cut_bytes=[0] + [1] * (n - 1) + [0],
                       allowed=[True] * (n + 1), static_mem=[1] * n, act_mem=[act] * n,
                       inflight=[S - i for i in range(S)], capacity=[cap] * S)


def test_a_dominant_node_leaves_the_other_stages_balanced() -> None:
    compute = [10] * 12 + [1000]  # an lm_head heavier than all blocks together
    inp = _inp(compute, 4)
    first = solve(inp, 4)
    better = refine(inp, 4, first)
    assert better.bottleneck == first.bottleneck == 1000
    assert sorted(better.stage_times)[:3] == [40, 40, 40]  # 12 blocks over 3 stages


def test_refined_split_is_valid_and_never_worse_on_random_instances() -> None:
    rng = random.Random(0)
    solved = refused = 0
    for _ in range(300):
        n, S = rng.randint(2, 9), rng.randint(1, 4)
        if S > n:
            continue
        compute = [rng.choice([0, 1, 5, 20, 100]) for _ in range(n)]
        inp = _inp(compute, S, cut=rng.randint(0, 5), cap=rng.randint(n, 4 * n), act=rng.randint(0, 1))
        try:
            first = solve(inp, S)
        except InfeasibleError:  # memory too tight for any split: the only refusal expected here
            refused += 1
            continue
        solved += 1
        better = refine(inp, S, first)
        assert better.bottleneck == first.bottleneck
        bounds = [0, *better.cuts, n]
        assert all(a < b for a, b in zip(bounds, bounds[1:]))  # no empty stage
        for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
            assert sum(inp.static_mem[a:b]) + inp.inflight[i] * sum(inp.act_mem[a:b]) <= inp.capacity[i]
        # the sorted stage times are never lexicographically worse than the first answer's
        assert sorted(better.stage_times, reverse=True) <= sorted(first.stage_times, reverse=True)
    assert solved > 100 and refused > 0, (solved, refused)  # both paths ran: the checks above are not vacuous


def test_brute_force_agrees_on_the_second_largest_stage_when_one_stage_dominates() -> None:
    compute = [3, 1, 4, 1, 5, 9, 2, 6, 50]
    inp = _inp(compute, 4, cut=1)
    first = solve(inp, 4)
    better = refine(inp, 4, first)
    n = len(compute)
    splits = [sorted((sum(compute[a:b]) + inp.cut_cost[a] + inp.cut_cost[b]
                      for a, b in zip((0, *c), (*c, n))), reverse=True)
              for c in itertools.combinations(range(1, n), 3)]
    optimal = [t for t in splits if t[0] == first.bottleneck]  # keep the bottleneck optimal
    assert sorted(better.stage_times, reverse=True)[1] == min(t[1] for t in optimal)
