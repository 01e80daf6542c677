"""FSDP's per-step mode (``plan.mesh.fsdp == "step"``) under a whole-backward schedule: 4 gloo
ranks as 2 pipeline ranks x 2 shards, 1F1B, train like one process on the whole batch, with
each FSDP unit all-gathered and reduce-scattered once per step (counted by wrapping the
collectives FSDP calls); a plan without the field runs the schedule's default mode."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
import torch
import torch.distributed as dist

from partitioner.plan import load_plan
from partitioner.runtime.launch import spawn
from tests.runtime.helpers import data
from tests.runtime.test_fsdp import ATOL, BATCH, OPTIMIZERS, RTOL, STEPS, TIMEOUT_S, _pipe, _reference

#: The collectives FSDP2 issues (torch 2.13: ``all_gather_single`` / ``reduce_scatter_single``;
#: older releases: the ``*_tensor`` forms). Counted, not replaced.
GATHERS = ("all_gather_single", "all_gather_into_tensor")
SCATTERS = ("reduce_scatter_single", "reduce_scatter_tensor")


def _counting(counts: dict[str, int]) -> None:
    for kind, names in (("gather", GATHERS), ("scatter", SCATTERS)):
        for name in names:
            fn = getattr(dist, name, None)
            if fn is None:
                continue

            def wrapped(*a: Any, _fn: Any = fn, _kind: str = kind, **kw: Any) -> Any:
                counts[_kind] += 1
                return _fn(*a, **kw)

            setattr(dist, name, wrapped)


def _train(rank: int, world: int, pipe: Any, kind: str) -> dict[str, Any]:
    from torch.distributed.tensor import DTensor

    from partitioner.runtime.fsdp import units

    counts = {"gather": 0, "scatter": 0}
    _counting(counts)
    x, y, loss_fn = data("gpt", BATCH)
    stage = pipe.build_stage(rank, "cpu")
    cls, kw = OPTIMIZERS[kind]
    opt = stage.optimizer(cls, **kw)
    runner = stage.runner("1f1b", loss_fn=loss_fn)
    losses, per_step = [], []
    for _ in range(STEPS):
        stage.zero_grad()
        counts.update(gather=0, scatter=0)
        loss = runner.step(x if stage.is_first else None, target=y if stage.is_last else None,
                           loss_on_every_rank=True)
        per_step.append(dict(counts))
        losses.append(loss.item())
        opt.step()
    params = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
              for n, p in stage.named_parameters(remove_duplicate=False)}
    n_units = 0  # the blocks, embeddings and head + the stage's own unit where it holds parameters (a root
    for mod in stage.modules.values():  # without any gathers nothing)
        inside = {id(p) for _, leaves in units(mod) for leaf in leaves for p in mod.get_submodule(leaf).parameters()}
        n_units += len(units(mod)) + any(id(p) not in inside for p in mod.parameters())
    return {"mode": stage.grad_sync.mode, "losses": losses, "params": params, "per_step": per_step,
            "units": n_units}


def _with_mode(pipe: Any, how: str) -> Any:
    """The pipe with its plan's ``mesh.fsdp`` set, through the JSON (what a saved plan runs)."""
    plan = dataclasses.replace(pipe.plan, mesh=dataclasses.replace(pipe.plan.mesh, fsdp=how))
    pipe.plan = load_plan(json.loads(plan.to_json()))
    return pipe


@pytest.mark.parametrize("kind", ["sgd"])
def test_step_mode_under_1f1b_trains_like_one_process_with_one_gather_per_unit(kind: str) -> None:
    model, pipe = _pipe("1f1b")
    default = pipe.plan
    assert pipe.plan.mesh.zero == 3 and not pipe.plan.mesh.fsdp
    try:
        _with_mode(pipe, "step")
        want_losses, _, want = _reference(model, kind, False)
        results = spawn(_train, 4, pipe, kind, timeout_s=TIMEOUT_S)
    finally:
        pipe.plan = default
    assert {r["mode"] for r in results} == {"step"}
    for r in results:
        assert r["losses"] == pytest.approx(want_losses, rel=1e-5)
        for n, v in r["params"].items():
            torch.testing.assert_close(v, want[n], rtol=RTOL, atol=ATOL, msg=lambda m, n=n: f"{n}: {m}")
        # m=2 micro-batches, yet each unit is gathered once and reduce-scattered once per step
        assert r["units"] >= 2
        assert r["per_step"] == [{"gather": r["units"], "scatter": r["units"]}] * STEPS, r


def test_a_plan_without_the_field_runs_the_schedules_mode() -> None:
    """An old plan (no ``mesh.fsdp``) runs per unit under 1F1B: more than one gather per unit
    per step (forward and backward of each micro-batch), a reduce-scatter per micro-batch."""
    _, pipe = _pipe("1f1b")
    assert "fsdp" not in pipe.plan.to_dict()["mesh"]
    results = spawn(_train, 4, pipe, "sgd", timeout_s=TIMEOUT_S)
    assert {r["mode"] for r in results} == {"unit"}
    for r in results:
        first = r["per_step"][0]
        assert first["gather"] > r["units"] and first["scatter"] >= 2 * (r["units"] - 1), r
