"""Data parallelism composed with tensor parallelism inside pipeline stages, on gloo: the
plan's mesh as one ``(dp, pp, tp)`` device mesh, replicas either FSDP2-sharded (``zero=3``:
each TP DTensor sharded again over dp, a DTensor on the 2-D (dp, tp) mesh) or averaging
their TP shards' gradients (``zero=0``). Each layout trains with clipping like one process
on the whole batch (losses, gradient norms, parameters after the steps). The 8-rank
PP2 x FSDP2 x TP2 case is its own test (``test_pp2_fsdp2_tp2_eight_ranks``) so a loaded
machine can deselect it."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from partitioner import partition
from partitioner.runtime.launch import spawn
from partitioner.runtime.tensor_parallel import full_state, with_tensor_parallel
from tests.runtime.helpers import Reference, dtensor_meshes, sgd_reference, train_clipped
from tests.runtime.test_tensor_parallel import Net, _data

TIMEOUT_S = 150.0
LR, STEPS, M, MAX_NORM = 0.1, 3, 2, 0.5
# float32: the replicas' reduction and the row-parallel linears' all-reduces sum in another
# order than one process does (rounding only).
RTOL, ATOL = 1e-5, 1e-6


def _pipe(pp: int, zero: int, tp: int = 2, schedule: str = "1f1b") -> tuple[torch.nn.Module, Any,
                                                                         dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = Net()
    init = copy.deepcopy(model.state_dict())
    inputs, _ = _data("net")
    pipe = partition(model, 2 * pp, inputs, device="cpu", link="loopback", data_parallel=2, zero=zero,
                     pinned_cuts=["blocks.1"] if pp > 1 else [], n_microbatches=M, schedule=schedule)
    assert (pipe.plan.mesh.dp, pipe.plan.pp_ranks, pipe.plan.mesh.zero) == (2, pp, zero)
    return model, with_tensor_parallel(pipe, tp), init


def _reference(model: torch.nn.Module, init: dict[str, torch.Tensor]) -> Reference:
    inputs, y = _data("net")
    return sgd_reference(model, inputs, y, F.mse_loss, steps=STEPS, lr=LR, max_norm=MAX_NORM, init=init,
                         remove_duplicate=True)


def _train(rank: int, world: int, pipe: Any) -> dict[str, Any]:
    inputs, y = _data("net")
    stage = pipe.build_stage(rank, "cpu")
    losses, norms = train_clipped(stage, inputs, y, F.mse_loss, steps=STEPS, lr=LR, max_norm=MAX_NORM)
    return {"dp": stage.dp_rank, "pp": stage.pp_rank, "tp": stage.tp_rank, "global": stage.global_rank,
            "losses": losses, "norms": norms, "meshes": dtensor_meshes(stage), "sync": type(stage.grad_sync).__name__,
            "mode": getattr(stage.grad_sync, "mode", None),
            "params": full_state(stage.named_parameters())}


def _check(model: torch.nn.Module, init: dict[str, torch.Tensor], results: list[dict[str, Any]], pp: int) -> None:
    ref = _reference(model, init)
    want_losses, want_norms, want = ref.losses, ref.norms, ref.params
    assert min(want_norms) > MAX_NORM, "clipping should change every step"
    # plan.mesh.rank: rank = (d * pp + p) * tp + t, tp innermost
    assert [(r["dp"], r["pp"], r["tp"]) for r in results] == [
        (d, p, t) for d in range(2) for p in range(pp) for t in range(2)]
    assert [r["global"] for r in results] == list(range(len(results)))
    for r in results:
        assert r["losses"] == pytest.approx(want_losses, rel=RTOL)
        assert r["norms"] == pytest.approx(want_norms, rel=RTOL)
        for n, v in r["params"].items():
            torch.testing.assert_close(v, want[n], rtol=RTOL, atol=ATOL, msg=lambda m, n=n: f"{n}: {m}")
    assert set().union(*(r["params"] for r in results)) == set(want)


@pytest.mark.timeout(200)
@pytest.mark.parametrize("zero", [3, 0])
def test_pp1_dp2_tp2_trains_like_one_process(zero: int) -> None:
    """4 ranks: 2 replicas x 2 TP ranks of a one-stage pipeline."""
    model, pipe, init = _pipe(1, zero)
    results = spawn(_train, 4, pipe, timeout_s=TIMEOUT_S)
    _check(model, init, results, 1)
    meshes = results[0]["meshes"]
    if zero == 3:  # FSDP over dp of TP's DTensors: 2-D parameters, dim 0 halved again by the replicas
        assert {r["sync"] for r in results} == {"FsdpSync"}
        assert meshes["blocks.1.q.weight"] == (("dp", "tp"), ("_StridedShard(dim=0, sf=2)", "Shard(dim=0)"), (8, 32))
        assert meshes["blocks.1.o.weight"] == (("dp", "tp"), ("Shard(dim=0)", "Shard(dim=1)"), (16, 16))
        assert meshes["head.weight"] == (("dp", "tp"), ("Shard(dim=0)", "Replicate()"), (4, 32))
    else:  # replicas average TP's shards: 1-D TP DTensors
        assert {r["sync"] for r in results} == {"GradSync"}
        assert meshes["blocks.1.q.weight"] == (("tp",), ("Shard(dim=0)",), (16, 32))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("schedule", ["1f1b", "zb-h1"])  # FSDP per unit; once per step (split backward)
def test_pp2_fsdp2_tp2_eight_ranks(schedule: str) -> None:
    """8 ranks: 2 replicas (FSDP) x 2 pipeline ranks x 2 TP ranks."""
    model, pipe, init = _pipe(2, 3, schedule=schedule)
    results = spawn(_train, 8, pipe, timeout_s=TIMEOUT_S * 2)
    _check(model, init, results, 2)
    assert {r["sync"] for r in results} == {"FsdpSync"}
    assert {r["mode"] for r in results} == {"step" if schedule == "zb-h1" else "unit"}


def _build(rank: int, world: int, pipe: Any) -> None:
    pipe.build_stage(rank, "cpu")


def test_zero1_with_tensor_parallelism_is_refused() -> None:
    """ZeroRedundancyOptimizer broadcasts DTensor parameters, which DTensor refuses mid-step:
    refused at build, naming what works instead."""
    from partitioner.runtime.errors import PipelineRuntimeError

    _, pipe, _ = _pipe(1, 1)
    with pytest.raises(PipelineRuntimeError, match=r"zero=1 with tensor parallelism .* zero=3 .* or zero=0"):
        spawn(_build, 4, pipe, timeout_s=60.0)
