"""The planner's whole layout for Llama 3 shapes, beside published layouts priced on the same costs.

For each model (Llama 3 8B, 70B, 405B shapes, built from their configs on the meta device,
bf16-mixed AdamW, sequence 8192) and GPU count, ``partition(..., tensor_parallel="auto",
data_parallel="auto", zero="auto", schedule="auto", n_microbatches="auto", recompute="auto")``
chooses T, D, P, the ZeRO level, schedule, micro-batches and recompute together
(``partitioner.layout.joint``) on the H100 SXM profile, NVLink 4 inside 8-GPU nodes and
400 Gb/s InfiniBand between them. Beside it, published layouts are pinned (every choice
given; only the cuts are solved) and priced on the same costs. Each row prints D x P x T,
ZeRO, schedule, m, recompute, the predicted step (the pipeline's with the replicas'
communication, plus the optimizer step on the fullest rank), tokens/s/GPU, MFU and the
peak memory of the fullest GPU.

The published runs used Float8 linears, torch.compile and async TP (torchtitan), which the
cost model does not price: the comparison is of layouts on this cost model, not a
validation of it against those measurements (their figures are cited beside the rows).

    PYTHONPATH=. .venv/bin/python benchmarks/layout_bench.py [--only 8b 70b 405b] [--gpus 8 64 ...]
    PYTHONPATH=. .venv/bin/python benchmarks/layout_bench.py --sweep [--only ...] [--json rows.json]

``--sweep``: the planner on 64, 128, 256 and 512 GPUs per model (``SWEEP``; global batch
``batch_for``), with the published layouts pinned where their GPU count comes up.

Planning is the slow part (a 405B capture is minutes on a laptop): the script captures and
annotates each (model, batch) once and shares that between the runs (patching
``partitioner.api``'s capture, context and emit for the duration: nothing is emitted, the
rows come from the solved layout).
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

from partitioner import api  # noqa: E402
from partitioner.cost_models.devices import get_device  # noqa: E402
from partitioner.layout import replicated  # noqa: E402
from partitioner.problem import Context  # noqa: E402
from partitioner.tools.hf_model import load_hf  # noqa: E402

SEQ = 8192
_LLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", max_position_embeddings=8192,
              rope_theta=500000.0, rms_norm_eps=1e-5, dtype="bfloat16", tie_word_embeddings=False,
              num_key_value_heads=8, vocab_size=128256)
#: Llama 3 / 3.1 shapes (Meta's config.json values)
CONFIGS: dict[str, dict[str, Any]] = {
    "8b": dict(_LLAMA, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32),
    "70b": dict(_LLAMA, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64),
    "405b": dict(_LLAMA, hidden_size=16384, intermediate_size=53248, num_hidden_layers=126,
                 num_attention_heads=128),
}
#: (model, GPUs) -> global batch in sequences: torchtitan's where it published one
#: (benchmarks/llama3_h100_202412_torchtitan.md: 8B 8 GPUs 16, 70B 256 GPUs 512, 405B 512 GPUs 256),
#: elsewhere the same sequences per GPU as its nearest published run
BATCH = {("8b", 8): 16, ("8b", 64): 128, ("70b", 64): 128, ("70b", 256): 512, ("405b", 256): 128,
         ("405b", 512): 256}
#: published layouts, pinned: (model, GPUs, name, partition() keywords, published tokens/s/GPU, note,
#: global batch: None for ``batch_for``'s; a row is priced only in a run at its batch)
PUBLISHED = [
    ("8b", 8, "torchtitan FSDP 8", dict(data_parallel=8, tensor_parallel=1, zero=3, schedule="1f1b",
                                         n_microbatches=1, recompute="selective-op"),  # its SAC, "op" policy
     "5,762", "bf16, no torch.compile, no Float8; selective AC; local batch 2", None),
    ("8b", 64, "torchtitan FSDP (as its 128-GPU run)", dict(data_parallel=64, tensor_parallel=1, zero=3,
                                                            schedule="1f1b", n_microbatches=1,
                                                            recompute="selective-op"),
     "5,605 (128 GPUs)", "bf16, no compile/Float8, 128 GPUs, local batch 2", None),
    ("70b", 256, "torchtitan FSDP 32 x TP 8", dict(data_parallel=32, tensor_parallel=8, zero=3, schedule="1f1b",
                                                  n_microbatches=1, recompute="full", sequence_parallel=True),
     "829 (876 async TP)", "Float8 + torch.compile; full AC; local batch 16", None),
    ("405b", 512, "torchtitan FSDP 8 x TP 8 x PP 8, 1F1B", dict(data_parallel=8, tensor_parallel=8, zero=3,
                                                                schedule="1f1b", n_microbatches=32,
                                                                recompute="full", sequence_parallel=True),
     "100", "Float8 + compile + async TP; full AC; local batch 32, micro-batch 1", None),
    ("405b", 512, "torchtitan FSDP 8 x TP 8 x PP 8, interleaved", dict(data_parallel=8, tensor_parallel=8, zero=3,
                                                                       schedule="interleaved-1f1b",
                                                                       n_microbatches=32, recompute="full",
                                                                       sequence_parallel=True),
     "128", "as above, interleaved 1F1B", None),
    # Megatron-Bridge's H100 recipes (scripts/performance/configs/llama/llama3_workload_base_configs.py,
    # LLAMA3_70B_PRETRAIN_CONFIG_H100_FP8_CS_V1 and LLAMA3_8B_PRETRAIN_CONFIG_H100_FP8_CS_V1; figures from its
    # docs/performance-summary-archive.md, DGX-H100, FP8 current scaling, 25.09 / 25.11 containers). Megatron's
    # distributed optimizer is ZeRO-1, which this project does not run beside tensor parallelism: the 70B row
    # is priced with zero=0 (the same ring bytes per step; the optimizer state not split over the 2
    # replicas, so its memory is over Megatron's). No recompute is set for 70B; 8B recomputes 5 of 32
    # layers, which a one-stage plan cannot say (priced with none). The BF16 recipes use context
    # parallelism (CP 2), which this project does not implement, so the FP8 recipes' layouts are priced.
    ("70b", 64, "Megatron-Bridge TP 4 x PP 8 x VP 5 (DP 2)",
     dict(data_parallel=2, tensor_parallel=4, zero=0, schedule="interleaved-1f1b", virtual_stages=5,
          n_microbatches=64, recompute="none", sequence_parallel=True),
     "1,619 / 1,602 (FP8)", "FP8 current scaling, TE kernels; global batch 128, micro-batch 1", None),
    ("70b", 64, "Megatron-Bridge's layout, recompute chosen to fit",
     dict(data_parallel=2, tensor_parallel=4, zero=0, schedule="interleaved-1f1b", virtual_stages=5,
          n_microbatches=64, recompute="auto", sequence_parallel=True),
     "-", "its layout on our memory model: the planner picks each stage's recompute", None),
    ("8b", 8, "Megatron-Bridge FSDP 8", dict(data_parallel=8, tensor_parallel=1, zero=3, schedule="1f1b",
                                            n_microbatches=16, recompute="none"),
     "14,079 / 14,451 (FP8)", "FP8 current scaling, Megatron FSDP; global batch 128, micro-batch 1, 5 layers "
     "recomputed", 128),
    ("8b", 8, "Megatron-Bridge's layout, recompute chosen to fit",
     dict(data_parallel=8, tensor_parallel=1, zero=3, schedule="1f1b", n_microbatches=16, recompute="auto"),
     "-", "its layout on our memory model: the planner picks the stage's recompute", 128),
]
RUNS = {"8b": (8, 64), "70b": (64, 256), "405b": (256, 512)}
#: the planner's runs (``--sweep``): every model on 64 to 512 GPUs
SWEEP = (64, 128, 256, 512)
#: the planner's keywords: every choice open
PLANNER = dict(data_parallel="auto", tensor_parallel="auto", zero="auto", schedule="auto", n_microbatches="auto",
               recompute="auto", sequence_parallel=True)


def batch_for(name: str, n_gpus: int) -> int:
    """The global batch of (model, GPUs): ``BATCH``'s, else the sequences per GPU of the model's
    published run nearest in GPU count (8B: 2, 70B: 2, 405B: 0.5) times the GPUs."""
    if (name, n_gpus) in BATCH:
        return BATCH[name, n_gpus]
    g = min((g for m, g in BATCH if m == name), key=lambda g: (abs(g - n_gpus), g))
    return max(1, BATCH[name, g] * n_gpus // g)
COMMON = dict(device="h100-sxm", link="nvlink4", gpus_per_node=8, inter_link="ib-ndr-400", optimizer="adamw",
              precision="bf16-mixed")

_shared: dict[Any, dict[str, Any]] = {}
#: the (model, batch) whose capture and annotation the next partition() calls share (``install``)
shared_key: list[Any] = [None]
_timing: list[float] = []  # the last layout search: wall seconds, CPU seconds (``install``)


def install() -> None:
    """Share one capture and annotation per (model, batch) between partition() calls, and
    return the context and the solved layout instead of emitting stage modules."""
    real_capture = api.capture

    def capture(model: Any, *a: Any, **k: Any) -> Any:
        ent = _shared.setdefault(shared_key[0], {})
        if "cap" not in ent:
            ent["cap"] = real_capture(model, *a, **k)
        return ent["cap"]

    def context(model: Any, cap: Any, specs: Any, request: Any) -> Context:
        ent = _shared[shared_key[0]]
        ctx = Context(model, cap, specs, request, annotated=ent.get("annotated"), views=ent.setdefault("views", {}))
        ent["ctx"] = ctx
        return ctx

    def emit(ctx: Context, solved: Any) -> Any:
        _shared[shared_key[0]]["annotated"] = ctx.annotated
        return ctx, solved

    real_choose = api.choose

    def choose(ctx: Context) -> Any:  # the layout search alone: its wall and CPU seconds
        t, c = time.perf_counter(), time.process_time()
        try:
            return real_choose(ctx)
        finally:
            _timing[:] = [time.perf_counter() - t, time.process_time() - c]

    api.capture, api.Context, api.emit, api.choose = capture, context, emit, choose  # type: ignore[assignment]


def price_row(ctx: Context, solved: Any, n_gpus: int, cfg: dict[str, Any], seconds: float) -> dict[str, Any]:
    prob, sol, fits, lay = solved
    rep = replicated(prob, sol, lay)
    dev = get_device("h100-sxm")
    opts = prob.opts
    bounds = [0, *sol.cuts, len(prob.priced.order)]
    trainable = max(prob.shard.trainable(a, b) for a, b in zip(bounds, bounds[1:]))  # one TP rank's, per stage
    if opts.zero and opts.data_parallel > 1:
        trainable = -(-trainable // opts.data_parallel)  # ZeRO-1 and FSDP step their shard only
    opt = dev.optimizer_time(trainable, "adamw", "bf16-mixed")
    step = rep.step + opt
    batch = prob.symbols["B"]
    tokens = batch * SEQ
    h, layers, vocab = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    n_params = sum(p.numel() for p in ctx.model.parameters()) - vocab * h  # without the input embedding
    flops_per_token = 6 * n_params + 12 * layers * h * SEQ  # torchtitan's / PaLM's count
    return dict(
        layout=f"{opts.data_parallel} x {opts.pp} x {opts.tensor_parallel}", zero=opts.zero,
        sp=opts.sequence_parallel and opts.tensor_parallel > 1,
        schedule=opts.schedule, m=opts.n_microbatches, recompute="/".join(sorted({f.mode for f in fits})),
        step_s=step, tps_gpu=tokens / step / n_gpus,
        mfu=tokens * flops_per_token / step / (n_gpus * dev.peak_flops_lowp),
        peak_gib=prob.peak(fits) / 2**30, plan_s=seconds,
        search_s=_timing[0], search_cpu_s=_timing[1],
        solved=sum(1 for r in prob.rankings.get("layout", []) if r["refused"] is None),
        pruned=sum(1 for r in prob.rankings.get("layout", []) if (r["refused"] or "").startswith("pruned")),
        floor=sum(1 for r in prob.rankings.get("layout", []) if "alone need at least" in (r["refused"] or "")),
        free_splits=sum(1 for k in ctx.priced_memo if k[0] == "free split"))  # distinct memory-free splits solved


def _plan(name: str, n_gpus: int, model: Any, inputs: Any, **kw: Any) -> tuple[dict[str, Any] | None, str]:
    t = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ctx, solved = api.partition(model, n_gpus, inputs, **COMMON, **kw)
    except api.PartitionError as e:
        return None, " ".join(str(e).split())[:300]
    return price_row(ctx, solved, n_gpus, CONFIGS[name], time.perf_counter() - t), ""


def _fmt(row: dict[str, Any]) -> str:
    return (f"{row['layout']} | {row['zero']} | {row['schedule']} | {row['m']} | {row['recompute']} | "
            f"{'on' if row.get('sp') else 'off'} | "
            f"{row['step_s']:.2f} s | {row['tps_gpu']:,.0f} | {100 * row['mfu']:.1f}% | {row['peak_gib']:.1f} GiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--gpus", nargs="*", type=int, default=None, help="GPU counts to run (default: each model's)")
    ap.add_argument("--no-planner", action="store_true", help="pinned layouts only")
    ap.add_argument("--json", default=None, help="write the rows here")
    ap.add_argument("--sweep", action="store_true", help=f"the planner on {', '.join(map(str, SWEEP))} GPUs per model")
    args = ap.parse_args()
    install()
    out: list[dict[str, Any]] = []
    print("model | GPUs | global batch | who | D x P x T | zero | schedule | m | recompute | SP | step | tokens/s/GPU | "
          "MFU | peak memory | published tokens/s/GPU | planning")
    for name in args.only:
        folder = tempfile.mkdtemp()
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(CONFIGS[name], f)
        for n_gpus in sorted(set(RUNS[name]) | set(SWEEP)) if args.sweep else RUNS[name]:
            if args.gpus and n_gpus not in args.gpus:
                continue
            batch = batch_for(name, n_gpus)
            shared_key[0] = (name, batch)
            t = time.perf_counter()
            model, inputs = load_hf(f"hf:{folder}", SEQ, batch)
            built = time.perf_counter() - t
            jobs: list[tuple[str, dict[str, Any], str]] = []
            if not args.no_planner:
                jobs.append(("planner", PLANNER, ""))
            jobs += [(who, kw, f"{tps} ({note})") for m, g, who, kw, tps, note, b in PUBLISHED
                     if m == name and g == n_gpus and (b or batch_for(m, g)) == batch]
            for who, kw, cited in jobs:
                first = "cap" not in _shared.get(shared_key[0], {})
                row, err = _plan(name, n_gpus, model, inputs, **kw)
                if row is None and who != "planner":  # price it anyway, its memory marked as over the device
                    row, err2 = _plan(name, n_gpus, model, inputs, memory_limit=2**50, **kw)
                    if row is not None:
                        row["over"] = err
                if row is None:
                    print(f"{name} | {n_gpus} | {batch} | {who} | refused: {err} | {cited}", flush=True)
                    out.append(dict(model=name, gpus=n_gpus, batch=batch, who=who, refused=err))
                    continue
                extra = (f"{row['plan_s']:.0f} s" + (" (with capture)" if first else "")
                         + f"; layout search {row['search_s']:.0f} s, {row['search_cpu_s']:.0f} CPU-s"
                         + (f", {row['solved']} solved, {row['pruned']} pruned, {row['floor']} refused by the "
                            f"memory floor, {row['free_splits']} distinct memory-free splits" if who == "planner" else ""))
                over = " (over the device: does not fit on our memory model)" if row.get("over") else ""
                print(f"{name} | {n_gpus} | {batch} | {who} | {_fmt(row)}{over} | {cited or '-'} | {extra}", flush=True)
                out.append(dict(model=name, gpus=n_gpus, batch=batch, who=who, cited=cited, build_s=built, **row))
        _shared.clear()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
