"""Shared set-up for runtime tests: fixture pipes built once, reset between tests.

Partitioning costs seconds, so each (model, layout) is partitioned once per session;
the stages share the model's tensors, so ``reset`` restores the initial weights in
place and every test starts from the same model.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from partitioner import partition
from tests.fixtures.models import FIXTURES

# float32; sums of m micro-batch gradients vs one full-batch gradient differ by rounding only.
RTOL, ATOL = 1e-5, 1e-6
LR = 0.1
STEPS = 3

# Cuts pinned at block boundaries so the tied embedding lands on the first and the last
# rank (the solver, pricing this tiny GPT for an H100, would put all blocks on one stage).
LAYOUTS: dict[str, dict[str, Any]] = {
    "gpt-2": dict(n_gpus=2, pinned_cuts=["transformer.h.2"]),
    "gpt-4": dict(n_gpus=4, pinned_cuts=["transformer.h.1", "transformer.h.2", "transformer.h.3"]),
    "gpt-2x2": dict(n_gpus=2, virtual_stages=2, schedule="interleaved-1f1b",
                    pinned_cuts=["transformer.h.1", "transformer.h.2", "transformer.h.3"]),
    # every stage recomputes its blocks in backward (checkpointed regions): same training
    "gpt-2-full": dict(n_gpus=2, pinned_cuts=["transformer.h.2"], recompute="full"),
    "gpt-2-selective": dict(n_gpus=2, pinned_cuts=["transformer.h.2"], recompute="selective"),
    "unet-2": dict(n_gpus=2),
    "unet-4": dict(n_gpus=4),
    "unet-2x2": dict(n_gpus=2, virtual_stages=2, schedule="interleaved-1f1b"),
    # enc1's features are made in stage 0 and used in stage 3: they skip two stages.
    "unet-skip": dict(n_gpus=4, pinned_cuts=["enc2", "bottleneck", "dec2"]),
}


def gpt_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.flatten(0, 1), y.flatten())


def data(model_name: str, batch: int = 4) -> tuple[torch.Tensor, torch.Tensor, Callable[..., torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    if model_name == "gpt":
        x = torch.randint(0, 128, (batch, 16), generator=g)
        return x, torch.randint(0, 128, (batch, 16), generator=g), gpt_loss
    return torch.randn(batch, 3, 16, 16, generator=g), torch.randn(batch, 2, 16, 16, generator=g), F.mse_loss


@functools.cache
def _built(layout: str) -> tuple[nn.Module, Any, dict[str, torch.Tensor]]:
    name = layout.split("-")[0]
    torch.manual_seed(0)
    model = FIXTURES[name].build()
    pipe = partition(model, example_inputs=FIXTURES[name].inputs(), **LAYOUTS[layout])
    return model, pipe, copy.deepcopy(model.state_dict())


def fresh(layout: str) -> tuple[nn.Module, Any]:
    """The layout's model (initial weights restored in place) and its pipe."""
    model, pipe, init = _built(layout)
    model.load_state_dict(init)
    model.zero_grad(set_to_none=True)
    return model, pipe


@dataclasses.dataclass
class Reference:
    """What the unpartitioned model did: the loss per step, the gradient norm per step
    (before clipping; empty without ``max_norm``) and the final parameters by FQN."""

    losses: list[float]
    norms: list[float]
    params: dict[str, torch.Tensor]


def sgd_reference(model: nn.Module, inputs: torch.Tensor | dict[str, Any], y: Any, loss_fn: Callable[..., torch.Tensor],
                  *, steps: int = STEPS, lr: float = LR, max_norm: float | None = None,
                  init: dict[str, torch.Tensor] | None = None, remove_duplicate: bool = False,
                  optimizer: Callable[[Any], torch.optim.Optimizer] | None = None) -> Reference:
    """Train a copy of the unpartitioned model on the whole batch with plain SGD (or
    ``optimizer(parameters)``): the one-process run every distributed test compares against.
    ``inputs`` is the positional input or a dict of keyword inputs; ``init`` a state dict
    loaded into the copy first; ``max_norm`` clips the gradients (``clip_grad_norm_``) before
    each step; ``remove_duplicate`` names a tied tensor once, as ``named_parameters()`` does."""
    ref = copy.deepcopy(model)
    if init is not None:
        ref.load_state_dict(init)
    opt = optimizer(ref.parameters()) if optimizer is not None else torch.optim.SGD(ref.parameters(), lr=lr)
    losses, norms = [], []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(ref(**inputs) if isinstance(inputs, dict) else ref(inputs), y)
        loss.backward()
        if max_norm is not None:
            norms.append(torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm).item())
        opt.step()
        losses.append(loss.item())
    return Reference(losses, norms, {n: p.detach() for n, p in ref.named_parameters(remove_duplicate=remove_duplicate)})


def pipe_sgd_losses(pipe: Any, model: nn.Module, inputs: dict[str, Any], y: Any, loss_fn: Callable[..., torch.Tensor],
                    *, steps: int, m: int, lr: float = LR) -> list[float]:
    """Train ``pipe`` (whose stages hold ``model``'s parameters) for ``steps`` plain SGD steps
    in this process (``pipe.train_step`` over ``m`` micro-batches): the loss per step."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        losses.append(pipe.train_step(**inputs, target=y, loss_fn=loss_fn, n_microbatches=m).item())
        opt.step()
    return losses


def reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable[..., torch.Tensor],
              steps: int = STEPS) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Train a copy of the unpartitioned model: losses and final parameters by FQN."""
    ref = sgd_reference(model, x, y, loss_fn, steps=steps)
    return ref.losses, ref.params


def train_in_process(layout: str, schedule: Any, m: int, comm: str = "buffered") -> tuple[list[float], list[float],
                                                                                     dict, dict]:
    """``STEPS`` SGD steps of the layout's pipe in one process (``pipe.train_step``, a schedule
    name or ``Schedule``; ``comm`` its transport) and of the plain model: (losses, reference
    losses, parameters, reference parameters), by FQN."""
    model, pipe = fresh(layout)
    x, y, loss_fn = data(layout.split("-")[0])
    want_losses, want = reference(model, x, y, loss_fn)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        losses.append(pipe.train_step(x, target=y, loss_fn=loss_fn, schedule=schedule, n_microbatches=m,
                                      comm=comm).item())
        opt.step()
    return losses, want_losses, dict(model.named_parameters(remove_duplicate=False)), want


def train_stage_sgd(stage: Any, rank: int, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable[..., torch.Tensor],
                    *, schedule: str = "1f1b", m: int = 4, steps: int = 3, lr: float = 0.1
                    ) -> tuple[list[float], dict[str, torch.Tensor]]:
    """``steps`` SGD steps of one rank's built stage under ``schedule`` (rank 0 feeds ``x``):
    (the loss per step, nan where this rank holds no loss; its parameters by FQN, ties named twice)."""
    params = stage.parameters()
    opt = torch.optim.SGD(params, lr=lr)
    runner = stage.runner(schedule, n_microbatches=m, loss_fn=loss_fn, batch_size=len(x))
    losses = []
    for _ in range(steps):
        for p in params:
            p.grad = None
        loss = runner.step(x if rank == 0 else None, target=y)
        losses.append(float("nan") if loss is None else loss.item())
        opt.step()
    return losses, {n: p.detach() for n, p in stage.named_parameters(remove_duplicate=False)}


def assert_params(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got, "no parameters to compare"
    for name, value in got.items():
        torch.testing.assert_close(value, want[name], rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")


def train_clipped(stage: Any, inputs: dict[str, Any], y: torch.Tensor, loss_fn: Callable[..., torch.Tensor], *,
                  steps: int = STEPS, lr: float = LR, max_norm: float = 1.0) -> tuple[list[float], list[float]]:
    """``steps`` SGD steps of one rank's built stage (``stage.optimizer``, so FSDP and tensor-parallel
    shards step as they are) under its plan's schedule, clipping the whole model's gradient norm to
    ``max_norm`` before each step; the first stage is fed ``inputs`` (keyword inputs), the last
    ``y``: (the loss per step, on every rank; the norm before clipping per step)."""
    opt = stage.optimizer(torch.optim.SGD, lr=lr)
    runner = stage.runner(loss_fn=loss_fn)
    losses, norms = [], []
    for _ in range(steps):
        stage.zero_grad()
        loss = runner.step(**(inputs if stage.is_first else {}), target=y if stage.is_last else None,
                           loss_on_every_rank=True)
        losses.append(loss.item())
        norms.append(stage.clip_grad_norm_(max_norm).item())
        opt.step()
    return losses, norms


def dtensor_meshes(stage: Any) -> dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[int, ...]]]:
    """Per DTensor parameter of a built stage: (its mesh's dimension names, its placements as
    text, its local shard's shape)."""
    from torch.distributed.tensor import DTensor

    return {n: (tuple(p.device_mesh.mesh_dim_names or ()), tuple(map(repr, p.placements)), tuple(p.to_local().shape))
            for n, p in stage.named_parameters() if isinstance(p, DTensor)}
