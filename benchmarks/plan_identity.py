"""Plans must not change when planning gets faster: print one SHA-256 of ``plan.to_json()``
per case (every test fixture at 2 and 4 stages, with a few schedules, objectives and
recompute modes, and the 10,000-node MLP into 64 stages).

Run before and after a change and compare: ``PYTHONPATH=. .venv/bin/python
benchmarks/plan_identity.py > after.txt; diff before.txt after.txt``.
"""

from __future__ import annotations

import hashlib
import sys
import warnings

import torch

from partitioner import partition
from tests.fixtures.models import FIXTURES

CASES = [
    dict(n_gpus=2),
    dict(n_gpus=4),
    dict(n_gpus=2, schedule="interleaved-1f1b", virtual_stages=2, n_microbatches=2),
    dict(n_gpus=2, schedule="zb-h1", n_microbatches=4, objective="step"),
    dict(n_gpus=4, device="a100-80gb", link="pcie4", recompute="full", objective="bottleneck"),
]


def _digest(pipe: object) -> str:
    return hashlib.sha256(pipe.plan.to_json().encode()).hexdigest()[:16]  # type: ignore[attr-defined]


def main() -> None:
    warnings.simplefilter("ignore")
    only = set(sys.argv[1:])
    for name, fx in sorted(FIXTURES.items()):
        if only and name not in only:
            continue
        for k, kw in enumerate(CASES):
            torch.manual_seed(0)
            model = fx.build()
            args, kwargs = fx.inputs(), fx.kwargs() or None
            try:
                text = _digest(partition(model, example_inputs=args, example_kwargs=kwargs, **kw))  # type: ignore[arg-type]
            except Exception as e:  # noqa: BLE001 - a refusal is a result too, and must stay the same
                text = f"error {type(e).__name__}: {str(e)[:120]}"
            print(f"{name} case{k} {text}", flush=True)
    if not only or "mlp10k" in only:
        from benchmarks.partition_bench import DeepMLP

        torch.manual_seed(0)
        pipe = partition(DeepMLP(2500), n_gpus=64, example_inputs=(torch.randn(8, 64),), device="a100-80gb",
                         link="pcie4", schedule="gpipe", n_microbatches=8)
        print(f"mlp10k {_digest(pipe)}", flush=True)


if __name__ == "__main__":
    main()
