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
