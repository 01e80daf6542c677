"""Checkpoints across parallel layouts with sharded stages (gloo, CPU, ranks forked by ``spawn``):
a run whose stages are tensor-parallel (DTensor over ``tp``) or FSDP2-sharded (``zero=3``, DTensor
over the replicas) saves model and AdamW state with ``torch.distributed.checkpoint``, and a run
on another layout resumes it -- PP2 x TP2 -> PP4 -> PP2 x TP2 and -> one process; PP2 x FSDP2 ->
PP2 x DP2 (ZeRO-1) -> PP2 x FSDP2 and -> one process -- ending with the parameters of one
process trained for all the steps on the whole batch. The written checkpoints hold the whole
tensors (read back here without any layout), safetensors files load into sharded stages, and
what cannot be placed on a shard is refused on every rank before anything is read or written.
FSDP x TP stages (a parameter a DTensor on a (dp, tp) mesh) do not build yet: their
placements are checked below the stage, on a 2-D mesh of 4 ranks.

Tolerances: float32; sharded and pipelined runs sum the gradient in another order than one
backward over the whole batch (rounding only), which AdamW carries on: ``RTOL``/``ATOL`` as
in the FSDP and ZeRO-1 tests (the GPT's attention key bias is compared as they compare it).
"""

from __future__ import annotations

import copy
import functools
import os
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from partitioner import partition
from partitioner.runtime.errors import PipelineRuntimeError
from partitioner.runtime.launch import spawn
from partitioner.runtime.tensor_parallel import with_tensor_parallel
from tests.runtime.helpers import data
from tests.runtime.test_checkpoint import (
    ADAMW,
    DP_BATCH,
    adamw_reference,
    dp_pipe,
    real_gpt,
    write_safetensors,
)
from tests.runtime.test_checkpoint import (
    _like_one_process as gpt_close,
)
from tests.runtime.test_tensor_parallel import Net
from tests.runtime.test_tensor_parallel import _data as net_data

TIMEOUT_S = 120.0
K, J = 2, 2  # steps before the save, steps after each resume
RTOL, ATOL = 1e-5, 1e-6
# eps above rounding noise: attention's key bias has an exactly zero gradient (see test_fsdp)
NET_ADAMW: dict[str, float] = dict(lr=1e-2, weight_decay=0.1, eps=1e-4)
M = 2  # micro-batches


def _full(t: Any) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def _moments(stage: Any, opt: torch.optim.Optimizer) -> dict[str, dict[str, torch.Tensor]]:
    """AdamW's state by this rank's parameter names, whole (a DTensor's ``full_tensor``:
    collective over its mesh, the same order on every rank of it)."""
    inner = getattr(opt, "optim", opt)  # not used with ZeRO-1 here: a plain optimizer's state
    out = {}
    for n, p in stage.named_parameters(remove_duplicate=False):
        st = inner.state.get(p, {})
        out[n] = {k: _full(v) for k, v in sorted(st.items())}
    return out


def _phase(rank: int, world: int, pipe: Any, model: str, load: str | None, save: str | None, steps: int,
           weights: str | None = None) -> dict[str, Any]:
    """Build this rank's stage, optionally read ``weights`` (safetensors) or resume ``load``
    (model + optimizer), train ``steps`` AdamW steps, optionally save: what it held."""
    from torch.distributed.tensor import DTensor

    stage = pipe.build_stage(rank, "cpu")
    if model == "gpt":
        x, y, loss_fn = data("gpt", DP_BATCH)
        opt = stage.optimizer(torch.optim.AdamW, **ADAMW)
    else:
        inputs, y = net_data("net")
        loss_fn = F.mse_loss
        opt = stage.optimizer(torch.optim.AdamW, **NET_ADAMW)
    out: dict[str, Any] = {"optimizer": type(opt).__name__,
                           "sharded": sorted({str(p.placements) for p in stage.parameters() if isinstance(p, DTensor)})}
    if weights:
        stage.load_checkpoint(weights)
        out["weights"] = {n: _full(p) for n, p in stage.named_parameters(remove_duplicate=False)}
    if load:
        stage.load_checkpoint(load, optimizer=opt)
        out["loaded"] = _moments(stage, opt)
    runner = stage.runner("1f1b", loss_fn=loss_fn)
    for _ in range(steps):
        stage.zero_grad()
        if model == "gpt":
            runner.step(x if stage.is_first else None, target=y if stage.is_last else None)
        else:
            runner.step(**(inputs if stage.is_first else {}), target=y if stage.is_last else None)
        opt.step()
    out["params"] = {n: _full(p) for n, p in stage.named_parameters(remove_duplicate=False)}
    if save:
        stage.save_checkpoint(save, optimizer=opt)
    return out


def _params(results: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {n: t for r in results for n, t in r["params"].items()}


def _read_whole(path: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Every ``model.*`` and ``optim.state.*`` tensor of a DCP checkpoint, whole, read in this
    process without any layout: what the sharded ranks wrote, put together by DCP."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = FileSystemReader(path).read_metadata().state_dict_metadata
    dest = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in meta.items()
            if isinstance(m, TensorStorageMetadata) and (k.startswith("model.") or k.startswith("optim.state."))}
    dcp.load(dest, storage_reader=FileSystemReader(path), no_dist=True)
    return ({k[len("model."):]: v for k, v in dest.items() if k.startswith("model.")},
            {k[len("optim.state."):]: v for k, v in dest.items() if k.startswith("optim.state.")})


# -- tensor parallelism: a 4-block attention + MLP net ---------------------------------------------

@functools.cache
def _net(n_gpus: int) -> tuple[torch.nn.Module, Any, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = Net(n_blocks=4)
    inputs, _ = net_data("net")
    cuts = {1: [], 2: ["blocks.2"], 4: ["blocks.1", "blocks.2", "blocks.3"]}[n_gpus]
    pipe = partition(model, n_gpus, inputs, device="cpu", link="loopback", pinned_cuts=cuts, n_microbatches=M)
    assert pipe.plan.n_stages == n_gpus
    return model, pipe, copy.deepcopy(model.state_dict())


def _net_pipe(n_gpus: int, tp: int = 1) -> Any:
    model, pipe, init = _net(n_gpus)
    model.load_state_dict(init)  # the ranks fork from the initial weights
    return with_tensor_parallel(pipe, tp) if tp > 1 else pipe


def _net_reference(steps: int) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    model, _, init = _net(1)
    ref = copy.deepcopy(model)
    ref.load_state_dict(init)
    opt = torch.optim.AdamW(ref.parameters(), **NET_ADAMW)  # type: ignore[arg-type]
    inputs, y = net_data("net")
    for _ in range(steps):
        opt.zero_grad()
        F.mse_loss(ref(**inputs), y).backward()
        opt.step()
    named = dict(ref.named_parameters())
    return {n: p.detach() for n, p in named.items()}, {n: dict(opt.state[p]) for n, p in named.items()}


def _close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got, "nothing to compare"
    for n, t in got.items():
        torch.testing.assert_close(t, want[n], rtol=RTOL, atol=ATOL, msg=lambda m, n=n: f"{n}: {m}")


def _check_state(got: dict[str, dict[str, torch.Tensor]], want: dict[str, dict[str, torch.Tensor]],
                 steps: int) -> None:
    for n, st in got.items():
        assert float(st["step"]) == steps, n
        _close({f"{n}.{k}": st[k] for k in ("exp_avg", "exp_avg_sq")},
               {f"{n}.{k}": want[n][k] for k in ("exp_avg", "exp_avg_sq")})


@pytest.fixture(scope="module")
def tp_checkpoint(tmp_path_factory: Any) -> str:
    """A checkpoint written by PP2 x TP2 after K AdamW steps (column and row shards)."""
    root = tmp_path_factory.mktemp("tp")
    path = str(root / "step")
    _net_pipe(1), _net_pipe(4)  # partitioned before the ranks fork
    saved = spawn(_phase, 4, _net_pipe(2, tp=2), "net", None, path, K, timeout_s=TIMEOUT_S)
    assert all("Shard(dim=0)" in str(r["sharded"]) and "Shard(dim=1)" in str(r["sharded"]) for r in saved)
    assert sorted(os.listdir(root)) == ["step"]  # no .partial / .old left
    _close(_params(saved), _net_reference(K)[0])
    return path


@pytest.mark.timeout(200)
def test_a_tp_checkpoint_holds_the_whole_model_and_resumes_on_one_process(tp_checkpoint: str) -> None:
    want_k, state_k = _net_reference(K)
    # the checkpoint holds whole tensors: every parameter and both moments, each once
    model, moments = _read_whole(tp_checkpoint)
    assert set(model) == set(want_k)
    _close(model, want_k)
    _check_state({n: {f: moments[f"{n}.{f}"] for f in ("step", "exp_avg", "exp_avg_sq")} for n in want_k},
                 state_k, K)
    # PP2 x TP2 -> one process (a one-stage plan, one rank)
    (one,) = spawn(_phase, 1, _net_pipe(1), "net", tp_checkpoint, None, J, timeout_s=TIMEOUT_S)
    _check_state(one["loaded"], state_k, K)
    _close(one["params"], _net_reference(K + J)[0])


@pytest.mark.timeout(200)
def test_tp_to_four_pipeline_ranks_and_back_continues_like_an_uninterrupted_run(tp_checkpoint: str,
                                                                                tmp_path: Any) -> None:
    pp4_ckpt = str(tmp_path / "pp4")
    _, state_k = _net_reference(K)
    # PP2 x TP2 -> PP4 (other cuts, no sharding): the state read is the saved one
    pp4 = spawn(_phase, 4, _net_pipe(4), "net", tp_checkpoint, pp4_ckpt, J, timeout_s=TIMEOUT_S)
    for r in pp4:
        _check_state(r["loaded"], state_k, K)
    want_kj, state_kj = _net_reference(K + J)
    _close(_params(pp4), want_kj)
    # PP4 (unsharded) -> PP2 x TP2: each TP rank reads its shards of the parameters and moments
    back = spawn(_phase, 4, _net_pipe(2, tp=2), "net", pp4_ckpt, None, J, timeout_s=TIMEOUT_S)
    for r in back:
        _check_state(r["loaded"], state_kj, K + J)
    _close(_params(back), _net_reference(K + 2 * J)[0])


# -- FSDP2 inside the stages: the GPT fixture, 2 pipeline ranks x 2 replicas -------------------------

@functools.cache
def _gpt_one() -> Any:
    x, _, _ = data("gpt", DP_BATCH)
    return partition(real_gpt(), n_gpus=1, example_inputs=(x,), n_microbatches=M)


def _gpt_state(got: dict[str, dict[str, torch.Tensor]], want: dict[str, dict[str, torch.Tensor]],
               steps: int) -> None:
    assert got
    for n, st in got.items():
        assert float(st["step"]) == steps, n
        gpt_close({f"{n}.{k}": st[k] for k in ("exp_avg", "exp_avg_sq")}, {f"{n}.{k}": want[n][k]
                                                                          for k in ("exp_avg", "exp_avg_sq")})


@pytest.fixture(scope="module")
def fsdp_checkpoint(tmp_path_factory: Any) -> str:
    """A checkpoint written by PP2 x FSDP2 after K AdamW steps."""
    path = str(tmp_path_factory.mktemp("fsdp") / "step")
    saved = spawn(_phase, 4, dp_pipe(3), "gpt", None, path, K, timeout_s=TIMEOUT_S)
    assert {r["optimizer"] for r in saved} == {"AdamW"} and all("Shard(dim=0)" in str(r["sharded"]) for r in saved)
    return path


@pytest.mark.timeout(200)
def test_an_fsdp_checkpoint_holds_the_whole_model_and_resumes_on_one_process(fsdp_checkpoint: str) -> None:
    want_k, state_k = adamw_reference(K)
    model, moments = _read_whole(fsdp_checkpoint)
    assert set(model) == set(want_k)  # tied weights under both names
    gpt_close(model, want_k)
    _gpt_state({n: {f: moments[f"{n}.{f}"] for f in ("exp_avg", "exp_avg_sq", "step")}
                for n in want_k if f"{n}.exp_avg" in moments}, state_k, K)
    # each parameter's state once (the tied embedding under its first name)
    assert sum(1 for k in moments if k.endswith(".exp_avg")) == len(list(real_gpt().parameters()))
    (one,) = spawn(_phase, 1, _gpt_one(), "gpt", fsdp_checkpoint, None, J, timeout_s=TIMEOUT_S)
    _gpt_state(one["loaded"], state_k, K)
    gpt_close(one["params"], adamw_reference(K + J)[0])


@pytest.mark.timeout(200)
def test_fsdp_to_zero1_to_fsdp_continues_like_an_uninterrupted_run(fsdp_checkpoint: str, tmp_path: Any) -> None:
    zero1 = str(tmp_path / "zero1")
    _, state_k = adamw_reference(K)
    # PP2 x FSDP2 -> PP2 x DP2 with ZeRO-1 (each replica keeps its shard of the optimizer state)
    mid = spawn(_phase, 4, dp_pipe(1), "gpt", fsdp_checkpoint, zero1, J, timeout_s=TIMEOUT_S)
    assert {r["optimizer"] for r in mid} == {"ZeroRedundancyOptimizer"}
    gpt_close(_params(mid), adamw_reference(K + J)[0])
    # and back: the unsharded save -> PP2 x FSDP2, each replica reading its shards
    back = spawn(_phase, 4, dp_pipe(3), "gpt", zero1, None, J, timeout_s=TIMEOUT_S)
    _gpt_state({n: s for r in back for n, s in r["loaded"].items()}, adamw_reference(K + J)[1], K + J)
    gpt_close(_params(back), adamw_reference(K + 2 * J)[0])


def _uneven(rank: int, world: int, pipe: Any, x: torch.Tensor, y: torch.Tensor, path: str) -> dict[str, Any]:
    """One AdamW step, save, overwrite every shard and moment, load back: what was held each time."""
    stage = pipe.build_stage(rank, "cpu")
    opt = stage.optimizer(torch.optim.AdamW, **NET_ADAMW)
    stage.runner(loss_fn=F.mse_loss).step(x if stage.is_first else None, target=y if stage.is_last else None)
    opt.step()
    before = ({n: _full(p) for n, p in stage.named_parameters()}, _moments(stage, opt))
    shards = {n: tuple(p.to_local().shape) for n, p in stage.named_parameters()}
    stage.save_checkpoint(path, optimizer=opt)
    with torch.no_grad():
        for p in stage.parameters():
            p.to_local().fill_(7.0)
        for st in opt.state.values():
            st["exp_avg"].to_local().fill_(7.0)
    stage.load_checkpoint(path, optimizer=opt)
    after = ({n: _full(p) for n, p in stage.named_parameters()}, _moments(stage, opt))
    return {"before": before, "after": after, "shards": shards}


@pytest.mark.timeout(120)
def test_uneven_fsdp_shards_save_and_load_back_exactly(tmp_path: Any) -> None:
    """Dims the replicas do not divide (7, 9, 5, a bias of 1: one replica's shard is empty);
    FSDP pads its storage, the checkpoint holds the tensors without the padding."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, 9), torch.nn.Tanh(), torch.nn.Linear(9, 5), torch.nn.Tanh(),
                                torch.nn.Linear(5, 1))
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(DP_BATCH, 7, generator=g), torch.randn(DP_BATCH, 1, generator=g)
    pipe = partition(model, n_gpus=4, data_parallel=2, example_inputs=(x,), n_microbatches=M, pinned_cuts=["2"],
                     zero=3)
    path = str(tmp_path / "uneven")
    results = spawn(_uneven, 4, pipe, x, y, path, timeout_s=TIMEOUT_S)
    assert (0,) in {r["shards"].get("4.bias") for r in results}  # an empty shard
    whole, moments = _read_whole(path)
    assert set(whole) == {n for n, _ in model.named_parameters()}
    for r in results:
        (params, state), (params_after, state_after) = r["before"], r["after"]
        for n, t in params.items():
            torch.testing.assert_close(whole[n], t, rtol=0, atol=0)
            torch.testing.assert_close(params_after[n], t, rtol=0, atol=0)
            torch.testing.assert_close(moments[f"{n}.exp_avg"], state[n]["exp_avg"], rtol=0, atol=0)
            for k in ("step", "exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(state_after[n][k], state[n][k], rtol=0, atol=0)


# -- safetensors into sharded stages, and refusals ---------------------------------------------------

def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """A copy whose every parameter differs from the initial one (what a load must bring)."""
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(torch.randn(p.shape, generator=g))
    return out


@pytest.mark.timeout(200)
def test_safetensors_load_into_tensor_parallel_and_fsdp_stages(tmp_path: Any) -> None:
    for name, pipe, model in (("net", _net_pipe(2, tp=2), _net(1)[0]), ("gpt", dp_pipe(3), real_gpt())):
        file = str(tmp_path / f"{name}.safetensors")
        want = _perturbed(model)
        write_safetensors(want, file)  # a tied tensor once, as Hugging Face stores it
        results = spawn(_phase, 4, pipe, name, None, None, 0, file, timeout_s=TIMEOUT_S)
        assert all(r["sharded"] for r in results)
        named = dict(want.named_parameters(remove_duplicate=False))
        got = {n: t for r in results for n, t in r["weights"].items()}
        assert set(got) == set(named)
        for n, t in got.items():  # each rank's shard is the file's slice: the whole is the file's, exactly
            torch.testing.assert_close(t, named[n].detach(), rtol=0, atol=0, msg=lambda m, n=n: f"{n}: {m}")


def _adafactor_save(rank: int, world: int, pipe: Any, path: str) -> None:
    inputs, y = net_data("net")
    stage = pipe.build_stage(rank, "cpu")
    opt = torch.optim.Adafactor(stage.parameters(), lr=1e-2)
    stage.runner("1f1b", loss_fn=F.mse_loss).step(**inputs, target=y)
    opt.step()
    stage.save_checkpoint(path, optimizer=opt)


def _refusals(rank: int, world: int, pipe: Any, factored: str, path: str) -> dict[str, Any]:
    from torch import nn
    from torch.distributed.tensor import DTensor, Partial

    stage = pipe.build_stage(rank, "cpu")
    before = {n: p.to_local().clone() for n, p in stage.named_parameters()}
    # Adafactor's factored second moments (a row and a column vector per matrix) have no
    # sharding of their own: refused on a tensor-parallel stage, before anything is read
    with pytest.raises(PipelineRuntimeError) as info:
        stage.load_checkpoint(factored, optimizer=torch.optim.Adafactor(stage.parameters(), lr=1e-2))
    load = str(info.value)
    unchanged = all(torch.equal(p.to_local(), before[n]) for n, p in stage.named_parameters())
    # a Partial DTensor (a pending sum) on rank 0 only: every rank refuses, nothing is written
    if rank == 0:
        mod = stage.modules[0]
        p = mod.get_parameter("blocks.0.q.weight")
        partial = DTensor.from_local(p.to_local(), p.device_mesh, [Partial()], run_check=False)
        mod.get_submodule("blocks.0.q").weight = nn.Parameter(partial)
    with pytest.raises(PipelineRuntimeError) as info:
        stage.save_checkpoint(path)
    return {"load": load, "unchanged": unchanged, "save": str(info.value)}


@pytest.mark.timeout(200)
def test_what_cannot_be_placed_on_shards_is_refused_on_every_rank(tmp_path: Any) -> None:
    factored, path = str(tmp_path / "adafactor"), str(tmp_path / "partial")
    spawn(_adafactor_save, 1, _net_pipe(1), factored, timeout_s=TIMEOUT_S)
    results = spawn(_refusals, 4, _net_pipe(2, tp=2), factored, path, timeout_s=TIMEOUT_S)
    for rank, r in enumerate(results):
        assert r["unchanged"]
        assert f"rank {rank}: {factored} holds optimizer state 'optim.state." in r["load"], r["load"]
        assert "row_var" in r["load"] or "col_var" in r["load"], r["load"]
        assert "has no known sharding" in r["load"] and "without optimizer=..." in r["load"]
    assert "'model.blocks.0.q.weight' is a DTensor with placements (Partial(sum),)" in results[0]["save"]
    assert "nothing was written" in results[0]["save"]
    for r in results[1:]:
        assert "another rank refused to save its part of the checkpoint" in r["save"], r["save"]
    assert not os.path.exists(path) and not os.path.exists(path + ".partial")


# -- 2-D meshes: a parameter sharded over replicas and TP ranks at once ------------------------------

def _placements() -> dict[str, list[Any]]:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    # (dp, tp): a column-parallel weight under FSDP (FSDP's shard of TP's shard: strided), a
    # row-parallel one, a replicated one sharded by FSDP only, and TP alone
    return {"fsdp-on-column": [_StridedShard(0, split_factor=2), Shard(0)], "fsdp-on-row": [Shard(0), Shard(1)],
            "fsdp-only": [Shard(0), Replicate()], "tp-only": [Replicate(), Shard(0)]}


def _two_d(rank: int, world: int, file: str, whole: str, out: str) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    from partitioner.runtime.checkpoint import _read_into_shard, safetensors_header

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    header, start = safetensors_header(file)
    got: dict[str, Any] = {}
    for name, placements in _placements().items():
        def fresh(placements: list[Any] = placements) -> Any:
            return distribute_tensor(torch.zeros(10, 6), mesh, placements, src_data_rank=None)

        dst = fresh()
        with open(file, "rb", buffering=0) as f:  # what load_checkpoint does with a safetensors tensor
            _read_into_shard(f, start, header["w"], dst, "w", file)
        from_file = dst.full_tensor()
        dst = fresh()  # an unsharded DCP save read into the 2-D shard, as load_checkpoint hands it to DCP
        dcp.load({"model.w": dst}, checkpoint_id=whole, no_dist=True)
        from_dcp = dst.full_tensor()
        dcp.save({f"model.{name}": dst}, checkpoint_id=f"{out}.{name}")  # every rank its shard
        got[name] = (from_file, from_dcp, tuple(dst.to_local().shape))
    return got


@pytest.mark.timeout(120)
def test_two_dimensional_shards_read_their_slice_and_write_the_whole_tensor(tmp_path: Any) -> None:
    """The placements FSDP x TP composes (a DTensor on a (dp, tp) mesh), below the stage: the
    slicing ``load_checkpoint`` does for safetensors files, and DCP's reading of an unsharded
    save into such a shard and its writing of one (10 rows: uneven shards)."""
    import torch.distributed.checkpoint as dcp

    full = torch.arange(60, dtype=torch.float32).reshape(10, 6)
    file, whole, out = str(tmp_path / "w.safetensors"), str(tmp_path / "whole"), str(tmp_path / "2d")
    save_file = pytest.importorskip("safetensors.torch").save_file
    save_file({"w": full}, file)
    dcp.save({"model.w": full}, checkpoint_id=whole, no_dist=True)
    results = spawn(_two_d, 4, file, whole, out, timeout_s=TIMEOUT_S)
    # rank (dp, tp) = (rank // 2, rank % 2); TP's 5 rows split by FSDP as 3 + 2
    assert [r["fsdp-on-column"][2] for r in results] == [(3, 6), (3, 6), (2, 6), (2, 6)]
    assert {r["fsdp-on-row"][2] for r in results} == {(5, 3)}
    for name in _placements():
        for r in results:
            torch.testing.assert_close(r[name][0], full, rtol=0, atol=0)
            torch.testing.assert_close(r[name][1], full, rtol=0, atol=0)
        model, _ = _read_whole(f"{out}.{name}")
        torch.testing.assert_close(model[name], full, rtol=0, atol=0)
