"""The causal mask rebuilt by each stage instead of sent: boundary bytes and the predicted step.

A Llama 3 70B-shaped model (``layout_bench.CONFIGS["70b"]``, built on the meta device, bf16-mixed
AdamW, H100 SXM, NVLink 4) captured with ``torch.export`` at sequence 8192 is cut into a
pipeline twice on the same options: as planned now (a tensor made from sizes alone crosses no
cut, ``passes/liveness.py``) and with nothing rebuilt (every crossing value sent, as plans were
before). Prints, per cut, the bytes one micro-batch sends forward, the S x S mask's share
before, and the plan's predicted step.

    PYTHONPATH=. .venv/bin/python benchmarks/rebuilt_mask_bench.py [--gpus 32] [--layers 80] [--micro 32]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from typing import Any

if __package__ in (None, ""):  # run as a script: the repository root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.layout_bench import CONFIGS, SEQ  # noqa: E402
from partitioner import partition  # noqa: E402
from partitioner.cost_models.devices import get_device  # noqa: E402
from partitioner.passes import liveness  # noqa: E402
from partitioner.passes.meta import COST  # noqa: E402
from partitioner.pricing import with_shape  # noqa: E402
from partitioner.tools.hf_model import load_hf  # noqa: E402


def plan(cfg: dict[str, Any], n_gpus: int, m: int, sent: bool) -> Any:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "config.json")
        with open(path, "w") as f:
            json.dump(cfg, f)
        model, inputs = load_hf(f"hf:{path}", SEQ, m)
    real = liveness.rebuilt_values
    if sent:
        liveness.rebuilt_values = lambda gm: {}  # type: ignore[assignment]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return partition(model, n_gpus, inputs, device="h100-sxm", link="nvlink4", optimizer="adamw",
                             precision="bf16-mixed", schedule="1f1b", n_microbatches=m, recompute="auto")
    finally:
        liveness.rebuilt_values = real  # type: ignore[assignment]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=int, default=32, help="pipeline stages, one per GPU")
    ap.add_argument("--layers", type=int, default=80)
    ap.add_argument("--micro", type=int, default=32, help="micro-batches of one sequence each")
    args = ap.parse_args(argv)
    cfg = dict(CONFIGS["70b"], num_hidden_layers=args.layers)
    rows = {}
    for sent in (True, False):
        t = time.perf_counter()
        pipe = plan(cfg, args.gpus, args.micro, sent)
        p = pipe.plan
        rows[sent] = p
        label = "before (mask sent)" if sent else "now (mask rebuilt)"
        print(f"{label}: micro-batch {p.prediction.microbatch_size} x {SEQ}, {p.n_stages} stages, "
              f"{p.prediction.schedule} m={p.prediction.n_microbatches}, planned in {time.perf_counter() - t:.0f} s")
        print(f"  predicted step {p.prediction.step_time_s:.4f} s, bottleneck {p.prediction.bottleneck_s * 1e3:.2f} ms, "
              f"bubble {p.prediction.bubble_fraction:.3f}, total cut bytes {p.solver.total_cut_bytes:,}")
        for b in p.boundaries:
            sq = [v for v in b.values if len(v.shape) >= 2 and tuple(v.shape[-2:]) == ("S", "S")]
            print(f"  cut {b.index} ({b.label}): {b.bytes:,} bytes per micro-batch, {len(b.values)} values"
                  + (f", of them {sq[0].name} {sq[0].dtype} {list(sq[0].shape)} {sq[0].bytes}" if sq else ""))
        if not sent:  # what a stage runs to rebuild the mask, priced as the node it copies
            dev = get_device("h100-sxm")
            at = {"B": p.prediction.microbatch_size, "S": SEQ}
            by_name = {n.name: n for n in pipe.graph.graph.nodes}
            for s, (st, sp) in enumerate(zip(pipe.stages, p.stages)):
                again = [n.name for n in st.graph.nodes
                         if n.op not in ("placeholder", "get_attr", "output") and n.name not in set(sp.nodes)]
                if again:
                    fwd = sum(dev.node_time(with_shape(by_name[x], by_name[x].meta[COST]), at)[0] for x in again)
                    print(f"  stage {s} rebuilds {len(again)} nodes ({again[-1]} last): {fwd * 1e6:.1f} us forward "
                          f"on the device model, not charged to the stage")
    old, new = rows[True], rows[False]
    same = [a.label == b.label for a, b in zip(old.boundaries, new.boundaries)]
    print(f"same cuts: {all(same)}; bytes per cut: "
          + ", ".join(f"{a.bytes:,} -> {b.bytes:,}" for a, b in zip(old.boundaries, new.boundaries)))
    print(f"predicted step: {old.prediction.step_time_s:.4f} s -> {new.prediction.step_time_s:.4f} s "
          f"({(new.prediction.step_time_s / old.prediction.step_time_s - 1) * 100:+.2f} %)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
