"""The FSDP mode of ``zero=3`` as the planner chooses and records it: ``fsdp_reshard="auto"``
keeps the per-step mode where it fits and is faster, per unit where only that fits; the
plan's ``mesh.fsdp`` round-trips through JSON and re-applying, is left out at the schedule's
default, and is refused where it cannot run."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from partitioner import PartitionError, partition
from partitioner.cost_models.devices import LinkSpec
from partitioner.examples import gpt_example
from partitioner.plan import PlanError, load_plan

# a slow link between the replicas, so per-micro-batch gathers are exposed (on NVLink both
# modes hide under the compute and tie; a tie keeps "unit")
SLOW = LinkSpec(name="slow", bandwidth=1e9, latency=2.5e-05, p2p=0.8, collective=0.75, half_bytes=1048576.0)
COMMON = dict(n_gpus=4, data_parallel=2, schedule="1f1b", n_microbatches=4, optimizer="adamw", recompute="none",
              zero=3, link=SLOW)


@pytest.fixture(scope="module")
def gpt() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model, (idx,) = gpt_example(batch=8, seq=8)
    return model, idx


@pytest.fixture(scope="module")
def forced(gpt):  # type: ignore[no-untyped-def]
    model, idx = gpt
    return {how: partition(model, example_inputs=(idx,), fsdp_reshard=how, **COMMON).plan for how in ("unit", "step")}


def _peak(plan) -> int:  # type: ignore[no-untyped-def]
    return max(st.cost.memory_bytes for st in plan.stages)


def test_each_mode_is_priced_as_it_runs(forced) -> None:  # type: ignore[no-untyped-def]
    unit, step = forced["unit"], forced["step"]
    assert unit.mesh.fsdp == "" and step.mesh.fsdp == "step"
    assert "fsdp" not in unit.to_dict()["mesh"] and step.to_dict()["mesh"]["fsdp"] == "step"
    # per step: 1 gather + 1 reduce-scatter per unit instead of m x (2 + 1) (m=4: 2 collectives vs 12)...
    assert sum(step.mesh.allreduce_s) < sum(unit.mesh.allreduce_s) / 4
    # ...but the stage holds its whole gathered weights and gradients
    assert _peak(step) > _peak(unit)
    assert step.prediction.step_time_s < unit.prediction.step_time_s


def test_auto_picks_step_when_it_fits_and_is_faster(gpt, forced) -> None:  # type: ignore[no-untyped-def]
    model, idx = gpt
    plan = partition(model, example_inputs=(idx,), fsdp_reshard="auto", **COMMON).plan
    assert plan.mesh.fsdp == "step"
    assert plan.prediction.step_time_s == pytest.approx(forced["step"].prediction.step_time_s)
    rows = plan.rankings["fsdp"]
    assert [(r["label"], r["picked"]) for r in rows] == [("step", True), ("unit", False)]
    assert rows[1]["step_s"] == pytest.approx(forced["unit"].prediction.step_time_s)
    assert any(n.startswith("fsdp: picked step") for n in plan.notes)


def test_auto_keeps_unit_when_only_unit_fits(gpt, forced) -> None:  # type: ignore[no-untyped-def]
    model, idx = gpt
    limit = (_peak(forced["unit"]) + _peak(forced["step"])) // 2
    with pytest.raises(PartitionError):  # the cap really excludes the per-step mode
        partition(model, example_inputs=(idx,), fsdp_reshard="step", memory_limit=limit, **COMMON)
    plan = partition(model, example_inputs=(idx,), fsdp_reshard="auto", memory_limit=limit, **COMMON).plan
    assert plan.mesh.fsdp == "" and _peak(plan) <= limit
    rows = plan.rankings["fsdp"]
    assert rows[0]["label"] == "unit" and rows[0]["picked"]
    assert rows[1]["label"] == "step" and rows[1]["refused"].startswith("does not fit")


def test_the_default_is_the_schedules_mode_and_records_nothing(gpt, forced) -> None:  # type: ignore[no-untyped-def]
    model, idx = gpt
    plan = partition(model, example_inputs=(idx,), **COMMON).plan
    assert plan.to_json() == forced["unit"].to_json()
    assert "fsdp" not in plan.rankings and "fsdp_reshard" not in plan.options


def test_mesh_fsdp_round_trips_and_reapplies(gpt, forced) -> None:  # type: ignore[no-untyped-def]
    model, idx = gpt
    step = forced["step"]
    loaded = load_plan(json.loads(step.to_json()))
    assert loaded == step and loaded.mesh.fsdp == "step"
    again = loaded.apply(model).plan  # re-priced in the mode the plan records
    assert again.mesh == step.mesh


def test_refusals(gpt, forced) -> None:  # type: ignore[no-untyped-def]
    model, idx = gpt
    with pytest.raises(PartitionError, match="fsdp_reshard must be"):
        partition(model, example_inputs=(idx,), fsdp_reshard="always", **COMMON)
    with pytest.raises(PartitionError, match="cannot run schedule 'zb-h1'"):
        partition(model, example_inputs=(idx,), fsdp_reshard="unit", **{**COMMON, "schedule": "zb-h1"})
    data = forced["step"].to_dict()
    data["mesh"]["fsdp"] = "sometimes"
    with pytest.raises(PlanError):
        load_plan(data)
    zb = partition(model, example_inputs=(idx,), **{**COMMON, "schedule": "zb-h1"}).plan
    assert "fsdp" not in zb.to_dict()["mesh"]  # a split backward is "step" by default: nothing recorded
    bad = dataclasses.replace(zb, mesh=dataclasses.replace(zb.mesh, fsdp="unit"))
    with pytest.raises(PlanError, match="splits the backward"):
        load_plan(json.loads(bad.to_json()))
    no_zero = dataclasses.replace(forced["step"], mesh=dataclasses.replace(forced["step"].mesh, zero=0))
    with pytest.raises(PlanError, match="only for zero=3"):
        load_plan(json.loads(no_zero.to_json()))
