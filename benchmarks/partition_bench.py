"""How fast and how good is ``partition()``? Prints three figures.

Run: ``.venv/bin/python benchmarks/partition_bench.py``

1. Solver: a synthetic 10,000-node graph (a 2,500-layer MLP traced by torch.fx: linear,
   relu, add, layer norm per layer) split into 64 stages; the solve alone, best of 3
   (goal: under 1 s), and the whole ``partition()`` of it.
2. Quality: the GPT example into 4 and 8 stages: the predicted bottleneck stage time
   over the ideal (total work / stages), and over the solver's lower bound (goal: within 5%).
3. The whole ``partition()`` time of the quick-start GPT.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from partitioner import DeviceSpec, partition
from passes.meta import COST
from partitioner.examples import gpt_example, quickstart
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
    import partitioner.api as api

    captured: dict[str, SolverInput] = {}
    real_solve = api.solve

    def spy(inp: SolverInput, n: int):  # type: ignore[no-untyped-def]
        captured["inp"] = inp
        return real_solve(inp, n)

    api.solve = spy
    try:
        partition(model, n_gpus=64, example_inputs=(x,), device="a100-80gb", link="pcie4",
                  schedule="gpipe", n_microbatches=8)
    finally:
        api.solve = real_solve
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


if __name__ == "__main__":
    torch.manual_seed(0)
    solver_figure()
    quality_figure()
    quickstart_figure()
