"""Pipeline runtime on this machine: stages in one process per rank (one thread each)
against the unpartitioned model on one thread, against torch.distributed.pipelining
running the same stages and schedule (and, with ``--cut solver``, PyTorch on the middle
cut too), and against the simulator fed the stage times measured in the same run.

Run: ``.venv/bin/python benchmarks/runtime_bench.py [--batch 32] [--cut solver|middle] [--layers 8] [--steps 5]
[--ranks 2] [--no-torch] [--only torch,local] [--no-cpu] [--dump FILE]``. Every contender runs once per round, ``--steps`` + 2 rounds (two warm
up), so load from other jobs hits them alike; each keeps its fastest step. Forward + backward of one global batch
(no optimizer step), gloo over loopback.

``--model llama`` is issue 11's benchmark (Llama-shaped: dim 256, 8 layers, vocab 4096, batch 16 x 64 tokens):
``--model llama --batch 16 --seq 64 --ms 8 --schedule 1f1b``. ``--schedule`` takes any registry name (zb-h1, zbv:
PyTorch's ScheduleInterleavedZeroBubble / ScheduleZBVZeroBubble run the same stages).

Columns: plain (unpartitioned, one process), ours, torch.pp, "tpp mid" (PyTorch on the middle cut, as a speedup
over plain), sim (the simulator on the mean F/B/I/W time per stage of our traced step), ours/replay (the traced
step over a replay of the same lists with each action's own measured duration and free messages: what the
runtime itself loses, apart from the compute's variance), the bubble measured vs simulated, "local" (every
stage in one process, no transport) and "solo sim" (the simulator on local's stage times: the step the ranks
would reach if none slowed another, the ceiling for this cut), and the traced step's compute / waiting for
peers / overhead (max over ranks), then per rank and action kind (``trace.breakdown``), the median over
rounds of the per-round ratios, and every round's times. Before the ranks start, ``cpu_ceiling`` asks the
"solo sim" question in thread CPU time, which load from other jobs moves far less than wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
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
from partitioner.runtime.interpreter import TraceEvent  # noqa: E402
from partitioner.runtime.launch import spawn  # noqa: E402
from partitioner.runtime.trace import PREDICTED_PID, breakdown  # noqa: E402
from partitioner.schedule import SCHEDULES, Action, build_schedule, replay  # noqa: E402  # noqa: E402
from partitioner.simulator import simulate  # noqa: E402

__all__: list[str] = []

MS = (1, 4, 8)
_TRACE = os.path.join(tempfile.gettempdir(), f"runtime_bench_{os.getpid()}.json")


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.flatten(0, 1), y.flatten())


def _rounds(contenders: dict[str, tuple[Any, bool]], steps: int, rank: int) -> dict[str, Any]:
    """Every contender once per round, in a shuffled order, ``steps + 2`` rounds (the first
    two warm up), so the load other jobs put on the machine hits them all alike. A contender is (step,
    solo): a solo step runs on rank 0 alone (the other ranks wait in the barrier) and is
    timed there; the others end when the slowest rank ends. Keeps each one's fastest
    step (the least disturbed: the machine is shared) and, for steps returning a trace,
    that step's trace under ("events", name), and every timed step under "every" (per
    round, so two contenders compare round by round)."""
    best: dict[Any, Any] = {}
    every: dict[str, list[float]] = {name: [] for name in contenders}
    order = list(contenders)
    for i in range(steps + 2):
        random.Random(i).shuffle(order)  # the same order on every rank; no contender always follows another
        for name in order:
            step, solo = contenders[name]
            dist.barrier()
            t0 = time.perf_counter()
            got = step() if rank == 0 or not solo else None
            t = time.perf_counter() - t0
            dist.barrier()
            if not solo:
                t = time.perf_counter() - t0  # the step ends when the slowest rank ends
            if i >= 2:
                every[name].append(t)
            if i >= 2 and (name not in best or t < best[name]):
                best[name] = t
                if got is not None:
                    best[("events", name)] = got
    best["every"] = every
    return best


def _torch_step(pipe: Any, rank: int, world: int, schedule: str, m: int, x: torch.Tensor, y: torch.Tensor) -> Any:
    theirs = pipe.build_stage(rank, "cpu")
    # torch's 1F1B refuses m < n_stages; with m = 1 both schedules are the same list.
    name = "gpipe" if schedule == "1f1b" and m < world else schedule
    stages = [theirs.as_pipelining_stage(s, n_microbatches=m, batch=len(x)) for s in sorted(theirs.modules)]
    cls = pytorch_schedule(name)
    sched = cls(stages if len(stages) > 1 or name in ("zb-h1", "interleaved-1f1b") else stages[0], m,
                loss_fn=loss_fn)
    first, last = 0 in theirs.modules, pipe.plan.n_stages - 1 in theirs.modules

    def step() -> None:
        if first and last:
            sched.step(x, target=y)
        elif first:
            sched.step(x)
        else:
            sched.step(target=y)
    return step


def _ranks(rank: int, world: int, pipe: Any, middle: Any, model: Any, x: torch.Tensor, y: torch.Tensor,
           schedule: str, steps: int, ms: tuple[int, ...], with_torch: bool,
           only: tuple[str, ...] = ()) -> dict[Any, Any]:
    out: dict[Any, Any] = {}
    for m in ms:
        ours = pipe.build_stage(rank, "cpu")
        runner = ours.runner(schedule, n_microbatches=m, loss_fn=loss_fn, batch_size=len(x))

        def ours_step() -> list[Any]:
            runner.step(x if rank == 0 else None, target=y)
            return list(runner.interpreter.events)

        def plain() -> None:
            loss_fn(model(x), y).backward()
            model.zero_grad(set_to_none=True)

        def local() -> list[Any]:
            # every stage in this one process, no transport: each stage's compute alone
            its = pipe.train_step(x, target=y, loss_fn=loss_fn, schedule=schedule, n_microbatches=m,
                                  trace=_TRACE)
            del its
            model.zero_grad(set_to_none=True)
            with open(_TRACE) as fh:
                tr = json.load(fh)
            return [TraceEvent(e["pid"], e["name"], int(e["ts"] * 1e3), int((e["ts"] + e["dur"]) * 1e3))
                    for e in tr["traceEvents"] if e.get("ph") == "X" and e["pid"] < PREDICTED_PID]

        contenders = {"plain": (plain, True), "local": (local, True), "ours": (ours_step, False)}
        if with_torch:
            contenders["torch"] = (_torch_step(pipe, rank, world, schedule, m, x, y), False)
        if middle is not None and with_torch:
            contenders["torch middle"] = (_torch_step(middle, rank, world, schedule, m, x, y), False)
        if only:
            contenders = {k: v for k, v in contenders.items() if k in only or k in ("plain", "ours")}
        got = _rounds(contenders, steps, rank)
        for k, v in got.items():
            out[(k, m)] = v
    return out


def split3(events: list[Any]) -> tuple[float, float, float, float]:
    """(wall, compute, waiting, overhead) seconds of one rank's traced step."""
    k = breakdown(events)
    compute = sum(v for n, v in k.items() if n in ("F", "B", "I", "W"))
    wait = sum(v for n, v in k.items() if n.startswith("wait"))
    return k["wall"], compute, wait, k["wall"] - compute - wait


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
    sched = build_schedule(schedule, pipe.plan.options["n_gpus"], m, pipe.plan.n_stages)
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
    sched = build_schedule(schedule, pipe.plan.options["n_gpus"], m, n)
    return simulate(sched, f, b, igrad_time=i if SCHEDULES[schedule].split_backward else ())


def cpu_ceiling(model: Any, pipe: Any, x: torch.Tensor, y: torch.Tensor, schedule: str, m: int,
                steps: int) -> dict[str, float]:
    """The same question as "solo sim", in this thread's CPU time (``time.thread_time``), which
    other jobs on the machine barely move (wall time under load does): the unpartitioned
    step's CPU time, every stage's F/B/I/W CPU time in one process (``train_step``, each
    action timed), and the simulator on those: the speedup 2 ranks with a core each would
    reach on this cut if the runtime cost nothing. Fastest of ``steps`` after 2 warm-ups."""
    from partitioner.runtime.interpreter import Interpreter

    plain = []
    for _ in range(steps + 2):
        t0 = time.thread_time()
        loss_fn(model(x), y).backward()
        plain.append(time.thread_time() - t0)
        model.zero_grad(set_to_none=True)
    per: dict[tuple[int, str], float] = {}
    run = Interpreter.run

    def timed(self: Any, a: Action) -> None:
        t0 = time.thread_time()
        run(self, a)
        if a.is_compute:
            acc[(a.stage, a.kind)] = acc.get((a.stage, a.kind), 0.0) + time.thread_time() - t0

    Interpreter.run = timed  # type: ignore[method-assign]
    try:
        for i in range(steps + 2):
            acc: dict[tuple[int, str], float] = {}
            pipe.train_step(x, target=y, loss_fn=loss_fn, schedule=schedule, n_microbatches=m)
            model.zero_grad(set_to_none=True)
            if i >= 2:
                for k, v in acc.items():
                    per[k] = min(per.get(k, v), v)
    finally:
        Interpreter.run = run  # type: ignore[method-assign]
    n = pipe.plan.n_stages
    f = [per.get((s, "F"), 0.0) / m for s in range(n)]
    i_ = [per.get((s, "I"), 0.0) / m for s in range(n)]
    b = [(per.get((s, "B"), 0.0) + per.get((s, "I"), 0.0) + per.get((s, "W"), 0.0)) / m for s in range(n)]
    sched = build_schedule(schedule, pipe.plan.options["n_gpus"], m, n)
    sim = simulate(sched, f, b, igrad_time=i_ if SCHEDULES[schedule].split_backward else ())
    base = min(plain[2:])
    return {"plain_cpu_ms": base * 1e3, "stages_cpu_ms": sum(per.values()) * 1e3, "sim_cpu_ms": sim.step_time * 1e3,
            "ceiling": base / sim.step_time, "ideal": pipe.plan.options["n_gpus"] * m / (m + sched.n_ranks - 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--ranks", type=int, default=2, help="pipeline ranks (processes), one thread each")
    ap.add_argument("--no-torch", action="store_true", help="skip torch.distributed.pipelining")
    ap.add_argument("--only", default="", help="comma-separated contenders to keep besides plain and ours "
                    "(local, torch, 'torch middle'); default all")
    ap.add_argument("--no-cpu", action="store_true", help="skip the CPU-time ceiling")
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
    load0 = f"{os.getloadavg()[0]:.2f}"
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
    n_stages = args.ranks * SCHEDULES[args.schedule].default_stages_per_rank
    # The cut is pinned mid-stack: this measures the runtime, not the solver's H100 pricing.
    if args.cut == "middle":
        pins = [f"{blocks}.{args.layers * k // n_stages}" for k in range(1, n_stages)]
        pipe = partition(model, n_gpus=args.ranks, example_inputs=(x,), pinned_cuts=pins, schedule=args.schedule,
                         virtual_stages=n_stages // args.ranks)
    else:
        pipe = partition(model, n_gpus=args.ranks, example_inputs=(x,), device="local", link="loopback",
                         schedule=args.schedule, virtual_stages=n_stages // args.ranks)

    # PyTorch pipelining is also run on the middle cut (the cut a user would pin by hand).
    middle = None
    if args.cut == "solver" and not args.no_torch:
        pins = [f"{blocks}.{args.layers * k // n_stages}" for k in range(1, n_stages)]
        middle = partition(model, n_gpus=args.ranks, example_inputs=(x,), pinned_cuts=pins,
                           schedule=args.schedule, virtual_stages=n_stages // args.ranks)
    ceilings = {m: cpu_ceiling(model, pipe, x, y, args.schedule, m, args.steps) for m in ms} if not args.no_cpu else {}
    only = tuple(args.only.split(",")) if args.only else ()
    res = spawn(_ranks, args.ranks, pipe, middle, model, x, y, args.schedule, args.steps, ms, not args.no_torch, only,
                timeout_s=900)
    print(f"{args.model} layers={args.layers} dim={args.embd} seq={args.seq} batch={args.batch}, "
          f"schedule {args.schedule}, cuts {' ; '.join(pipe.plan.cuts)}, {args.ranks} ranks x 1 thread, gloo; "
          f"load average before / after: {load0} / {os.getloadavg()[0]:.2f}")
    rows = []
    for m in ms:
        got = {k: max(r[(k, m)] for r in res) for k in ("plain", "local", "ours", "torch", "torch middle")
               if (k, m) in res[0]}
        evs = [e for r in res for e in r[(("events", "ours"), m)]]
        simr = simulated(pipe, evs, args.schedule, m)
        solo = simulated(pipe, res[0][(("events", "local"), m)], args.schedule, m) if "local" in got else None
        parts = [split3(r[(("events", "ours"), m)]) for r in res]
        wall = max(p[0] for p in parts)
        base = got["plain"]
        # Round by round, slowest rank per round (the load drifts; a pair in one round saw the same).
        every = {k: [max(r[("every", m)][k][i] if k not in ("plain", "local") else res[0][("every", m)][k][i]
                         for r in res) for i in range(args.steps)] for k in res[0][("every", m)]}

        def paired(a: str, b: str) -> float | None:
            return statistics.median(x / y for x, y in zip(every[a], every[b])) if a in every and b in every else None
        c = ceilings.get(m)
        if c:
            print(f"m={m}: CPU time (thread_time, barely moved by other jobs): unpartitioned {c['plain_cpu_ms']:.1f} ms, "
                  f"all stages {c['stages_cpu_ms']:.1f} ms (x{c['stages_cpu_ms'] / c['plain_cpu_ms']:.2f}: "
                  f"micro-batching and the cut), simulated step on those {c['sim_cpu_ms']:.1f} ms: ceiling "
                  f"{c['ceiling']:.2f}x one process (ideal {c['ideal']:.2f}x)")
        rows.append(dict(
            cpu=c,
            paired_speedup=paired("plain", "ours"), paired_ours_vs_torch=paired("ours", "torch"),
            paired_torch_middle_speedup=paired("plain", "torch middle"), rounds=every,
            m=m, plain_ms=base * 1e3, ours_ms=got["ours"] * 1e3, speedup=base / got["ours"],
            torch_ms=got["torch"] * 1e3 if "torch" in got else None,
            ours_vs_torch=got["ours"] / got["torch"] if "torch" in got else None,
            torch_middle_ms=got["torch middle"] * 1e3 if "torch middle" in got else None,
            torch_middle_speedup=base / got["torch middle"] if "torch middle" in got else None,
            sim_ms=simr.step_time * 1e3, ours_vs_sim=got["ours"] / simr.step_time,
            ours_vs_replay=wall / replayed(pipe, evs, args.schedule, m),
            bubble=1 - sum(p[1] for p in parts) / (len(parts) * wall), sim_bubble=simr.bubble_fraction,
            compute_ms=max(p[1] for p in parts) * 1e3, wait_ms=max(p[2] for p in parts) * 1e3,
            overhead_ms=max(p[3] for p in parts) * 1e3,
            local_ms=got["local"] * 1e3 if solo else None, solo_sim_ms=solo.step_time * 1e3 if solo else None,
            solo_speedup=base / solo.step_time if solo else None,
            by_kind=[{k: v * 1e3 for k, v in breakdown(r[(("events", "ours"), m)]).items() if k != "wall"} for r in res]))
    print("plain: the unpartitioned model, one process, 1 thread. local: every stage in one process (no "
          "transport). solo sim: the simulator on the stage times of 'local' (each stage computing alone), "
          "i.e. what the ranks reach if none slows another.")
    print(f"{'m':>3} {'plain':>7} {'ours':>7} {'speedup':>8} {'torch.pp':>9} {'ours/tpp':>8} {'tpp mid':>8} "
          f"{'sim':>7} {'ours/sim':>8} {'ours/replay':>11} {'bubble meas/sim':>16} {'local':>7} {'solo sim':>9}"
          "  traced: compute / waiting / overhead (max over ranks), ms")
    for r in rows:
        mid = f"{r['torch_middle_speedup']:>7.2f}x" if r["torch_middle_ms"] is not None else f"{'-':>8}"
        tpp = f"{r['torch_ms']:>9.1f} {r['ours_vs_torch']:>8.2f}" if r["torch_ms"] is not None else f"{'-':>9} {'-':>8}"
        solo = (f"{r['local_ms']:>7.1f} {r['solo_sim_ms']:>7.1f} ({r['solo_speedup']:.2f}x)"
                if r["local_ms"] is not None else f"{'-':>7} {'-':>9}")
        print(f"{r['m']:>3} {r['plain_ms']:>7.1f} {r['ours_ms']:>7.1f} {r['speedup']:>7.2f}x {tpp} {mid} "
              f"{r['sim_ms']:>7.1f} {r['ours_vs_sim']:>8.2f} {r['ours_vs_replay']:>11.2f} {r['bubble']:>7.1%} "
              f"/{r['sim_bubble']:>7.1%} {solo}  {r['compute_ms']:.1f} / {r['wait_ms']:.1f} / {r['overhead_ms']:.1f}")
        pairs = [f"speedup {r['paired_speedup']:.2f}x"]
        if r["paired_ours_vs_torch"] is not None:
            pairs.append(f"ours/torch.pp {r['paired_ours_vs_torch']:.2f}")
        if r["paired_torch_middle_speedup"] is not None:
            pairs.append(f"torch.pp middle cut speedup {r['paired_torch_middle_speedup']:.2f}x")
        print("      median over rounds of the per-round ratio: " + ", ".join(pairs))
        print("      every round, ms: " + "; ".join(f"{k} " + " ".join(f"{t * 1e3:.0f}" for t in v)
                                                  for k, v in r["rounds"].items()))
        for rank, kinds in enumerate(r["by_kind"]):
            print(f"      rank {rank} by kind, ms: " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(kinds.items())))
    if args.dump:
        with open(args.dump, "w") as fh:
            json.dump({"args": vars(args), "cuts": list(pipe.plan.cuts), "rows": rows,
                       "events": {str(m): [[list(e) for e in r[(("events", "ours"), m)]] for r in res] for m in ms},
                       "local_events": {str(m): [list(e) for e in res[0].get((("events", "local"), m), [])]
                                        for m in ms}},
                      fh)


if __name__ == "__main__":
    main()
