"""Issue 9 item 9 and issue 11 item 2 through ``partition()``: Hugging Face and fixture models on
the default H100 profile. (The solver-level cases are in test_objective.py.)"""

from __future__ import annotations

import warnings

import pytest
import torch

from partitioner import partition
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
    plan = partition(fx.build(), n_gpus=4, example_inputs=fx.inputs()).plan
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
    base = partition(model, n_gpus=4, example_inputs=fx.inputs()).plan
    step = partition(model, n_gpus=4, example_inputs=fx.inputs(), objective="step").plan
    assert base.options["objective"] == "bottleneck" and step.options["objective"] == "step"
    assert step.prediction.step_time_s <= base.prediction.step_time_s * (1 + 1e-9)
    assert any(n.startswith("objective step:") for n in step.notes)
    j = step.to_json()
    assert load_plan(j).apply(model).plan.to_json() == j
    assert partition(model, n_gpus=4, example_inputs=fx.inputs(), objective="step").plan.to_json() == j


def test_unknown_objective_is_refused() -> None:
    fx = FIXTURES["mlp"]
    with pytest.raises(ValueError, match="unknown objective 'fastest'.*bottleneck, step"):
        partition(fx.build(), n_gpus=2, example_inputs=fx.inputs(), objective="fastest")
