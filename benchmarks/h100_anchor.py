"""The one like-for-like H100 anchor, priced alone: torchtitan's Llama 3 8B, bf16 eager, FSDP on 8 H100s.

torchtitan measured 5,762 tokens/s/GPU (``benchmarks/llama3_h100_202412_torchtitan.md`` of
torchtitan: 8 GPUs, FSDP, local batch 2, sequence 8192, selective activation checkpointing, no
torch.compile, no Float8). ``layout_bench.py`` prices the same pinned layout among many others;
this script prices only that row (one capture, shared by every device variant), so a change to
the cost model can be checked against it in a few minutes:

    PYTHONPATH=. .venv/bin/python benchmarks/h100_anchor.py [--devices h100-sxm h100-sxm-fa2]
        [--set attn_fwd=0.75,attn_bwd=0.51 [--set ...]] [--recompute selective full]

``--devices``: the profiles to price it on (default: the ones that exist of ``h100-sxm`` and
``h100-sxm-fa2``). ``--set``: one more row per device with those ``Efficiency`` fields replaced
(a sensitivity, never a profile). ``--recompute``: the recompute modes to price it with. Each row prints the predicted step, tokens/s/GPU, the ratio
to the measured 5,762 and the model FLOP utilisation (layout_bench's count).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from typing import Any

if __package__ in (None, ""):  # run as a script: the repository root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import layout_bench  # noqa: E402

from partitioner import api  # noqa: E402
from partitioner.cost_models.devices import DEVICES, DeviceSpec  # noqa: E402
from partitioner.tools.hf_model import load_hf  # noqa: E402

MEASURED = 5762.0  # tokens/s/GPU, torchtitan llama3_h100_202412_torchtitan.md, 8B, 8 GPUs, bf16 eager
_PINNED = next(kw for m, g, who, kw, *_ in layout_bench.PUBLISHED if (m, g) == ("8b", 8) and "FSDP" in who)


def _variants(names: list[str], sets: list[str]) -> list[tuple[str, DeviceSpec]]:
    out = []
    for name in names:
        dev = DEVICES[name]
        out.append((name, dev))
        for one in sets:  # "field=value,field=value"
            assert dev.efficiency is not None
            fields = {k: float(v) for k, v in (kv.split("=", 1) for kv in one.split(","))}
            out.append((f"{name}, {one}", replace(dev, efficiency=replace(dev.efficiency, **fields))))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", nargs="*", default=[d for d in ("h100-sxm", "h100-sxm-fa2") if d in DEVICES])
    ap.add_argument("--set", action="append", default=[],
                    help="field=value[,field=value]: one more row per device with these Efficiency fields (repeatable)")
    ap.add_argument("--recompute", nargs="*", default=[_PINNED["recompute"]],
                    help="recompute modes to price the layout with (torchtitan ran its own selective AC: every "
                         "second matmul and the cheap ops recomputed, attention kept; the planner's 'selective' "
                         "recomputes the attention core, 'full' the whole forward)")
    args = ap.parse_args()
    layout_bench._install()  # one capture and annotation for every row
    folder = tempfile.mkdtemp()
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(layout_bench.CONFIGS["8b"], f)
    batch = layout_bench.BATCH["8b", 8]
    layout_bench._key[0] = ("8b", batch)
    model, inputs = load_hf(f"hf:{folder}", layout_bench.SEQ, batch)
    print("| device | recompute | step s | tokens/s/GPU | predicted / measured 5,762 | MFU | planning s |")
    print("|---|---|---|---|---|---|---|")
    for (label, dev), recompute in [(v, r) for r in args.recompute for v in _variants(args.devices, args.set)]:
        common: dict[str, Any] = dict(layout_bench.COMMON, device=dev)
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ctx, solved = api.partition(model, 8, inputs, **common, **dict(_PINNED, recompute=recompute),
                                        memory_limit=2**50)
        row = layout_bench._row(ctx, solved, 8, layout_bench.CONFIGS["8b"], time.perf_counter() - t)
        print(f"| {label} | {recompute} | {row['step_s']:.3f} | {row['tps_gpu']:,.0f} | {row['tps_gpu'] / MEASURED:.3f} | "
              f"{100 * row['mfu']:.1f} % | {row['plan_s']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
