"""Per-rank materialisation of a meta-device model: each rank allocates and initialises
only its own tensors; non-persistent buffers are recomputed, never loaded; the rank's
memory grows by its share of the model, not the whole (gloo, CPU, forked ranks)."""

from __future__ import annotations

import functools
import os
from typing import Any

import pytest
import torch
from torch import nn

from partitioner import partition
from partitioner.examples.gpt import GPT, GPTConfig
from partitioner.runtime import meta_params
from partitioner.runtime.errors import PipelineRuntimeError
from partitioner.runtime.launch import spawn
from tests.fixtures.models import FIXTURES
from tests.runtime.helpers import LAYOUTS, data

TIMEOUT_S = 120.0


@functools.cache
def meta_pipe(layout: str) -> Any:
    with torch.device("meta"):
        model = FIXTURES["gpt"].build()
    return partition(model, example_inputs=FIXTURES["gpt"].inputs(), **LAYOUTS[layout])


def _build(rank: int, world: int, layout: str) -> dict[str, Any]:
    pipe = meta_pipe(layout)
    stage = pipe.build_stage(rank, "cpu")
    stage.eval()
    training = stage.training
    stage.train()
    return dict(params={n: p.detach() for n, p in stage.named_parameters(remove_duplicate=False)},
                devices={p.device.type for p in stage.parameters()}, uninitialized=sorted(stage.uninitialized),
                model_still_meta=all(p.device.type == "meta" for p in pipe.model.parameters()),
                numel=sum(p.numel() for p in stage.parameters()), modes=(training, stage.training),
                pairs=next(iter(stage.named_parameters())))


def test_each_rank_allocates_and_initialises_only_its_own_tensors() -> None:
    pipe2, pipe4 = meta_pipe("gpt-2"), meta_pipe("gpt-4")
    r2 = spawn(_build, 2, "gpt-2", timeout_s=TIMEOUT_S)
    r4 = spawn(_build, 4, "gpt-4", timeout_s=TIMEOUT_S)
    for pipe, results in ((pipe2, r2), (pipe4, r4)):
        for rank, r in enumerate(results):
            assert set(r["params"]) == set(pipe.plan.stages[rank].parameters)
            assert r["devices"] == {"cpu"} and r["uninitialized"] == [] and r["model_still_meta"]
            assert r["modes"] == (False, True)
            name, p = r["pairs"]  # named_parameters() yields (name, parameter) pairs like nn.Module
            assert isinstance(name, str) and isinstance(p, torch.Tensor)
            # no other stage's weights: exactly this stage's parameter bytes (float32)
            assert 4 * r["numel"] == pipe.plan.stages[rank].cost.param_bytes
        # a weight tied across ranks starts equal on both (wte on the first, lm_head on the last)
        torch.testing.assert_close(results[0]["params"]["transformer.wte.weight"],
                                   results[-1]["params"]["lm_head.weight"], rtol=0, atol=0)
    # a module's values depend on its path and the seed, not on the plan
    every2 = {n: t for r in r2 for n, t in r["params"].items()}
    every4 = {n: t for r in r4 for n, t in r["params"].items()}
    assert every2.keys() == every4.keys()
    for n in every2:
        torch.testing.assert_close(every2[n], every4[n], rtol=0, atol=0)
    # initialised the way the modules initialise themselves (nn.Linear: kaiming-uniform bound 1/sqrt(fan_in))
    w = every2["transformer.h.1.mlp.c_fc.weight"]
    assert w.abs().max() <= 1 / 32**0.5 and w.std() > 0.5 / 32**0.5 / 3**0.5
    ln = every2["transformer.h.1.ln_1.weight"]
    assert torch.equal(ln, torch.ones_like(ln))


def _llama_rank(rank: int, world: int, how: str, path: str) -> tuple[str, dict[str, torch.Tensor]]:
    pipe = _llama(how)
    kwargs: dict[str, Any] = {}
    if how == "init_fn":
        real = _real_llama()

        def init_fn(module: nn.Module) -> None:  # the user's recipe: recompute the tables
            if hasattr(module, "cos"):
                module.cos.copy_(real.cos)
                module.sin.copy_(real.sin)
        kwargs["init_fn"] = init_fn
    stage = pipe.build_stage(rank, "cpu", **kwargs)
    stage.load_checkpoint(path)
    if how == "meta":  # nothing computes cos/sin: the runner would refuse on the rank that holds them
        try:
            stage.check_initialized()
        except PipelineRuntimeError as e:
            return str(e), {}
        return "", {}
    x, y, _ = data("gpt")
    runner = stage.runner("gpipe", n_microbatches=2, loss_fn=lambda out, t: out.float().pow(2).mean(), batch_size=4)
    try:
        loss = runner.step(x if rank == 0 else None, target=y)
    except PipelineRuntimeError as e:
        return str(e), {}
    return ("" if loss is None else f"{loss.item():.9g}"), dict(stage.named_buffers())


@functools.cache
def _real_llama() -> nn.Module:
    torch.manual_seed(0)
    return FIXTURES["llama"].build()


@functools.cache
def _llama(how: str) -> Any:
    if how == "meta_params":
        with meta_params():
            model = FIXTURES["llama"].build()
    else:
        with torch.device("meta"):
            model = FIXTURES["llama"].build()
    assert all(p.device.type == "meta" for p in model.parameters())
    return partition(model, n_gpus=2, example_inputs=FIXTURES["llama"].inputs(), pinned_cuts=["layers.2"])


@pytest.mark.parametrize("how", ["meta", "meta_params", "init_fn"])
def test_non_persistent_buffers_are_recomputed_not_loaded(how: str, tmp_path: Any) -> None:
    save_file = pytest.importorskip("safetensors.torch").save_file
    real = _real_llama()
    path = str(tmp_path / "llama.safetensors")
    sd = real.state_dict()
    assert "cos" not in sd  # non-persistent: in no checkpoint
    save_file({n: t.contiguous() for n, t in sd.items()}, path)
    _llama(how)
    results = spawn(_llama_rank, 2, how, path, timeout_s=TIMEOUT_S)
    x, _, _ = data("gpt")
    want = real(x).float().pow(2).mean().item()
    if how == "meta":  # everything on meta and no initialiser computes cos/sin: refused, with the fix
        msg = next(m for m, _ in results if m)
        assert "never initialised" in msg and "'cos'" in msg and "meta_params()" in msg and "init_fn" in msg
        return
    assert float(results[-1][0]) == pytest.approx(want, rel=1e-5)
    for _, buffers in results:
        for name in ("cos", "sin"):
            if name in buffers:
                torch.testing.assert_close(buffers[name], getattr(real, name), rtol=0, atol=0)


# ----------------------------------------------------------------------------- memory
#
# A forked rank's resident set also grows by pages that are not the model: shared-library
# code and data faulted in the first time a code path runs (file-backed, counted in VmRSS
# and VmHWM), and the allocator's first arenas. That overhead is fixed, not a share of the
# model, and it depends on the environment: in a freshly created .venv the file-backed part
# was 29 MB against 10 MB in a warm one (the same 77 MB model, 40 MB per rank). Each rank
# therefore first builds and loads a tiny model of the same class through the same calls
# (every code path runs once, allocating ~1 MB), and only then resets its peak and measures
# the real build: what is left is the rank's tensors plus what the build itself allocates.

def _status() -> dict[str, int]:
    status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
    return {k: int(status[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM", "RssAnon", "RssFile")}


def _grow(pipe: Any, rank: int, path: str) -> tuple[dict[str, int], Any]:
    """Peak resident growth (VmHWM after minus VmRSS before) of building + loading a stage,
    and the end growth of anonymous and file-backed pages."""
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current resident set
    before = _status()
    stage = pipe.build_stage(rank, "cpu")
    stage.load_checkpoint(path)
    after = _status()
    return dict(growth=after["VmHWM"] - before["VmRSS"], anon=after["RssAnon"] - before["RssAnon"],
                file=after["RssFile"] - before["RssFile"]), stage


def measure_rank(rank: int, world: int, warm: Any, warm_path: str, pipe: Any, path: str) -> dict[str, int]:
    """Growth of this process while it builds and loads its stage, after a warm-up build of
    a tiny model (``warm``) that pays the fixed per-process overhead; both are reported."""
    overhead, warm_stage = _grow(warm, rank, warm_path)
    del warm_stage
    r, stage = _grow(pipe, rank, path)
    held = sum(t.numel() * t.element_size() for _, t in stage.unique_tensors())
    return dict(r, held=held, predicted=pipe.plan.stages[rank].cost.param_bytes, overhead=overhead["growth"])


def gpt_config(n_layer: int, n_embd: int, vocab: int) -> GPTConfig:
    return GPTConfig(vocab_size=vocab, block_size=64, n_layer=n_layer, n_head=4, n_embd=n_embd)


def plan_on_meta(cfg: GPTConfig) -> tuple[Any, int]:
    """The model planned on the meta device for 2 ranks, cut in the middle; its bytes."""
    with torch.device("meta"):
        model = GPT(cfg)
    whole = sum(p.numel() * p.element_size() for p in model.parameters())
    pipe = partition(model, n_gpus=2, example_inputs=(torch.randint(0, cfg.vocab_size, (2, 64)),),
                     pinned_cuts=[f"transformer.h.{cfg.n_layer // 2}"])
    return pipe, whole


def write_checkpoint_in_a_child(cfg: GPTConfig, path: str) -> int:
    """The whole model is built only in a throw-away process (the ranks fork from this
    one, whose memory must not hold it)."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    p = ctx.Process(target=_write, args=(cfg, path))
    p.start()
    p.join(300)
    assert p.exitcode == 0
    return os.path.getsize(path)


def _write(cfg: GPTConfig, path: str) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = GPT(cfg)
    save_file({n: t.contiguous() for n, t in model.state_dict().items() if n != "lm_head.weight"}, path)
    os._exit(0)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_a_rank_grows_by_its_share_not_the_whole_model(tmp_path: Any) -> None:
    pytest.importorskip("safetensors")
    big, tiny = gpt_config(12, 640, 8192), gpt_config(2, 32, 256)  # ~257 MB and ~0.1 MB of float32
    path, warm_path = str(tmp_path / "gpt.safetensors"), str(tmp_path / "tiny.safetensors")
    size = write_checkpoint_in_a_child(big, path)
    write_checkpoint_in_a_child(tiny, warm_path)
    pipe, whole = plan_on_meta(big)
    warm, _ = plan_on_meta(tiny)
    assert abs(size - whole) < 1e5 and whole > 250e6
    results = spawn(measure_rank, 2, warm, warm_path, pipe, path, timeout_s=TIMEOUT_S)
    for rank, r in enumerate(results):
        assert r["held"] == r["predicted"]  # what the plan predicts is what the rank holds
        assert r["predicted"] < 0.6 * whole  # half the blocks plus its copy of the tied embedding
        # anonymous memory ends at most at the rank's tensors (the loader reads straight into
        # them); less can happen: pages the allocator had resident before the build are reused
        # (a fresh clone's CI run measured 128.4 MB anon growth for 139.3 MB held)
        assert r["anon"] - r["held"] < 6e6, (rank, r)
        # the peak: the rank's tensors plus a small constant (4.6-6.3 MB measured here after the
        # warm-up, in a warm and in a fresh .venv alike), never the whole model nor the file's
        # other half
        assert r["growth"] < r["predicted"] + 16e6, (rank, r)
        assert r["growth"] < 0.7 * whole, (rank, r, whole)
