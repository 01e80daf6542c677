"""Cost of the training loop's extras per step, as ratios to the training step in one run:
``runner.eval_step`` (forward only through the pipeline) and ``stage.clip_grad_norm_`` (the
global norm over the pipeline ranks, then the clip), on gloo ranks on CPU.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/loop_bench.py --ranks 2 --rounds 10

The Llama-shaped model of ``runtime_bench.py --model llama`` (dim 256, 8 layers, vocab
4096, batch 16 x 64 tokens, 8 micro-batches, 1F1B, cut mid-stack). Each phase is timed on
rank 0 between barriers, in alternating rounds; medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from partitioner import partition  # noqa: E402
from partitioner.examples.llama import Llama, LlamaConfig  # noqa: E402
from partitioner.runtime.launch import spawn  # noqa: E402

__all__: list[str] = []


def loss_sum(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="sum")


def _rank(rank: int, world: int, pipe: Any, x: torch.Tensor, y: torch.Tensor, m: int, rounds: int) -> dict:
    stage = pipe.build_stage(rank, "cpu")
    opt = stage.optimizer(torch.optim.AdamW, lr=1e-4)
    runner = stage.runner("1f1b", n_microbatches=m, loss_fn=loss_sum, normalize="tokens")
    xi, yi = (x if stage.is_first else None), (y if stage.is_last else None)
    times: dict[str, list[float]] = {"step": [], "clip": [], "eval": []}

    def timed(name: str, fn: Any) -> None:
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        dist.barrier()
        times[name].append(time.perf_counter() - t0)

    for i in range(rounds + 2):
        stage.zero_grad()
        timed("step", lambda: runner.step(xi, target=yi))
        timed("clip", lambda: stage.clip_grad_norm_(1.0))
        opt.step()
        timed("eval", lambda: runner.eval_step(xi, target=yi))
        if i < 2:  # warm-up rounds
            for v in times.values():
                v.clear()
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--ms", type=int, default=8)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = Llama(LlamaConfig(vocab_size=4096, dim=256, n_layers=8, n_heads=4, hidden_dim=4 * 256 * 2 // 3,
                              max_seq_len=64))
    x = torch.randint(0, 4096, (16, 64))
    y = torch.randint(0, 4096, (16, 64))
    pins = [f"layers.{8 * k // args.ranks}" for k in range(1, args.ranks)]
    pipe = partition(model, n_gpus=args.ranks, example_inputs=(x,), pinned_cuts=pins, schedule="1f1b",
                     n_microbatches=args.ms)
    t = spawn(_rank, args.ranks, pipe, x, y, args.ms, args.rounds, timeout_s=600)[0]
    print(f"{args.ranks} gloo ranks, 1f1b, {args.ms} micro-batches, medians of {args.rounds} rounds (rank 0):")
    print(f"  train step {t['step'] * 1e3:8.1f} ms")
    print(f"  eval step  {t['eval'] * 1e3:8.1f} ms  = {t['eval'] / t['step']:.3f} x the train step")
    print(f"  clipping   {t['clip'] * 1e3:8.1f} ms  = {t['clip'] / t['step']:.3f} x the train step")


if __name__ == "__main__":
    main()
