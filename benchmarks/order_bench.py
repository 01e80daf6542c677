"""What the order pass (``passes/order.py``) changes on branchy models: a table for RESULTS.md.

Run: ``HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/order_bench.py``

Each model is partitioned twice in one run, same options: with the recorded fx order
(``OrderForCuts(min_gain=1.0)``: never reorders) and with the pass as ``partition()`` runs
it. Columns: bytes crossing a position summed over all positions and at the worst position
(the pass's objective), then the solver's answer on each order: total bytes crossing the
chosen cuts, the bottleneck stage time and the predicted step (``plan.prediction``). All
figures are the cost model's, not measured times: the pass changes what the solver is
offered, and the table shows what it then picks. A GPT is the control (no real branches:
the pass must keep its order).
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import partitioner.problem as problem  # noqa: E402
from partitioner import partition  # noqa: E402
from partitioner.examples import gpt_example  # noqa: E402
from partitioner.passes.order import OrderForCuts  # noqa: E402
from tests.fixtures.branchy import Inception, TwoTower, inception_inputs, two_tower_inputs  # noqa: E402
from tests.fixtures.models import UNet  # noqa: E402


def _cases() -> list[tuple[str, torch.nn.Module, tuple[torch.Tensor, ...]]]:
    torch.manual_seed(0)
    gpt, (idx,) = gpt_example()
    return [
        ("two-tower, loop over both towers", TwoTower(width=512, depth=8), two_tower_inputs(64)),
        ("two-tower, one tower then the other", TwoTower(width=512, depth=8, interleaved=False), two_tower_inputs(64)),
        ("Inception-style, 6 blocks", Inception(blocks=6, c=32), inception_inputs(16, 32)),
        ("U-Net (tests/fixtures)", UNet(c=16), (torch.randn(8, 3, 64, 64),)),
        ("GPT example (control)", gpt, (idx,)),
    ]


def _run(model: torch.nn.Module, args: tuple[torch.Tensor, ...], reorder: bool) -> tuple[object, object]:
    original = problem.OrderForCuts
    problem.OrderForCuts = (lambda: OrderForCuts()) if reorder else (lambda: OrderForCuts(min_gain=1.0))  # type: ignore[misc]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe = partition(model, 4, args, device="h100-sxm", link="pcie4")
    finally:
        problem.OrderForCuts = original  # type: ignore[misc]
    return pipe, pipe.graph.meta["pp.order"]


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def main() -> None:
    print("| model | order | crossing, all positions (MiB) | worst position (MiB) | bytes cut by the solver (MiB) "
          "| bottleneck (us) | predicted step (us) | pipe == model |")
    print("|---|---|---|---|---|---|---|---|")
    for name, model, args in _cases():
        for reorder in (False, True):
            pipe, report = _run(model, args, reorder)
            plan = pipe.plan
            same = torch.allclose(pipe(*args), model(*args), rtol=1e-5, atol=1e-5)
            label = "recorded" if not reorder else f"{report.chosen} ({report.moved} moved)"
            print(f"| {name} | {label} | {_mib(report.total_after)} | {_mib(report.max_after)} | "
                  f"{_mib(plan.solver.total_cut_bytes)} | {plan.solver.bottleneck_s * 1e6:.2f} | "
                  f"{plan.prediction.step_time_s * 1e6:.2f} | {same} |")


if __name__ == "__main__":
    main()
