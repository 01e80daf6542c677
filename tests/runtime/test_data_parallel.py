"""Pipeline x data parallelism on gloo: 4 ranks as 2 replicas x 2 pipeline ranks train like
one process on the whole batch (GPipe and 1F1B, the GPT fixture's tied embedding on the first
and last pipeline rank, ZeRO-1), and a dead replica is named by rank and replica."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

from partitioner import partition
from partitioner.runtime.errors import PipelineRuntimeError
from partitioner.runtime.launch import spawn
from tests.fixtures.models import FIXTURES
from tests.runtime.helpers import LR, STEPS, assert_params, data, reference

TIMEOUT_S = 120.0
BATCH = 8


def _pipe(schedule: str = "1f1b", **kw: Any) -> tuple[torch.nn.Module, Any]:
    torch.manual_seed(0)
    model = FIXTURES["gpt"].build()
    x, _, _ = data("gpt", BATCH)
    pipe = partition(model, n_gpus=4, data_parallel=2, example_inputs=(x,), schedule=schedule, n_microbatches=2,
                     pinned_cuts=["transformer.h.2"], **kw)
    return model, pipe


def _train(rank: int, world: int, pipe: Any, schedule: str, share: bool) -> dict[str, Any]:
    x, y, loss_fn = data("gpt", BATCH)
    stage = pipe.build_stage(rank, "cpu")
    opt = stage.optimizer(torch.optim.SGD, lr=LR)
    runner = stage.runner(schedule, loss_fn=loss_fn)
    half = BATCH // 2
    if share:  # each replica's data loader gives its own share
        x, y = x[stage.dp_rank * half:(stage.dp_rank + 1) * half], y[stage.dp_rank * half:(stage.dp_rank + 1) * half]
    losses = []
    for _ in range(STEPS):
        stage.zero_grad()
        loss = runner.step(x if stage.is_first else None, target=y if stage.is_last else None)
        losses.append(None if loss is None else loss.item())
        opt.step()
    return {"dp": stage.dp_rank, "pp": stage.pp_rank, "first": stage.is_first, "last": stage.is_last,
            "losses": losses, "zero": type(opt).__name__,
            "params": {n: p.detach().clone() for n, p in stage.named_parameters(remove_duplicate=False)}}


@pytest.mark.parametrize("schedule,zero,share", [("1f1b", 0, False), ("gpipe", 0, True), ("1f1b", 1, False),
                                                 ("zb-h1", 0, False),  # split backward: weight grads in W
                                                 # two stages per rank: each stage's final backward starts its
                                                 # own buckets (the V puts the tied embedding on one rank twice)
                                                 ("interleaved-1f1b", 0, False), ("zbv", 0, False)])
def test_two_replicas_of_two_stages_train_like_one_process(schedule: str, zero: int, share: bool) -> None:
    model, pipe = _pipe(schedule, zero=zero, **({"virtual_stages": 2} if schedule == "interleaved-1f1b" else {}))
    assert (pipe.plan.mesh.dp, pipe.plan.mesh.pp, pipe.plan.pp_ranks) == (2, 2, 2)
    assert pipe.plan.n_stages == (4 if schedule in ("interleaved-1f1b", "zbv") else 2)
    assert pipe.plan.tied_parameters, "the fixture should tie its embedding across the cut"
    x, y, loss_fn = data("gpt", BATCH)
    want_losses, want = reference(model, x, y, loss_fn)
    results = spawn(_train, 4, pipe, schedule, share, timeout_s=TIMEOUT_S)
    # rank = d * pp + p (plan.mesh.dims == ("dp", "pp"))
    assert [(r["dp"], r["pp"]) for r in results] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [r["first"] for r in results] == [True, False, True, False]
    assert {r["zero"] for r in results} == {"ZeroRedundancyOptimizer" if zero else "SGD"}
    last = [r["losses"] for r in results if r["last"]]
    assert len(last) == 2 and last[0] != last[1], "each replica should see its own half of the batch"
    mean = [(a + b) / 2 for a, b in zip(*last)]  # equal halves: the mean of replica losses is the batch loss
    assert mean == pytest.approx(want_losses, rel=1e-5)
    for r in results:  # every replica ends with the one-process parameters (tied copies included)
        assert_params(r["params"], want)
    assert set().union(*(r["params"] for r in results)) == set(want)


def _dies(rank: int, world: int, pipe: Any) -> None:
    x, y, loss_fn = data("gpt", BATCH)
    stage = pipe.build_stage(rank, "cpu")
    runner = stage.runner("1f1b", loss_fn=loss_fn)
    if rank == 3:  # replica 1's last pipeline rank dies before the step
        os._exit(3)
    runner.step(x if stage.is_first else None, target=y if stage.is_last else None)


def test_a_dead_replica_is_reported_by_rank_within_the_timeout() -> None:
    _, pipe = _pipe()
    with pytest.raises(PipelineRuntimeError, match=r"rank 3") as info:
        spawn(_dies, 4, pipe, timeout_s=60.0)
    assert "exit" in str(info.value) or "died" in str(info.value), str(info.value)


def test_a_data_parallel_plan_refuses_the_wrong_world_size() -> None:
    _, pipe = _pipe()

    def run(rank: int, world: int, pipe: Any) -> None:
        pipe.build_stage(rank, "cpu")

    with pytest.raises(PipelineRuntimeError, match=r"2 replicas x 2 pipeline ranks = 4 ranks, the process group has 2"):
        spawn(run, 2, pipe, timeout_s=60.0)


class _WithUnused(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used, self.unused = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # `unused` is read, but no gradient reaches it
        return self.used(x) + self.unused(x).detach()


def _adamw(rank: int, world: int, pipe: Any, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    stage = pipe.build_stage(rank, "cpu")
    opt = stage.optimizer(torch.optim.AdamW, lr=0.1, weight_decay=0.5)
    runner = stage.runner("1f1b", loss_fn=torch.nn.functional.mse_loss)
    for _ in range(2):
        stage.zero_grad()
        runner.step(x, target=y)
        grads = {n: p.grad is not None for n, p in stage.named_parameters()}
        opt.step()
    return {"grads": grads, "params": {n: p.detach().clone() for n, p in stage.named_parameters()}}


def test_a_parameter_no_replica_uses_gets_no_gradient_as_in_one_process() -> None:
    torch.manual_seed(0)
    model = _WithUnused()
    x, y = torch.randn(4, 4), torch.randn(4, 4)
    pipe = partition(model, n_gpus=2, data_parallel=2, example_inputs=(x,), n_microbatches=1)
    ref = __import__("copy").deepcopy(model)
    opt = torch.optim.AdamW(ref.parameters(), lr=0.1, weight_decay=0.5)
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.mse_loss(ref(x), y).backward()
        opt.step()
    for r in spawn(_adamw, 2, pipe, x, y, timeout_s=TIMEOUT_S):
        assert r["grads"] == {"used.weight": True, "used.bias": True, "unused.weight": False, "unused.bias": False}
        assert_params(r["params"], dict(ref.named_parameters()))  # AdamW's decay skipped the unused weights


def _train_save(rank: int, world: int, pipe: Any, path: str) -> None:
    x, y, loss_fn = data("gpt", BATCH)
    stage = pipe.build_stage(rank, "cpu")
    opt = stage.optimizer(torch.optim.SGD, lr=LR)
    runner = stage.runner("1f1b", loss_fn=loss_fn)
    for _ in range(2):
        stage.zero_grad()
        runner.step(x if stage.is_first else None, target=y if stage.is_last else None)
        opt.step()
    stage.save_checkpoint(path, optimizer=opt)


def _resume(rank: int, world: int, pipe: Any, path: str) -> dict[str, torch.Tensor]:
    x, y, loss_fn = data("gpt", BATCH)
    stage = pipe.build_stage(rank, "cpu")
    opt = torch.optim.SGD(stage.parameters(), lr=LR)
    stage.load_checkpoint(path, optimizer=opt)
    runner = stage.runner("1f1b", n_microbatches=2, loss_fn=loss_fn)
    stage.zero_grad()
    runner.step(x if rank == 0 else None, target=y)
    opt.step()
    return {n: p.detach().clone() for n, p in stage.named_parameters(remove_duplicate=False)}


def test_a_checkpoint_saved_by_two_replicas_resumes_on_one_pipeline(tmp_path: Any) -> None:
    model, pipe = _pipe()
    x, y, loss_fn = data("gpt", BATCH)
    _, want = reference(model, x, y, loss_fn, steps=3)
    spawn(_train_save, 4, pipe, str(tmp_path / "ckpt"), timeout_s=TIMEOUT_S)
    one = partition(model, n_gpus=2, example_inputs=(x,), pinned_cuts=["transformer.h.2"])
    for params in spawn(_resume, 2, one, str(tmp_path / "ckpt"), timeout_s=TIMEOUT_S):
        assert_params(params, want)


def _overlapped(rank: int, world: int, pipe: Any, schedule: str) -> dict[str, Any]:
    x, y, loss_fn = data("gpt", BATCH)
    stage = pipe.build_stage(rank, "cpu")
    assert stage.grad_sync is not None
    stage.grad_sync.bucket_bytes = 4096  # this GPT is tiny: many buckets, so some can go early
    opt = stage.optimizer(torch.optim.SGD, lr=LR)
    runner = stage.runner(schedule, loss_fn=loss_fn)
    for _ in range(STEPS):
        stage.zero_grad()
        runner.step(x if stage.is_first else None, target=y if stage.is_last else None)
        opt.step()
    finals = {str(a): s for a, s in runner.interpreter.final_backward.items()}
    return {"events": [tuple(e) for e in runner.events], "finals": finals,
            "launches": list(stage.grad_sync.launches), "waits": list(stage.grad_sync.waits),
            "buckets": len(stage.grad_sync.buckets),
            "params": {n: p.detach().clone() for n, p in stage.named_parameters(remove_duplicate=False)}}


@pytest.mark.parametrize("schedule", ["1f1b", "zb-h1"])
def test_the_all_reduce_overlaps_the_last_backward_and_no_action_waits_for_it(schedule: str) -> None:
    model, pipe = _pipe(schedule)
    x, y, loss_fn = data("gpt", BATCH)
    _, want = reference(model, x, y, loss_fn)
    results = spawn(_overlapped, 4, pipe, schedule, timeout_s=TIMEOUT_S)
    for rank, r in enumerate(results):
        assert_params(r["params"], want)  # small buckets, launched early: the same training
        assert r["buckets"] > 2 and sorted(b for b, _, _ in r["launches"]) == list(range(r["buckets"]))
        assert [b for b, _, _ in r["launches"]] == list(range(r["buckets"])), "buckets go in one order on all replicas"
        actions = [e for e in r["events"] if not e[1].startswith("wait")]
        final = [e for e in actions if e[1] in r["finals"]]
        assert len(final) == len(r["finals"]) >= 1
        # (1) a reduction was launched before the rank's last final backward ended: during it
        #     (autograd's post-accumulate hooks, B) or right after an earlier one ...
        last_final = max(final, key=lambda e: e[3])
        early = [t for _, t, _ in r["launches"] if t < last_final[3]]
        assert early, f"rank {rank}: every bucket was launched after {last_final[1]} ended"
        if schedule == "1f1b":  # ... with B, inside the final backward itself
            inside = [t for _, t, how in r["launches"] if how == "hook" and last_final[2] <= t <= last_final[3]]
            assert inside, f"rank {rank}: no bucket was launched inside {last_final[1]}"
        else:  # W accumulates by hand: its stage's buckets go as soon as it ends, before the step does
            assert {how for _, _, how in r["launches"]} <= {"hook", "ready"}
        # (2) no action waited on a reduction: every wait comes after the rank's last action
        end_of_actions = max(e[3] for e in actions)
        assert r["waits"] and min(t0 for _, t0, _ in r["waits"]) >= end_of_actions
