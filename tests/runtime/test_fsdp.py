"""FSDP2 inside pipeline stages (``zero=3``) on gloo: 4 ranks as 2 pipeline ranks x 2 shards
train like one process on the whole batch (SGD and AdamW, 1F1B and the split backward of
zb-h1, the GPT fixture's embedding tied across the two pipeline ranks), gradient clipping
equals ``torch.nn.utils.clip_grad_norm_`` on the whole model, refusals; and the planner's
pricing of ``zero=3`` (shards shrink with the replica count, the gathers and
reduce-scatters cost time)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from partitioner import partition
from partitioner.runtime.errors import PipelineRuntimeError
from partitioner.runtime.launch import spawn
from tests.fixtures.models import FIXTURES
from tests.runtime.helpers import LR, data

TIMEOUT_S = 120.0
BATCH = 8
STEPS = 3
CLIP = 0.5  # below the fixture's gradient norm (about 3), so clipping changes every step
# fp32: the shards' reduce-scatter sums two replica gradients in another order than one
# backward over the whole batch (rounding only).
RTOL, ATOL = 1e-5, 1e-6

_PIPES: dict[tuple[str, int], tuple[torch.nn.Module, Any, dict[str, torch.Tensor]]] = {}


def _pipe(schedule: str = "1f1b", zero: int = 3) -> tuple[torch.nn.Module, Any]:
    key = (schedule, zero)
    if key not in _PIPES:
        torch.manual_seed(0)
        model = FIXTURES["gpt"].build()
        x, _, _ = data("gpt", BATCH)
        pipe = partition(model, n_gpus=4, data_parallel=2, example_inputs=(x,), schedule=schedule, n_microbatches=2,
                         pinned_cuts=["transformer.h.2"], zero=zero)
        _PIPES[key] = (model, pipe, copy.deepcopy(model.state_dict()))
    model, pipe, init = _PIPES[key]
    model.load_state_dict(init)
    return model, pipe


OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, float]]] = {
    "sgd": (torch.optim.SGD, {"lr": LR}),
    # eps above rounding noise: attention's key bias has an exactly zero gradient, so with the
    # default eps (1e-8) Adam's step on it is rounding noise divided by itself (sign at random)
    "adamw": (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1, "eps": 1e-4})}


def _optimizer(kind: str, params: Any) -> torch.optim.Optimizer:
    cls, kw = OPTIMIZERS[kind]
    return cls(params, **kw)


def _reference(model: torch.nn.Module, kind: str, clip: bool) -> tuple[list[float], list[float],
                                                                      dict[str, torch.Tensor]]:
    """The unpartitioned model trained in one process: losses, gradient norms, parameters."""
    x, y, loss_fn = data("gpt", BATCH)
    ref = copy.deepcopy(model)
    opt = _optimizer(kind, ref.parameters())
    losses, norms = [], []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = loss_fn(ref(x), y)
        loss.backward()
        if clip:
            norms.append(torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP).item())
        opt.step()
        losses.append(loss.item())
    return losses, norms, {n: p.detach() for n, p in ref.named_parameters(remove_duplicate=False)}


def _train(rank: int, world: int, pipe: Any, schedule: str, kind: str, clip: bool) -> dict[str, Any]:
    from torch.distributed.tensor import DTensor

    x, y, loss_fn = data("gpt", BATCH)
    stage = pipe.build_stage(rank, "cpu")
    sharded = {n: (type(p).__name__, tuple(p.to_local().shape)) for n, p in stage.named_parameters()
               if isinstance(p, DTensor)}
    cls, kw = OPTIMIZERS[kind]
    opt = stage.optimizer(cls, **kw)
    runner = stage.runner(schedule, loss_fn=loss_fn)
    losses, norms = [], []
    for _ in range(STEPS):
        stage.zero_grad()
        loss = runner.step(x if stage.is_first else None, target=y if stage.is_last else None,
                           loss_on_every_rank=True)
        losses.append(loss.item())
        if clip:
            norms.append(stage.clip_grad_norm_(CLIP).item())
        opt.step()
    params = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
              for n, p in stage.named_parameters(remove_duplicate=False)}
    from torch.distributed.fsdp import FSDPModule

    fsdp_units = sorted(n for mod in stage.modules.values() for n, m in mod.named_modules() if isinstance(m, FSDPModule))
    return {"dp": stage.dp_rank, "pp": stage.pp_rank, "losses": losses, "norms": norms, "opt": type(opt).__name__,
            "sharded": sharded, "params": params, "mode": stage.grad_sync.mode, "units": fsdp_units}


@pytest.mark.parametrize("schedule,kind,clip", [("1f1b", "sgd", False), ("1f1b", "adamw", True),
                                                ("zb-h1", "sgd", False), ("zb-h1", "adamw", True)])
def test_fsdp_in_two_stages_trains_like_one_process(schedule: str, kind: str, clip: bool) -> None:
    model, pipe = _pipe(schedule)
    assert pipe.plan.mesh.zero == 3 and pipe.plan.tied_parameters
    want_losses, want_norms, want = _reference(model, kind, clip)
    assert not clip or min(want_norms) > CLIP, "clipping should change every step"
    results = spawn(_train, 4, pipe, schedule, kind, clip, timeout_s=TIMEOUT_S)
    assert [(r["dp"], r["pp"]) for r in results] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert {r["opt"] for r in results} == {"SGD" if kind == "sgd" else "AdamW"}
    # per unit (reshard after forward, reduce per micro-batch) for 1f1b; once per step for a split backward
    assert {r["mode"] for r in results} == {"step" if schedule == "zb-h1" else "unit"}
    # each block's called leaves are one unit (the stage module the other), e.g. transformer.h.0's c_attn..c_proj
    assert "transformer.h.0.attn.c_attn" in results[0]["units"] and "" in results[0]["units"]
    assert "transformer.h.3.mlp.c_fc" in results[1]["units"]
    for r in results:  # every parameter is a shard: half of dim 0 (the GPT's dims are even)
        names = dict(model.named_parameters(remove_duplicate=False))
        assert r["sharded"] and set(r["sharded"]) == set(r["params"])
        for n, (_, shape) in r["sharded"].items():
            assert shape[0] * 2 == names[n].shape[0], n
        assert r["losses"] == pytest.approx(want_losses, rel=1e-5)
        assert r["norms"] == pytest.approx(want_norms, rel=1e-5)  # clip_grad_norm_ of the whole model
    for r in results:  # every rank ends with the one-process parameters (tied copies included)
        for n, v in r["params"].items():
            torch.testing.assert_close(v, want[n], rtol=RTOL, atol=ATOL, msg=lambda m, n=n: f"{n}: {m}")
    assert set().union(*(r["params"] for r in results)) == set(want)


def _build_and_step(rank: int, world: int, pipe: Any, schedule: str) -> None:
    x, y, loss_fn = data("gpt", BATCH)
    stage = pipe.build_stage(rank, "cpu")
    runner = stage.runner(schedule, loss_fn=loss_fn)
    runner.step(x if stage.is_first else None, target=y if stage.is_last else None)


def _partition(**kw: Any) -> Any:
    torch.manual_seed(0)
    model = FIXTURES["gpt"].build()
    x, _, _ = data("gpt", BATCH)
    return partition(model, n_gpus=4, data_parallel=2, example_inputs=(x,), n_microbatches=2, zero=3, **kw)


@pytest.mark.parametrize("case", ["tied-on-one-rank", "bf16-mixed", "split-runner-on-unit-plan"])
def test_fsdp_refuses_what_it_cannot_train_exactly(case: str) -> None:
    if case == "tied-on-one-rank":  # zbv's V puts the embedding's stage 0 and the head's stage 3 on rank 0
        pipe, schedule, want = _partition(schedule="zbv"), "zbv", "shared by stages 0 and 3"
    elif case == "bf16-mixed":
        pipe, schedule, want = (_partition(schedule="1f1b", pinned_cuts=["transformer.h.2"], precision="bf16-mixed"),
                                "1f1b", "runs fp32 plans only")
    else:  # per-unit sharding for 1f1b; zb-h1's W would write gradients after FSDP reduced them
        pipe, schedule, want = _pipe("1f1b")[1], "zb-h1", "computed after FSDP reduced them"
    with pytest.raises(PipelineRuntimeError, match=want):
        spawn(_build_and_step, 4, pipe, schedule, timeout_s=TIMEOUT_S)
