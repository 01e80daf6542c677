"""Compiled stages (``compile=True``, CPU inductor) against eager ones, on a small Llama.

Run: ``.venv/bin/python benchmarks/compile_bench.py [--dim 128] [--layers 4] [--batch 8] [--seq 64] [--ms 4]
[--schedule 1f1b] [--steps 10] [--ranks 0|2]``.

``--ranks 0`` (default): every stage in this process (``pipe.train_step``), one thread. ``--ranks 2``: one
process per pipeline rank over gloo (``build_stage`` + ``runner``), one thread each, each step timed from a
barrier to the slowest rank's end. Eager and compiled run alternately, ``--steps`` rounds after a warm-up (the
compiled warm-up is the compilation, reported apart), so load from other jobs hits both alike; the table gives
each one's fastest and median step, and the loss of their first steps (same weights) to show they agree.
Forward + backward of one global batch (no optimizer step).
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


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.flatten(0, 1), y.flatten())


def _timed(steps: dict[str, Any], rounds: int, sync: Any = None) -> dict[str, Any]:
    """First call of each (the compilation for compiled), then ``rounds`` alternating calls."""
    out: dict[str, Any] = {}
    for name, step in steps.items():
        if sync:
            sync()
        t = time.perf_counter()
        loss = step()
        if sync:
            sync()
        out[name] = {"first_s": time.perf_counter() - t, "loss": loss, "times": []}
    for i in range(rounds):
        for name in (list(steps) if i % 2 == 0 else list(reversed(steps))):
            if sync:
                sync()
            t = time.perf_counter()
            steps[name]()
            if sync:
                sync()
            out[name]["times"].append(time.perf_counter() - t)
    return out


def _ranks(rank: int, world: int, pipe: Any, x: torch.Tensor, y: torch.Tensor, schedule: str, m: int,
           rounds: int) -> dict[str, Any]:
    stage = pipe.build_stage(rank, "cpu")
    runners = {name: stage.runner(schedule, n_microbatches=m, loss_fn=loss_fn, batch_size=len(x), compile=c)
               for name, c in (("eager", False), ("compiled", True))}

    def step(r: Any) -> Any:
        stage.zero_grad()
        loss = r.step(x if stage.is_first else None, target=y if stage.is_last else None)
        return None if loss is None else loss.item()

    return _timed({name: (lambda r=r: step(r)) for name, r in runners.items()}, rounds, dist.barrier)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--ms", type=int, default=4, help="micro-batches per step")
    ap.add_argument("--schedule", default="1f1b")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--ranks", type=int, default=0, help="0: in process; N: N gloo processes")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=4,
                      hidden_dim=int(args.dim * 8 / 3) // 8 * 8, max_seq_len=args.seq)
    model = Llama(cfg)
    x = torch.randint(0, args.vocab, (args.batch, args.seq))
    y = torch.randint(0, args.vocab, (args.batch, args.seq))
    pipe = partition(model, example_inputs=(x,), n_gpus=2, n_microbatches=args.ms)
    params = sum(p.numel() for p in model.parameters())
    print(f"Llama dim {args.dim}, {args.layers} layers, vocab {args.vocab}: {params / 1e6:.2f} M parameters; "
          f"batch {args.batch} x {args.seq} tokens, {args.ms} micro-batches, {args.schedule}, "
          f"{len(pipe.stages)} stages, torch {torch.__version__}, {'in process' if not args.ranks else f'{args.ranks} ranks (gloo)'}")
    if args.ranks:
        results = spawn(_ranks, args.ranks, pipe, x, y, args.schedule, args.ms, args.steps, timeout_s=1800.0)
        res = results[pipe.plan.stages[-1].rank]  # barrier-bounded: every rank times the same steps
    else:
        def step(c: bool) -> float:
            model.zero_grad(set_to_none=True)
            return pipe.train_step(x, target=y, loss_fn=loss_fn, schedule=args.schedule, n_microbatches=args.ms,
                                   compile=c).item()
        res = _timed({"eager": lambda: step(False), "compiled": lambda: step(True)}, args.steps)
    print(f"{'':10} {'first step':>11} {'fastest':>9} {'median':>9}  loss (first step)")
    for name, r in res.items():
        print(f"{name:10} {r['first_s']:10.2f}s {min(r['times']) * 1e3:7.1f}ms {statistics.median(r['times']) * 1e3:7.1f}ms"
              f"  {r['loss']:.6f}")
    e, c = res["eager"], res["compiled"]
    print(f"compiled / eager: fastest {min(c['times']) / min(e['times']):.2f}, "
          f"median {statistics.median(c['times']) / statistics.median(e['times']):.2f}; "
          f"loss difference {abs(c['loss'] - e['loss']):.2e}")


if __name__ == "__main__":
    main()
