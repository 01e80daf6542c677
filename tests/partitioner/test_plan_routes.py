"""The plan's routes (``Plan.routes``): each stage value's producer and consumers, written from
the split that made the stages; the runtime takes them from the plan, checks them against the
stage graphs it is given, and reads them from the stage graphs for a version-3 plan.

The routes the plan records equal those the runtime derives from the stage graphs
(``routing.routes``) for skip connections, interleaved stages, tied weights and several
inputs and outputs; a plan written before routes (a committed version-3 file from the
previous release) loads, re-saves byte-identically and trains like the unpartitioned model;
a plan whose routes or stages disagree is refused when loaded or when the runtime record is
built, naming the value and the stages; two gloo ranks that each load only their own stage
file train like one process.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from partitioner import partition
from partitioner.plan import PLAN_VERSION, PlanError, ValueRoute, load_plan
from partitioner.runtime.errors import PipelineRuntimeError
from partitioner.runtime.launch import spawn
from partitioner.runtime.local import train_step
from partitioner.runtime.routing import Route, from_plan, routes
from partitioner.runtime.spec import PipelineSpec
from tests.fixtures.models import FIXTURES
from tests.runtime.helpers import LR, STEPS, assert_params, data, fresh, reference

OLD_PLAN = Path(__file__).parent / "data" / "plan_v3_unet_pp4.json"  # benchmarks/plan_identity.py's unet.pp4, v3
TIMEOUT_S = 120.0


def _by_name(plan: Any) -> dict[str, ValueRoute]:
    return {r.name: r for r in plan.routes}


def test_the_plan_records_producer_consumers_and_shapes_of_every_stage_value() -> None:
    _, pipe = fresh("unet-skip")
    plan = pipe.plan
    assert plan.version == PLAN_VERSION == 4
    r = _by_name(plan)
    # every name a stage takes or returns has exactly one record
    assert set(r) == {n for st in plan.stages for n in (*st.inputs, *st.outputs)} and len(r) == len(plan.routes)
    assert r["x"] == ValueRoute("x", "input", (0,), False, "tensor", ("B", 3, 16, 16), "float32")
    assert (r["enc1_5"].producer, r["enc1_5"].consumers) == (0, (3,))  # skips stages 1 and 2
    out = plan.stages[-1].outputs[0]
    assert r[out].producer == 3 and r[out].consumers == () and r[out].output
    for b in plan.boundaries:  # shapes and dtypes as the boundaries give them
        for v in b.values:
            assert (r[v.name].kind, r[v.name].shape, r[v.name].dtype) == (v.kind, v.shape, v.dtype)
    again = load_plan(plan.to_json())
    assert again == plan and again.to_json() == plan.to_json()
    assert '"routes"' in plan.to_json()


@pytest.mark.parametrize("layout", ["unet-skip", "unet-2x2", "gpt-2x2", "gpt-4"])
def test_the_plans_routes_are_the_ones_the_stage_graphs_give(layout: str) -> None:
    _, pipe = fresh(layout)
    from_graphs = routes(pipe.plan, pipe.stages)
    assert from_graphs  # something crosses a cut
    assert from_plan(pipe.plan) == from_graphs
    assert list(from_plan(pipe.plan)) == list(from_graphs)  # the same order: both ends pack messages by it
    assert PipelineSpec.build(pipe.plan, list(pipe.stages)).routes == from_graphs


def test_several_inputs_and_outputs_and_an_input_used_late() -> None:
    fx = FIXTURES["multi_io"]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = partition(fx.build(), n_gpus=4, example_inputs=fx.inputs(), example_kwargs=fx.kwargs() or None)
    r = _by_name(pipe.plan)
    inputs = [d["name"] for d in pipe.plan.inputs]
    assert [r[n].producer for n in inputs] == ["input"] * len(inputs)
    assert sum(route.output for route in pipe.plan.routes) == len(pipe.plan.stages[-1].outputs) >= 2
    assert from_plan(pipe.plan) == routes(pipe.plan, pipe.stages)


def test_a_version_3_plan_loads_resaves_unchanged_and_trains_on_routes_from_the_stage_graphs() -> None:
    text = OLD_PLAN.read_text()
    old = load_plan(OLD_PLAN)
    assert old.version == 3 and old.routes == ()
    assert old.to_json() == text  # nothing added on the way through
    model, _ = fresh("unet-4")  # the model the file was planned for (same graph fingerprint)
    pipe = old.apply(model)  # re-applied: the same cuts, now with routes
    assert pipe.plan.version == PLAN_VERSION and pipe.plan.routes
    assert [st.nodes for st in pipe.plan.stages] == [st.nodes for st in old.stages]
    spec = PipelineSpec.build(old, list(pipe.stages))  # the old plan: routes read from the graphs
    assert spec.routes == from_plan(pipe.plan) == routes(old, pipe.stages)
    assert spec.routes["enc1_5"] == Route("enc1_5", 0, (3,))

    x, y, loss_fn = data("unet")
    want_losses, want = reference(model, x, y, loss_fn)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        losses.append(train_step(spec, x, target=y, loss_fn=loss_fn).item())  # the old plan's 1f1b, m=2
        opt.step()
    assert losses == pytest.approx(want_losses, rel=1e-5)
    assert_params(dict(model.named_parameters(remove_duplicate=False)), want)


def _edited(plan: Any, name: str, **change: Any) -> Any:
    routes_ = tuple(dataclasses.replace(r, **change) if r.name == name else r for r in plan.routes)
    return dataclasses.replace(plan, routes=routes_)


def test_stage_modules_that_disagree_with_the_plans_routes_are_refused() -> None:
    _, skip = fresh("unet-skip")
    _, other = fresh("unet-4")  # the same model cut elsewhere: stale stage files for this plan
    assert [st.inputs for st in skip.plan.stages] != [st.inputs for st in other.plan.stages]
    with pytest.raises(PipelineRuntimeError, match=r"stage \d's graph (takes|returns) .*, but the plan says "
                                                   r".*\(first differing value '\w+'\).*different models or splits"):
        PipelineSpec.build(skip.plan, list(other.stages))
    stages = list(skip.stages)
    # a route that sends enc1_5 to stage 2 too (which only passes it along) ...
    extra = _edited(skip.plan, "enc1_5", consumers=(2, 3))
    load_plan(extra.to_json())  # consistent as a plan: stage 2 does receive it
    with pytest.raises(PipelineRuntimeError, match=r"the plan routes 'enc1_5' \(made by stage 0\) to stages "
                                                   r"\[2, 3\], but stage 2's graph does not use it"):
        PipelineSpec.build(extra, stages)
    # ... or none to stage 3, which uses it: stage 3 would be called with None in its slot
    missing = _edited(skip.plan, "enc1_5", consumers=())
    with pytest.raises(PipelineRuntimeError, match=r"routes 'enc1_5' \(made by stage 0\) to stages \[\], but "
                                                   r"stage 3's graph uses it"):
        PipelineSpec.build(missing, {3: stages[3]})  # one rank's own stage is checked too
    with pytest.raises(PipelineRuntimeError, match=r"routes 'x' \(made by the model's inputs\) to stages \[\], "
                                                   r"but stage 0's graph uses it"):
        PipelineSpec.build(_edited(skip.plan, "x", consumers=()), {0: stages[0]})


def _plan_dict() -> dict[str, Any]:
    return json.loads(fresh("unet-skip")[1].plan.to_json())


def _route(d: dict[str, Any], name: str) -> dict[str, Any]:
    return next(r for r in d["routes"] if r["name"] == name)


@pytest.mark.parametrize("edit, path, match", [
    (lambda d: d.__setitem__("version", 3), "$.routes", "a version-3 plan has no routes"),
    (lambda d: d["routes"].pop(1), "$.routes", r"stage values \['enc1_5'\] have no route"),
    (lambda d: d["routes"].append(copy.deepcopy(d["routes"][1])), "$.routes[8].name", "routed twice"),
    (lambda d: _route(d, "enc1_5").__setitem__("producer", 1), "$.routes[1].producer", "stage 1 does not make"),
    (lambda d: _route(d, "enc1_5").__setitem__("producer", 7), "$.routes[1].producer", "not a stage of this plan"),
    (lambda d: _route(d, "enc1_5").__setitem__("consumers", [3, 2]), "$.routes[1].consumers", "ascending"),
    (lambda d: _route(d, "pool").__setitem__("consumers", [2]), "$.routes[2].consumers",
     "stage 2 cannot consume 'pool'"),
    (lambda d: _route(d, "enc1_5").__setitem__("output", True), "$.routes[1].output", "among the last"),
    (lambda d: _route(d, "enc1_5").__setitem__("dtype", "float16"), "$.routes[1]", "in boundary 0"),
    (lambda d: _route(d, "enc1_5").__setitem__("producer", "stage0"), "$.routes[1].producer", ""),
    (lambda d: _route(d, "enc1_5").__setitem__("name", "nope"), "$.routes[1].name", "in no stage's inputs"),
])
def test_load_refuses_routes_that_disagree_with_the_stages(edit: Any, path: str, match: str) -> None:
    d = _plan_dict()
    edit(d)
    with pytest.raises(PlanError, match=match) as info:
        load_plan(d)
    assert info.value.path == path


def _rank_with_its_own_stage_file(rank: int, world: int, plan_path: str, stage_dir: str, x: torch.Tensor,
                                  y: torch.Tensor) -> tuple[Any, ...]:
    from partitioner.runtime.stage import build_stage

    plan = load_plan(plan_path)
    mine = {s: torch.load(f"{stage_dir}/stage{s}.pt", weights_only=False)
            for s in range(plan.n_stages) if plan.stages[s].rank == rank}
    spec = PipelineSpec.build(plan, mine)  # routes from the plan: no other rank's stage needed
    stage = build_stage(spec, rank, "cpu")
    params = stage.parameters()
    opt = torch.optim.SGD(params, lr=LR)
    runner = stage.runner(loss_fn=F.mse_loss, batch_size=len(y))
    losses = []
    for _ in range(STEPS):
        for p in params:
            p.grad = None
        loss = runner.step(x if rank == 0 else None, target=y)
        losses.append(None if loss is None else loss.item())
        opt.step()
    return sorted(mine), losses, {n: p.detach() for n, p in stage.named_parameters()}


def test_gloo_ranks_that_load_only_their_own_stage_files_train_like_one_process(tmp_path: Path) -> None:
    model, pipe = fresh("unet-skip")  # 4 stages on 4 ranks; enc1_5 goes from rank 0 straight to rank 3
    x, y, loss_fn = data("unet")
    want_losses, want = reference(model, x, y, loss_fn)
    pipe.plan.save(tmp_path / "plan.json")
    for s, stage in enumerate(pipe.stages):
        torch.save(copy.deepcopy(stage), tmp_path / f"stage{s}.pt")
    results = spawn(_rank_with_its_own_stage_file, 4, str(tmp_path / "plan.json"), str(tmp_path), x, y,
                    timeout_s=TIMEOUT_S)
    got: dict[str, torch.Tensor] = {}
    for rank, (held, _, params) in enumerate(results):
        assert held == [rank]
        got.update(params)
    assert results[-1][1] == pytest.approx(want_losses, rel=1e-5)
    assert_params(got, want)
    assert set(got) == {n for n, _ in model.named_parameters()}


def test_plan_identity_leaves_out_routes_and_version_only(tmp_path: Path) -> None:
    from tests.partitioner.test_plan_identity import _plan_identity

    pi = _plan_identity()
    new = json.loads(fresh("unet-skip")[1].plan.to_json())
    old = copy.deepcopy({k: v for k, v in new.items() if k != "routes"} | {"version": 3})
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()

    def write(folder: str, data: dict[str, Any]) -> None:
        (tmp_path / folder / "unet.json").write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")

    write("a", old)
    write("b", new)
    assert pi.compare(str(tmp_path / "a"), str(tmp_path / "b")) == []  # a baseline from before routes still holds
    new["stages"][0]["rank"] = 1
    write("b", new)
    assert pi.compare(str(tmp_path / "a"), str(tmp_path / "b")) == ["unet: differs at $.stages[0].rank"]
    # a file not in Plan.to_json's exact form is compared as it is: a difference in bytes still shows
    (tmp_path / "b" / "unet.json").write_text(json.dumps(old, indent=2, sort_keys=True) + "\n")
    (diff,) = pi.compare(str(tmp_path / "a"), str(tmp_path / "b"))
    assert diff.startswith("unet: differs at")


def test_show_names_the_values_that_skip_stages(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from partitioner.tools.cli import main

    fresh("unet-skip")[1].plan.save(tmp_path / "plan.json")
    assert main(["show", str(tmp_path / "plan.json")]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("route ")]
    assert lines == ["route enc1_5: stage 0 -> stage 3, straight past the stages between"]
    assert main(["show", str(OLD_PLAN)]) == 0  # a version-3 plan: no routes to print
    assert "route " not in capsys.readouterr().out
