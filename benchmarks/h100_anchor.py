"""The one like-for-like H100 anchor, priced alone: torchtitan's Llama 3 8B, bf16 eager, FSDP on 8 H100s.

torchtitan measured 5,762 tokens/s/GPU (``benchmarks/llama3_h100_202412_torchtitan.md`` of
torchtitan: 8 GPUs, FSDP, local batch 2, sequence 8192, selective activation checkpointing, no
torch.compile, no Float8). ``layout_bench.py`` prices the same pinned layout among many others;
this script prices only that row (one capture, shared by every device variant), so a change to
the cost model can be checked against it in a few minutes:

    PYTHONPATH=. .venv/bin/python benchmarks/h100_anchor.py [--devices h100-sxm h100-sxm-fa2]
        [--set attn_fwd=0.75,attn_bwd=0.51 [--set ...]] [--recompute selective full] [--as-run]

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
from partitioner.cost_models.devices import DEVICES, DeviceSpec, is_gemm, kernels  # noqa: E402
from partitioner.passes.annotate import tensor_users  # noqa: E402
from partitioner.passes.meta import COST  # noqa: E402
from partitioner.tools.hf_model import load_hf  # noqa: E402

MEASURED = 5762.0  # tokens/s/GPU, torchtitan llama3_h100_202412_torchtitan.md, 8B, 8 GPUs, bf16 eager
#: The GPU that run used (the same file, "Hardware"): Grand Teton's H100 with 96 GB of HBM2e at
#: 2.4 TB/s, at its default 500 W power limit, whose "actual peak TFLOPs number is between SXM and
#: NVL, and we don't know its exact value" (its footnote 2). NVIDIA H100 NVL datasheet: BF16 1,671
#: TFLOPS with sparsity (835 dense), FP32 60 TFLOPS. ``--as-run`` prices the row on this GPU at
#: both ends of that range, with attention as FlashAttention-2 (``h100-sxm-fa2``'s figures: the
#: run's torch, a nightly of 2024-12-23, put SDPA's flash backend first on Hopper).
AS_RUN = {"mem_bandwidth": 2.4e12, "memory_bytes": 96 * 10**9}
PEAKS = {"SXM peak": (989e12, 67e12), "NVL peak": (835e12, 60e12)}
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


def _as_run() -> list[tuple[str, DeviceSpec]]:
    base = DEVICES["h100-sxm-fa2"]
    return [(f"as run: H100 HBM2e 2.4 TB/s, 500 W, {name} ({lowp / 1e12:.0f}), FA2 attention",
             replace(base, name="h100-hbm2e-500w", peak_flops_lowp=lowp, peak_flops=fp32, **AS_RUN))
            for name, (lowp, fp32) in PEAKS.items()]


def sac_delta(prob: Any) -> tuple[float, float, float]:
    """Seconds per step around what torchtitan's selective activation checkpointing recomputes,
    as this problem prices its nodes: (the attention cores' forward, which the planner's
    "selective" recomputes; the forward of every second matmul of each block as torchtitan's
    policy counts them per block, q, k, v, o, gate, up, down: k, o and up; the forward of the
    blocks' other ops that launch a kernel, norms, rotary, activations, adds, which torchtitan
    recomputes too: it keeps only those matmuls' and attention's outputs). An estimate of the
    recompute torchtitan ran, for which the planner has no mode. A node is a block's by the
    weights it reads (its matmuls) or by lying between the first block's first matmul and the
    output layer (the first block's input norm is left out, the final norm counted: one norm each)."""
    gm = prob.priced.order[0].graph.owning_module
    users = tensor_users(gm)
    recomputed = ("k_proj.weight", "o_proj.weight", "up_proj.weight")
    attn = mm_half = cheap = 0.0
    inside = False
    for node, f in zip(prob.priced.order, prob.priced.fwd_s):
        cost = node.meta.get(COST)
        if cost is None:
            continue
        weights = users.get(node.name, ())
        in_layer = any(".layers." in w for w in weights)
        if cost.kind.startswith("attention"):
            attn += f
        elif is_gemm(cost.ops) and weights:
            inside = in_layer  # from the first block's first matmul to the output layer's
            if any(w.endswith(recomputed) for w in weights):
                mm_half += f
        elif inside and kernels(cost.ops):
            cheap += f
    return attn, mm_half, cheap


def _own_optimizer(row: dict[str, Any], solved: Any, dev: DeviceSpec) -> None:
    """``layout_bench.price_row`` prices the optimizer step on ``h100-sxm``: re-price it on ``dev``
    (its memory bandwidth), the step and throughput with it."""
    prob, sol, _, _ = solved
    bounds = [0, *sol.cuts, len(prob.priced.order)]
    trainable = max(prob.shard.trainable(a, b) for a, b in zip(bounds, bounds[1:]))
    if prob.opts.zero and prob.opts.data_parallel > 1:
        trainable = -(-trainable // prob.opts.data_parallel)
    step = row["step_s"] - DEVICES["h100-sxm"].optimizer_time(trainable, "adamw", "bf16-mixed") \
        + dev.optimizer_time(trainable, "adamw", "bf16-mixed")
    row["tps_gpu"] *= row["step_s"] / step
    row["mfu"] *= row["step_s"] / step
    row["step_s"] = step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", nargs="*", default=[d for d in ("h100-sxm", "h100-sxm-fa2") if d in DEVICES])
    ap.add_argument("--set", action="append", default=[],
                    help="field=value[,field=value]: one more row per device with these Efficiency fields (repeatable)")
    ap.add_argument("--recompute", nargs="*", default=[_PINNED["recompute"]],
                    help="recompute modes to price the layout with (torchtitan ran its own selective AC: every "
                         "second matmul and the cheap ops recomputed, attention kept; the planner's 'selective' "
                         "recomputes the attention core, 'full' the whole forward)")
    ap.add_argument("--as-run", action="store_true", help="also price it on the GPU the run used (AS_RUN)")
    args = ap.parse_args()
    layout_bench.install()  # one capture and annotation for every row
    folder = tempfile.mkdtemp()
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(layout_bench.CONFIGS["8b"], f)
    batch = layout_bench.BATCH["8b", 8]
    layout_bench.shared_key[0] = ("8b", batch)
    model, inputs = load_hf(f"hf:{folder}", layout_bench.SEQ, batch)
    print("| device | recompute | step s | tokens/s/GPU | predicted / measured 5,762 | MFU | planning s |")
    print("|---|---|---|---|---|---|---|")
    extra: list[str] = []
    devices = _variants(args.devices, args.set) + (_as_run() if args.as_run else [])
    for (label, dev), recompute in [(v, r) for r in args.recompute for v in devices]:
        common: dict[str, Any] = dict(layout_bench.COMMON, device=dev)
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ctx, solved = api.partition(model, 8, inputs, **common, **dict(_PINNED, recompute=recompute),
                                        memory_limit=2**50)
        row = layout_bench.price_row(ctx, solved, 8, layout_bench.CONFIGS["8b"], time.perf_counter() - t)
        _own_optimizer(row, solved, dev)
        if recompute == "selective":  # torchtitan's own selective AC, estimated from the node prices
            attn, mm_half, cheap = sac_delta(solved[0])
            sac = row["step_s"] - attn + mm_half + cheap
            tps = row["tps_gpu"] * row["step_s"] / sac
            extra.append(f"| {label} | torchtitan SAC (estimate: selective - attention fwd {attn:.3f} s + "
                         f"every 2nd matmul fwd {mm_half:.3f} s + other block ops fwd {cheap:.3f} s) | {sac:.3f} | "
                         f"{tps:,.0f} | {tps / MEASURED:.3f} | | |")
        print(f"| {label} | {recompute} | {row['step_s']:.3f} | {row['tps_gpu']:,.0f} | {row['tps_gpu'] / MEASURED:.3f} | "
              f"{100 * row['mfu']:.1f} % | {row['plan_s']:.0f} |", flush=True)
    print("\n".join(extra))


if __name__ == "__main__":
    main()
