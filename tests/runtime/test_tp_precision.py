"""Tensor parallelism under mixed precision, on gloo ranks: an fp32 attention + MLP net planned
with ``precision="bf16-mixed"`` trains like ONE PROCESS UNDER THE SAME RECIPE
(``test_precision.reference``: the model cast to bf16, fp32 masters stepped by AdamW from the
bf16 gradients and copied back).

- PP2 x TP2 (4 ranks, no replicas): the bf16 parameters are DTensors, each with an fp32 master
  DTensor of the same placements (``RankStage.tensor_parallel_precision``), which
  ``stage.optimizer`` steps.
- PP1 x FSDP2 x TP2 (``zero=3``, 4 ranks): FSDP's fp32 2-D shards are the masters and its
  ``MixedPrecisionPolicy`` computes in bf16.
- fp16-mixed on PP2 x TP2: the loss scale and its overflow verdict are the job's (one
  all-reduce over every rank, TP ranks included), like ``torch.amp.GradScaler`` in one process.

Tolerances: ``test_precision._compare``'s (the masters' mean absolute difference from the
reference's at most ``LR / 20`` per rank, ``LR / 4`` per tensor, none beyond ``2 * LR * STEPS``;
losses at ``rtol=1e-2``): a row-parallel linear sums two bf16 half dot products where one
process sums one, rounding only.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from partitioner import partition
from partitioner.runtime.launch import spawn
from partitioner.runtime.tensor_parallel import full_state, with_tensor_parallel
from tests.runtime.test_precision import LR, STEPS, _compare, reference
from tests.runtime.test_tensor_parallel import Net
from tests.runtime.test_tensor_parallel import _data as net_data

TIMEOUT_S = 120.0
M = 2  # micro-batches


@functools.cache
def _planned(precision: str, pp: int, dp: int = 1, zero: int = 0) -> tuple[torch.nn.Module, Any,
                                                                             dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = Net(n_blocks=2)
    inputs, _ = net_data("net")
    pipe = partition(model, pp * dp, inputs, device="cpu", link="loopback", data_parallel=dp, zero=zero,
                     precision=precision, pinned_cuts=["blocks.1"] if pp > 1 else [], n_microbatches=M,
                     schedule="1f1b", optimizer="adamw")
    return model, pipe, copy.deepcopy(model.state_dict())


def _pipe(precision: str, pp: int, dp: int = 1, zero: int = 0) -> tuple[torch.nn.Module, Any]:
    model, pipe, init = _planned(precision, pp, dp, zero)
    model.load_state_dict(init)
    return model, with_tensor_parallel(pipe, 2)


def _train(rank: int, world: int, pipe: Any, growth_interval: int | None = None,
           poison: int | None = None, ckpt: str | None = None) -> dict[str, Any]:
    from torch.distributed.tensor import DTensor

    inputs, y = net_data("net")
    stage = pipe.build_stage(rank, "cpu")
    if growth_interval is not None:
        stage.loss_scaler.growth_interval = growth_interval
    opt = stage.optimizer(torch.optim.AdamW, lr=LR)
    runner = stage.runner("1f1b", loss_fn=F.mse_loss)
    losses, scales, skipped, changed = [], [], [], None
    for step in range(STEPS):
        opt.zero_grad()
        loss = runner.step(**(inputs if stage.is_first else {}), target=y if stage.is_last else None)
        if step == poison:  # one TP rank of the job overflows: its shard of one gradient
            if rank == world - 1:
                dict(stage.named_parameters())["blocks.1.up.weight"].grad.to_local()[0, 0] = float("inf")
            before = {n: p.to_local().clone() for n, p in stage.named_parameters()}
        opt.step()
        if step == poison:
            changed = [n for n, p in stage.named_parameters() if not torch.equal(p.to_local(), before[n])]
        losses.append(None if loss is None else loss.item())
        scales.append(getattr(opt, "scale", None))
        skipped.append(getattr(opt, "skipped", 0))
    if ckpt is not None:
        stage.save_checkpoint(ckpt, opt)
    params = dict(stage.named_parameters())
    masters = stage.masters
    fsdp = {}
    for mod in stage.modules.values():  # FSDP's policy (zero=3): what its units gather and compute in
        for sub in mod.modules():
            state = getattr(sub, "_get_fsdp_state", None)
            if state is not None:
                fsdp[str(state()._mp_policy.param_dtype)] = str(state()._mp_policy.reduce_dtype)
    return {"rank": rank, "dp": stage.dp_rank, "last": stage.is_last, "losses": losses, "scales": scales,
            "skipped": skipped, "changed": changed, "opt": type(opt).__name__, "fsdp": fsdp,
            "sync": type(stage.grad_sync).__name__,
            "dtypes": {str(p.dtype) for p in params.values()},
            "local_dtypes": {str(p.to_local().dtype) for p in params.values() if isinstance(p, DTensor)},
            "placements": {n: (tuple(map(repr, p.placements)), tuple(map(repr, masters[n].placements)))
                           for n, p in params.items() if n in masters and isinstance(p, DTensor)},
            "masters": full_state(masters.items()), "params": full_state(params.items())}


def _load(rank: int, world: int, pipe: Any, path: str) -> dict[str, Any]:
    """A fresh stage and optimizer, loaded from ``path``: masters, parameters, AdamW's moments."""
    stage = pipe.build_stage(rank, "cpu")
    opt = stage.optimizer(torch.optim.AdamW, lr=LR)
    stage.load_checkpoint(path, opt)
    by_master = {id(m): n for n, m in stage.masters.items()}
    return {"masters": full_state(stage.masters.items()), "params": full_state(stage.named_parameters()),
            "exp_avg": full_state((by_master[id(k)], v["exp_avg"]) for k, v in opt.state.items())}


def _without_key_bias(results: list[dict[str, Any]], want: dict[str, Any]) -> None:
    """Attention's key bias has an exactly zero gradient (softmax ignores what it adds to every
    score of a row): what it gets is rounding noise, in another order here than in one process,
    and AdamW moves it by about ``LR`` a step in that noise's sign either way. Left out of the
    comparison (``test_checkpoint_layouts`` raises AdamW's eps for it instead); every other
    parameter is compared."""
    for d in (*results, want):
        for key in ("masters", "params"):
            if key in d:
                d[key] = {n: t for n, t in d[key].items() if not n.endswith(".k.bias")}


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    inputs, y = net_data("net")
    return inputs["x"], y


@pytest.mark.timeout(200)
def test_pp2_tp2_bf16_mixed_trains_like_one_process_under_the_same_recipe(tmp_path: Any) -> None:
    """And its checkpoint holds the fp32 masters: a fresh PP2 x TP2 stage loads them exactly,
    its bf16 DTensors their casts."""
    model, pipe = _pipe("bf16-mixed", 2)
    path = str(tmp_path / "ckpt")
    results = spawn(_train, 4, pipe, None, None, path, timeout_s=TIMEOUT_S)
    loaded = spawn(_load, 4, pipe, path, timeout_s=TIMEOUT_S)
    for r, got in zip(results, loaded):
        assert got["masters"] and set(got["masters"]) == set(r["masters"])
        for n, m in got["masters"].items():
            assert m.dtype == torch.float32 and torch.equal(m, r["masters"][n]), n
            assert torch.equal(got["params"][n], m.to(torch.bfloat16)), n
        assert set(got["exp_avg"]) == set(r["masters"])
    assert {r["opt"] for r in results} == {"MixedPrecisionOptimizer"}
    for r in results:  # the bf16 copy of a DTensor shard is a DTensor with its master's placements
        assert r["local_dtypes"] == {"torch.bfloat16"}
        assert r["placements"] and all(p == m for p, m in r["placements"].values()), r["placements"]
    assert any(("Shard(dim=1)",) in pm for r in results for pm in r["placements"].values())  # row-parallel
    want = reference(model, torch.bfloat16, data=_data(), loss_fn=F.mse_loss, microbatches=M)
    _without_key_bias(results, want)
    _compare(results, want, torch.bfloat16)
    init = dict(model.named_parameters())
    moved = max((m - init[n].detach()).abs().max().item() for n, m in want["masters"].items())
    assert moved > 2 * LR  # the masters moved: the comparison has teeth


@pytest.mark.timeout(200)
@pytest.mark.parametrize(("zero", "precision"), [(3, "bf16-mixed"), (0, "bf16-mixed"), (3, "fp16-mixed")])
def test_pp1_dp2_tp2_mixed_trains_like_one_process(zero: int, precision: str) -> None:
    """Two replicas of a TP2 stage. zero=3: FSDP's fp32 2-D shards are the masters, its policy
    gathers them in the compute dtype (fp16: their gradients unscaled in place, one verdict).
    zero=0: each replica's bf16 DTensors and fp32 master DTensors, gradients averaged over the
    replicas by ``GradSync`` (in bf16, as without TP)."""
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
    model, pipe = _pipe(precision, 1, dp=2, zero=zero)
    results = spawn(_train, 4, pipe, 1 if dtype == torch.float16 else None, timeout_s=TIMEOUT_S)
    want = reference(model, dtype, scaled=dtype == torch.float16, growth_interval=1, data=_data(),
                     loss_fn=F.mse_loss, microbatches=2 * M)
    last = [r["losses"] for r in results if r["last"]]
    assert len(last) == 4  # every TP rank of both replicas runs the last stage
    mean = [sum(v) / len(v) for v in zip(*last)]
    assert mean == pytest.approx(want["losses"], rel=1e-2)
    for r in results:
        r["last"] = False  # losses compared as the replicas' mean above
        if dtype == torch.float16:
            assert r["scales"] == want["scales"], (r["rank"], r["scales"], want["scales"])
        if zero == 3:
            assert r["fsdp"] and set(r["fsdp"]) == {str(dtype)}, r["fsdp"]
            assert r["dtypes"] == {"torch.float32"} and not r["masters"]
            # the fp32 shards are the masters: compared as test_precision compares masters
            r.update(masters=r["params"], dtypes={str(dtype)},
                     params={n: p.to(dtype) for n, p in r["params"].items()})
        else:
            assert r["sync"] == "GradSync" and r["local_dtypes"] == {str(dtype)}
    _without_key_bias(results, want)
    _compare(results, want, dtype)


@pytest.mark.timeout(200)
def test_pp2_tp2_fp16_mixed_scales_the_loss_like_grad_scaler() -> None:
    """One loss scale for the job: every rank (both TP ranks of each pipeline rank) grows it
    after each clean step (growth_interval=1), as GradScaler does in one process."""
    model, pipe = _pipe("fp16-mixed", 2)
    results = spawn(_train, 4, pipe, 1, timeout_s=TIMEOUT_S)
    want = reference(model, torch.float16, scaled=True, growth_interval=1, data=_data(), loss_fn=F.mse_loss,
                     microbatches=M)
    _without_key_bias(results, want)
    _compare(results, want, torch.float16)
    assert len({tuple(r["skipped"]) for r in results}) == 1  # every rank skipped the same steps
    for r in results:
        assert r["scales"] == want["scales"], (r["rank"], r["scales"], want["scales"])


@pytest.mark.timeout(200)
def test_an_fp16_overflow_on_one_tp_rank_skips_the_step_on_every_rank() -> None:
    """An inf in one TP rank's shard of one gradient (the last rank's): every rank of the job,
    the other TP rank of that pipeline rank and the other pipeline rank's included, skips the
    step and halves the scale, as GradScaler does in one process."""
    model, pipe = _pipe("fp16-mixed", 2)
    results = spawn(_train, 4, pipe, None, 1, timeout_s=TIMEOUT_S)
    clean = reference(model, torch.float16, scaled=True, data=_data(), loss_fn=F.mse_loss, microbatches=M)
    for r in results:
        assert r["changed"] == [], f"rank {r['rank']} stepped through the overflow: {r['changed']}"
        assert r["skipped"] == [0, 1, 1]
        assert r["scales"][1] == r["scales"][0] / 2 == clean["scales"][1] / 2


def test_partition_refuses_zero1_with_tensor_parallelism_and_replicas() -> None:
    """What build_stage refuses (ZeRO-1 over DTensor parameters) is refused up front, naming the fix."""
    from partitioner import PartitionError

    inputs, _ = net_data("net")
    with pytest.raises(PartitionError, match=r"zero=1 with tensor_parallel=2 and data_parallel=2 .* zero=3 .* zero=0"):
        partition(Net(), 4, inputs, device="cpu", data_parallel=2, zero=1, tensor_parallel=2)
