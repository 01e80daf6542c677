"""Multi-process (gloo, CPU): the same transparency, failures that end fast, interop.

Ranks are forked by ``spawn``, so they inherit the pipes built here; every test has a
timeout and a hang becomes an error, never a stuck test run.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import pytest
import torch

from partitioner.runtime.errors import PipelineRuntimeError
from partitioner.runtime.launch import spawn
from tests.runtime.helpers import LR, STEPS, assert_params, data, fresh, reference

TIMEOUT_S = 120.0


def stage_zero_grad(params: list[torch.nn.Parameter]) -> None:
    for p in params:
        p.grad = None


def _train(rank: int, world: int, layout: str, schedule: str, m: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    _, pipe = fresh(layout)
    x, y, loss_fn = data(layout.split("-")[0])
    stage = pipe.build_stage(rank, "cpu")
    params = stage.parameters()  # a stage may hold none (U-Net's pooling between cuts)
    opt = torch.optim.SGD(params, lr=LR) if params else None
    runner = stage.runner(schedule, n_microbatches=m, loss_fn=loss_fn, batch_size=len(x))
    losses = []
    for _ in range(STEPS):
        stage_zero_grad(params)
        loss = runner.step(x if rank == 0 else None, target=y)
        losses.append(float("nan") if loss is None else loss.item())
        if opt is not None:
            opt.step()
    return losses, {n: p.detach() for n, p in stage.named_parameters().items()}


@pytest.mark.parametrize("layout,schedule,m", [
    ("gpt-2", "gpipe", 4), ("gpt-2", "1f1b", 4), ("gpt-2x2", "interleaved-1f1b", 4), ("gpt-4", "1f1b", 4),
    ("unet-2", "1f1b", 4), ("unet-4", "gpipe", 4), ("unet-2x2", "interleaved-1f1b", 2),
])
def test_ranks_train_like_the_unpartitioned_model(layout: str, schedule: str, m: int) -> None:
    model, pipe = fresh(layout)
    x, y, loss_fn = data(layout.split("-")[0])
    want_losses, want = reference(model, x, y, loss_fn)
    results = spawn(_train, pipe.plan.options["n_gpus"], layout, schedule, m, timeout_s=TIMEOUT_S)
    last = pipe.plan.stages[-1].rank
    assert results[last][0] == pytest.approx(want_losses, rel=1e-5)
    for _, params in results:  # tied copies on the first and last rank both match
        if params:
            assert_params(params, want)
    assert set().union(*(p for _, p in results)) == set(want)


def _fail_in_forward(rank: int, world: int) -> None:
    _, pipe = fresh("gpt-4")
    x, y, loss_fn = data("gpt")
    stage = pipe.build_stage(rank, "cpu")
    if rank == 2:
        def boom(*args: Any) -> Any:
            raise RuntimeError("injected failure")
        stage.modules[2].forward = boom  # type: ignore[method-assign]
    stage.runner("1f1b", n_microbatches=4, loss_fn=loss_fn).step(x, target=y)


def test_a_failing_rank_stops_all_and_is_named() -> None:
    fresh("gpt-4")
    t0 = time.monotonic()
    with pytest.raises(PipelineRuntimeError, match=r"rank 2 failed at action 2F0: .*injected failure") as info:
        spawn(_fail_in_forward, 4, timeout_s=TIMEOUT_S)
    assert info.value.rank == 2 and info.value.action == "2F0"
    assert time.monotonic() - t0 < 30  # not the 120 s timeout: the launcher stopped the others


def _bad_plan(rank: int, world: int) -> None:
    _, pipe = fresh("gpt-2")
    b0 = pipe.plan.boundaries[0]
    v = dataclasses.replace(b0.values[0], shape=("B", "S", 64))
    pipe.plan = dataclasses.replace(pipe.plan, boundaries=(dataclasses.replace(b0, values=(v,)),))
    x, y, loss_fn = data("gpt")
    pipe.build_stage(rank, "cpu").runner("gpipe", n_microbatches=4, loss_fn=loss_fn).step(x, target=y)


def test_shape_mismatch_is_reported_by_the_sender() -> None:
    fresh("gpt-2")
    with pytest.raises(PipelineRuntimeError, match=r"rank 0 failed at action 0F0: .*'add_4' does not match the plan: "
                       r"expected shape \(1, 16, 64\) float32, got \(1, 16, 32\)"):
        spawn(_bad_plan, 2, timeout_s=TIMEOUT_S)


def _ours_and_torch(rank: int, world: int, schedule: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe

    _, pipe = fresh("gpt-2")
    x, y, loss_fn = data("gpt")
    ours = pipe.build_stage(rank, "cpu")
    ours.runner(schedule, n_microbatches=4, loss_fn=loss_fn).step(x, target=y)
    theirs = pipe.build_stage(rank, "cpu")
    cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule]
    sched = cls(theirs.as_pipelining_stage(rank, n_microbatches=4), 4, loss_fn=loss_fn)
    if rank == 0:
        sched.step(x)
    else:
        sched.step(target=y)
    theirs.reduce_tied_grads()  # torch's schedules know nothing of weights tied across ranks
    grads = lambda st: {n: p.grad for n, p in st.named_parameters().items()}  # noqa: E731
    return grads(ours), grads(theirs)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_torch_pipelining_runs_our_stages_with_the_same_gradients(schedule: str) -> None:
    fresh("gpt-2")
    for ours, theirs in spawn(_ours_and_torch, 2, schedule, timeout_s=TIMEOUT_S):
        assert ours.keys() == theirs.keys()
        assert_params(ours, theirs)
