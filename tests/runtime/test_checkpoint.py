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
