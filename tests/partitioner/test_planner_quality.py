"""Issue 9 item 9 and issue 11 item 2 through ``partition()``: Hugging Face and fixture models on
the default H100 profile. (The solver-level cases are in test_objective.py.)"""

from __future__ import annotations

import warnings
from dataclasses import replace

import pytest
import torch

from partitioner import partition
from partitioner.cost_models.devices import DEVICES
from partitioner.plan import load_plan
from tests.fixtures.models import FIXTURES
from tests.hf.zoo import ZOO


@pytest.mark.parametrize("name", ["distilbert", "vit", "resnet"])
def test_no_stage_without_flops_on_zoo_models(name: str) -> None:
    # Before: stage 0 was one sym_size_int node (distilbert, vit) or flatten alone (resnet at 4).
    case = ZOO[name]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = partition(case.build(), n_gpus=4, example_inputs=case.inputs())
    for st in pipe.plan.stages:
        assert st.cost.fwd_flops not in ("0", "0.0"), (st.index, st.nodes)
    assert not any(n.startswith("sym_size") for st in pipe.plan.stages for n in st.nodes[:1]
                   if len(st.nodes) == 1)


def test_fewer_stages_note_and_cli_text_on_a_small_model() -> None:
    fx = FIXTURES["gpt"]
    torch.manual_seed(0)
    # the datasheet roofline (no kernel launch floors): there this small model runs fastest on
    # one GPU (on h100-sxm's efficiency model its 4 stages are predicted fastest: no note)
    roofline = replace(DEVICES["h100-sxm"], efficiency=None)
    plan = partition(fx.build(), n_gpus=4, example_inputs=fx.inputs(), device=roofline).plan
    note = [n for n in plan.notes if n.startswith("fewer stages would be predicted faster")]
    assert len(note) == 1
    assert "1 GPU " in note[0] and "2 GPUs " in note[0] and "3 GPUs " in note[0] and "4 GPUs " in note[0]


def test_no_fewer_stages_note_when_more_stages_are_faster() -> None:
    from partitioner.examples import gpt_example

    model, (idx,) = gpt_example(batch=32, seq=64, n_layer=8, n_embd=256, n_head=8, vocab_size=4096, block_size=64)
    plan = partition(model, n_gpus=2, example_inputs=(idx,), n_microbatches=8).plan
    assert not any(n.startswith("fewer stages") for n in plan.notes), plan.notes


def test_step_objective_is_recorded_round_trips_and_is_never_slower() -> None:
    fx = FIXTURES["llama"]
    torch.manual_seed(0)
    model = fx.build()
    base = partition(model, n_gpus=4, example_inputs=fx.inputs(), objective="bottleneck").plan
    step = partition(model, n_gpus=4, example_inputs=fx.inputs(), objective="step").plan
    assert base.options["objective"] == "bottleneck" and step.options["objective"] == "step"
    assert step.prediction.step_time_s <= base.prediction.step_time_s * (1 + 1e-9)
    assert any(n.startswith("objective step:") for n in step.notes)
    j = step.to_json()
    assert load_plan(j).apply(model).plan.to_json() == j
    assert partition(model, n_gpus=4, example_inputs=fx.inputs(), objective="step").plan.to_json() == j


def test_unknown_objective_is_refused() -> None:
    fx = FIXTURES["mlp"]
    with pytest.raises(ValueError, match="unknown objective 'fastest'.*auto, bottleneck, step"):
        partition(fx.build(), n_gpus=2, example_inputs=fx.inputs(), objective="fastest")


def test_auto_objective_searches_the_step_only_where_the_bottleneck_is_a_poor_proxy() -> None:
    """objective="auto" (the default): the step-aware search for several stages per rank
    (interleaved-1f1b, zbv) and split backward (zb-h1), where it gives a faster predicted step
    than the bottleneck cuts; the bottleneck cuts for 1f1b and gpipe (no search)."""
    from partitioner.examples import gpt_example

    model, (idx,) = gpt_example(batch=16, seq=64, n_layer=12, n_embd=256, n_head=4, vocab_size=8192, block_size=64)
    kw = dict(n_gpus=4, example_inputs=(idx,), n_microbatches=8)
    inter = dict(schedule="interleaved-1f1b", virtual_stages=2)
    auto = partition(model, **kw, **inter).plan
    bottleneck = partition(model, **kw, **inter, objective="bottleneck").plan
    assert auto.options["objective"] == "auto"
    assert [s.nodes for s in auto.stages] != [s.nodes for s in bottleneck.stages]
    assert auto.prediction.step_time_s < bottleneck.prediction.step_time_s * 0.99  # 8.0 % on this model
    assert any(n.startswith("objective step (auto: interleaved-1f1b, 2 stages per rank)") for n in auto.notes)
    j = auto.to_json()
    assert load_plan(j).apply(model).plan.to_json() == j
    a = partition(model, **kw, schedule="1f1b").plan
    b = partition(model, **kw, schedule="1f1b", objective="bottleneck").plan
    assert [s.nodes for s in a.stages] == [s.nodes for s in b.stages]
    assert not any(n.startswith("objective") for n in a.notes)
    zb = partition(model, **kw, schedule="zb-h1").plan
    assert any(n.startswith("objective step (auto: zb-h1, split backward)") for n in zb.notes)
    gp = partition(model, **kw, schedule="gpipe").plan
    assert any(n.startswith("objective step (auto: gpipe, forward and backward phases)") for n in gp.notes)


def test_auto_objective_keeps_the_bottleneck_for_a_pipeline_too_large_to_search() -> None:
    """The step search's budget is 20,000 simulated compute actions, at least 20 simulations:
    gpipe over 64 stages x 8 micro-batches (1,024 compute actions) keeps the bottleneck cuts."""
    from partitioner.objective import resolve_objective
    from partitioner.schedule import build_schedule

    assert resolve_objective("auto", build_schedule("gpipe", 64, 8, 64))[0] == "bottleneck"
    used, budget, _ = resolve_objective("auto", build_schedule("gpipe", 8, 8, 8))
    assert (used, budget) == ("step", 156)  # 20,000 // 128 compute actions
    assert resolve_objective("auto", build_schedule("1f1b", 4, 8, 4))[0] == "bottleneck"
    assert resolve_objective("bottleneck", build_schedule("zbv", 2, 8, 4))[0] == "bottleneck"
