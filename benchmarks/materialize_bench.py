"""Peak memory of a rank that builds and loads only its own stage, against the whole model.

A GPT of a few hundred MB (float32) is written once to a safetensors file by a throw-away
process. The parent plans it on the meta device and forks 2 gloo ranks; each resets its
peak resident set (``/proc/self/clear_refs`` = 5), then

* ``per-rank``: ``build_stage`` on the meta model + ``load_checkpoint`` (this runtime);
* ``whole model``: builds the real model and loads the whole file (``load_file`` +
  ``load_state_dict``), then ``build_stage`` copies its share — what every rank had to do
  before;

and reports its peak RSS growth (VmHWM minus VmRSS before), the bytes its stage holds and
the plan's ``param_bytes`` for it.

Before measuring, each rank runs the same route once on a tiny GPT of the same class (2
layers x 32): that pays the fixed per-process overhead (shared-library pages faulted in the
first time a code path runs, the allocator's first arenas: 11 MB in a warm .venv, 31 MB in a
freshly created one), reported as ``warm-up``; the growth then measured is the model's.

    python benchmarks/materialize_bench.py [--layers 12 --width 768 --vocab 8192]
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing as mp
import os
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from partitioner import partition  # noqa: E402
from partitioner.examples.gpt import GPT, GPTConfig  # noqa: E402
from partitioner.runtime.launch import spawn  # noqa: E402


def _cfg(a: Any) -> GPTConfig:
    return GPTConfig(vocab_size=a.vocab, block_size=128, n_layer=a.layers, n_head=12, n_embd=a.width)


def _write(cfg: GPTConfig, path: str) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = GPT(cfg)
    save_file({n: t.contiguous() for n, t in model.state_dict().items() if n != "lm_head.weight"}, path)
    os._exit(0)


def _mem() -> tuple[int, int]:
    status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
    return int(status["VmRSS"].split()[0]) * 1024, int(status["VmHWM"].split()[0]) * 1024


def _once(rank: int, pipe: Any, cfg: GPTConfig, path: str, how: str) -> tuple[dict[str, float], Any]:
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base, _ = _mem()
    t0 = time.perf_counter()
    if how == "per-rank":
        stage = pipe.build_stage(rank, "cpu")
        stage.load_checkpoint(path)
    else:
        from safetensors.torch import load_file

        model = GPT(cfg)
        model.load_state_dict(load_file(path), strict=False)  # lm_head.weight is tied to wte
        real = partition(model, example_inputs=(torch.randint(0, cfg.vocab_size, (2, 128)),), n_gpus=2,
                         pinned_cuts=pipe.plan.options["pinned_cuts"])
        stage = real.build_stage(rank, "cpu")
    seconds = time.perf_counter() - t0
    _, peak = _mem()
    return dict(growth=peak - base, seconds=seconds), stage


def _rank(rank: int, world: int, warm: tuple[Any, GPTConfig, str], pipe: Any, cfg: GPTConfig, path: str,
          how: str) -> dict[str, float]:
    overhead, _ = _once(rank, *warm, how)  # the same route on a tiny model: the fixed overhead
    r, stage = _once(rank, pipe, cfg, path, how)
    held = sum(t.numel() * t.element_size() for _, t in stage.unique_tensors())
    return dict(r, held=held, predicted=pipe.plan.stages[rank].cost.param_bytes, overhead=overhead["growth"])


def _plan(cfg: GPTConfig) -> Any:
    with torch.device("meta"):
        model = GPT(cfg)
    return model, partition(model, n_gpus=2, example_inputs=(torch.randint(0, cfg.vocab_size, (2, 128)),),
                            pinned_cuts=[f"transformer.h.{cfg.n_layer // 2}"])


def _write_in_child(cfg: GPTConfig, path: str) -> None:
    p = mp.get_context("fork").Process(target=_write, args=(cfg, path))
    p.start()
    p.join()
    assert p.exitcode == 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=8192)
    a = ap.parse_args()
    cfg = _cfg(a)
    tiny = GPTConfig(vocab_size=256, block_size=128, n_layer=2, n_head=4, n_embd=32)
    with tempfile.TemporaryDirectory() as d:
        path, warm_path = os.path.join(d, "gpt.safetensors"), os.path.join(d, "tiny.safetensors")
        _write_in_child(cfg, path)
        _write_in_child(tiny, warm_path)
        model, pipe = _plan(cfg)
        warm = (_plan(tiny)[1], tiny, warm_path)
        whole = sum(t.numel() * t.element_size() for t in model.parameters())
        print(f"GPT {cfg.n_layer} layers x {cfg.n_embd}, vocab {cfg.vocab_size}: {whole / 1e6:.1f} MB of float32 "
              f"weights (file {os.path.getsize(path) / 1e6:.1f} MB); 2 ranks, cut {pipe.plan.cuts[0]}")
        print(f"load: {os.getloadavg()[0]:.2f}")
        print("| route | rank | warm-up growth (MB) | peak RSS growth (MB) | stage holds (MB) | "
              "plan param_bytes (MB) | growth / whole | s |")
        print("|---|---|---|---|---|---|---|---|")
        for how in ("per-rank", "whole model"):
            for rank, r in enumerate(spawn(_rank, 2, warm, pipe, cfg, path, how, timeout_s=600)):
                print(f"| {how} | {rank} | {r['overhead'] / 1e6:.1f} | {r['growth'] / 1e6:.1f} | "
                      f"{r['held'] / 1e6:.1f} | {r['predicted'] / 1e6:.1f} | {r['growth'] / whole:.2f} | "
                      f"{r['seconds']:.2f} |")


if __name__ == "__main__":
    main()
