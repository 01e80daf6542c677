"""Two checkouts of this repository, the same distributed training step, alternated.

Run: ``.venv/bin/python benchmarks/ab_bench.py --before ../old-checkout [--after .] [--rounds 4]
[--schedules 1f1b,zbv] [--steps 6]``. Each round runs, for each schedule, one fresh
subprocess per checkout (``PYTHONPATH`` pointing at it, in alternating order) that
partitions the Llama-shaped benchmark model (dim 256, 8 layers, vocab 4096, batch 16 x 64
tokens, 8 micro-batches: runtime_bench's ``--model llama``) with its cuts pinned at layer
boundaries (the same stages whatever either checkout's cost model), spawns 2 gloo ranks of one
thread and times ``--steps`` training steps after 2 warm-up steps; the step time is the
median over steps of the slower rank. Load from other jobs hits both checkouts alike, so
read the before/after ratio per round, not the absolute times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

__all__: list[str] = []

_CHILD = r"""
import json, statistics, sys, time
import torch, torch.nn.functional as F
from partitioner import partition
from partitioner.examples.llama import Llama, LlamaConfig
from partitioner.runtime.launch import spawn

schedule, steps = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
cfg = LlamaConfig(dim=256, n_layers=8, n_heads=4, hidden_dim=4 * 256 * 2 // 3, vocab_size=4096, max_seq_len=64)
model = Llama(cfg)
x = torch.randint(0, 4096, (16, 64))
y = torch.randint(0, 4096, (16, 64))
# Cuts pinned at layer boundaries: both checkouts run the same stages whatever their cost models.
kw = dict(virtual_stages=2, pinned_cuts=["layers.2", "layers.4", "layers.6"]) \
    if schedule in ("zbv", "interleaved-1f1b") else dict(pinned_cuts=["layers.4"])
pipe = partition(model, n_gpus=2, example_inputs=(x,), schedule=schedule, n_microbatches=8, **kw)
print(json.dumps([s.nodes[0] for s in pipe.plan.stages]), file=sys.stderr)
loss_fn = lambda out, t: F.cross_entropy(out.flatten(0, 1), t.flatten())

def rank_fn(rank, world):
    stage = pipe.build_stage(rank, "cpu")
    runner = stage.runner(schedule, n_microbatches=8, loss_fn=loss_fn)
    times = []
    for i in range(steps + 2):
        stage.zero_grad()
        t0 = time.perf_counter()
        runner.step(x if stage.is_first else None, target=y)
        torch.distributed.barrier()
        times.append(time.perf_counter() - t0)
    return times[2:]

res = spawn(rank_fn, 2, timeout_s=300)
print(json.dumps([max(ts) for ts in zip(*res)]))
"""


def _run(repo: Path, schedule: str, steps: int) -> float:
    env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", _CHILD, schedule, str(steps)], cwd=repo, env=env,
                         capture_output=True, text=True, timeout=900, check=True)
    return statistics.median(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", type=Path, required=True)
    ap.add_argument("--after", type=Path, default=Path(__file__).resolve().parents[1])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--schedules", default="1f1b,zbv")
    args = ap.parse_args()
    for schedule in args.schedules.split(","):
        ratios = []
        for r in range(args.rounds):
            order = [("before", args.before), ("after", args.after)]
            if r % 2:
                order.reverse()
            got = {name: _run(repo.resolve(), schedule, args.steps) for name, repo in order}
            ratios.append(got["after"] / got["before"])
            print(f"{schedule} round {r}: before {got['before'] * 1e3:.1f} ms, after {got['after'] * 1e3:.1f} ms, "
                  f"after/before {ratios[-1]:.3f}", flush=True)
        print(f"{schedule}: after/before median {statistics.median(ratios):.3f} "
              f"(min {min(ratios):.3f}, max {max(ratios):.3f})", flush=True)


if __name__ == "__main__":
    main()
