"""Pipeline runtime on this machine: 2 stages in 2 processes (one thread each) against
the unpartitioned model on one thread, against torch.distributed.pipelining running the
same stages and schedule, and against the simulator fed this CPU's measured stage times.

Run: ``.venv/bin/python benchmarks/runtime_bench.py [--batch 32] [--cut solver|middle] [--layers 8] [--steps 5]``.
Times are the fastest of ``--steps`` steps (other jobs share the cores) after two warm-up steps, forward + backward of
one global batch (no optimizer step), gloo over loopback.

``--model llama`` is issue 11's benchmark (Llama-shaped: dim 256, 8 layers, vocab 4096, batch 16 x 64 tokens):
``--model llama --batch 16 --seq 64 --cut middle --ms 8 --schedule 1f1b``. ``--schedule`` takes any registry name
(zb-h1, zbv: PyTorch's ScheduleInterleavedZeroBubble / ScheduleZBVZeroBubble run the same stages). Each row
also gives, from our runtime's trace, where each rank's step went (max over ranks): compute (F/B/I/W), waiting
for peers (blocked receives), and overhead (the rest: Python, sends, posting receives), and ours / simulated, the
simulation fed the stage times measured in the same run.
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
from partitioner.examples.llama import Llama, LlamaConfig  # noqa: E402
from partitioner.runtime.interop import pytorch_schedule  # noqa: E402
from partitioner.schedule import SCHEDULES, Action  # noqa: E402
from partitioner.runtime.launch import spawn  # noqa: E402
from partitioner.schedule import build_schedule, replay  # noqa: E402
from partitioner.simulator import simulate  # noqa: E402

__all__: list[str] = []

MS = (1, 4, 8)


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.flatten(0, 1), y.flatten())


def _median_step(step: Any, steps: int, events: Any = None) -> float:
    """Fastest of ``steps`` timed steps; with ``events`` (a callable giving the last step's
    trace), that step's trace is kept in ``_median_step.events``."""
    times, traces = [], []
    for i in range(steps + 2):
        dist.barrier()
        t0 = time.perf_counter()
        step()
        dist.barrier()  # the step ends when the slowest rank ends
        if i >= 2:
            times.append(time.perf_counter() - t0)
            traces.append(list(events()) if events is not None else None)
    best = min(range(len(times)), key=times.__getitem__)
    _median_step.events = traces[best]  # type: ignore[attr-defined]
    return times[best]  # the least-disturbed step: the machine is shared


def _ranks(rank: int, world: int, pipe: Any, x: torch.Tensor, y: torch.Tensor, schedule: str, steps: int,
           ms: tuple[int, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for m in ms:
        ours = pipe.build_stage(rank, "cpu")
        runner = ours.runner(schedule, n_microbatches=m, loss_fn=loss_fn, batch_size=len(x))
        out[("ours", m)] = _median_step(lambda: runner.step(x if rank == 0 else None, target=y), steps,
                                        lambda: runner.interpreter.events)
        out[("events", m)] = _median_step.events  # type: ignore[attr-defined]
        theirs = pipe.build_stage(rank, "cpu")
        # torch's 1F1B refuses m < n_stages; with m = 1 both schedules are the same list.
        name = "gpipe" if schedule == "1f1b" and m < world else schedule
        stages = [theirs.as_pipelining_stage(s, n_microbatches=m, batch=len(x)) for s in sorted(theirs.modules)]
        cls = pytorch_schedule(name)
        sched = cls(stages if len(stages) > 1 or name in ("zb-h1", "interleaved-1f1b") else stages[0], m,
                    loss_fn=loss_fn)
        first, last = 0 in theirs.modules, pipe.plan.n_stages - 1 in theirs.modules

        def torch_step() -> None:
            if first and last:
                sched.step(x, target=y)
            elif first:
                sched.step(x)
            else:
                sched.step(target=y)
        out[("torch", m)] = _median_step(torch_step, steps)
    return out


def breakdown(events: list[Any]) -> tuple[float, float, float, float]:
    """(wall, compute, waiting, overhead) seconds of one rank's traced step."""
    wall = (max(e.end_ns for e in events) - min(e.start_ns for e in events)) / 1e9
    compute = sum(e.end_ns - e.start_ns for e in events
                  if not e.name.startswith("wait") and Action.parse(e.name).is_compute) / 1e9
    wait = sum(e.end_ns - e.start_ns for e in events if e.name.startswith("wait")) / 1e9
    return wall, compute, wait, wall - compute - wait


def per_kind(events: list[Any]) -> dict[str, float]:
    """One rank's traced step by action kind (seconds): compute per kind ("F", "B", "I",
    "W"), "wait F" / "wait B" (blocked on activations / gradients), each comm kind's own
    time ("SEND_F", "RECV_B", ...: the Python and the transport calls), and "between" (the
    gaps between actions that no event covers: the interpreter's loop)."""
    out: dict[str, float] = {}
    for e in events:
        k = "wait " + e.name.split()[1][0] if e.name.startswith("wait") else Action.parse(e.name).kind
        out[k] = out.get(k, 0.0) + (e.end_ns - e.start_ns) / 1e9
    wall = (max(e.end_ns for e in events) - min(e.start_ns for e in events)) / 1e9
    out["between"] = wall - sum(out.values())
    return out


def replayed(pipe: Any, events: list[Any], schedule: str, m: int) -> float:
    """The step a runtime with no overhead and free messages would take given the very
    compute durations of this traced step (each action its own measured time, not a mean):
    ours / replayed is the runtime's own loss, replayed / simulated the compute's variance."""
    dur: dict[tuple[int, str, int], float] = {}
    for e in events:
        if not e.name.startswith("wait"):
            a = Action.parse(e.name)
            if a.is_compute:
                dur[(a.stage, a.kind, a.microbatch)] = (e.end_ns - e.start_ns) / 1e9
    sched = build_schedule(schedule, 2, m, pipe.plan.n_stages)
    clock, lands = [0.0] * sched.n_ranks, {}

    def visit(r: int, _i: int, a: Action) -> None:
        st, k, mb = a
        if k.startswith("SEND"):
            lands[(k[-1], st, mb)] = clock[r]
        elif k.startswith("RECV"):
            clock[r] = max(clock[r], lands[(k[-1], st - 1 if k == "RECV_F" else st + 1, mb)])
        else:
            clock[r] += dur[(st, k, mb)]

    replay(sched, visit)
    return max(clock)


def simulated(pipe: Any, events: list[Any], schedule: str, m: int) -> Any:
    """The simulator on the stage times measured in ``events`` (mean per stage and kind)."""
    acc: dict[tuple[int, str], list[float]] = {}
    for e in events:
        if not e.name.startswith("wait"):
            a = Action.parse(e.name)
            if a.is_compute:
                acc.setdefault((a.stage, a.kind), []).append((e.end_ns - e.start_ns) / 1e9)
    mean = {k: sum(v) / len(v) for k, v in acc.items()}
    n = pipe.plan.n_stages
    f = [mean.get((s, "F"), 0.0) for s in range(n)]
    i = [mean.get((s, "I"), 0.0) for s in range(n)]
    b = [mean.get((s, "B"), 0.0) + i[s] + mean.get((s, "W"), 0.0) for s in range(n)]
    sched = build_schedule(schedule, 2, m, n)
    return simulate(sched, f, b, igrad_time=i if SCHEDULES[schedule].split_backward else ())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--embd", type=int, default=256)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--schedule", default="1f1b", choices=[n for n, sp in SCHEDULES.items() if sp.pytorch])
    ap.add_argument("--model", default="gpt", choices=["gpt", "llama"])
    ap.add_argument("--vocab", type=int, default=4096, help="llama only")
    ap.add_argument("--ms", default=",".join(map(str, MS)), help="micro-batch counts, comma-separated")
    ap.add_argument("--dump", default=None, help="write every rank's traced step (events per m) to this JSON file")
    ap.add_argument("--cut", default="solver", choices=["middle", "solver"],
                    help="middle: pin the cut at the middle block; solver: our plan priced on this CPU (device='local')")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    ms = tuple(int(v) for v in args.ms.split(","))
    if args.model == "llama":
        model: Any = Llama(LlamaConfig(vocab_size=args.vocab, dim=args.embd, n_layers=args.layers, n_heads=4,
                                       hidden_dim=4 * args.embd * 2 // 3, max_seq_len=args.seq))
        x = torch.randint(0, args.vocab, (args.batch, args.seq))
        blocks = "layers"
    else:
        model, (x,) = gpt_example(batch=args.batch, seq=args.seq, n_layer=args.layers, n_embd=args.embd,
                                  n_head=4, block_size=args.seq)
        blocks = "transformer.h"
    y = torch.randint(0, args.vocab if args.model == "llama" else model.cfg.vocab_size, x.shape)
    n_stages = 2 * SCHEDULES[args.schedule].default_stages_per_rank
    # The cut is pinned mid-stack: this measures the runtime, not the solver's H100 pricing.
    if args.cut == "middle":
        pins = [f"{blocks}.{args.layers * k // n_stages}" for k in range(1, n_stages)]
        pipe = partition(model, n_gpus=2, example_inputs=(x,), pinned_cuts=pins, schedule=args.schedule,
                         virtual_stages=n_stages // 2)
    else:
        pipe = partition(model, n_gpus=2, example_inputs=(x,), device="local", link="loopback",
                         schedule=args.schedule, virtual_stages=n_stages // 2)

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
    res = spawn(_ranks, 2, pipe, x, y, args.schedule, args.steps, ms, timeout_s=600)
    base = min(base, plain())  # again after, in case other load hit the first measurement
    print(f"{args.model} layers={args.layers} dim={args.embd} seq={args.seq} batch={args.batch}, "
          f"schedule {args.schedule}, cuts {' ; '.join(pipe.plan.cuts)}, 2 ranks x 1 thread, gloo")
    print(f"unpartitioned, 1 thread: {base * 1e3:.1f} ms/step")
    print(f"{'m':>3} {'ours ms':>9} {'speedup':>8} {'torch.pp ms':>12} {'ours/torch':>10} {'simulated ms':>13} "
          f"{'ours/sim':>9} {'ours/replay':>11} {'bubble meas/sim':>16}  traced step: compute / waiting / overhead ms "
          "(max over ranks)")
    for m in ms:
        ours = max(r[("ours", m)] for r in res)
        torch_pp = max(r[("torch", m)] for r in res)
        evs = [e for r in res for e in r[("events", m)]]
        simr = simulated(pipe, evs, args.schedule, m)
        sim = simr.step_time
        parts = [breakdown(r[("events", m)]) for r in res]
        wall = max(p[0] for p in parts)
        bubble = 1 - sum(p[1] for p in parts) / (len(parts) * wall)
        print(f"{m:>3} {ours * 1e3:>9.1f} {base / ours:>7.2f}x {torch_pp * 1e3:>12.1f} {ours / torch_pp:>10.2f} "
              f"{sim * 1e3:>13.1f} {ours / sim:>9.2f} {wall / replayed(pipe, evs, args.schedule, m):>11.2f} "
              f"{bubble:>7.1%} /{simr.bubble_fraction:>7.1%}  "
              + " / ".join(f"{max(p[k] for p in parts) * 1e3:.1f}" for k in (1, 2, 3)))
        for rank, r in enumerate(res):
            kinds = per_kind(r[("events", m)])
            print(f"      rank {rank} by kind, ms: " + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in sorted(kinds.items())))
    if args.dump:
        import json
        with open(args.dump, "w") as fh:
            json.dump({"base_s": base, "schedule": args.schedule, "n_stages": pipe.plan.n_stages,
                       "steps": {str(m): {"ours_s": max(r[("ours", m)] for r in res),
                                          "torch_s": max(r[("torch", m)] for r in res),
                                          "events": [list(map(list, r[("events", m)])) for r in res]}
                                 for m in ms}}, fh)


if __name__ == "__main__":
    main()
