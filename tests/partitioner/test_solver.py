"""The solver against brute force, exact-integer cases, and every error it raises."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import partitioner.solver as solver_mod
from partitioner.solver import (
    InfeasibleError,
    Solution,
    SolverInput,
    SolverInputError,
    solve,
)

BIG = 10**15


def make(compute: list[int], *, cut_cost: list[int] | None = None,
         cut_bytes: list[int] | None = None, allowed: list[bool] | None = None,
         static: list[int] | None = None, act: list[int] | None = None,
         inflight: list[int] | None = None, capacity: list[int] | None = None,
         pinned: tuple[int, ...] = (), stages: int = 2) -> SolverInput:
    n = len(compute)
    return SolverInput(
        compute=compute,
        cut_cost=cut_cost if cut_cost is not None else [0] * (n + 1),
        cut_bytes=cut_bytes if cut_bytes is not None else [0] * (n + 1),
        allowed=allowed if allowed is not None else [True] * (n + 1),
        static_mem=static if static is not None else [0] * n,
        act_mem=act if act is not None else [0] * n,
        inflight=inflight if inflight is not None else [1] * stages,
        capacity=capacity if capacity is not None else [BIG] * stages,
        pinned=pinned,
    )


def stage_time(inp: SolverInput, a: int, b: int) -> int:
    return sum(inp.compute[a:b]) + inp.cut_cost[a] + inp.cut_cost[b]


def stage_mem(inp: SolverInput, i: int, a: int, b: int) -> int:
    return sum(inp.static_mem[a:b]) + inp.inflight[i] * sum(inp.act_mem[a:b])


def brute(inp: SolverInput, S: int) -> tuple[int, int] | None:
    """(bottleneck, bytes) of the best partition, or None when none is valid. When some valid
    partition gives every stage compute (> 0), only those count (the solver's rule)."""
    n = len(inp.compute)
    best: dict[bool, tuple[int, int]] = {}
    inner = [k for k in range(1, n) if inp.allowed[k]]
    for combo in itertools.combinations(inner, S - 1):
        if not set(inp.pinned) <= set(combo):
            continue
        c = (0, *combo, n)
        if any(stage_mem(inp, i, c[i], c[i + 1]) > inp.capacity[i] for i in range(S)):
            continue
        key = (max(stage_time(inp, c[i], c[i + 1]) for i in range(S)),
               sum(inp.cut_bytes[k] for k in combo))
        busy = S == 1 or all(sum(inp.compute[c[i]:c[i + 1]]) > 0 for i in range(S))
        best[busy] = key if busy not in best or key < best[busy] else best[busy]
    return best.get(True, best.get(False))


def check_valid(inp: SolverInput, S: int, sol: Solution) -> None:
    n = len(inp.compute)
    c = (0, *sol.cuts, n)
    assert len(sol.cuts) == S - 1
    assert all(c[i] < c[i + 1] for i in range(S)), "empty stage"
    assert all(inp.allowed[k] for k in sol.cuts)
    assert set(inp.pinned) <= set(sol.cuts)
    assert sol.stage_times == tuple(stage_time(inp, c[i], c[i + 1]) for i in range(S))
    assert sol.stage_mem == tuple(stage_mem(inp, i, c[i], c[i + 1]) for i in range(S))
    assert all(m <= cap for m, cap in zip(sol.stage_mem, inp.capacity))
    assert sol.bottleneck == max(sol.stage_times)
    assert sol.total_cut_bytes == sum(inp.cut_bytes[k] for k in sol.cuts)
    assert sol.lower_bound <= sol.bottleneck
    assert sol.optimal


@st.composite
def instances(draw: st.DrawFn) -> tuple[SolverInput, int]:
    n = draw(st.integers(1, 9))
    S = draw(st.integers(1, 4))
    small = st.integers(0, 9)
    compute = draw(st.lists(small, min_size=n, max_size=n))
    cut_cost = [0] + draw(st.lists(small, min_size=n - 1, max_size=n - 1)) + [0]
    cut_bytes = draw(st.lists(small, min_size=n + 1, max_size=n + 1))
    allowed = draw(st.lists(st.booleans(), min_size=n + 1, max_size=n + 1))
    static = draw(st.lists(st.integers(0, 5), min_size=n, max_size=n))
    act = draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
    inflight = draw(st.lists(st.integers(0, 4), min_size=S, max_size=S))
    capacity = draw(st.lists(st.sampled_from([5, 10, 20, 40, BIG]), min_size=S, max_size=S))
    interior = [k for k in range(1, n) if allowed[k]]
    pinned = draw(st.lists(st.sampled_from(interior), max_size=S - 1, unique=True)
                  if interior and S > 1 else st.just([]))
    inp = SolverInput(compute, cut_cost, cut_bytes, allowed, static, act, inflight,
                      capacity, tuple(pinned))
    return inp, S


@settings(max_examples=600, deadline=None)
@given(instances())
def test_matches_brute_force(case: tuple[SolverInput, int]) -> None:
    inp, S = case
    want = brute(inp, S)
    if want is None:
        with pytest.raises(InfeasibleError):
            solve(inp, S)
        return
    sol = solve(inp, S)
    check_valid(inp, S, sol)
    assert (sol.bottleneck, sol.total_cut_bytes) == want


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 60), st.integers(1, 12), st.integers(0, 50))
def test_uniform_compute_splits_evenly(n: int, S: int, w: int) -> None:
    if S > n:
        return
    sol = solve(make([w] * n, inflight=[1] * S, capacity=[BIG] * S), S)
    assert sol.bottleneck == w * -(-n // S)
    assert sol.lower_bound <= sol.bottleneck


def test_exact_small_case() -> None:
    # [5 | 1 1 1 | 5] costs 5,3+2+2,5 once the two cuts each charge 2 to both sides.
    inp = make([5, 1, 1, 1, 5], cut_cost=[0, 2, 2, 2, 2, 0], cut_bytes=[0, 7, 1, 1, 7, 0],
               stages=3)
    sol = solve(inp, 3)
    assert sol.cuts == (1, 4)
    assert sol.stage_times == (7, 7, 7)
    assert sol.total_cut_bytes == 14
    assert sol.lower_bound == 7  # max(5 + 2, ceil((13 + 2*2*2) / 3))


def test_bytes_break_ties_between_optimal_partitions() -> None:
    # Cutting at 1 or at 2 both give bottleneck 2; only cut 2 is cheap in bytes.
    inp = make([1, 1, 1, 1], cut_bytes=[0, 9, 1, 9, 0], stages=2)
    assert solve(inp, 2).cuts == (2,)
    inp = make([1, 0, 1], cut_bytes=[0, 9, 1, 0], stages=2)
    assert solve(inp, 2).cuts == (2,)


def test_memory_moves_the_cut() -> None:
    # Balanced would be (2,), but stage 0 holds 2 micro-batches and only 20 bytes.
    inp = make([1, 1, 1, 1], act=[10, 10, 0, 0], inflight=[2, 1], capacity=[20, BIG])
    sol = solve(inp, 2)
    assert sol.cuts == (1,) and sol.stage_mem == (20, 10) and sol.bottleneck == 3


def test_pinned_cut_is_kept() -> None:
    sol = solve(make([1] * 6, pinned=(1,), stages=3), 3)
    assert 1 in sol.cuts and sol.bottleneck == 3


def test_single_stage() -> None:
    sol = solve(make([4, 5], stages=1), 1)
    assert sol.cuts == () and sol.bottleneck == 9 and sol.optimal


def test_larger_random_instance_is_valid_and_bounded() -> None:
    rng = random.Random(0)
    n, S = 3000, 16
    inp = SolverInput(
        compute=[rng.randint(0, 1000) for _ in range(n)],
        cut_cost=[0] + [rng.randint(0, 300) for _ in range(n - 1)] + [0],
        cut_bytes=[rng.randint(0, 10**6) for _ in range(n + 1)],
        allowed=[rng.random() < 0.8 for _ in range(n + 1)],
        static_mem=[rng.randint(0, 1000) for _ in range(n)],
        act_mem=[rng.randint(0, 100) for _ in range(n)],
        inflight=[S - i for i in range(S)],
        capacity=[200_000] * S,
    )
    sol = solve(inp, S)
    check_valid(inp, S, sol)


def test_tie_break_in_small_chunks_matches_brute_force(monkeypatch: pytest.MonkeyPatch) -> None:
    # Chunking the pair DP must not change the answer, even with chunks of two pairs.
    monkeypatch.setattr(solver_mod, "_CHUNK_PAIRS", 2)
    rng = random.Random(1)
    for _ in range(200):
        n, S = rng.randint(2, 9), rng.randint(1, 4)
        inp = make([rng.randint(0, 3) for _ in range(n)],
                   cut_bytes=[rng.randint(0, 9) for _ in range(n + 1)],
                   inflight=[1] * S, capacity=[BIG] * S)
        want = brute(inp, S)
        if want is not None:
            sol = solve(inp, S)
            assert (sol.bottleneck, sol.total_cut_bytes) == want


def test_approximate_tie_break_keeps_the_optimal_bottleneck(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Long zero-cost runs make the optimal bands wide; with the budget forced to zero
    # the byte pass goes approximate, which may cost bytes but never time or validity.
    rng = random.Random(2)
    n, S = 2500, 8
    inp = make([rng.choice((0, 0, 0, 5)) for _ in range(n)],
               cut_bytes=[rng.randint(0, 1000) for _ in range(n + 1)],
               inflight=[1] * S, capacity=[BIG] * S)
    exact = solve(inp, S)
    monkeypatch.setattr(solver_mod, "_PAIR_BUDGET", 0)
    approx = solve(inp, S)
    check_valid(inp, S, approx)
    assert approx.bottleneck == exact.bottleneck
    assert approx.total_cut_bytes >= exact.total_cut_bytes


# --- errors -----------------------------------------------------------------------


def test_error_no_gpus() -> None:
    with pytest.raises(SolverInputError, match=r"n_gpus must be >= 1, got 0"):
        solve(make([1, 2]), 0)


def test_error_more_stages_than_nodes() -> None:
    with pytest.raises(InfeasibleError, match=r"cannot make 9 stages from 8 nodes"):
        solve(make([1] * 8, stages=9), 9)


def test_error_too_few_allowed_cuts() -> None:
    allowed = [True, False, True, False, False, True]
    with pytest.raises(InfeasibleError, match=r"only 1 cut positions are allowed but 2"):
        solve(make([1] * 5, allowed=allowed, stages=3), 3)


def test_error_pinned_not_allowed() -> None:
    allowed = [True, True, False, True, True]
    with pytest.raises(SolverInputError, match=r"pinned cut 2 is not an allowed cut"):
        solve(make([1] * 4, allowed=allowed, pinned=(2,)), 2)


def test_error_pinned_out_of_range() -> None:
    with pytest.raises(SolverInputError, match=r"pinned cut 4 is out of range; cuts lie in 1..3"):
        solve(make([1] * 4, pinned=(4,)), 2)


def test_error_too_many_pins() -> None:
    with pytest.raises(InfeasibleError, match=r"2 pinned cuts need at least 3 stages but 2"):
        solve(make([1] * 4, pinned=(1, 2)), 2)


def test_error_length_mismatch() -> None:
    inp = make([1, 2, 3], cut_cost=[0, 0, 0])
    with pytest.raises(SolverInputError, match=r"cut_cost has length 3, expected 4"):
        solve(inp, 2)
    with pytest.raises(SolverInputError, match=r"capacity has length 2, expected 3"):
        solve(make([1, 2, 3], inflight=[1, 1, 1]), 3)


def test_error_negative_and_endpoint_costs() -> None:
    with pytest.raises(SolverInputError, match=r"compute\[1\] = -2 is negative"):
        solve(make([1, -2, 3]), 2)
    with pytest.raises(SolverInputError, match=r"cut_cost\[0\] and cut_cost\[n\] must be 0"):
        solve(make([1, 2], cut_cost=[1, 0, 0]), 2)


def test_error_memory_names_stage_bytes_and_fix() -> None:
    gib = 2**30
    # The only split leaves each stage 1 GiB over; the first of the worst is named.
    inp = make([1, 1], static=[3 * gib, 3 * gib], act=[gib // 2, gib // 2],
               inflight=[4, 4], capacity=[4 * gib, 4 * gib])
    with pytest.raises(InfeasibleError, match=(
            r"stage 0 needs 5.0 GiB \(weights 3.0 GiB \+ 4 micro-batches x 512.0 MiB "
            r"activations\) but the device holds 4.0 GiB; use more GPUs")):
        solve(inp, 2)


def test_error_memory_picks_the_overflowing_stage() -> None:
    # Stage 0 has room; stage 1 (capacity 10) can never hold the last node (12 bytes).
    inp = make([1, 1, 1], static=[1, 1, 12], capacity=[BIG, 10])
    with pytest.raises(InfeasibleError, match=r"stage 1 needs 12 B \(weights 12 B \+ 1 "
                                              r"micro-batches x 0 B activations\) but the "
                                              r"device holds 10 B"):
        solve(inp, 2)
