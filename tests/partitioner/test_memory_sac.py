"""Op-level selective checkpointing ("selective-op", torchtitan's policy) and the selective
region around a grouped-query K/V repeat: same outputs and gradients as the model, and the
bytes each stage keeps (saved-tensor hooks, checkpoint inputs and the outputs the policy
keeps) equal to what the plan prices."""

from __future__ import annotations

import pytest
import torch

from partitioner import load_plan, partition, poly
from partitioner.memory import measure_saved
from partitioner.passes.recompute import RecomputeStage, sac_policy

pytest.importorskip("transformers")

B, S = 4, 32


def _llama(layers: int = 2):
    from tests.hf.models import CASES

    torch.manual_seed(0)
    case = CASES["llama"]  # 4 heads, 2 K/V heads: grouped-query attention
    return case.build(layers), case.inputs(B, S)


MODES = ("none", "selective", "selective-op", "full")


@pytest.fixture(scope="module")
def runs() -> dict[str, tuple]:
    """Per mode: (pipe, measured bytes per stage, predicted bytes per stage) of the 2-layer
    Llama on two stages cut at layer 1 (one capture per mode, shared by the tests); and
    "model": (the model, its inputs)."""
    model, kwargs = _llama()
    params = list(model.parameters())
    out = {}
    for mode in MODES:
        pipe = partition(model, n_gpus=2, example_inputs=kwargs, recompute=mode, device="cpu", n_microbatches=1,
                         pinned_cuts=["model.layers.1"])
        values = pipe.flatten_inputs((), kwargs)
        measured, predicted = [], []
        for i, stage in enumerate(pipe.stages):
            if i:
                grads = [v.requires_grad for v in pipe.plan.boundaries[i - 1].values]
                values = [v.detach().requires_grad_(g) if isinstance(v, torch.Tensor) else v
                          for v, g in zip(values, grads)]
            got, res = measure_saved(lambda: stage(*values), exclude=params)
            measured.append(got)
            predicted.append(poly.evaluate(poly.from_text(pipe.plan.stages[i].cost.saved_bytes), B, S))
            values = list(res) if isinstance(res, (tuple, list)) else [res]
        out[mode] = (pipe, measured, predicted)
    out["model"] = (model, kwargs)
    return out


def test_selective_op_gives_the_models_outputs_and_gradients(runs) -> None:
    model, kwargs = runs["model"]
    pipe = runs["selective-op"][0]
    assert [st.recompute for st in pipe.plan.stages] == ["selective-op"] * 2
    assert all(isinstance(s, RecomputeStage) and s.recompute_mode == "selective-op" and s.regions()
               for s in pipe.stages)

    def grads(run):
        model.zero_grad(set_to_none=True)
        out = run().logits
        out.float().pow(2).mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    want_out, want = grads(lambda: model(**kwargs))
    got_out, got = grads(lambda: pipe(**kwargs))  # the stages hold the model's own parameters
    torch.testing.assert_close(got_out, want_out, rtol=1e-5, atol=1e-6)
    assert got.keys() == want.keys()
    for name in want:  # the recomputation re-runs the same float ops: equal up to reduction order
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_selective_op_keeps_what_the_plan_prices_between_full_and_none(runs) -> None:
    """Measured per stage against the plan (the memory tests' 10 %; it is exact here), and the
    ordering the policy implies: fewer bytes than no recompute, more than full recompute."""
    for mode in ("none", "selective-op", "full"):
        _, measured, predicted = runs[mode]
        for i, (m, p) in enumerate(zip(measured, predicted)):
            assert p == pytest.approx(m, rel=0.10), (mode, i, m, p)
    kept = {mode: runs[mode][1] for mode in MODES}
    for i in range(2):
        assert kept["full"][i] < kept["selective-op"][i] < 0.6 * kept["none"][i], (i, kept)


def test_selective_op_pays_only_the_recomputed_nodes_forward_again(runs) -> None:
    bwd = {mode: sum(st.cost.bwd_time_s for st in runs[mode][0].plan.stages) for mode in ("none", "selective-op", "full")}
    assert bwd["none"] < bwd["selective-op"] < bwd["full"], bwd


def test_selective_checkpoints_the_kv_repeat_with_the_attention_core(runs) -> None:
    """The captured graph repeats K/V for grouped-query attention just before SDPA; the
    selective region takes the repeat in, so it keeps the unrepeated K/V: fewer bytes than no
    recompute, as priced."""
    pipe, selective, predicted = runs["selective"]
    assert selective == predicted
    first = pipe.stages[0].regions()[0]
    assert [n.split("_")[0] for n in first[:2]] == ["expand", "reshape"], first  # the repeat is inside
    assert all(s < n for s, n in zip(selective, runs["none"][1])), (selective, runs["none"][1])


def test_a_selective_op_plan_round_trips(runs) -> None:
    model, _ = runs["model"]
    text = runs["selective-op"][0].plan.to_json()
    again = load_plan(text).apply(model)
    assert again.plan.to_json() == text
    assert [s.recompute_mode for s in again.stages] == ["selective-op"] * 2


def test_the_policy_keeps_every_other_mm_counted_per_call() -> None:
    """torchtitan's rule on a chain of four matmuls and a ReLU: the 1st and 3rd products are
    kept in forward, the recomputation counts again from one."""
    seen: list[tuple[int, ...]] = []
    w = torch.randn(8, 8, requires_grad=True)

    def fn(x):
        for _ in range(4):
            x = torch.relu(x @ w)
        return x

    from partitioner.passes import recompute

    x = torch.randn(4, 8, requires_grad=True)
    out = recompute.checkpoint(fn, x, keep=lambda: sac_policy(observe=lambda o: seen.append(tuple(o.shape))))
    assert len(seen) == 2  # mm 1 and 3 of 4; no relu
    out.sum().backward()
    want = torch.autograd.grad(fn(x.detach().requires_grad_()).sum(), w)[0]
    torch.testing.assert_close(w.grad, want)


def _gpt_sac():
    from tests.fixtures.models import FIXTURES

    torch.manual_seed(0)
    model = FIXTURES["gpt"].build()
    pipe = partition(model, n_gpus=2, example_inputs=FIXTURES["gpt"].inputs(), pinned_cuts=["transformer.h.2"],
                     recompute="selective-op")
    return model, pipe


def _train_sac(rank: int, world: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    from tests.runtime.helpers import data, train_stage_sgd

    _, pipe = _gpt_sac()
    x, y, loss_fn = data("gpt")
    stage = pipe.build_stage(rank, "cpu")
    assert all(isinstance(m, RecomputeStage) and m.recompute_mode == "selective-op" for m in stage.modules.values())
    return train_stage_sgd(stage, rank, x, y, loss_fn)


def test_two_gloo_ranks_with_selective_op_train_like_one_process() -> None:
    """The torch.fx route (nn.Linear leaves), 1F1B on two gloo ranks, 3 SGD steps: the same
    losses and parameters as the unpartitioned model."""
    from partitioner.runtime.launch import spawn
    from tests.runtime.helpers import assert_params, data, reference

    model, pipe = _gpt_sac()
    assert pipe.plan.capture == "fx" and [st.recompute for st in pipe.plan.stages] == ["selective-op"] * 2
    x, y, loss_fn = data("gpt")
    want_losses, want = reference(model, x, y, loss_fn, steps=3)
    results = spawn(_train_sac, 2, timeout_s=120.0)
    assert results[-1][0] == pytest.approx(want_losses, rel=1e-5)
    for _, params in results:
        assert_params(params, want)
