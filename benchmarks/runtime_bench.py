"""Pipeline runtime on this machine: 2 stages in 2 processes (one thread each) against
the unpartitioned model on one thread, against torch.distributed.pipelining running the
same stages and schedule, and against the simulator fed this CPU's measured stage times.

Run: ``.venv/bin/python benchmarks/runtime_bench.py [--batch 32] [--cut solver|middle] [--layers 8] [--steps 5]``.
Times are the fastest of ``--steps`` steps (other jobs share the cores) after two warm-up steps, forward + backward of
one global batch (no optimizer step), gloo over loopback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from partitioner import partition  # noqa: E402
from partitioner.examples import gpt_example  # noqa: E402
from partitioner.runtime.launch import spawn  # noqa: E402
from partitioner.runtime.trace import measured_stage_times  # noqa: E402
from partitioner.schedule import build_schedule  # noqa: E402
from partitioner.simulator import simulate  # noqa: E402

__all__: list[str] = []

MS = (1, 4, 8)


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.flatten(0, 1), y.flatten())


def _median_step(step: Any, steps: int) -> float:
    times = []
    for i in range(steps + 2):
        dist.barrier()
        t0 = time.perf_counter()
        step()
        dist.barrier()  # the step ends when the slowest rank ends
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return min(times)  # the least-disturbed step: the machine is shared


def _ranks(rank: int, world: int, pipe: Any, x: torch.Tensor, y: torch.Tensor, schedule: str, steps: int) -> dict[str, Any]:
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe

    out: dict[str, Any] = {}
    for m in MS:
        ours = pipe.build_stage(rank, "cpu")
        runner = ours.runner(schedule, n_microbatches=m, loss_fn=loss_fn, batch_size=len(x))
        out[("ours", m)] = _median_step(lambda: runner.step(x if rank == 0 else None, target=y), steps)
        out[("events", m)] = runner.events
        theirs = pipe.build_stage(rank, "cpu")
        # torch's 1F1B refuses m < n_stages; with m = 1 both schedules are the same list.
        cls = ScheduleGPipe if schedule == "gpipe" or m < world else Schedule1F1B
        sched = cls(theirs.as_pipelining_stage(rank, n_microbatches=m, batch=len(x)), m, loss_fn=loss_fn)
        out[("torch", m)] = _median_step(lambda: sched.step(x) if rank == 0 else sched.step(target=y), steps)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--embd", type=int, default=256)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--schedule", default="1f1b", choices=["gpipe", "1f1b"])
    ap.add_argument("--cut", default="solver", choices=["middle", "solver"],
                    help="middle: pin the cut at the middle block; solver: our plan priced on this CPU (device='local')")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model, (x,) = gpt_example(batch=args.batch, seq=args.seq, n_layer=args.layers, n_embd=args.embd,
                              n_head=4, block_size=args.seq)
    y = torch.randint(0, model.cfg.vocab_size, x.shape)
    # The cut is pinned mid-stack: this measures the runtime, not the solver's H100 pricing.
    if args.cut == "middle":
        pipe = partition(model, n_gpus=2, example_inputs=(x,), pinned_cuts=[f"transformer.h.{args.layers // 2}"])
    else:
        pipe = partition(model, n_gpus=2, example_inputs=(x,), device="local", link="loopback",
                         )

    def plain() -> float:
        times = []
        for i in range(args.steps + 2):
            t0 = time.perf_counter()
            loss_fn(model(x), y).backward()
            if i >= 2:
                times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
        return min(times)  # the least-disturbed step: the machine is shared

    base = plain()
    res = spawn(_ranks, 2, pipe, x, y, args.schedule, args.steps, timeout_s=600)
    base = min(base, plain())  # again after, in case other load hit the first measurement
    print(f"GPT n_layer={args.layers} n_embd={args.embd} seq={args.seq} batch={args.batch}, "
          f"schedule {args.schedule}, cut {pipe.plan.cuts[0]}, 2 ranks x 1 thread, gloo")
    print(f"unpartitioned, 1 thread: {base * 1e3:.1f} ms/step")
    print(f"{'m':>3} {'ours ms':>9} {'speedup':>8} {'torch.pp ms':>12} {'ours/torch':>10} {'simulated ms':>13} {'ours/sim':>9}")
    for m in MS:
        ours = max(r[("ours", m)] for r in res)
        torch_pp = max(r[("torch", m)] for r in res)
        fwd, bwd = measured_stage_times([e for r in res for e in r[("events", m)]], 2)
        sim = simulate(build_schedule(args.schedule, 2, m), fwd, bwd).step_time
        print(f"{m:>3} {ours * 1e3:>9.1f} {base / ours:>7.2f}x {torch_pp * 1e3:>12.1f} {ours / torch_pp:>10.2f} "
              f"{sim * 1e3:>13.1f} {ours / sim:>9.2f}")


if __name__ == "__main__":
    main()
