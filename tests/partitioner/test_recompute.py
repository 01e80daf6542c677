"""Recomputation as a plan decision: the solver chooses it per stage, the emitted stages
really recompute (same gradients, fewer bytes kept), plans round-trip it."""

from __future__ import annotations

import pytest
import torch

from partitioner import load_plan, partition, poly
from partitioner.memory import measure_saved
from partitioner.passes.recompute import RecomputeStage
from partitioner.runtime.launch import spawn
from partitioner.solver import InfeasibleError
from tests.fixtures.models import FIXTURES
from tests.runtime.helpers import assert_params, data, fresh, reference, train_stage_sgd

hf = pytest.importorskip("transformers")


def _llama(layers: int = 4):
    from tests.hf.models import CASES

    torch.manual_seed(0)
    case = CASES["llama"]
    return case.build(layers), case.inputs(4, 32)


def _logits(out):
    return out.logits if hasattr(out, "logits") else out["logits"] if isinstance(out, dict) else out[0]


def _grads(model, run) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = run()
    out.float().pow(2).mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["full", "selective"])
@pytest.mark.parametrize("route", ["fx", "export"])
def test_recomputing_stages_give_the_same_outputs_and_gradients(mode: str, route: str) -> None:
    if route == "fx":
        torch.manual_seed(0)
        model = FIXTURES["gpt"].build()
        (x,) = FIXTURES["gpt"].inputs()
        kwargs: dict = {}
        args = (x,)
        pipe = partition(model, n_gpus=2, example_inputs=args, recompute=mode, pinned_cuts=["transformer.h.2"])
        plain = lambda: model(x)  # noqa: E731
        piped = lambda: pipe(x)  # noqa: E731
    else:
        model, kwargs = _llama()
        pipe = partition(model, n_gpus=2, example_inputs=kwargs, recompute=mode, device="cpu")
        plain = lambda: _logits(model(**kwargs))  # noqa: E731
        piped = lambda: _logits(pipe(**kwargs))  # noqa: E731
    assert pipe.plan.capture == route
    assert [st.recompute for st in pipe.plan.stages] == [mode, mode]
    assert all(isinstance(s, RecomputeStage) and s.regions() for s in pipe.stages)
    want_out, want = _grads(model, plain)
    got_out, got = _grads(model, piped)
    torch.testing.assert_close(got_out, want_out, rtol=1e-5, atol=1e-6)
    assert got.keys() == want.keys()
    for name in want:  # recompute re-runs the same float ops: equal up to reduction order
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_full_recompute_keeps_the_bytes_the_plan_says() -> None:
    """Measured per stage (saved-tensor hooks plus the checkpoints' inputs) against the plan:
    recompute keeps far fewer bytes than none, and as many as priced."""
    model, kwargs = _llama()
    params = list(model.parameters())
    kept = {}
    for mode in ("none", "full"):
        pipe = partition(model, n_gpus=2, example_inputs=kwargs, recompute=mode, device="cpu", n_microbatches=1,
                         pinned_cuts=["model.layers.2"])
        values = pipe.flatten_inputs((), kwargs)
        for i, stage in enumerate(pipe.stages):
            if i:
                grads = [v.requires_grad for v in pipe.plan.boundaries[i - 1].values]
                values = [v.detach().requires_grad_(g) if isinstance(v, torch.Tensor) else v
                          for v, g in zip(values, grads)]
            measured, out = measure_saved(lambda: stage(*values), exclude=params)
            predicted = poly.evaluate(poly.from_text(pipe.plan.stages[i].cost.saved_bytes), 4, 32)
            assert predicted == pytest.approx(measured, rel=0.10), (mode, i)
            kept[mode, i] = measured
            values = list(out) if isinstance(out, (tuple, list)) else [out]
    for i in range(2):
        assert kept["full", i] < 0.5 * kept["none", i]


def test_auto_recomputes_only_the_stages_that_need_it() -> None:
    """1F1B keeps 4 micro-batches in flight on stage 0, 3 on stage 1, ... 1 on stage 3. On a split
    of two layers per stage, with a capacity that holds stages 1-3 without recompute but not stage 0
    (2 % over the largest need of stages 1-3, read from the plan without recompute), auto
    recomputes stage 0 and no other. The cuts are pinned: free, the solver may meet a capacity by
    moving layers off stage 0 instead of recomputing."""
    model, kwargs = _llama(8)
    same = dict(n_gpus=4, example_inputs=kwargs, device="cpu", n_microbatches=4,
                pinned_cuts=[f"model.layers.{i}" for i in (2, 4, 6)])
    base = partition(model, recompute="none", **same)
    assert [sorted({m.split(".")[2] for m in st.modules if m.startswith("model.layers.")}) for st in base.plan.stages] \
        == [["0", "1"], ["2", "3"], ["4", "5"], ["6", "7"]]
    need = [st.cost.memory_bytes for st in base.plan.stages]
    limit = int(max(need[1:]) * 1.02)
    assert need[0] > limit  # without recompute, stage 0 does not fit
    with pytest.raises(InfeasibleError, match="recompute='full' \\(or 'auto'\\) fits"):
        partition(model, recompute="none", memory_limit=limit, **same)
    pipe = partition(model, recompute="auto", memory_limit=limit, **same)
    modes = [st.recompute for st in pipe.plan.stages]
    assert modes[0] != "none" and modes[1:] == ["none"] * 3, modes
    assert all(st.cost.memory_bytes <= limit for st in pipe.plan.stages)
    recomputed = [s for s, st in zip(pipe.stages, pipe.plan.stages) if st.recompute != "none"]
    assert all(isinstance(s, RecomputeStage) for s in recomputed)
    # a recomputing stage pays its forward again in backward
    st0 = pipe.plan.stages[0]
    assert st0.cost.bwd_time_s > base.plan.stages[0].cost.bwd_time_s * (st0.cost.fwd_time_s > 0)
    # the plan round-trips byte for byte, recompute included, and the stages recompute again
    text = pipe.plan.to_json()
    again = load_plan(text).apply(model)
    assert again.plan.to_json() == text
    assert [isinstance(s, RecomputeStage) for s in again.stages] == [m != "none" for m in modes]


def test_infeasible_says_what_would_fit() -> None:
    model, kwargs = _llama(2)
    with pytest.raises(InfeasibleError) as err:
        partition(model, n_gpus=2, example_inputs=kwargs, device="cpu", recompute="none",
                  memory_limit=2**20)
    text = str(err.value)
    assert "static" in text and "B/param" in text and "activations" in text, text
    assert "GPUs fit" in text or "recompute" in text, text


def _train(rank: int, world: int, layout: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    _, pipe = fresh(layout)
    x, y, loss_fn = data("gpt")
    stage = pipe.build_stage(rank, "cpu")
    assert all(isinstance(m, RecomputeStage) for m in stage.modules.values())  # survives the copy
    return train_stage_sgd(stage, rank, x, y, loss_fn)


@pytest.mark.parametrize("layout", ["gpt-2-full", "gpt-2-selective"])
def test_two_gloo_ranks_with_recompute_train_like_one_process(layout: str) -> None:
    model, pipe = fresh(layout)
    x, y, loss_fn = data("gpt")
    want_losses, want = reference(model, x, y, loss_fn)
    results = spawn(_train, 2, layout, timeout_s=120.0)
    assert results[-1][0] == pytest.approx(want_losses, rel=1e-5)
    for _, params in results:
        assert_params(params, want)
