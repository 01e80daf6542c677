"""Checkpoints between a 3-D layout and others, end to end (gloo, CPU, ranks forked by ``spawn``):
PP1 x FSDP2 x TP2 (4 ranks, ``zero=3``: every parameter a DTensor on the 2-D (dp, tp) mesh --
column weights ``(_StridedShard(0), Shard(0))``, row weights ``(Shard(0), Shard(1))``, the
rest ``(Shard(0), Replicate())``) trains K AdamW steps and saves model and optimizer; PP2 x DP2
(4 ranks, ``zero=0``, plain tensors) and one process resume it and train J more; and the other
way, a PP2 x DP2 save resumes on PP1 x FSDP2 x TP2. Each run ends with the parameters (and
AdamW's moments where read) of one process trained for all the steps on the whole batch.

The full layout, PP2 x FSDP2 x TP2 on 8 ranks <-> PP4 x DP2 on 8 ranks (and -> one process),
is its own test (``test_pp2_fsdp2_tp2_eight_ranks_to_pp4_dp2_and_back``, about a minute here)
so a loaded machine can deselect it; the 4-rank tests show the same on fewer processes.

Tolerances: float32; sharded, replicated and pipelined runs sum the gradient in another order
than one backward over the whole batch (rounding only): as in ``test_checkpoint_layouts``.
"""

from __future__ import annotations

import copy
import functools
import os
from typing import Any

import pytest
import torch

from partitioner import partition
from partitioner.runtime.launch import spawn
from partitioner.runtime.tensor_parallel import with_tensor_parallel
from tests.runtime.test_checkpoint_layouts import _close, _net_reference, _params, _phase, _read_whole
from tests.runtime.test_tensor_parallel import Net
from tests.runtime.test_tensor_parallel import _data as net_data

TIMEOUT_S = 150.0
K, J = 2, 2  # steps before the save, steps after each resume
M = 2  # micro-batches


@functools.cache
def _model() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = Net(n_blocks=4)  # the same initial weights as test_checkpoint_layouts' reference
    return model, copy.deepcopy(model.state_dict())


@functools.cache
def _partitioned(pp: int, dp: int, zero: int) -> Any:
    model, init = _model()
    inputs, _ = net_data("net")
    pipe = partition(model, pp * dp, inputs, device="cpu", link="loopback", data_parallel=dp, zero=zero,
                     pinned_cuts={1: [], 2: ["blocks.2"], 4: ["blocks.1", "blocks.2", "blocks.3"]}[pp],
                     n_microbatches=M)
    assert (pipe.plan.pp_ranks, pipe.plan.mesh.dp) == (pp, dp)
    return pipe


def _pipe(pp: int, dp: int, zero: int = 0, tp: int = 1) -> Any:
    model, init = _model()
    pipe = _partitioned(pp, dp, zero)
    model.load_state_dict(init)  # the ranks fork from the initial weights
    return with_tensor_parallel(pipe, tp) if tp > 1 else pipe


def _three_d() -> Any:
    return _pipe(1, 2, zero=3, tp=2)


def _strided(results: list[dict[str, Any]]) -> None:
    """Each rank's parameters are 2-D DTensors with the placements FSDP x TP composes."""
    for r in results:
        assert any("_StridedShard" in s for s in r["sharded"]), r["sharded"]
        assert "(Shard(dim=0), Shard(dim=1))" in r["sharded"], r["sharded"]


@pytest.fixture(scope="module")
def three_d_checkpoint(tmp_path_factory: Any) -> str:
    """A checkpoint written by PP1 x FSDP2 x TP2 after K AdamW steps."""
    root = tmp_path_factory.mktemp("threed")
    path = str(root / "step")
    _pipe(2, 2), _pipe(1, 1)  # partitioned before the ranks fork
    saved = spawn(_phase, 4, _three_d(), "net", None, path, K, timeout_s=TIMEOUT_S)
    _strided(saved)
    assert sorted(os.listdir(root)) == ["step"]
    _close(_params(saved), _net_reference(K)[0])
    return path


def _state(got: dict[str, dict[str, torch.Tensor]], want: dict[str, dict[str, torch.Tensor]], steps: int) -> None:
    assert got
    for n, st in got.items():
        assert float(st["step"]) == steps, n
        _close({f"{n}.{k}": st[k] for k in ("exp_avg", "exp_avg_sq")},
               {f"{n}.{k}": want[n][k] for k in ("exp_avg", "exp_avg_sq")})


@pytest.mark.timeout(240)
def test_a_three_d_checkpoint_holds_the_whole_model_and_resumes_on_pp2_dp2_and_one_process(
        three_d_checkpoint: str) -> None:
    want_k, state_k = _net_reference(K)
    model, moments = _read_whole(three_d_checkpoint)  # whole tensors, each once
    assert set(model) == set(want_k)
    _close(model, want_k)
    _state({n: {f: moments[f"{n}.{f}"] for f in ("step", "exp_avg", "exp_avg_sq")} for n in want_k}, state_k, K)
    want_kj = _net_reference(K + J)[0]
    # 3-D -> PP2 x DP2 (replicas averaging gradients, other cuts, nothing sharded)
    flat = spawn(_phase, 4, _pipe(2, 2), "net", three_d_checkpoint, None, J, timeout_s=TIMEOUT_S)
    assert all(not r["sharded"] for r in flat)
    for r in flat:
        _state(r["loaded"], state_k, K)
    _close(_params(flat), want_kj)
    # 3-D -> one process
    (one,) = spawn(_phase, 1, _pipe(1, 1), "net", three_d_checkpoint, None, J, timeout_s=TIMEOUT_S)
    _state(one["loaded"], state_k, K)
    _close(one["params"], want_kj)


@pytest.mark.timeout(240)
def test_a_pp2_dp2_checkpoint_resumes_on_three_d(tmp_path: Any) -> None:
    path = str(tmp_path / "flat")
    _pipe(2, 2)
    saved = spawn(_phase, 4, _pipe(2, 2), "net", None, path, K, timeout_s=TIMEOUT_S)
    _close(_params(saved), _net_reference(K)[0])
    # PP2 x DP2 -> PP1 x FSDP2 x TP2: each rank reads its 2-D shards of parameters and moments
    back = spawn(_phase, 4, _three_d(), "net", path, None, J, timeout_s=TIMEOUT_S)
    _strided(back)
    for r in back:
        _state(r["loaded"], _net_reference(K)[1], K)
    _close(_params(back), _net_reference(K + J)[0])


@pytest.mark.timeout(400)
def test_pp2_fsdp2_tp2_eight_ranks_to_pp4_dp2_and_back(tmp_path: Any) -> None:
    """The full 3-D layout, 8 ranks: PP2 x FSDP2 x TP2 saves; PP4 x DP2 (8 ranks, other cuts)
    and one process resume it; PP4 x DP2's save resumes on PP2 x FSDP2 x TP2. Its own test so
    a loaded machine can deselect it."""
    three_d, flat_path = str(tmp_path / "three_d"), str(tmp_path / "flat")
    _pipe(4, 2), _pipe(2, 2, zero=3), _pipe(1, 1)
    saved = spawn(_phase, 8, _pipe(2, 2, zero=3, tp=2), "net", None, three_d, K, timeout_s=TIMEOUT_S * 2)
    _strided(saved)
    _close(_params(saved), _net_reference(K)[0])
    want_kj, state_kj = _net_reference(K + J)
    flat = spawn(_phase, 8, _pipe(4, 2), "net", three_d, flat_path, J, timeout_s=TIMEOUT_S * 2)
    for r in flat:
        _state(r["loaded"], _net_reference(K)[1], K)
    _close(_params(flat), want_kj)
    (one,) = spawn(_phase, 1, _pipe(1, 1), "net", three_d, None, J, timeout_s=TIMEOUT_S)
    _close(one["params"], want_kj)
    back = spawn(_phase, 8, _pipe(2, 2, zero=3, tp=2), "net", flat_path, None, J, timeout_s=TIMEOUT_S * 2)
    _strided(back)
    for r in back:
        _state(r["loaded"], state_kj, K + J)
    _close(_params(back), _net_reference(K + 2 * J)[0])
