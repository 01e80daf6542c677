"""The joint layout search (``zero="auto"``, ``partitioner.layout.joint``) made fast without
changing its answer: the pruned search picks what the exhaustive one picks, byte for byte;
candidates that price alike share their node times and memory-free splits (one solve per
distinct split, counted); only the kept layout pays for the "fewer stages" note."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch

from partitioner import layout, partition, search
from partitioner.examples import gpt_example

#: a joint search with every choice open but tensor parallelism, on 4 GPUs: 14 layouts to rank
KW: dict[str, Any] = dict(n_gpus=4, data_parallel="auto", zero="auto", schedule="auto", n_microbatches="auto",
                          optimizer="adamw")


@pytest.fixture(scope="module")
def gpt() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model, (idx,) = gpt_example(batch=4, seq=8, n_layer=2)
    return model, idx


class Spy:
    """Counts calls of a module function (and passes them on)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> None:
        self.calls: list[tuple[Any, ...]] = []
        real = getattr(module, name)

        def spy(*a: Any, **k: Any) -> Any:
            self.calls.append(a)
            return real(*a, **k)

        monkeypatch.setattr(module, name, spy)


@pytest.fixture(scope="module")
def runs(gpt) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """The pruned and the exhaustive joint search of one model, each with its calls counted."""
    model, idx = gpt
    out: dict[str, Any] = {}
    for prune in (True, False):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(layout, "PRUNE", prune)
            spies = {name: Spy(mp, mod, name) for mod, name in ((layout, "solve_fsdp"), (search, "free_split"),
                                                                  (search, "refine"), (search, "search_cuts"),
                                                                  (search, "note_fewer_stages"))}
            out["pruned" if prune else "full"] = (partition(model, example_inputs=(idx,), **KW).plan, spies)
    return out


def test_pruned_joint_search_picks_the_exhaustive_searchs_plan(runs) -> None:  # type: ignore[no-untyped-def]
    pruned, ps = runs["pruned"]
    full, fs = runs["full"]
    n_pruned, n_full = len(ps["solve_fsdp"].calls), len(fs["solve_fsdp"].calls)
    assert n_pruned < n_full, (n_pruned, n_full)  # the bound saves solves here, or the test shows nothing
    rows = full.rankings["layout"]
    assert not [r for r in rows if (r["refused"] or "").startswith("pruned")]
    # the same pick, the same plan (cuts, recompute, mesh, notes but the layout line's counts)
    assert rows[0]["label"] == pruned.rankings["layout"][0]["label"]
    a, b = pruned.to_dict(), full.to_dict()
    for d in (a, b):
        d["notes"] = [n for n in d["notes"] if not n.startswith(layout.LAYOUT_NOTE)]
        d.pop("rankings")
    assert a == b
    steps = {r["label"]: r["step_s"] for r in rows if r["refused"] is None}
    for r in pruned.rankings["layout"]:  # each layout the pruned search solved has the exhaustive step
        if r["refused"] is None:
            assert r["step_s"] == steps[r["label"]], r["label"]
        elif r["refused"].startswith("pruned"):  # and each it pruned is no faster than the pick
            assert steps.get(r["label"], float("inf")) >= pruned.prediction.step_time_s


def test_candidates_share_one_solve_per_distinct_memory_free_split(runs) -> None:  # type: ignore[no-untyped-def]
    """The min-bottleneck split with memory ignored depends on the node times and cut prices
    (the tensor-parallel degree, the micro-batch size) and the stage count, not on the ZeRO
    level, the schedule or the micro-batch count: the solver runs once per distinct one."""
    _, spies = runs["full"]
    free = spies["free_split"].calls
    keys = {(p.opts.n_stages, tuple(f.compute), tuple(f.cut_cost)) for p, f in free}
    assert len(free) == len(spies["search_cuts"].calls) > 2 * len(keys), (len(free), len(keys))
    assert len(spies["refine"].calls) == len(keys)  # memory binds nowhere here: no other solve


def test_the_fewer_stages_note_is_computed_for_the_kept_layout_only(gpt, runs) -> None:  # type: ignore[no-untyped-def]
    model, idx = gpt
    plan, spies = runs["pruned"]
    assert len(spies["note_fewer_stages"].calls) == 1 < len(spies["solve_fsdp"].calls)
    picked = plan.rankings["layout"][0]["label"]
    t, d, p, z, m, sched = re.match(r"T=(\d+) D=(\d+) P=(\d+) zero=(\d) m=(\d+) (\S+)", picked).groups()
    alone = partition(model, example_inputs=(idx,), n_gpus=4, data_parallel=int(d), zero=int(z),
                      n_microbatches=int(m), schedule=sched, optimizer="adamw").plan
    # the pick's notes are those of the same layout planned alone, in the same order, then the layout line
    assert [n for n in plan.notes if not n.startswith(layout.LAYOUT_NOTE)] == list(alone.notes)
    assert plan.to_dict()["stages"] == alone.to_dict()["stages"]


#: a joint search where memory refuses layouts the static floor lets through (the refusals'
#: explanations are in the ranking)
TIGHT: dict[str, Any] = dict(n_gpus=4, data_parallel="auto", zero="auto", schedule="auto", gpus_per_node=2,
                             inter_link="ib-ndr-400", optimizer="adamw")


def test_a_refusal_reads_the_same_when_what_would_fit_is_not_tried(gpt, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The joint ranking shows the first 160 characters of a refusal; the search skips the
    hints (a solve each) that would come after them, and the plan stays byte for byte the
    one with every hint tried."""
    model, idx = gpt
    free = partition(model, example_inputs=(idx,), n_gpus=2).plan
    limit = int(0.6 * max(st.cost.memory_bytes for st in free.stages))
    plans, hints = {}, {}
    for skip in (True, False):
        with pytest.MonkeyPatch.context() as mp:
            if not skip:
                real = search.explain
                mp.setattr(search, "explain", lambda prob, err, last, limit=None: real(prob, err, last, None))
            spy = Spy(mp, search, "feasible")
            plans[skip] = partition(model, example_inputs=(idx,), memory_limit=limit, **TIGHT).plan.to_dict()
            hints[skip] = len(spy.calls)
    refused = [r for r in plans[True]["rankings"]["layout"] if r["refused"] and "needs" in r["refused"]]
    assert refused, "no layout was refused by the exact memory: the test shows nothing"
    assert hints[True] < hints[False], hints
    assert plans[True] == plans[False]


def test_feasible_is_whether_solve_finds_a_split() -> None:
    import random

    from partitioner.solver import Option, PartitionError, SolverInput, feasible, solve

    rng = random.Random(0)
    seen = {True: 0, False: 0}
    for _ in range(300):
        n, S = rng.randint(1, 12), rng.randint(1, 5)
        compute = [rng.choice([0, 0, 1, 3, 7]) for _ in range(n)]
        act = [rng.randint(0, 9) for _ in range(n)]
        inp = SolverInput(compute, [0] + [rng.randint(0, 3) for _ in range(n - 1)] + [0],
                          [rng.randint(0, 9) for _ in range(n + 1)], [rng.random() < 0.8 for _ in range(n + 1)],
                          [rng.randint(0, 9) for _ in range(n)], act, [rng.randint(1, 3) for _ in range(S)],
                          [rng.randint(5, 60) for _ in range(S)],
                          options=[Option(compute, act), Option([2 * c for c in compute], [a // 3 for a in act], 4)]
                          if rng.random() < 0.5 else [])
        try:
            solve(inp, S)
            ok = True
        except PartitionError:
            ok = False
        assert feasible(inp, S) == ok, (inp, S)
        seen[ok] += 1
    assert min(seen.values()) > 30, seen  # both answers well represented


def test_candidates_share_built_schedules_and_keep_the_plan(gpt) -> None:  # type: ignore[no-untyped-def]
    """Candidates with the same schedule, ranks, micro-batches and stages share one built
    schedule (and so one lowering in the simulator); the plan is the one built with a fresh
    schedule, lowered again, for every use."""
    from partitioner import problem, simulator
    from partitioner.problem import Context

    model, idx = gpt
    with pytest.MonkeyPatch.context() as mp:
        shared_spy = Spy(mp, problem, "build_schedule")
        shared = partition(model, example_inputs=(idx,), **KW).plan.to_dict()
    with pytest.MonkeyPatch.context() as mp:
        real = Context.memo
        mp.setattr(Context, "memo", lambda self, key, make: make() if key[0] == "schedule" else real(self, key, make))
        mp.setattr(simulator, "_KEPT_ACTIONS", 0)  # the simulator keeps only the last schedule's lowering
        fresh_spy = Spy(mp, problem, "build_schedule")
        fresh = partition(model, example_inputs=(idx,), **KW).plan.to_dict()
    assert len(shared_spy.calls) == len(set(shared_spy.calls)) < len(fresh_spy.calls), (
        len(shared_spy.calls), len(fresh_spy.calls))
    assert shared == fresh


def _random_input(rng: Any, n: int, S: int, options: bool) -> Any:
    from partitioner.solver import Option, SolverInput

    compute = [rng.choice([0, 1, 3, 7, 20, 45]) for _ in range(n)]
    act = [rng.randint(0, 9) for _ in range(n)]
    return SolverInput(compute, [0] + [rng.randint(0, 5) for _ in range(n - 1)] + [0],
                       [rng.randint(0, 9) for _ in range(n + 1)], [rng.random() < 0.85 for _ in range(n + 1)],
                       [rng.randint(0, 9) for _ in range(n)], act, [rng.randint(1, 3) for _ in range(S)],
                       [rng.randint(40, 200) for _ in range(S)],
                       options=[Option(compute, act), Option([2 * c for c in compute], [a // 3 for a in act], 4)]
                       if options else [])


def _blocks(n_blocks: int, S: int) -> Any:
    """A stack of identical blocks (a decoder layer's pattern of node times, memory and cut
    bytes, repeated), with an embedding-like first node and a head-like last one, and a
    recompute option: the shape of a transformer's order."""
    from partitioner.solver import Option, SolverInput

    times, act, static, cut = [50, 900, 30, 400, 2500, 60, 1800, 1800, 40], [8, 30, 2, 16, 40, 4, 60, 60, 2], \
        [0, 40, 0, 10, 0, 0, 80, 80, 0], [16, 16, 64, 32, 16, 64, 64, 16, 16]
    # time units as the planner's (about 10^-12 s): a stage takes ~10^11 of them
    compute = [c * 1_000_003 for c in [700] + times * n_blocks + [3000]]
    acts = [10] + act * n_blocks + [50]
    stat = [500] + static * n_blocks + [500]
    cuts = [0] + cut * n_blocks + [16, 0]
    n = len(compute)
    return SolverInput(compute, [0] + [c * 250_001 for c in cuts[1:-1]] + [0], cuts, [True] * (n + 1), stat, acts,
                       [min(S - i, 4) for i in range(S)], [sum(stat) // S + 4 * sum(acts) // S // 2] * S,
                       options=[Option(compute, acts), Option([c + c // 3 for c in compute], [a // 4 for a in acts], 30)])


def test_the_threshold_search_lists_stage_times_and_keeps_every_answer(monkeypatch) -> None:
    """``solve`` bisects over the stage times that can be the optimum (once the bracket is
    narrow) instead of over every integer: the same Solution on random instances and on a
    stack of identical blocks, with fewer feasibility tests (counted, not timed)."""
    import random

    from partitioner import solver
    from partitioner.solver import PartitionError

    calls = [0]
    real_reach = solver._reach

    def reach(*a: Any) -> Any:
        calls[0] += 1
        return real_reach(*a)

    monkeypatch.setattr(solver, "_reach", reach)

    def run(inp: Any, S: int, budget: int) -> tuple[Any, int]:
        monkeypatch.setattr(solver, "_VALUE_BUDGET", budget)  # -1: never list, bisect every integer (as before)
        calls[0] = 0
        try:
            return solver.solve(inp, S), calls[0]
        except PartitionError as e:
            return str(e), calls[0]

    budget = solver._VALUE_BUDGET
    rng = random.Random(1)
    for _ in range(150):
        n, S = rng.randint(1, 40), rng.randint(1, 6)
        inp = _random_input(rng, n, S, rng.random() < 0.5)
        assert run(inp, S, budget)[0] == run(inp, S, -1)[0], (inp, S)
    for n_blocks, S in ((40, 8), (80, 16)):
        inp = _blocks(n_blocks, S)
        (new, tests_new), (old, tests_old) = run(inp, S, budget), run(inp, S, -1)
        assert isinstance(new, solver.Solution) and new == old
        assert tests_new < 0.7 * tests_old, (n_blocks, S, tests_new, tests_old)


def test_remembered_answers_are_keyed_by_every_input() -> None:
    """Inside ``remembered()`` an input met before is answered from the memo; an input that
    differs in any one entry of any field (or in the stage count) is solved again."""
    import random
    from dataclasses import replace

    from partitioner import solver
    from partitioner.solver import Option, PartitionError, remembered

    def answer(f: Any) -> Any:
        try:
            return f()
        except PartitionError as e:
            return ("refused", str(e), getattr(e, "closest", None))

    rng = random.Random(2)
    base = _random_input(rng, 14, 3, True)
    variants = [(base, 3), (replace(base, inflight=base.inflight[:2], capacity=base.capacity[:2]), 2)]
    for name in ("compute", "cut_cost", "cut_bytes", "allowed", "static_mem", "act_mem", "inflight", "capacity", "avoid",
                 "has_compute"):
        xs = list(getattr(base, name)) or [0] * (len(base.compute) + (name == "avoid"))
        k = 1 if name in ("cut_cost", "allowed", "avoid") else 0
        xs[k] = (not xs[k]) if isinstance(xs[k], bool) or name in ("avoid", "has_compute") else xs[k] + 7
        variants.append((replace(base, **{name: xs}), 3))
    variants.append((replace(base, pinned=[next(k for k in range(1, 14) if base.allowed[k])]), 3))
    o = base.options[1]
    variants.append((replace(base, options=[base.options[0], Option(o.compute, o.act_mem, o.reserve + 50)]), 3))
    fresh = [answer(lambda v=v: solver.solve(*v)) for v in variants]
    with remembered() as memo:
        for _ in range(2):  # the second pass is answered from the memo, the same answers
            assert [answer(lambda v=v: solver.solve(*v)) for v in variants] == fresh
    assert memo.misses == len(variants) and memo.hits == len(variants)
    assert len({repr(f) for f in fresh}) > 1  # the variants do change answers


def test_remembered_answers_keep_the_joint_plan(gpt) -> None:  # type: ignore[no-untyped-def]
    """The joint search shares solver answers between candidates (``solver.remembered``): the
    plan is the one every call computed afresh gives, and some calls were answered from the memo."""
    import contextlib

    from partitioner import solver

    model, idx = gpt
    memos: list[Any] = []
    real = solver.remembered

    @contextlib.contextmanager
    def spy() -> Any:
        with real() as m:
            memos.append(m)
            yield m

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(layout, "remembered", spy)
        shared = partition(model, example_inputs=(idx,), **KW).plan.to_dict()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(layout, "remembered", contextlib.nullcontext)
        fresh = partition(model, example_inputs=(idx,), **KW).plan.to_dict()
    assert shared == fresh
    assert len(memos) == 1 and memos[0].hits > 0, memos[0].__dict__ if memos else None


def test_the_pipeline_floor_is_under_every_simulated_step() -> None:
    """``objective.pipeline_floor`` (the joint search's bound term that needs no simulation)
    is below the simulated step of 1F1B, GPipe and interleaved 1F1B with one stage per rank
    under uneven random stage times, and it is not loose everywhere: with even stages it is
    within 25% of 1F1B's step on these counts."""
    import random

    from partitioner.objective import pipeline_floor
    from partitioner.schedule import build_schedule
    from partitioner.simulator import simulate

    rng = random.Random(3)
    tight = 0.0
    for _ in range(120):
        name = rng.choice(["1f1b", "gpipe", "interleaved-1f1b"])
        p, m = rng.choice([1, 2, 3, 4, 8]), rng.choice([1, 2, 3, 4, 8, 16])
        if name == "interleaved-1f1b":
            m = p * rng.choice([1, 2])  # its rule: micro-batches a multiple of the ranks
        fwd = [rng.choice([0.01, 0.5, 1.0, 3.0]) * rng.random() for _ in range(p)]
        bwd = [f * rng.uniform(1.0, 3.0) for f in fwd]
        step = simulate(build_schedule(name, p, m, p), fwd, bwd).step_time
        assert step >= pipeline_floor(sum(fwd) + sum(bwd), m, p), (name, p, m, fwd, bwd)
        even = simulate(build_schedule("1f1b", p, m, p), [1.0] * p, [2.0] * p).step_time
        tight = max(tight, pipeline_floor(3.0 * p, m, p) / even)
    assert tight > 0.8, tight


def test_balanced_bound_simulates_each_schedule_and_times_once(gpt, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The bound's balanced simulation depends only on the schedule and the stage times:
    candidates that differ in ZeRO level alone share it (one simulation per distinct input)."""
    model, idx = gpt
    spy = Spy(monkeypatch, layout, "simulate")
    partition(model, example_inputs=(idx,), **KW)
    keys = [(id(s), tuple(f), tuple(b)) for s, f, b, *_ in spy.calls]
    assert len(keys) == len(set(keys)) > 0


def test_the_shortcuts_of_reachability_and_tie_break_answer_as_the_full_tests(monkeypatch) -> None:
    """``_valid_ends`` decides most ends from their last reachable starts and sends the rest to
    the range maxima; ``_pairs_split`` lists only the strip of pairs whose time test depends on
    the start's cut cost. With the shortcuts off (every end through the range maxima; every
    pair listed, option by option, by ``_pairs``) every solve and min_cost_at answers the
    same, on random instances (large cut costs: wide strips) and a stack of blocks."""
    import random
    from dataclasses import replace

    import numpy as np

    from partitioner import solver
    from partitioner.solver import PartitionError

    def full_valid_ends(pr, i, b, R, T):  # type: ignore[no-untyped-def]
        if T >= pr.T_free:
            return solver._valid_ends_untimed(pr, i, b, R, pr.top[b])
        return solver._valid_ends_table(pr, i, b, R, T)

    def full_pairs(pr, Fa, Fb, spans, best, T):  # type: ignore[no-untyped-def]
        new_best = np.full(len(Fb), np.int64(2**62))
        pred = np.zeros(len(Fb), np.intp)
        for o, (s, e) in zip(pr.opts, spans):
            nb, pd = solver._pairs(o, Fa, Fb, s, e, best, T, False)
            take = nb < new_best
            new_best, pred = np.where(take, nb, new_best), np.where(take, pd, pred)
        return new_best, pred

    def answers(inp: Any, S: int, rng: Any) -> list[Any]:
        out: list[Any] = []
        try:
            sol = solver._solve(inp, S)
            out.append(sol)
            T = sol.bottleneck
        except PartitionError as e:
            out.append((str(e), getattr(e, "closest", None)))
            T = rng.randint(1, 300)
        n = len(inp.compute)
        for d in (0, 3, 40):
            try:
                out.append(solver._min_cost_at(inp, S, T + d, [rng.randint(0, 50) for _ in range(n + 1)]))
            except PartitionError as e:
                out.append(str(e))
        return out

    rng = random.Random(3)
    cases = []
    for _ in range(120):
        n, S = rng.randint(1, 50), rng.randint(1, 6)
        inp = _random_input(rng, n, S, rng.random() < 0.6)
        if rng.random() < 0.5:
            inp = replace(inp, cut_cost=[0] + [rng.randint(0, 60) for _ in range(n - 1)] + [0])
        cases.append((inp, S))
    cases += [(_blocks(20, 5), 5)]
    fast = [answers(inp, S, random.Random(k)) for k, (inp, S) in enumerate(cases)]
    monkeypatch.setattr(solver, "_valid_ends", full_valid_ends)
    monkeypatch.setattr(solver, "_pairs_split", full_pairs)
    full = [answers(inp, S, random.Random(k)) for k, (inp, S) in enumerate(cases)]
    assert fast == full
