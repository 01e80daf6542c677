"""``zero="auto"``: the ZeRO level chosen with the replicas, tensor parallelism, schedule and
micro-batches (``partitioner.layout.joint``): the level that fits when memory is tight, the
cheapest communication when it is not, every candidate's level in the ranking, the bounds
that prune the search, and ``--zero auto`` on the CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from partitioner import PartitionError, partition
from partitioner.examples import gpt_example
from partitioner.solver import InfeasibleError
from tests.tools.helpers import cli

# four replicas of a 2-stage pipeline; AdamW in fp32: 16 bytes per parameter before ZeRO
COMMON = dict(n_gpus=8, data_parallel=4, schedule="1f1b", n_microbatches=2, optimizer="adamw", recompute="none")


@pytest.fixture(scope="module")
def gpt() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model, (idx,) = gpt_example(batch=8, seq=8)  # short: the parameters' bytes dominate
    return model, idx


def _peak(plan) -> int:  # type: ignore[no-untyped-def]
    return max(st.cost.memory_bytes for st in plan.stages)


def _levels(plan) -> dict[int, dict]:  # type: ignore[no-untyped-def]
    """The layout ranking's solved rows by ZeRO level (the label names it)."""
    out = {}
    for row in plan.rankings["layout"]:
        if row["refused"] is None:
            out.setdefault(int(re.search(r"zero=(\d)", row["label"]).group(1)), row)
    return out


def test_zero_auto_picks_fsdp_when_only_sharded_weights_and_optimizer_state_fit(gpt) -> None:  # type: ignore[no-untyped-def]
    model, idx = gpt
    peaks = {z: _peak(partition(model, example_inputs=(idx,), zero=z, **COMMON).plan) for z in (1, 3)}
    assert peaks[3] < peaks[1], peaks  # the fixture shards as ZeRO says it should
    limit = (peaks[3] + peaks[1]) // 2
    with pytest.raises(InfeasibleError):  # ZeRO-1 fits under no cuts, so neither does zero=0 (it holds more)
        partition(model, example_inputs=(idx,), zero=1, memory_limit=limit, **COMMON)
    plan = partition(model, example_inputs=(idx,), zero="auto", memory_limit=limit, **COMMON).plan
    assert plan.options["zero"] == 3 and plan.mesh.zero == 3 and _peak(plan) <= limit
    rows = plan.rankings["layout"]
    assert rows[0]["picked"] and "zero=3" in rows[0]["label"]
    refused = {int(re.search(r"zero=(\d)", r["label"]).group(1)) for r in rows if r["refused"] is not None}
    assert refused == {0, 1}, rows  # named in the ranking, with why


def test_zero_auto_keeps_zero0_when_memory_is_ample_and_sharding_costs_time(gpt) -> None:  # type: ignore[no-untyped-def]
    model, idx = gpt
    # the replicas share a slow link (100 Gb/s Ethernet) and run two micro-batches: FSDP's two
    # gathers and one reduce-scatter per micro-batch, and ZeRO-1's gather, cost more than the
    # one all-reduce (on NVLink, or with one micro-batch, FSDP's overlap wins: see RESULTS.md)
    kw = dict(COMMON, link="ethernet-100g")
    fixed = {z: partition(model, example_inputs=(idx,), zero=z, **kw).plan for z in (0, 1, 3)}
    plan = partition(model, example_inputs=(idx,), zero="auto", **kw).plan
    levels = _levels(plan)
    assert set(levels) == {0, 1, 3}  # every level solved and labelled
    for z, row in levels.items():  # each candidate's step is the plan that level gives by itself
        assert row["step_s"] == pytest.approx(fixed[z].prediction.step_time_s, rel=1e-9)
    assert min(levels, key=lambda z: levels[z]["step_s"]) == 0
    assert plan.options["zero"] == 0 and plan.prediction.step_time_s == fixed[0].prediction.step_time_s
    assert [st.nodes for st in plan.stages] == [st.nodes for st in fixed[0].stages]


def test_joint_search_ranks_every_open_choice_and_its_bounds_hold(gpt) -> None:  # type: ignore[no-untyped-def]
    model, idx = gpt
    plan = partition(model, n_gpus=4, example_inputs=(idx,), data_parallel="auto", schedule="auto",
                     n_microbatches="auto", zero="auto", optimizer="adamw").plan
    rows = plan.rankings["layout"]
    solved = [r for r in rows if r["refused"] is None]
    assert solved[0]["picked"] and solved[0]["step_s"] == plan.prediction.step_time_s
    assert [r["step_s"] for r in solved] == sorted(r["step_s"] for r in solved)
    assert {re.search(r"D=(\d)", r["label"]).group(1) for r in solved} >= {"1", "2"}
    assert all(re.search(r"zero=\d", r["label"]) for r in rows)
    for r in solved:  # a solved candidate is never faster than the floor it was ranked by
        bound = float(re.search(r"bound ([0-9.e+-]+) ms", r["text"]).group(1)) / 1e3
        assert bound <= r["step_s"] * (1 + 1e-3), r["text"]
    pruned = [r for r in rows if r["refused"] is not None and r["refused"].startswith("pruned")]
    assert pruned, "the bound prunes nothing on this search: the test would not see a wrong bound"
    for r in pruned:  # pruned only when no faster than the best found
        assert float(re.search(r"bound ([0-9.e+-]+) ms", r["refused"]).group(1)) / 1e3 >= \
            plan.prediction.step_time_s * (1 - 1e-3)
    assert any(r["text"].startswith("T=1 D=1 P=4 zero=0") for r in rows)  # one replica: zero=0 only
    assert not any(r["label"].startswith(("T=1 D=1 P=4 zero=1", "T=1 D=1 P=4 zero=3")) for r in rows)


def test_zero_auto_refuses_unsolved_what_cannot_fit_and_checks_its_value(gpt) -> None:  # type: ignore[no-untyped-def]
    model, idx = gpt
    with pytest.raises(InfeasibleError, match="need at least .* on a rank, the device holds"):
        partition(model, example_inputs=(idx,), zero="auto", memory_limit=10_000, **COMMON)
    with pytest.raises(PartitionError, match="'auto'"):
        partition(model, example_inputs=(idx,), zero="fsdp", n_gpus=4, data_parallel=2)


def test_cli_zero_auto_prints_the_ranking_with_each_level(tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    done = cli("plan", "partitioner.examples:gpt_example", "--gpus", "4", "--dp", "2", "--zero", "auto",
               "--microbatches", "2", "--optimizer", "adamw", "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert "layout (T, D, P, ZeRO, schedule, micro-batches): picked T=1 D=2 P=2 zero=" in done.stdout
    ranked = [line.split()[4] for line in done.stdout.splitlines() if re.match(r"\s+#\d+ T=", line)]
    assert sorted(set(ranked)) == ["zero=0", "zero=1", "zero=3"], done.stdout
    picked = done.stdout.split("picked T=1 D=2 P=2 zero=")[1][0]
    assert json.loads(out.read_text())["mesh"]["zero"] == int(picked)
    bad = cli("plan", "partitioner.examples:gpt_example", "--gpus", "4", "--zero", "2", "-o", str(tmp_path / "b.json"))
    assert bad.returncode == 2 and "--zero" in bad.stderr and "auto" in bad.stderr


def test_automatic_choices_skip_zero1_with_tensor_parallelism_and_replicas() -> None:
    """The runtime refuses ZeRO-1 with TP and replicas, so no automatic choice may return it:
    with zero=1 and tensor_parallel="auto" at two replicas the TP degrees are refused (T=1
    wins), and zero="auto" never solves zero=1 at T > 1 with D > 1 (it lists it refused)."""
    from partitioner.layout import ZERO1_TP
    from tests.runtime.test_tensor_parallel import Net, _data

    inputs, _ = _data("net")
    pipe = partition(Net(), 4, inputs, device="cpu", link="loopback", data_parallel=2, zero=1,
                     tensor_parallel="auto")
    assert pipe.plan.mesh.tp == 1
    assert any(r["refused"] and ZERO1_TP in r["text"] for r in pipe.plan.rankings["tp"])
    pipe = partition(Net(), 4, inputs, device="cpu", link="loopback", data_parallel="auto", zero="auto",
                     tensor_parallel="auto")
    rows = pipe.plan.rankings["layout"]
    solved = [r["label"] for r in rows if not r["refused"]]
    assert solved and not [lb for lb in solved if re.search(r"T=[2-9].*D=[2-9].*zero=1", lb)]
    assert any(r["refused"] and ZERO1_TP in r["text"] for r in rows)
    assert not (pipe.plan.mesh.tp > 1 and pipe.plan.mesh.dp > 1 and pipe.plan.mesh.zero == 1)
