"""Transparency: the stages together compute what the model computes, gradients included."""

from __future__ import annotations

import copy
import json
import time
from typing import Any

import pytest
import torch
from torch.utils import _pytree as pytree

from partitioner import PartitionError, Plan, PlanError, load_plan, partition
from tests.fixtures.models import FIXTURES, big_llama_on_meta

ROUTES = ["fx", "export"]


def _loss(out: Any) -> torch.Tensor:
    leaves = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return sum((t.float().pow(2).mean() for t in leaves), torch.zeros(()))


def _example(name: str) -> tuple[torch.nn.Module, tuple[Any, ...], dict[str, Any]]:
    f = FIXTURES[name]
    return f.build(), f.inputs(), f.kwargs()


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_outputs_and_gradients_match_the_model(name: str, route: str) -> None:
    model, args, kwargs = _example(name)
    ref = copy.deepcopy(model)
    pipe = partition(model, n_gpus=4, example_inputs=args or kwargs, capture_route=route,
                     device="cpu", link="loopback")
    assert pipe.plan.capture == route
    assert len(pipe.stages) == 4
    assert all(len(s.nodes) > 0 for s in pipe.plan.stages)

    out = pipe(*args, **kwargs)
    expected = ref(*args, **kwargs)
    torch.testing.assert_close(out, expected)  # float32 defaults: rtol 1.3e-6, atol 1e-5

    _loss(out).backward()
    _loss(expected).backward()
    seen = 0
    for stage in pipe.stages:
        for fqn, p in stage.named_parameters(remove_duplicate=False):
            torch.testing.assert_close(p.grad, ref.get_parameter(fqn).grad, msg=lambda m: f"{name}.{fqn}: {m}")
            seen += 1
    assert seen >= len(list(ref.parameters()))
    # state_dict keys keep their fully qualified names: a checkpoint loads into stages
    keys = set(ref.state_dict())
    for stage in pipe.stages:
        assert set(stage.state_dict()) <= keys


def test_stage_loads_model_checkpoint() -> None:
    model, args, _ = _example("gpt")
    pipe = partition(model, n_gpus=2, example_inputs=args, device="cpu")
    other = FIXTURES["gpt"].build()  # different random weights
    ckpt = other.state_dict()
    for stage in pipe.stages:
        stage.load_state_dict({k: ckpt[k] for k in stage.state_dict()})
    torch.testing.assert_close(pipe(*args), other(*args))


def test_tied_embeddings_are_reported_and_shared() -> None:
    model, args, _ = _example("gpt")
    pipe = partition(model, n_gpus=4, example_inputs=args, device="cpu")
    tied = [set(g) for g in pipe.plan.tied_parameters]
    assert {"transformer.wte.weight", "lm_head.weight"} in tied
    first = pipe.stages[0].get_parameter("transformer.wte.weight")
    last = pipe.stages[-1].get_parameter("lm_head.weight")
    assert first is last


def test_skip_connections_are_passed_along() -> None:
    model, args, _ = _example("unet")
    pipe = partition(model, n_gpus=4, example_inputs=args, device="cpu")
    # the encoder's first block output reaches the last decoder: it crosses every later cut
    crossing = [{v.name for v in b.values} for b in pipe.plan.boundaries]
    assert any(len(c) > 1 for c in crossing), crossing
    for i, st in enumerate(pipe.plan.stages[1:], start=1):
        assert st.inputs == pipe.plan.stages[i - 1].outputs


def test_plan_json_round_trips_and_is_deterministic() -> None:
    model, args, _ = _example("gpt")
    a = partition(model, n_gpus=4, example_inputs=args, device="cpu").plan
    b = partition(copy.deepcopy(model), n_gpus=4, example_inputs=args, device="cpu").plan
    assert a.to_json() == b.to_json()
    again = load_plan(a.to_json())
    assert again == a
    assert again.to_json() == a.to_json()


def test_apply_rebuilds_the_same_stages_without_solving() -> None:
    model, args, _ = _example("resnet")
    pipe = partition(model, n_gpus=3, example_inputs=args, device="cpu")
    text = pipe.plan.to_json()
    pipe2 = load_plan(text).apply(model)
    assert [s.nodes for s in pipe2.plan.stages] == [s.nodes for s in pipe.plan.stages]
    torch.testing.assert_close(pipe2(*args), pipe(*args))


def test_apply_to_a_different_model_is_refused() -> None:
    model, args, _ = _example("mlp")
    plan = partition(model, n_gpus=2, example_inputs=args, device="cpu").plan
    with pytest.raises(PlanError, match="different model"):
        plan.apply(FIXTURES["cnn"].build())


def test_plan_restricted_to_block_boundaries() -> None:
    model, args, _ = _example("gpt")
    pipe = partition(model, n_gpus=4, example_inputs=args, device="cpu", cut_at="transformer.h.*")
    for label in pipe.plan.cuts:
        left, right = label.split(" | ")
        assert left != right
        assert left.startswith("transformer.h.") or right.startswith("transformer.h.")
    torch.testing.assert_close(pipe(*args), model(*args))


def test_pinned_cuts_are_used() -> None:
    model, args, _ = _example("llama")
    pipe = partition(model, n_gpus=2, example_inputs=args, device="cpu", pinned_cuts=["layers.1"])
    assert pipe.plan.stages[1].modules[0].startswith("layers.1")


def test_no_example_inputs_balances_parameters_with_a_warning() -> None:
    model, args, _ = _example("mlp")
    with pytest.warns(UserWarning, match="parameter bytes only"):
        pipe = partition(model, n_gpus=2)
    torch.testing.assert_close(pipe(*args), model(*args))
    sizes = [st.cost.param_bytes for st in pipe.plan.stages]
    assert max(sizes) < sum(sizes)  # both stages own weights


def test_cost_at_reprices_without_retracing() -> None:
    model, args, _ = _example("gpt")
    plan = partition(model, n_gpus=2, example_inputs=args, device="cpu").plan
    one, two = plan.cost_at(batch=1), plan.cost_at(batch=2)
    for a, b in zip(one, two):
        assert b["fwd_flops"] == 2 * a["fwd_flops"] > 0
        assert b["param_bytes"] == a["param_bytes"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_gpus": 0}, "n_gpus must be an int >= 1"),
        ({"n_gpus": 500}, "stages"),
        ({"n_gpus": 2, "schedule": "zigzag"}, "unknown schedule"),
        ({"n_gpus": 2, "n_microbatches": 3}, "does not split into 3 micro-batches"),
        ({"n_gpus": 2, "device": "tpu-v9"}, "tpu-v9"),
        ({"n_gpus": 2, "memory_limit": 1000}, "needs"),
    ],
)
def test_bad_requests_get_clear_errors(kwargs: dict[str, Any], match: str) -> None:
    model, args, _ = _example("mlp")
    with pytest.raises(PartitionError, match=match):
        partition(model, example_inputs=args, **kwargs)


def test_uncapturable_model_names_module_and_fix() -> None:
    class Branchy(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum().item() > 0:  # data-dependent Python control flow
                return x * 2
            return x.nonzero().float()

    with pytest.raises(PartitionError, match="Branchy.*leaf"):
        partition(Branchy(), n_gpus=2, example_inputs=(torch.randn(4, 3),))


def test_meta_device_llama_7b_plans_in_seconds() -> None:
    model, args = big_llama_on_meta()
    start = time.perf_counter()
    pipe = partition(model, n_gpus=8, example_inputs=args, cut_at="layers.*")
    elapsed = time.perf_counter() - start
    assert elapsed < 60, elapsed  # the whole test took 15.7 s on the shared 2-core machine (Nov 2026); the bound is generous
    assert all(p.device.type == "meta" for p in model.parameters())
    plan = pipe.plan
    total = sum(s.cost.param_bytes for s in plan.stages)
    assert total > 6.5e9 * 4
    assert len(plan.cuts) == 7 and all("layers." in c for c in plan.cuts)
    Plan.from_dict(json.loads(plan.to_json()))


def test_apply_works_for_the_export_route_with_keyword_inputs() -> None:
    model, args, kwargs = _example("multi_io")
    pipe = partition(model, n_gpus=2, example_inputs=kwargs, capture_route="export", device="cpu")
    pipe2 = load_plan(pipe.plan.to_json()).apply(model)
    assert pipe2.plan.capture == "export"
    assert [s.nodes for s in pipe2.plan.stages] == [s.nodes for s in pipe.plan.stages]
    torch.testing.assert_close(pipe2(**kwargs), model(**kwargs))
