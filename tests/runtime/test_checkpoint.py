"""A model no single host could hold, run the way such a model must be: planned on the
meta device, each rank building and loading only its own stage, checkpoints keyed by the
model's FQNs and resumed under another plan (gloo, CPU; ranks forked by ``spawn``).

Exactness is against the unpartitioned model in one process, started from the same
checkpoint: losses and parameters equal to ``RTOL``/``ATOL`` (float32; a sum of
micro-batch gradients differs from the full-batch gradient by rounding only). SGD with
momentum, so the optimizer state carried through a checkpoint matters.
"""

from __future__ import annotations

import copy
import functools
import json
import os
from typing import Any

import pytest
import torch

from partitioner import partition
from partitioner.runtime.errors import PipelineRuntimeError
from partitioner.runtime.launch import spawn
from tests.fixtures.models import FIXTURES
from tests.runtime.helpers import LAYOUTS, assert_params, data

# Only the tests write safetensors files with the package; the runtime reads them itself.
save_file = pytest.importorskip("safetensors.torch", reason="writing test checkpoints needs safetensors").save_file

TIMEOUT_S = 120.0
LR, MOMENTUM, M = 0.1, 0.9, 4


def sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)


def real_gpt() -> torch.nn.Module:
    torch.manual_seed(0)
    return FIXTURES["gpt"].build()


@functools.cache
def meta_pipe(layout: str) -> Any:
    """The layout's pipe over a GPT whose parameters are all on the meta device."""
    with torch.device("meta"):
        model = FIXTURES["gpt"].build()
    pipe = partition(model, example_inputs=FIXTURES["gpt"].inputs(), **LAYOUTS[layout])
    assert all(p.device.type == "meta" for p in model.parameters())
    return pipe


def write_safetensors(model: torch.nn.Module, path: str) -> None:
    """As Hugging Face does: a tied tensor stored once, under its first name."""
    seen: set[int] = set()
    out = {}
    for n, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            out[n] = t.detach().contiguous()
    save_file(out, path)


def single_process(model: torch.nn.Module, steps: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    ref = copy.deepcopy(model)
    opt = sgd(ref.parameters())
    x, y, loss_fn = data("gpt")
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(ref(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, {n: p.detach() for n, p in ref.named_parameters(remove_duplicate=False)}


def _train(stage: Any, opt: torch.optim.Optimizer, rank: int, steps: int) -> list[float]:
    x, y, loss_fn = data("gpt")
    runner = stage.runner("1f1b", n_microbatches=M, loss_fn=loss_fn, batch_size=len(x))
    losses = []
    for _ in range(steps):
        stage.zero_grad()
        loss = runner.step(x if rank == 0 else None, target=y)
        losses.append(float("nan") if loss is None else loss.item())
        opt.step()
    return losses


def _from_file(rank: int, world: int, layout: str, path: str, steps: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    stage = meta_pipe(layout).build_stage(rank, "cpu")
    read = stage.load_checkpoint(path)
    assert read == [path] and not stage.uninitialized
    losses = _train(stage, sgd(stage.parameters()), rank, steps)
    return losses, {n: p.detach() for n, p in stage.named_parameters(remove_duplicate=False)}


@pytest.mark.parametrize("layout", ["gpt-2", "gpt-4"])
def test_meta_ranks_loading_a_checkpoint_train_like_one_process(layout: str, tmp_path: Any) -> None:
    model = real_gpt()
    path = str(tmp_path / "gpt.safetensors")
    write_safetensors(model, path)
    pipe = meta_pipe(layout)
    want_losses, want = single_process(model, 3)
    results = spawn(_from_file, pipe.plan.options["n_gpus"], layout, path, 3, timeout_s=TIMEOUT_S)
    assert results[-1][0] == pytest.approx(want_losses, rel=1e-5)
    for _, params in results:
        assert_params(params, want)
    assert set().union(*(p for _, p in results)) == set(want)


def _phase(rank: int, world: int, layout: str, load: str, optim_from: str | None, save: str | None,
           steps: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    stage = meta_pipe(layout).build_stage(rank, "cpu")
    opt = sgd(stage.parameters())
    stage.load_checkpoint(load, optimizer=opt if optim_from else None)
    losses = _train(stage, opt, rank, steps)
    if save:
        stage.save_checkpoint(save, optimizer=opt)
    return losses, {n: p.detach() for n, p in stage.named_parameters(remove_duplicate=False)}


def test_save_on_4_ranks_resume_on_2_continues_like_an_uninterrupted_run(tmp_path: Any) -> None:
    model = real_gpt()
    start, ckpt = str(tmp_path / "start.safetensors"), str(tmp_path / "step2")
    write_safetensors(model, start)
    meta_pipe("gpt-4"), meta_pipe("gpt-2")
    want_losses, want = single_process(model, 4)
    first = spawn(_phase, 4, "gpt-4", start, None, ckpt, 2, timeout_s=TIMEOUT_S)
    assert sorted(os.listdir(tmp_path)) == ["start.safetensors", "step2"]  # no .partial / .old left
    second = spawn(_phase, 2, "gpt-2", ckpt, ckpt, None, 2, timeout_s=TIMEOUT_S)
    assert first[-1][0] + second[-1][0] == pytest.approx(want_losses, rel=1e-5)
    for _, params in second:
        assert_params(params, want)
    # Without the optimizer state (momentum) the same resume would differ: the test can fail.
    fresh = spawn(_phase, 2, "gpt-2", ckpt, None, None, 2, timeout_s=TIMEOUT_S)
    assert fresh[-1][0][1] != pytest.approx(want_losses[3], rel=1e-5)


def _interrupted(rank: int, world: int, path: str) -> tuple[dict[str, torch.Tensor], str]:
    from torch.distributed.checkpoint import FileSystemWriter

    stage = meta_pipe("gpt-2").build_stage(rank, "cpu")
    stage.load_checkpoint(path + ".safetensors")
    opt = sgd(stage.parameters())
    stage.save_checkpoint(path, optimizer=opt)
    before = {n: t.clone() for n, t in stage.state_dict().items()}
    _train(stage, opt, rank, 1)

    def crash(self: Any, *args: Any, **kwargs: Any) -> None:
        raise OSError("disk full (injected)")

    FileSystemWriter.finish = crash  # type: ignore[method-assign]  # the metadata write, after the data
    try:
        stage.save_checkpoint(path, optimizer=opt)
        message = ""
    except PipelineRuntimeError as e:
        message = str(e)
    again = meta_pipe("gpt-2").build_stage(rank, "cpu")
    again.load_checkpoint(path)
    got = again.state_dict()
    assert all(torch.equal(got[n], before[n]) for n in before)
    return got, message


def test_an_interrupted_save_leaves_the_previous_checkpoint(tmp_path: Any) -> None:
    path = str(tmp_path / "ckpt")
    write_safetensors(real_gpt(), path + ".safetensors")
    meta_pipe("gpt-2")
    results = spawn(_interrupted, 2, path, timeout_s=TIMEOUT_S)
    for _, message in results:
        assert "disk full (injected)" in message and f"{path} is unchanged" in message
    want = real_gpt().state_dict()
    for got, _ in results:
        for n, t in got.items():
            torch.testing.assert_close(t, want[n], rtol=0, atol=0)


def _errors(rank: int, world: int, good: str, bad_shape: str, missing: str) -> list[str]:
    stage = meta_pipe("gpt-2").build_stage(rank, "cpu")
    before = {n: t.clone() for n, t in stage.state_dict().items()}
    messages = []
    for path in (bad_shape, missing):
        with pytest.raises(PipelineRuntimeError) as info:
            stage.load_checkpoint(path)
        messages.append(str(info.value))
    # every key is checked before anything is read: a failed load leaves no half-loaded stage
    assert all(torch.equal(t, before[n]) for n, t in stage.state_dict().items())
    stage.load_checkpoint(good)
    return messages


def test_a_missing_or_misshaped_key_names_the_key_and_the_file(tmp_path: Any) -> None:
    model = real_gpt()
    good, bad, missing = (str(tmp_path / f"{n}.safetensors") for n in ("good", "bad", "missing"))
    write_safetensors(model, good)
    sd = {n: t.contiguous() for n, t in model.state_dict().items() if n != "lm_head.weight"}
    save_file({**sd, "transformer.wpe.weight": torch.zeros(3, 5), "transformer.h.3.mlp.c_fc.weight": torch.zeros(2)}, bad)
    save_file({n: t for n, t in sd.items() if n not in ("transformer.wte.weight", "transformer.h.3.attn.c_attn.bias")},
              missing)
    meta_pipe("gpt-2")
    (m0, m1) = spawn(_errors, 2, good, bad, missing, timeout_s=TIMEOUT_S)
    assert f"key 'transformer.wpe.weight' in {bad} has shape (3, 5), the model's is (16, 32)" in m0[0]
    assert f"key 'transformer.h.3.mlp.c_fc.weight' in {bad} has shape (2,)" in m1[0]
    assert f"key 'transformer.wte.weight' is not in {missing} (nor under its tied names ['lm_head.weight'])" in m0[1]
    assert f"key 'transformer.h.3.attn.c_attn.bias' is not in {missing}" in m1[1]
    assert "1 more missing: ['lm_head.weight']" in m1[1]  # the last rank's name for the tied weight


# --------------------------------------------------------------- Hugging Face, sharded


def _hf_config() -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers, transformers.GPT2Config(vocab_size=128, n_positions=32, n_embd=32, n_layer=4, n_head=2,
                                                 use_cache=False, bos_token_id=0, eos_token_id=0,
                                                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


@functools.cache
def _hf_meta_pipe() -> Any:
    transformers, cfg = _hf_config()
    with torch.device("meta"):
        model = transformers.GPT2LMHeadModel(cfg)
    return partition(model, 2, {"input_ids": torch.randint(0, 128, (4, 16))}, device="cpu",
                     pinned_cuts=["transformer.h.2"])


def _hf_rank(rank: int, world: int, directory: str) -> tuple[list[str], dict[str, torch.Tensor], dict[str, Any]]:
    stage = _hf_meta_pipe().build_stage(rank, "cpu")
    initial = {n: p.detach().clone() for n, p in stage.named_parameters(remove_duplicate=False)}
    assert not stage.uninitialized  # initialised by transformers' own _init_weights
    read = stage.load_checkpoint(directory)
    ids, y = _hf_data()
    loss = stage.runner("1f1b", n_microbatches=2, loss_fn=_hf_loss).step(**({"input_ids": ids} if rank == 0 else {}),
                                                                         target=y)
    initial["loss"] = None if loss is None else loss.item()  # the stages run on cpu: no device=meta left
    return read, {n: p.detach() for n, p in stage.named_parameters(remove_duplicate=False)}, initial


def _hf_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.randint(0, 128, (4, 16), generator=g), torch.randint(0, 128, (4, 16), generator=g)


def _hf_loss(out: Any, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), y.flatten())


def test_a_sharded_hugging_face_checkpoint_loads_per_rank_opening_only_its_shards(tmp_path: Any) -> None:
    transformers, cfg = _hf_config()
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    want = {n: p.detach() for n, p in model.named_parameters(remove_duplicate=False)}
    model.save_pretrained(str(tmp_path), max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert "lm_head.weight" not in index  # HF stores the tied head once, as transformer.wte.weight
    pipe = _hf_meta_pipe()
    results = spawn(_hf_rank, 2, str(tmp_path), timeout_s=TIMEOUT_S)
    shards = sorted(set(index.values()))
    for rank, (read, params, initial) in enumerate(results):
        names = set(pipe.plan.stages[rank].parameters)
        needed = {os.path.join(str(tmp_path), index[n if n in index else "transformer.wte.weight"]) for n in names}
        assert set(read) == needed and len(read) < len(shards)
        assert set(params) == names
        assert_params(params, want)
        # before loading: HF's initialisation (normal, std 0.02), not NaN nor the checkpoint
        w = initial["transformer.h.3.attn.c_attn.weight" if rank else "transformer.h.0.attn.c_attn.weight"]
        assert 0.015 < w.std() < 0.025 and w.mean().abs() < 0.005
    torch.testing.assert_close(results[0][2]["transformer.wte.weight"], results[1][2]["lm_head.weight"],
                               rtol=0, atol=0)
    ids, y = _hf_data()
    assert results[1][2]["loss"] == pytest.approx(_hf_loss(model(input_ids=ids), y).item(), rel=1e-5)


# --------------------------------------------------------------- ZeRO-1: pipeline x data parallel
#
# 4 gloo ranks as 2 replicas x 2 pipeline ranks, AdamW with weight decay: each replica keeps
# half of the optimizer state (ZeroRedundancyOptimizer over stage.dp_group). The checkpoint
# holds the whole state, keyed by FQN, as an unsharded run's does. Resuming in the same
# layout replays the uninterrupted run bit for bit; against one process on the whole batch
# (other summation order) parameters and moments agree to DP_RTOL/DP_ATOL, except the
# attention's key bias: its gradient is zero in exact arithmetic (softmax ignores a shift
# shared by all keys), so it is rounding noise, whose sign AdamW turns into a whole
# lr-sized step (up to 4e-3 apart after 4 steps); it is compared bit for bit only.

DP_BATCH, ADAMW = 8, dict(lr=0.01, weight_decay=0.1)
DP_RTOL, DP_ATOL = 1e-5, 1e-6


@functools.cache
def dp_pipe(zero: int) -> Any:
    x, _, _ = data("gpt", DP_BATCH)
    return partition(real_gpt(), n_gpus=4, data_parallel=2, zero=zero, example_inputs=(x,), n_microbatches=2,
                     pinned_cuts=["transformer.h.2"])


def adamw_reference(steps: int) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """One process, the whole batch: parameters and AdamW state by FQN (tied names included)."""
    model = real_gpt()
    opt = torch.optim.AdamW(model.parameters(), **ADAMW)  # type: ignore[arg-type]
    x, y, loss_fn = data("gpt", DP_BATCH)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    named = dict(model.named_parameters(remove_duplicate=False))
    return ({n: p.detach() for n, p in named.items()},
            {n: {k: v for k, v in opt.state[p].items() if k != "step"} for n, p in named.items()})


def _moments(stage: Any, params: list[torch.Tensor], state: dict[int, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """exp_avg / exp_avg_sq / step by this rank's parameter names (each of a tied tensor's);
    ``state`` keyed by index into ``params``, as in a state dict."""
    names: dict[int, list[str]] = {}
    for n, p in stage.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    return {n: {k: v.detach().clone() for k, v in state[i].items()}
            for i, p in enumerate(params) if state.get(i) for n in names[id(p)]}


def _dp_phase(rank: int, world: int, pipe: Any, load: str | None, save: str | None, steps: int) -> dict[str, Any]:
    x, y, loss_fn = data("gpt", DP_BATCH)
    stage = pipe.build_stage(rank, "cpu")
    opt = stage.optimizer(torch.optim.AdamW, **ADAMW)
    if load:
        stage.load_checkpoint(load, optimizer=opt)
    runner = stage.runner("1f1b", loss_fn=loss_fn)
    for _ in range(steps):
        stage.zero_grad()
        runner.step(x if stage.is_first else None, target=y if stage.is_last else None)
        opt.step()
    out: dict[str, Any] = {"dp": stage.dp_rank, "optimizer": type(opt).__name__,
                           "params": {n: p.detach().clone() for n, p in stage.named_parameters(remove_duplicate=False)}}
    if save:
        stage.save_checkpoint(save, optimizer=opt)
        if out["optimizer"] == "ZeroRedundancyOptimizer":
            assert not opt._all_state_dicts  # the gathered copy was freed
            opt.consolidate_state_dict(to=0)  # group rank 0: replica 0
            if stage.dp_rank == 0:
                params = [p for g in opt.param_groups for p in g["params"]]
                out["state"] = _moments(stage, params, opt.state_dict()["state"])
    return out


def _plain_resume(rank: int, world: int, path: str, steps: int) -> dict[str, Any]:
    """The 2-rank pipeline (no data parallelism) with a plain AdamW."""
    x, y, loss_fn = data("gpt", DP_BATCH)
    stage = meta_pipe("gpt-2").build_stage(rank, "cpu")
    opt = torch.optim.AdamW(stage.parameters(), **ADAMW)  # type: ignore[arg-type]
    stage.load_checkpoint(path, optimizer=opt)
    params = stage.parameters()
    loaded = _moments(stage, params, {i: opt.state[p] for i, p in enumerate(params) if p in opt.state})
    runner = stage.runner("1f1b", n_microbatches=2, loss_fn=loss_fn, batch_size=len(x))
    for _ in range(steps):
        stage.zero_grad()
        runner.step(x if rank == 0 else None, target=y)
        opt.step()
    return {"loaded": loaded, "hypers": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
            "params": {n: p.detach().clone() for n, p in stage.named_parameters(remove_duplicate=False)}}


@pytest.fixture(scope="module")
def zero1_checkpoint(tmp_path_factory: Any) -> tuple[str, list[dict[str, Any]]]:
    """A checkpoint written after 2 ZeRO-1 steps, and what each rank held then."""
    path = str(tmp_path_factory.mktemp("zero1") / "step2")
    saved = spawn(_dp_phase, 4, dp_pipe(1), None, path, 2, timeout_s=TIMEOUT_S)
    assert {r["optimizer"] for r in saved} == {"ZeroRedundancyOptimizer"}
    return path, saved


def _close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rtol: float, atol: float) -> None:
    assert got
    for n, t in got.items():
        torch.testing.assert_close(t, want[n], rtol=rtol, atol=atol, msg=lambda m: f"{n}: {m}")


def _like_one_process(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """DP_RTOL/DP_ATOL, the key third of each attention bias left out (see above)."""
    def query_value(n: str, t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t[:len(t) // 3], t[2 * len(t) // 3:]]) if n.endswith("attn.c_attn.bias") else t

    _close({n: query_value(n, t) for n, t in got.items()}, {n: query_value(n, want[n]) for n in got},
           DP_RTOL, DP_ATOL)


def test_a_zero1_checkpoint_resumes_like_an_uninterrupted_run(zero1_checkpoint: Any) -> None:
    from partitioner.runtime.checkpoint import _read_small

    path, saved = zero1_checkpoint
    assert _read_small(path, ["optim.class"]) == {"optim.class": "AdamW"}  # the wrapped class, not ZeRO's
    uninterrupted = spawn(_dp_phase, 4, dp_pipe(1), None, None, 4, timeout_s=TIMEOUT_S)
    resumed = spawn(_dp_phase, 4, dp_pipe(1), path, None, 2, timeout_s=TIMEOUT_S)
    want, _ = adamw_reference(4)
    for a, b in zip(resumed, uninterrupted):
        _close(a["params"], b["params"], rtol=0, atol=0)  # same layout, same arithmetic: bit for bit
        _like_one_process(a["params"], want)
    # the consolidated state written is one process's AdamW state after 2 steps
    _, moments = adamw_reference(2)
    consolidated = {n: s for r in saved if "state" in r for n, s in r["state"].items()}
    assert set(consolidated) == set(moments)  # every parameter, tied copies under both names
    for n, s in consolidated.items():
        assert float(s["step"]) == 2.0
        _close({k: s[k] for k in ("exp_avg", "exp_avg_sq")}, moments[n], DP_RTOL, DP_ATOL)


def test_a_zero1_checkpoint_loads_into_a_plain_optimizer_on_a_pipeline_without_replicas(
        zero1_checkpoint: Any) -> None:
    path, saved = zero1_checkpoint
    consolidated = {n: s for r in saved if "state" in r for n, s in r["state"].items()}
    meta_pipe("gpt-2")
    want, _ = adamw_reference(4)
    results = spawn(_plain_resume, 2, path, 2, timeout_s=TIMEOUT_S)
    for r in results:
        assert r["loaded"] and r["loaded"].keys() == r["params"].keys()
        for n, s in r["loaded"].items():  # exactly the consolidated moments, step included
            _close(s, consolidated[n], rtol=0, atol=0)
        assert r["hypers"][0]["lr"] == ADAMW["lr"] and r["hypers"][0]["weight_decay"] == ADAMW["weight_decay"]
        _like_one_process(r["params"], want)


def test_zero1_and_zero0_load_each_others_checkpoints(zero1_checkpoint: Any, tmp_path: Any) -> None:
    path, _ = zero1_checkpoint
    want, _ = adamw_reference(4)
    # zero=1 -> zero=0: every replica's AdamW reads the whole state
    for r in spawn(_dp_phase, 4, dp_pipe(0), path, None, 2, timeout_s=TIMEOUT_S):
        assert r["optimizer"] == "AdamW"
        _like_one_process(r["params"], want)
    # zero=0 -> zero=1: each replica keeps its shard of an unsharded run's state
    plain = str(tmp_path / "zero0")
    spawn(_dp_phase, 4, dp_pipe(0), None, plain, 2, timeout_s=TIMEOUT_S)
    for r in spawn(_dp_phase, 4, dp_pipe(1), plain, None, 2, timeout_s=TIMEOUT_S):
        assert r["optimizer"] == "ZeroRedundancyOptimizer"
        _like_one_process(r["params"], want)


def _zero_refusals(rank: int, world: int, path: str) -> list[str]:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    stage = dp_pipe(1).build_stage(rank, "cpu")
    before = {n: t.clone() for n, t in stage.state_dict().items()}
    messages = []
    # sharded over all 4 ranks, not over this pipeline rank's 2 replicas
    world_zero = ZeroRedundancyOptimizer(stage.parameters(), optimizer_class=torch.optim.AdamW, **ADAMW)
    with pytest.raises(PipelineRuntimeError) as info:
        stage.save_checkpoint(path + ".new", optimizer=world_zero)
    messages.append(str(info.value))
    with pytest.raises(PipelineRuntimeError) as info:
        stage.load_checkpoint(path, optimizer=world_zero)
    messages.append(str(info.value))
    # the checkpoint holds AdamW state: a ZeRO-wrapped SGD, or a plain SGD, is refused
    for opt in (stage.optimizer(torch.optim.SGD, lr=0.1, momentum=0.9), torch.optim.SGD(stage.parameters(), lr=0.1)):
        with pytest.raises(PipelineRuntimeError) as info:
            stage.load_checkpoint(path, optimizer=opt)
        messages.append(str(info.value))
    # refused before anything was read: the weights are the fresh ones
    assert all(torch.equal(t, before[n]) for n, t in stage.state_dict().items())
    return messages


def test_a_zero_optimizer_over_another_group_or_of_another_class_is_refused(zero1_checkpoint: Any) -> None:
    path, _ = zero1_checkpoint
    results = spawn(_zero_refusals, 4, path, timeout_s=TIMEOUT_S)
    assert not os.path.exists(path + ".new") and not os.path.exists(path + ".new.partial")
    for rank, (save, load, zero_sgd, sgd_) in enumerate(results):
        replicas = [rank % 2, rank % 2 + 2]
        for m in (save, load):
            assert f"rank {rank}: cannot" in m and "shards over ranks [0, 1, 2, 3]" in m, m
            assert f"replicas (stage.dp_group) are ranks {replicas}" in m, m
        assert "save its state" in save and "load its state" in load
        assert "holds AdamW state; this optimizer is SGD (the ZeroRedundancyOptimizer's wrapped class)" in zero_sgd
        assert "holds AdamW state; this optimizer is SGD: build an optimizer of class AdamW" in sgd_
