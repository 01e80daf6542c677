"""Schedule-aware cuts vs the bottleneck objective vs an auto_partition-style DP, on the same costs.

Run: ``PYTHONPATH=. .venv/bin/python benchmarks/schedule_aware_bench.py [--measure [ROUNDS]]``

For each model x schedule, ``partition(..., objective="step")`` is run once; its solver input
and simulator inputs are captured, and three splits are priced by the same simulator
(``partitioner.objective.step_of``, the step the plan records):

- bottleneck: ``solve`` + ``refine`` (``objective="bottleneck"``, the default);
- step: ``partitioner.objective.step_search`` (``objective="step"``);
- autopart-DP: our reimplementation of the recurrence of PyTorch's proposed ``auto_partition``
  (pytorch/pytorch PR 179212, ``torch/distributed/pipelining/_partition.py``, after AutoPipe by
  Liu et al.; written from its description, no PyTorch code copied): (1) a layer-level DP that
  minimises the largest stage's forward + backward compute, ignoring communication; (2) a
  search around it: simulate, take the critical stage (here: the stage with the largest
  compute, which carries the steady phase's critical path for these schedules), move its first
  layer to the previous stage and re-run the DP on the prefix, or move its last layer to the
  next stage and re-run the DP on the prefix before it; keep the best simulated candidate,
  best-first, at most 64 candidates. Layers here are the solver's positions (graph nodes), and
  only allowed cuts are used (the PR knows no disallowed cuts).

``--measure`` runs the bottleneck and the schedule-aware splits for real, on 2 gloo ranks of this
CPU (one thread each), for the instances below where the two objectives choose different cuts
when priced on this machine (``calibrate_device``: the "local" profile scaled so the predicted
forward + backward of the whole model equals the measured one). Both runners are built in the
same processes and alternate within every round (shuffled order, as ``runtime_bench`` does), so
load moves both alike; reported: predicted step of each split, the fastest measured step, and the
median over rounds of the per-round ratio step / bottleneck.
"""

from __future__ import annotations

import heapq
import itertools
import warnings
from typing import Any

import torch

import partitioner.search as search
from partitioner import partition
from partitioner.objective import StepModel, step_of
from partitioner.refine import score
from partitioner.solver import SolverInput


def _dp(times: list[int], ok: list[bool], lo: int, hi: int, k: int) -> list[int] | None:
    """Cuts (absolute) splitting positions [lo, hi) into k stages minimising the largest sum;
    cuts only where ``ok``. O((hi - lo)^2 k) like the PR's DP."""
    n = hi - lo
    P = [0]
    for t in times[lo:hi]:
        P.append(P[-1] + t)
    INF = float("inf")
    best = [[INF] * (n + 1) for _ in range(k + 1)]
    arg = [[-1] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0
    for parts in range(1, k + 1):
        for end in range(parts, n + 1):
            if end < n and not ok[lo + end]:
                continue
            for start in range(parts - 1, end):
                if best[parts - 1][start] == INF or (start > 0 and not ok[lo + start]):
                    continue
                c = max(best[parts - 1][start], P[end] - P[start])
                if c < best[parts][end]:
                    best[parts][end], arg[parts][end] = c, start
    if best[k][n] == INF:
        return None
    cuts, end = [], n
    for parts in range(k, 0, -1):
        end = arg[parts][end]
        cuts.append(lo + end)
    return sorted(cuts)[1:]


def autopart_dp(inp: SolverInput, S: int, model: StepModel, budget: int = 64) -> tuple[int, ...]:
    n = len(inp.compute)
    comp = list(inp.compute)
    base = _dp(comp, list(inp.allowed), 0, n, S)
    assert base is not None

    def sim(c: tuple[int, ...]) -> float:
        return step_of(inp, model, score(inp, c))

    seen = {tuple(base): sim(tuple(base))}
    heap = [(seen[tuple(base)], tuple(base))]
    while heap and len(seen) < budget:
        _, cur = heapq.heappop(heap)
        bounds = [0, *cur, n]
        crit = max(range(S), key=lambda s: sum(comp[bounds[s]:bounds[s + 1]]))
        for first_layer in (True, False):
            a, b = bounds[crit], bounds[crit + 1]
            if b - a < 2:
                continue
            if first_layer and crit > 0:  # the critical stage's first layer goes left
                pre = _dp(comp, list(inp.allowed), 0, a + 1, crit)
                cand = None if pre is None else (*pre, a + 1, *cur[crit:])
            elif not first_layer and crit < S - 1:  # its last layer goes right
                pre = _dp(comp, list(inp.allowed), 0, b - 1, crit + 1)
                cand = None if pre is None else (*pre, b - 1, *cur[crit + 1:])
            else:
                continue
            if cand is None or len(cand) != S - 1 or not all(inp.allowed[c] for c in cand) or \
                    any(x >= y for x, y in itertools.pairwise([0, *cand, n])) or cand in seen:
                continue
            seen[cand] = sim(cand)
            heapq.heappush(heap, (seen[cand], cand))
    return min(seen, key=lambda c: (seen[c], c))


def capture(model: torch.nn.Module, inputs: tuple[Any, ...], **kw: Any) -> dict[str, Any]:
    got: dict[str, Any] = {}
    real = search.step_search

    def spy(inp, S, model_, first, **k):  # type: ignore[no-untyped-def]
        out = real(inp, S, model_, first, **k)
        got.update(inp=inp, S=S, model=model_, first=first, step=out[0][0])
        return out

    search.step_search = spy
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe = partition(model, example_inputs=inputs, objective="step", **kw)
    finally:
        search.step_search = real
    got["plan"] = pipe.plan
    return got


MEASURED = (  # (label, model builder, schedule): where the objectives disagree on this CPU
    ("GPT 6x256 vocab 16384", "gpt6", "interleaved-1f1b"),
    ("GPT 6x256 vocab 16384", "gpt6", "zbv"),
    ("GPT 8x256 vocab 8192", "gpt8", "interleaved-1f1b"),
    ("Llama 8x256 vocab 4096", "llama", "interleaved-1f1b"),
    ("Llama 8x256 vocab 4096", "llama", "zbv"),
)


def _build(which: str) -> tuple[torch.nn.Module, torch.Tensor, int]:
    from partitioner.examples import gpt_example
    from partitioner.examples.llama import Llama, LlamaConfig

    torch.manual_seed(0)
    if which == "llama":
        model = Llama(LlamaConfig(vocab_size=4096, dim=256, n_layers=8, n_heads=4, hidden_dim=682, max_seq_len=64))
        return model, torch.randint(0, 4096, (16, 64)), 4096
    layers, vocab = (6, 16384) if which == "gpt6" else (8, 8192)
    gpt, (idx,) = gpt_example(batch=16, seq=64, n_layer=layers, n_embd=256, n_head=4, vocab_size=vocab, block_size=64)
    return gpt, idx, vocab


def _measure_ranks(rank: int, world: int, pipes: dict[str, Any], schedule: str, m: int, x: torch.Tensor,
                   y: torch.Tensor, rounds: int) -> dict[str, list[float]]:
    import random
    import time

    import torch.distributed as dist
    import torch.nn.functional as F

    def loss_fn(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.flatten(0, 1), t.flatten())

    runners = {k: p.build_stage(rank, "cpu").runner(schedule, n_microbatches=m, loss_fn=loss_fn, batch_size=len(x))
               for k, p in pipes.items()}
    times: dict[str, list[float]] = {k: [] for k in runners}
    order = list(runners)
    for i in range(rounds + 2):  # two warm-up rounds
        random.Random(i).shuffle(order)
        for k in order:
            dist.barrier()
            t0 = time.perf_counter()
            runners[k].step(x if rank == 0 else None, target=y)
            dist.barrier()
            if i >= 2:
                times[k].append(time.perf_counter() - t0)
    return times


def measure(rounds: int) -> None:
    import statistics

    from partitioner.calibrate import calibrate_device
    from partitioner.runtime.launch import spawn

    torch.set_num_threads(1)
    print("| model | schedule | 2 ranks x v | m | predicted bottleneck | predicted step-aware | predicted gain | "
          "measured bottleneck | measured step-aware | measured gain (best) | measured gain (median per round) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    built: dict[str, Any] = {}
    for label, which, sched in MEASURED:
        if which not in built:
            model, x, vocab = _build(which)
            built[which] = (model, x, vocab, calibrate_device(model, (x,)))
        model, x, vocab, dev = built[which]
        y = torch.randint(0, vocab, x.shape)
        pipes = {}
        for obj in ("bottleneck", "step"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pipes[obj] = partition(model, n_gpus=2, example_inputs=(x,), device=dev, link="loopback",
                                       schedule=sched, n_microbatches=8, virtual_stages=2, objective=obj)
        pred = {k: p.plan.prediction.step_time_s for k, p in pipes.items()}
        cuts = {k: [s.nodes[-1] for s in p.plan.stages[:-1]] for k, p in pipes.items()}
        if cuts["bottleneck"] == cuts["step"]:
            print(f"| {label} | {sched} | same cuts on this CPU's profile; not measured |")
            continue
        got = spawn(_measure_ranks, 2, pipes, sched, 8, x, y, rounds, timeout_s=900)
        every = {k: [max(r[k][i] for r in got) for i in range(rounds)] for k in pipes}
        best = {k: min(v) for k, v in every.items()}
        med = statistics.median(s / b for s, b in zip(every["step"], every["bottleneck"]))
        print(f"| {label} | {sched} | 2 x 2 | 8 | {pred['bottleneck'] * 1e3:.1f} ms | {pred['step'] * 1e3:.1f} ms | "
              f"{pred['step'] / pred['bottleneck'] - 1:+.1%} | {best['bottleneck'] * 1e3:.1f} ms | "
              f"{best['step'] * 1e3:.1f} ms | {best['step'] / best['bottleneck'] - 1:+.1%} | {med - 1:+.1%} |",
              flush=True)


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--measure", type=int, nargs="?", const=10, default=None, metavar="ROUNDS",
                    help="run the two splits on 2 gloo ranks, ROUNDS timed rounds each (default 10)")
    args = ap.parse_args()
    if args.measure is not None:
        measure(args.measure)
        return
    from partitioner.examples import gpt_example
    from tests.fixtures.models import FIXTURES
    from tests.hf.zoo import ZOO

    cases = []
    gpt, (idx,) = gpt_example(batch=32, seq=64, n_layer=8, n_embd=256, n_head=8, vocab_size=8192, block_size=64)
    for sched, gpus, m in (("1f1b", 4, 8), ("gpipe", 4, 8), ("zb-h1", 4, 8), ("interleaved-1f1b", 2, 8)):
        cases.append(("GPT 8x256 vocab 8192, A100/PCIe 4", gpt, (idx,),
                      dict(n_gpus=gpus, schedule=sched, n_microbatches=m, device="a100-80gb", link="pcie4",
                           virtual_stages=2 if sched == "interleaved-1f1b" else None)))
    torch.manual_seed(0)
    llama = FIXTURES["llama"]
    cases.append(("llama fixture, H100 (default)", llama.build(), llama.inputs(), dict(n_gpus=4, n_microbatches=4)))
    torch.manual_seed(0)
    mistral = ZOO["mistral"]
    cases.append(("HF Mistral (zoo), H100, PCIe 4", mistral.build(), tuple(mistral.inputs().values()),
                  dict(n_gpus=2, link="pcie4", n_microbatches=2)))
    print("| model | schedule | GPUs x v | m | bottleneck | step (ours) | autopart-DP | step vs bottleneck | "
          "step vs autopart-DP |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, model, inputs, kw in cases:
        got = capture(model, inputs, **kw)
        inp, S, sm = got["inp"], got["S"], got["model"]
        t_bn = step_of(inp, sm, got["first"])
        t_step = step_of(inp, sm, got["step"])
        t_ap = step_of(inp, sm, score(inp, autopart_dp(inp, S, sm)))
        sched = sm.schedule
        us = 1e-12 * 1e6
        print(f"| {label} | {sched.name} | {sched.n_ranks} x {S // sched.n_ranks} | {sched.n_microbatches} | "
              f"{t_bn * us:.1f} us | {t_step * us:.1f} us | {t_ap * us:.1f} us | {t_step / t_bn - 1:+.1%} | "
              f"{t_step / t_ap - 1:+.1%} |")


if __name__ == "__main__":
    main()
