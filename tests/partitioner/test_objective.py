"""Planner quality: no stage without compute, ints lose ties to
tensors, a note when fewer stages would be faster, and the schedule-aware ``objective="step"``."""

from __future__ import annotations

import itertools
import random

import pytest

from partitioner.objective import StepModel, fewer_stages, step_of, step_search
from partitioner.refine import refine, score
from partitioner.schedule import ScheduleError, build_schedule
from partitioner.simulator import simulate
from partitioner.solver import SolverInput, min_cost_at, solve


def _inp(compute: list[int], S: int, *, cut_cost: list[int] | None = None, cut_bytes: list[int] | None = None,
         avoid: list[bool] | None = None) -> SolverInput:
    n = len(compute)
    return SolverInput(compute=compute, cut_cost=cut_cost or [0] * (n + 1), cut_bytes=cut_bytes or [0] * (n + 1),
                       allowed=[True] * (n + 1), static_mem=[0] * n, act_mem=[0] * n, inflight=[1] * S,
                       capacity=[10**12] * S, avoid=avoid or ())


def _sched_inst(fwd: list[int], bwd: list[int], send: list[int], bsend: list[int], S: int, m: int,
                name: str = "1f1b", ranks: int | None = None) -> tuple[SolverInput, StepModel]:
    n = len(fwd)
    sched = build_schedule(name, ranks or S, m, S)
    inflight = list(simulate(sched, [1.0] * S, [2.0] * S).peak_inflight)
    inp = SolverInput([f + b for f, b in zip(fwd, bwd)], [0] + [send[k] + bsend[k] for k in range(1, n)] + [0],
                      [0] + send[1:n] + [0], [True] * (n + 1), [0] * n, [0] * n, inflight, [10**12] * S)
    return inp, StepModel(fwd, send, bsend, sched)


# -- degenerate stages ---------------------------------------------------------------------

def test_no_stage_without_compute_when_the_model_allows_it() -> None:
    # The last node alone is the bottleneck (100); before this rule the byte tie-break put the
    # two zero-compute nodes (a sym size, a flatten) in stages of their own: cuts (1, 4) or (2, 4).
    inp = _inp([0, 0, 30, 30, 100], 3, cut_bytes=[0, 0, 0, 50, 10, 0])
    sol = refine(inp, 3, solve(inp, 3))
    assert sol.bottleneck == 100
    bounds = [0, *sol.cuts, 5]
    assert all(sum(inp.compute[a:b]) > 0 for a, b in itertools.pairwise(bounds)), sol.cuts
    assert sol.cuts == (3, 4)


def test_idle_stages_only_when_there_is_no_other_way() -> None:
    inp = _inp([0, 7, 0, 0], 3)  # one computing node for three stages: allowed, not refused
    sol = solve(inp, 3)
    assert len(sol.cuts) == 2 and sol.bottleneck == 7


def test_has_compute_overrides_time() -> None:
    # a flatten priced at launch overhead (time 1) but 0 FLOPs does not count as compute
    inp = _inp([1, 1, 30, 30, 100], 3, cut_bytes=[0, 0, 0, 50, 10, 0])
    inp = SolverInput(**{**inp.__dict__, "has_compute": [False, False, True, True, True]})
    assert solve(inp, 3).cuts == (3, 4)


def test_int_cuts_lose_ties_to_tensor_cuts() -> None:
    # cuts 2 and 3 give the same bottleneck; cut 2 sends a Python int (8 bytes), cut 3 a tensor
    compute = [5, 0, 0, 5]
    plain = _inp(compute, 2, cut_bytes=[0, 64, 8, 64, 0])
    assert solve(plain, 2).cuts == (2,)  # bytes alone pick the int
    avoided = _inp(compute, 2, cut_bytes=[0, 64, 8, 64, 0], avoid=[False, False, True, False, False])
    sol = solve(avoided, 2)
    assert sol.cuts in ((1,), (3,)) and sol.bottleneck == solve(plain, 2).bottleneck


def test_int_cut_still_used_when_it_is_faster() -> None:
    inp = _inp([5, 5, 5, 5], 2, cut_cost=[0, 9, 0, 9, 0], avoid=[False, False, True, False, False])
    assert solve(inp, 2).cuts == (2,)  # the int cut is the only fast one: a tie-break, not a ban


def test_refine_keeps_every_stage_computing() -> None:
    compute = [0, 0, 0, 3, 3, 3, 3, 3, 3, 500]
    inp = _inp(compute, 4, cut_bytes=[0, 1, 1, 1] + [100] * 6 + [0])
    sol = refine(inp, 4, solve(inp, 4))
    bounds = [0, *sol.cuts, len(compute)]
    parts = sorted(sum(compute[a:b]) for a, b in itertools.pairwise(bounds))
    assert parts == [6, 6, 6, 500]  # balanced around the dominant node, none idle


def test_fewer_stages_reported_with_the_step_per_count() -> None:
    # transfers dominate: every cut costs far more than the compute it spreads
    n = 8
    fwd, bwd = [1] * n, [2] * n
    send = [0] + [50] * (n - 1) + [0]
    inp, model = _sched_inst(fwd, bwd, send, send, 4, 4)
    sol = solve(inp, 4)
    here = step_of(inp, model, sol)
    rows = dict(fewer_stages(inp, model, here, n_gpus=4, stages_per_rank=1))
    assert set(rows) == {1, 2, 3}
    assert rows[1] is not None and rows[1] < here
    assert rows[1] == pytest.approx(4 * sum(fwd) + 4 * sum(bwd))  # one GPU: m x (F + B), no transfers


def test_fewer_stages_silent_when_more_stages_win() -> None:
    n = 16
    inp, model = _sched_inst([10] * n, [20] * n, [0] * (n + 1), [0] * (n + 1), 4, 8)
    sol = solve(inp, 4)
    here = step_of(inp, model, sol)
    assert all(t is None or t > here for _, t in fewer_stages(inp, model, here, n_gpus=4, stages_per_rank=1))


# -- schedule-aware cuts ------------------------------------------------------------------

def test_step_objective_beats_the_bottleneck_split() -> None:
    # The middle cut (4) carries a large tensor: counted in both neighbours' stage times it
    # makes the min-bottleneck split pick cut 3 (30/50 compute). A send costs its rank nothing
    # in the schedule (it lands later), so the even split is faster for 1F1B with 8 micro-batches.
    inp, model = _sched_inst([5] * 8, [10] * 8, [0, 0, 0, 0, 8, 0, 0, 0, 0], [0, 0, 0, 0, 7, 0, 0, 0, 0], 2, 8)
    first = refine(inp, 2, solve(inp, 2))
    cands, rep = step_search(inp, 2, model, first)
    assert first.cuts == (3,) and cands[0].cuts == (4,)
    assert rep.step == step_of(inp, model, cands[0]) < rep.bottleneck_step == step_of(inp, model, first)
    assert rep.local_optimum


def _random_case(rng: random.Random) -> tuple[SolverInput, StepModel, int] | None:
    n, S = rng.randint(3, 9), rng.choice([2, 3, 4])
    name = rng.choice(["1f1b", "gpipe", "zb-h1", "interleaved-1f1b"])
    if S > n or (name == "interleaved-1f1b" and S % 2):
        return None
    ranks = S // 2 if name == "interleaved-1f1b" else S
    m = rng.choice([2, 4, 8]) if name == "interleaved-1f1b" else rng.choice([1, 2, 4, 8])
    fwd = [rng.randint(0, 20) for _ in range(n)]
    bwd = [2 * f + rng.randint(0, 5) for f in fwd]
    send = [0] + [rng.randint(0, 15) for _ in range(n - 1)] + [0]
    bsend = [0] + [rng.randint(0, 15) for _ in range(n - 1)] + [0]
    try:
        inp, model = _sched_inst(fwd, bwd, send, bsend, S, m, name, ranks)
    except ScheduleError as e:  # a schedule that does not take this count (interleaved: m % ranks)
        if "needs n_microbatches to be a multiple of n_ranks" not in str(e):
            raise
        return None
    return inp, model, S


def test_step_objective_never_slower_and_closer_to_brute_force() -> None:
    """The bound the module states: never predicted slower than the min-bottleneck split; and,
    measured against brute force over every split, exact at least as often (here 120 of 126
    random instances against 74 of 126 for the bottleneck objective, seed 0)."""
    rng = random.Random(0)
    exact = exact_bn = total = 0
    for _ in range(150):
        case = _random_case(rng)
        if case is None:
            continue
        inp, model, S = case
        n = len(inp.compute)
        first = refine(inp, S, solve(inp, S))
        cands, rep = step_search(inp, S, model, first)
        best = min(step_of(inp, model, score(inp, c)) for c in itertools.combinations(range(1, n), S - 1))
        assert rep.step <= rep.bottleneck_step == step_of(inp, model, first)
        assert rep.step >= best
        total += 1
        exact += rep.step == best
        exact_bn += rep.bottleneck_step == best
    assert total > 100
    assert exact >= exact_bn + 30 and exact >= 0.9 * total, (exact, exact_bn, total)


def test_min_cost_at_matches_brute_force() -> None:
    rng = random.Random(1)
    for _ in range(200):
        n, S = rng.randint(2, 8), rng.randint(1, 4)
        if S > n:
            continue
        compute = [rng.randint(1, 9) for _ in range(n)]
        cc = [0] + [rng.randint(0, 5) for _ in range(n - 1)] + [0]
        cost = [0] + [rng.randint(0, 20) for _ in range(n - 1)] + [0]
        inp = _inp(compute, S, cut_cost=cc)
        T = rng.randint(max(compute), sum(compute) + 10)
        ok = [c for c in itertools.combinations(range(1, n), S - 1)
              if all(sum(compute[a:b]) + cc[a] + cc[b] <= T for a, b in itertools.pairwise((0, *c, n)))]
        got = min_cost_at(inp, S, T, cost)
        if not ok:
            assert got is None
            continue
        assert got in ok
        assert sum(cost[k] for k in got) == min(sum(cost[k] for k in c) for c in ok)
