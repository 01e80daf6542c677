"""The runtime's hand-off record (``runtime.spec.PipelineSpec``) and its defaults from the plan.

The runtime is built from a plan plus stage modules, without the compiler's ``Pipe``: a
plan saved as JSON and stage modules saved with ``torch.save`` train like the unpartitioned
model in a fresh process that never imports ``partitioner.pipe`` or ``partitioner.api``, and
over two gloo ranks that each keep only their own stage. With no schedule given,
``train_step``, ``eval_step`` and ``runner()`` run the schedule and micro-batch count the
plan was priced for; an explicit argument wins.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from partitioner import partition
from partitioner.plan import STATIC_SHAPES_NOTE, load_plan
from partitioner.runtime import driver as driver_module
from partitioner.runtime.errors import PipelineRuntimeError
from partitioner.runtime.launch import spawn
from partitioner.runtime.spec import IOSpec, PipelineSpec, static_shapes
from tests.runtime.helpers import LR, STEPS, assert_params, reference

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 120.0


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2, self.l3, self.l4 = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l4(torch.relu(self.l3(torch.relu(self.l2(torch.relu(self.l1(x)))))))


@functools.cache
def _zb() -> tuple[nn.Module, Any, torch.Tensor, torch.Tensor]:
    """A model, its pipe priced for zb-h1 with 4 micro-batches on 2 ranks, and data."""
    torch.manual_seed(0)
    model = _MLP()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 8, generator=g), torch.randn(8, 4, generator=g)
    pipe = partition(model, example_inputs=(x,), n_gpus=2, schedule="zb-h1", n_microbatches=4,
                     pinned_cuts=["l3"])
    assert pipe.plan.prediction.schedule == "zb-h1" and pipe.plan.prediction.n_microbatches == 4
    return model, pipe, x, y


def _saved(tmp_path: Path) -> tuple[Path, Path]:
    """The plan as JSON and copies of the stage modules (``torch.save``), as a user would keep them."""
    _, pipe, _, _ = _zb()
    plan_path, stages_path = tmp_path / "plan.json", tmp_path / "stages.pt"
    pipe.plan.save(plan_path)
    torch.save(copy.deepcopy(list(pipe.stages)), stages_path)
    return plan_path, stages_path


_FRESH_PROCESS = """
import sys
import torch
import torch.nn.functional as F
from partitioner.plan import load_plan
from partitioner.runtime.local import train_step
from partitioner.runtime.spec import PipelineSpec

plan_path, stages_path, data_path, out_path, lr, steps = sys.argv[1:]
spec = PipelineSpec.build(load_plan(plan_path), torch.load(stages_path, weights_only=False))
x, y = torch.load(data_path)
params = {n: p for s in spec.stages.values() for n, p in s.named_parameters()}
opt = torch.optim.SGD(list(params.values()), lr=float(lr))
losses = []
for _ in range(int(steps)):
    opt.zero_grad()
    losses.append(train_step(spec, x, target=y, loss_fn=F.mse_loss).item())
    opt.step()
loaded = sorted(m for m in sys.modules if m in ("partitioner.pipe", "partitioner.api"))
torch.save({"losses": losses, "params": {n: p.detach() for n, p in params.items()}, "loaded": loaded}, out_path)
"""


def test_a_saved_plan_and_stage_modules_train_like_one_process_without_a_pipe(tmp_path: Path) -> None:
    model, _, x, y = _zb()
    want_losses, want = reference(model, x, y, F.mse_loss)
    plan_path, stages_path = _saved(tmp_path)
    torch.save((x, y), tmp_path / "data.pt")
    out = tmp_path / "out.pt"
    done = subprocess.run([sys.executable, "-c", _FRESH_PROCESS, str(plan_path), str(stages_path),
                           str(tmp_path / "data.pt"), str(out), str(LR), str(STEPS)],
                          cwd=ROOT, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    got = torch.load(out)
    assert got["loaded"] == []  # the runtime ran without the compiler's Pipe (or api) ever imported
    assert got["losses"] == pytest.approx(want_losses, rel=1e-5)
    assert_params(got["params"], want)
    assert set(got["params"]) == set(want)


def _rank_from_record(rank: int, world: int, plan_path: str, stages_path: str, x: torch.Tensor,
                      y: torch.Tensor) -> tuple[Any, ...]:
    from partitioner.runtime.stage import build_stage

    spec = PipelineSpec.build(load_plan(plan_path), torch.load(stages_path, weights_only=False)).for_rank(rank)
    held = sorted(spec.stages)
    stage = build_stage(spec, rank, "cpu")
    params = stage.parameters()
    opt = torch.optim.SGD(params, lr=LR)
    runner = stage.runner(loss_fn=F.mse_loss)  # no schedule, no micro-batch count: the plan's
    kinds = sorted({a.kind for a in runner.interpreter.actions})
    losses = []
    for _ in range(STEPS):
        for p in params:
            p.grad = None
        loss = runner.step(x if rank == 0 else None, target=y)
        losses.append(None if loss is None else loss.item())
        opt.step()
    return (held, runner.schedule.name, runner.schedule.n_microbatches, kinds, losses,
            {n: p.detach() for n, p in stage.named_parameters()})


def test_ranks_built_from_a_saved_plan_keep_only_their_stage_and_run_its_schedule(tmp_path: Path) -> None:
    model, _, x, y = _zb()
    want_losses, want = reference(model, x, y, F.mse_loss)
    plan_path, stages_path = _saved(tmp_path)
    results = spawn(_rank_from_record, 2, str(plan_path), str(stages_path), x, y, timeout_s=TIMEOUT_S)
    got: dict[str, torch.Tensor] = {}
    for rank, (held, name, m, kinds, losses, params) in enumerate(results):
        assert held == [rank]  # the other rank's stage was dropped from the record
        assert (name, m) == ("zb-h1", 4)  # the plan's schedule and micro-batches, by default
        assert {"I", "W"} <= set(kinds)  # it really split the backward
        got.update(params)
    assert results[1][4] == pytest.approx(want_losses, rel=1e-5)
    assert_params(got, want)
    assert set(got) == set(want)


@pytest.fixture
def ran(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, list[str]]]:
    """(schedule name, micro-batches, action kinds) of every step a StepDriver runs."""
    seen: list[tuple[str, int, list[str]]] = []
    original = driver_module.StepDriver.step

    def step(self: Any, *args: Any, **kwargs: Any) -> Any:
        kinds = sorted({a.kind for it in self.interpreters for a in it.actions})
        seen.append((self.schedule.name, self.schedule.n_microbatches, kinds))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(driver_module.StepDriver, "step", step)
    return seen


def test_in_process_steps_default_to_the_plans_schedule_and_an_argument_wins(
        ran: list[tuple[str, int, list[str]]]) -> None:
    model, pipe, x, y = _zb()
    init = copy.deepcopy(model.state_dict())
    try:
        pipe.train_step(x, target=y, loss_fn=F.mse_loss)
        assert ran[-1][:2] == ("zb-h1", 4) and {"I", "W"} <= set(ran[-1][2])
        pipe.eval_step(x, target=y, loss_fn=F.mse_loss)
        assert ran[-1] == ("zb-h1-forward", 4, ["F", "RECV_F", "SEND_F"])
        pipe.train_step(x, target=y, loss_fn=F.mse_loss, schedule="gpipe", n_microbatches=2)
        assert ran[-1][:2] == ("gpipe", 2) and "I" not in ran[-1][2]
        pipe.train_step(x, target=y, loss_fn=F.mse_loss, n_microbatches=2)  # the plan's schedule, 2 micro-batches
        assert ran[-1][:2] == ("zb-h1", 2)
    finally:
        model.load_state_dict(init)
        model.zero_grad(set_to_none=True)


def test_the_record_refuses_missing_stages_and_the_default_io_maps_calls_by_name() -> None:
    _, pipe, x, y = _zb()
    stages = list(pipe.stages)
    with pytest.raises(PipelineRuntimeError, match=r"none for \[1\]: pass every stage once"):
        PipelineSpec.build(dataclasses.replace(pipe.plan, routes=()), stages[:1])  # a plan without routes
    assert sorted(PipelineSpec.build(pipe.plan, stages[:1]).stages) == [0]  # the plan's routes: one stage will do
    spec = PipelineSpec.build(pipe.plan, stages)
    assert spec.model is None and spec.names is None  # no model given: nothing of it is kept
    assert sorted(pipe.pipeline_spec().stages) == [0, 1] and pipe.pipeline_spec().model is None  # a real model
    with pytest.raises(PipelineRuntimeError, match=r"train_step needs stages \[0\], but this record holds only "
                                                   r"stages \[1\]"):
        from partitioner.runtime.local import train_step

        train_step(spec.for_rank(1), x, target=y, loss_fn=F.mse_loss)
    io = IOSpec.from_plan(pipe.plan)
    (name,) = io.input_names
    assert io.flatten_inputs((x,), {}) == [x] and io.flatten_inputs((), {name: x}) == [x]
    with pytest.raises(PipelineRuntimeError, match=r"input 'nope' is not one of the plan's inputs"):
        io.flatten_inputs((), {"nope": x})
    assert io.unflatten_outputs([y]) is y


def test_static_shapes_is_read_from_the_plans_field_and_an_old_plans_note() -> None:
    _, pipe, _, _ = _zb()
    assert not static_shapes(pipe.plan) and not pipe.plan.static_shapes
    assert static_shapes(dataclasses.replace(pipe.plan, static_shapes=True))
    # a plan written before the field says it in a note
    pinned = dataclasses.replace(pipe.plan, notes=(*pipe.plan.notes, STATIC_SHAPES_NOTE + " (B fixed to 8)"))
    assert static_shapes(pinned)


class _PinsBatch(nn.Module):
    """``view(8, -1)`` pins B to 8: symbolic shape propagation fails, shapes are static."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x).view(8, -1) * 2)


def test_partition_records_static_shapes_in_the_plan() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = partition(_PinsBatch(), n_gpus=2, example_inputs=(torch.randn(8, 4),)).plan
    assert plan.static_shapes and static_shapes(plan)
    assert load_plan(plan.to_json()).static_shapes
    assert '"static_shapes"' not in _zb()[1].plan.to_json()  # left out at its default
