"""How fast and how good is ``partition()``? Prints three figures.

Run: ``.venv/bin/python benchmarks/partition_bench.py``

1. Solver: a synthetic 10,000-node graph (a 2,500-layer MLP traced by torch.fx: linear,
   relu, add, layer norm per layer) split into 64 stages; the solve alone, best of 3
   (goal: under 1 s), and the whole ``partition()`` of it.
2. Quality: the GPT example into 4 and 8 stages: the predicted bottleneck stage time
   over the ideal (total work / stages), and over the solver's lower bound (goal: within 5%).
3. The whole ``partition()`` time of the quick-start GPT.

``--phases`` prints instead where ``partition()`` of the 10,000-node MLP spends its time:
capture, each graph pass, pricing, the memory models, the search (solve + refine), stage
emission (split, plan), wall and CPU seconds per phase, best of ``--repeat`` runs (each phase's
own minimum) with the load average beside them.
"""

from __future__ import annotations

import os
import time

import torch
from torch import nn

from partitioner import DeviceSpec, partition
from partitioner.examples import gpt_example, quickstart
from partitioner.passes.meta import COST
from partitioner.solver import SolverInput, solve


class DeepMLP(nn.Module):
    def __init__(self, layers: int, width: int = 64) -> None:
        super().__init__()
        self.lin = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
        self.norm = nn.ModuleList(nn.LayerNorm(width) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for lin, norm in zip(self.lin, self.norm):
            x = norm(x + torch.relu(lin(x)))
        return x


def _timed(fn, repeat: int = 1):  # type: ignore[no-untyped-def]
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def solver_figure() -> None:
    model = DeepMLP(2500)
    x = torch.randn(8, 64)
    t_part, pipe = _timed(lambda: partition(model, n_gpus=64, example_inputs=(x,), device="a100-80gb",
                                            link="pcie4", schedule="gpipe", n_microbatches=8))
    n_nodes = sum(len(s.nodes) for s in pipe.plan.stages)
    # Re-solve the same instance alone to time the solver itself.
    import partitioner.search as search

    captured: dict[str, SolverInput] = {}
    real_solve = search.solve

    def spy(inp: SolverInput, n: int):  # type: ignore[no-untyped-def]
        captured["inp"] = inp
        return real_solve(inp, n)

    search.solve = spy
    try:
        partition(model, n_gpus=64, example_inputs=(x,), device="a100-80gb", link="pcie4",
                  schedule="gpipe", n_microbatches=8)
    finally:
        search.solve = real_solve
    t_solve, sol = _timed(lambda: solve(captured["inp"], 64), repeat=3)
    print(f"solver: {n_nodes} nodes -> 64 stages: solve {t_solve:.3f} s (best of 3), "
          f"bottleneck/lower bound {sol.bottleneck / sol.lower_bound:.4f}, optimal={sol.optimal}; "
          f"whole partition() {t_part:.1f} s")


def quality_figure() -> None:
    model, (idx,) = gpt_example(batch=32, seq=64, n_layer=12, n_embd=256, n_head=8, vocab_size=8192, block_size=64)
    _quality("gpt 12x256", model, idx)
    # GPT-2 small's shape (124M parameters, 1024 tokens), built on the meta device: no weights needed.
    with torch.device("meta"):
        big, (idx,) = gpt_example(batch=32, seq=1024, n_layer=12, n_embd=768, n_head=12, vocab_size=50257,
                                  block_size=1024)
    _quality("gpt2-small shape", big, idx)


def _quality(label: str, model: nn.Module, idx: torch.Tensor) -> None:
    for n in (4, 8):
        t, pipe = _timed(lambda: partition(model, n_gpus=n, example_inputs=(idx,), device="a100-80gb", link="nvlink4"))
        plan = pipe.plan
        work = sum(s.cost.fwd_time_s + s.cost.bwd_time_s for s in plan.stages)
        # No split can beat the slowest single node either (here: lm_head).
        dev = DeviceSpec.from_dict(plan.device)
        at = {"B": plan.prediction.microbatch_size, "S": plan.symbols.get("S", 1)}
        biggest = max(sum(dev.node_time(nd.meta[COST], at)) for nd in pipe.graph.graph.nodes if COST in nd.meta)
        ideal = max(work / n, biggest)
        print(f"{label} -> {n} stages: bottleneck {plan.solver.bottleneck_s * 1e6:.1f} us, "
              f"ideal max(work/{n}, largest node) {ideal * 1e6:.1f} us (work/{n} = {work / n * 1e6:.1f} us), "
              f"ratio {plan.solver.bottleneck_s / ideal:.3f}; "
              f"over solver lower bound {plan.solver.bottleneck_s / plan.solver.lower_bound_s:.3f}; "
              f"optimal={plan.solver.optimal}; partition() {t:.1f} s; cuts: {', '.join(plan.cuts)}")


def quickstart_figure() -> None:
    model, inputs = quickstart()
    t, pipe = _timed(lambda: partition(model, n_gpus=4, example_inputs=inputs))
    print(f"quickstart GPT -> 4 stages: partition() {t:.2f} s, {sum(len(s.nodes) for s in pipe.plan.stages)} nodes")


#: (label, module, attribute) of what ``--phases`` times; nested phases are timed inside
#: their parents and listed after them.
_PHASES = (
    ("capture", "partitioner.api", "capture"),
    ("shape-prop", "partitioner.passes.shape_prop", "ShapeProp.run"),
    ("annotate-costs", "partitioner.passes.annotate", "AnnotateCosts.run"),
    ("order-for-cuts", "partitioner.passes.order", "OrderForCuts.run"),
    ("pricing", "partitioner.problem", "price"),
    ("memory (static + activations)", "partitioner.problem", "Static"),
    ("memory (static + activations)", "partitioner.problem", "Activations"),
    ("memory (static + activations)", "partitioner.memory", "Activations.arrays"),
    ("search (solve + refine + exact memory)", "partitioner.layout", "search"),
    ("emission (split + recompute + plan)", "partitioner.api", "emit"),
    ("  of which split", "partitioner.emit", "split_graph"),
    ("  of which build_plan", "partitioner.plan_builder", "build_plan"),
)


def _timed_phases(run):  # type: ignore[no-untyped-def]
    """Run ``run()`` with the functions of ``_PHASES`` wrapped; {label: (wall, cpu)}."""
    import importlib

    spent: dict[str, list[float]] = {}
    undo = []
    for label, module, attr in _PHASES:
        owner: object = importlib.import_module(module)
        *path, name = attr.split(".")
        for p in path:
            owner = getattr(owner, p)
        real = getattr(owner, name)

        def wrapped(*a, _real=real, _label=label, **k):  # type: ignore[no-untyped-def]
            w, c = time.perf_counter(), time.process_time()
            try:
                return _real(*a, **k)
            finally:
                acc = spent.setdefault(_label, [0.0, 0.0])
                acc[0] += time.perf_counter() - w
                acc[1] += time.process_time() - c

        setattr(owner, name, wrapped)
        undo.append((owner, name, real))
    try:
        w, c = time.perf_counter(), time.process_time()
        run()
        spent["total partition()"] = [time.perf_counter() - w, time.process_time() - c]
    finally:
        for owner, name, real in reversed(undo):
            setattr(owner, name, real)
    return spent


def phases_figure(repeat: int) -> None:
    model = DeepMLP(2500)
    x = torch.randn(8, 64)
    best: dict[str, list[float]] = {}
    loads = []
    for _ in range(repeat):
        loads.append(os.getloadavg()[0])
        spent = _timed_phases(lambda: partition(model, n_gpus=64, example_inputs=(x,), device="a100-80gb",
                                                link="pcie4", schedule="gpipe", n_microbatches=8))
        for k, (w, c) in spent.items():
            b = best.setdefault(k, [w, c])
            b[0], b[1] = min(b[0], w), min(b[1], c)
    other = best["total partition()"][0] - sum(
        w for k, (w, _) in best.items() if k != "total partition()" and not k.startswith(" "))
    print(f"partition() of the 10,000-node MLP into 64 stages, best of {repeat} "
          f"(load average {', '.join(f'{x:.2f}' for x in loads)})")
    print("| phase | wall s | CPU s |")
    print("|---|---|---|")
    for label in dict.fromkeys(lbl for lbl, _, _ in _PHASES):
        if label in best:
            print(f"| {label} | {best[label][0]:.2f} | {best[label][1]:.2f} |")
    print(f"| rest (checks, schedule, simulation, ...) | {other:.2f} | |")
    print(f"| total partition() | {best['total partition()'][0]:.2f} | {best['total partition()'][1]:.2f} |")


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phases", action="store_true", help="time partition()'s phases on the 10,000-node MLP")
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    torch.manual_seed(0)
    if a.phases:
        phases_figure(a.repeat)
    else:
        solver_figure()
        quality_figure()
        quickstart_figure()
