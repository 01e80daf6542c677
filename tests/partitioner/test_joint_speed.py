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
