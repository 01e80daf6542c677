"""What naming each action for the profiler costs when no profiler runs.

The interpreter runs every action under ``runtime.profiling.named(action)``: a
``torch.profiler.record_function`` range while a profiler records, a no-op context after
one check otherwise. Run: ``.venv/bin/python benchmarks/profiler_bench.py [--calls 100000] [--steps 30]``.

1. Per call, with no profiler active, in nanoseconds (the bare loop's cost subtracted), best
   of 5 runs of ``--calls``: ``record_function`` enter + exit, and ``named``'s.
2. An in-process step (``pipe.train_step``, a GPT of 4 layers x 64, 2 stages, 1f1b, 4
   micro-batches: 32 actions) three ways, alternately, ``--steps`` rounds: as it is
   (``named``), with ``record_function`` entered for every action regardless, and with no
   range at all; the fastest and median step of each, and the difference per action.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from partitioner import partition  # noqa: E402
from partitioner.examples.gpt import GPT, GPTConfig  # noqa: E402
from partitioner.runtime import interpreter  # noqa: E402
from partitioner.runtime.profiling import named  # noqa: E402

__all__: list[str] = []


def per_call_ns(calls: int) -> dict[str, float]:
    def loop(make: Any) -> int:
        t = time.thread_time_ns()
        for _ in range(calls):
            with make("1F0"):
                pass
        return time.thread_time_ns() - t

    nothing = contextlib.nullcontext()
    best = {"record_function": float("inf"), "named": float("inf")}
    for _ in range(5):
        bare = loop(lambda _name: nothing)  # a call returning a ready no-op context
        best["record_function"] = min(best["record_function"], (loop(torch.profiler.record_function) - bare) / calls)
        best["named"] = min(best["named"], (loop(named) - bare) / calls)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=100_000)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(1)
    assert not torch.autograd._profiler_enabled()
    per = per_call_ns(args.calls)
    print(f"no profiler, per call (enter + exit): record_function {per['record_function']:.0f} ns, "
          f"named {per['named']:.0f} ns")

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=128, block_size=32, n_layer=4, n_head=2, n_embd=64))
    x = torch.randint(0, 128, (8, 32))
    y = torch.randint(0, 128, (8, 32))
    pipe = partition(model, example_inputs=(x,), n_gpus=2)

    def loss_fn(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.flatten(0, 1), t.flatten())

    ways: dict[str, Any] = {
        "named": named,
        "record_function": lambda a: torch.profiler.record_function(str(a)),
        "none": lambda a: contextlib.nullcontext(),
    }
    times: dict[str, list[float]] = {k: [] for k in ways}

    def step(kind: str) -> None:
        interpreter.named = ways[kind]  # type: ignore[attr-defined]
        try:
            model.zero_grad(set_to_none=True)
            t = time.thread_time()
            pipe.train_step(x, target=y, loss_fn=loss_fn, schedule="1f1b", n_microbatches=4)
            times[kind].append(time.thread_time() - t)
        finally:
            interpreter.named = named  # type: ignore[attr-defined]

    for kind in ways:  # warm-up
        step(kind)
    times = {k: [] for k in ways}
    order = list(ways)
    for i in range(args.steps):
        for kind in order[i % 3:] + order[:i % 3]:
            step(kind)
    n_actions = 2 * 4 * 2 + 4 * 4  # F and B per stage and micro-batch, a send and a receive per message
    base = min(times["none"])
    print(f"step (GPT 4x64, 2 stages, 1f1b, 4 micro-batches, {n_actions} actions):")
    for kind, ts in times.items():
        print(f"  {kind:16} fastest {min(ts) * 1e3:6.2f} ms, median {statistics.median(ts) * 1e3:6.2f} ms; "
              f"fastest - none: {(min(ts) - base) * 1e6 / n_actions:+6.1f} us per action "
              f"({(min(ts) - base) / base * 100:+.2f} %)")


if __name__ == "__main__":
    main()
