"""Predicted against measured on published H100 training runs (bf16), with where the time goes.

The GPU cost model's one fitted number (``Efficiency.fit``) was fitted on A100 pipeline runs
(``gpu_cost_bench.py``); H100 takes it unchanged. The H100 Triton attention kernel's slowdown
(``devices._TRITON_SHARE``) is fitted here, on ``TRITON_FIT_MODELS``' one-node rows only; the
summary scores those and the held-out rows apart. This benchmark prices published H100 runs
whose model shape, GPU count, layout, micro-batch, recompute and measured throughput are all
given by their source, each with its layout pinned (``partition(data_parallel=..., zero=...,
n_microbatches=..., recompute=...)``, each on the profile of the attention kernel it ran
(``DEVICES_BY_SOURCE``: [MPT] on ``h100-sxm-triton``, llm-foundry's 2023 Triton FlashAttention;
[TT] on ``h100-hbm2e-fa2``, SDPA's flash backend on the H100 part they ran (96 GB HBM2e, 500 W); ``--device NAME`` prices every run on one profile,
``--cudnn`` adds the one-node rows as cuDNN would run them), ``nvlink4`` inside an 8-GPU node, ``ib-ndr-400`` between nodes), and prints per run the measured and predicted iteration, their
ratio and the predicted iteration split by what the model charges for it:

- ``gemm``: matrix multiplies (the efficiency model's GEMM curve), forward + backward;
- ``attn``: the flash-attention cores;
- ``mem``: everything else inside the blocks and the embedding (norms, element-wise ops,
  residual adds, casts): memory-bound kernels and launch floors;
- ``out``: the output layer (its matmul included) and the loss, from the head's first node on;
- ``recomp``: forwards run again in backward (activation recomputation), all kinds;
- ``comm``: communication not hidden behind compute (FSDP's gathers and reduce-scatters,
  ``plan.mesh.exposed_s``), and the remainder of the pipeline's step (bubble and point-to-point
  transfers; 0 for the single-stage layouts priced here);
- ``opt``: the optimizer step on each rank's shard of the parameters.

Every column sums, per micro-batch on one rank, from the nodes' own prices
(``DeviceSpec.node_time`` on ``pricing.with_shape``), so ``gemm + attn + mem + out + recomp``
is the stage time the plan holds; the script checks it (``check``).

Sources (cited per row):

[MPT] MosaicML llm-foundry, ``scripts/train/benchmarking/README.md``, section "H100 80GB BF16"
      (github.com/mosaicml/llm-foundry, commit 061f2c7ce64e655100286584a7629e2a09f827ba as
      stored here): per run the model (760m-70b), sequence length, GPU count (h100_80gb),
      micro-batch size, gradient accumulation, global batch, throughput in tokens/s/GPU, MFU,
      precision amp_bf16, FSDP FULL_SHARD (mixed precision DEFAULT), activation checkpointing
      True/False, and the parameter count. Shapes from ``scripts/train/yamls/pretrain/
      mpt-<size>.yaml`` (e.g. mpt-70b.yaml: d_model 8192, n_heads 64, n_layers 80,
      expansion_ratio 4, vocab_size 50368, attn_impl triton): MPT is a GPT with LayerNorm,
      GELU MLP of 4h, biases, learned positions (the cited parameter counts grow by h per token
      of sequence) and the output layer tied to the token embedding; the cited counts equal
      ``V h + S h + L (12 h^2 + 13 h) + 2 h`` exactly. Built here as ``gpu_cost_bench.GPT``
      (``per_head_qkv=True``, flash attention) with the head's weight tied to the embedding.
      Not given by the source, assumed: the H100 variant (SXM: 80 GB HBM3), the network between
      nodes for the 16-64 GPU rows (``ib-ndr-400``), the optimizer (AdamW, as ``mpt-70b.yaml``;
      only its step on the 1/D shard is priced). Its attention kernel is cited: the table's
      commit (b2a43a1, 2023-10-19) ran ``attn_impl: triton`` ([MPT-K] in cost_models/devices.py).
[TT]  torchtitan, ``benchmarks/llama3_h100_202412_torchtitan.md`` (github.com/pytorch/torchtitan,
      commit 31a17bfdb70bab6f62a13d21816a5339b911d6e3): Llama 3.1 8B, FSDP over 8 GPUs (Table 1)
      and 128 GPUs (Table 3), local batch 2, sequence 8192 (torchtitan's default for these
      runs, as ``layout_bench.py``), selective activation checkpointing, bf16 without
      torch.compile or Float8: 5,762 and 5,605 tokens/s/GPU. Hardware: Grand Teton hosts of
      8 H100 with 96 GB HBM2e (2.4 TB/s) at a 500 W limit, 400 Gb/s RDMA per GPU between hosts;
      priced on ``h100-hbm2e-fa2`` (2.4 TB/s, 96 GB; peak 912 TFLOP/s, the middle of the SXM -
      NVL bracket the source puts it in: ``cost_models/devices.py`` [TT-HW]). Shape: ``layout_bench.CONFIGS["8b"]`` (Meta's config), built with the project's
      ``load_hf``. torchtitan's "selective" is its per-op policy (matmul outputs kept, other
      ops recomputed), priced as this planner's ``"selective"`` (attention cores recomputed).

Published H100 runs read but not priced (``SKIPPED``, printed with the reason).

    PYTHONPATH=. .venv/bin/python benchmarks/h100_published.py [--quick] [--source MPT TT] [--json F]
    PYTHONPATH=. .venv/bin/python benchmarks/h100_published.py --device h100-sxm-fa2 --json fa2.json
    PYTHONPATH=. .venv/bin/python benchmarks/h100_published.py --fit-triton fa2.json  # devices._TRITON_SHARE

Meta device and this CPU only; ``--quick`` prices, per model, the one-node rows at its shortest
and longest sequence (the 8-GPU torchtitan row once). Every predicted figure is the cost model's, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

if __package__ in (None, ""):  # run as a script: the repository root and benchmarks/ on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from gpu_cost_bench import GPT  # noqa: E402
from layout_bench import CONFIGS as LLAMA_CONFIGS  # noqa: E402

from partitioner.cost_models.devices import get_device, is_gemm  # noqa: E402

H100_PEAK = 989e12  # dense bf16 FLOP/s of the H100 SXM: the peak [MPT]'s MFU is relative to
MPT_VOCAB = 50368

SOURCES = {
    "MPT": "github.com/mosaicml/llm-foundry scripts/train/benchmarking/README.md (H100 80GB BF16) @061f2c7; "
           "shapes: scripts/train/yamls/pretrain/mpt-<size>.yaml",
    "TT": "github.com/pytorch/torchtitan benchmarks/llama3_h100_202412_torchtitan.md @31a17bf, Tables 1 and 3",
}


@dataclass(frozen=True)
class Run:
    """One published, measured run: shape, layout, measured throughput, and its source."""

    source: str  # a key of SOURCES
    name: str
    family: str  # "mpt" (gpu_cost_bench.GPT, tied head) or "llama3" (Hugging Face Llama from its config)
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    seq: int
    gpus: int
    tp: int
    pp: int
    dp: int
    zero: int  # 3: FSDP (FULL_SHARD), 0: replicas
    micro: int  # micro-batch size (sequences)
    m: int  # micro-batches per rank per iteration (gradient accumulation)
    recompute: str  # "none", "full", "selective"
    tokens_per_gpu_s: float  # measured
    cited_params: float  # the source's parameter count (or the model's nominal size)
    gpu: str  # the GPU as the source names it
    mfu_pct: float | None = None  # the source's MFU, where it gives one

    @property
    def global_batch(self) -> int:
        return self.micro * self.m * self.dp

    @property
    def measured_s(self) -> float:
        """Iteration seconds: the tokens of one iteration over the cluster's measured rate."""
        return self.global_batch * self.seq / (self.tokens_per_gpu_s * self.gpus)

    def params(self) -> int:
        """Parameters of the shape as built (tied MPT head counted once; Llama's untied)."""
        h, f, L = self.hidden, self.ffn, self.layers
        if self.family == "mpt":  # LayerNorm (weight + bias), biases on every linear, learned positions
            return self.vocab * h + self.seq * h + L * (4 * h * h + 4 * h + 2 * h * f + f + h + 4 * h) + 2 * h
        kv = h // self.heads * self.kv_heads  # Llama: RMSNorm weights, no biases, untied head
        return 2 * self.vocab * h + L * (2 * h * h + 2 * h * kv + 3 * h * f + 2 * h) + h


# -- [MPT] ----------------------------------------------------------------------------------
#: mpt-<size>.yaml: (n_layers, d_model, n_heads); expansion_ratio 4, vocab_size 50368
MPT_SHAPES = {"760m": (24, 1536, 12), "1b": (24, 2048, 16), "3b": (32, 2560, 20), "7b": (32, 4096, 32),
              "13b": (40, 5120, 40), "30b": (48, 7168, 56), "70b": (80, 8192, 64)}
#: [MPT] "H100 80GB BF16", every row as printed: model, SeqLen, #GPUs, MFU, MicroBatchSize,
#: GradAccum, GlobalBatchSize, Throughput (T/s/GPU), Activation Checkpointing, NumParams
MPT_TABLE = """
70b 2048 64 42.57 8 4 2048 1039 True 64862437376
70b 2048 32 36.15 2 16 1024 882 True 64862437376
30b 8192 8 29.92 1 21 168 1384 True 30019254272
30b 4096 8 35.86 1 21 168 1802 True 29989894144
30b 2048 32 43.92 14 3 1344 2308 True 29975214080
30b 2048 16 43.07 10 3 480 2263 True 29975214080
30b 2048 8 38.11 3 21 504 2002 True 29975214080
30b 1024 8 38.76 6 21 1008 2084 True 29967874048
13b 32768 8 31.68 1 3 24 1976 True 13011240960
13b 16384 8 35.55 3 3 72 2985 True 12927354880
13b 4096 8 41.6 10 3 240 4717 True 12864440320
13b 2048 64 39.86 2 1 128 4800 False 12853954560
13b 2048 32 39.95 2 1 64 4811 False 12853954560
13b 2048 16 39.58 2 1 32 4767 False 12853954560
13b 2048 8 39.79 2 1 16 4792 False 12853954560
13b 1024 8 44.27 40 3 960 5502 True 12848711680
7b 65536 8 28.59 1 2 16 1956 True 6918905856
7b 32768 8 30.94 2 2 32 3318 True 6784688128
7b 8192 8 37.14 8 2 128 6935 True 6684024832
7b 4096 8 40.42 16 2 256 8611 True 6667247616
7b 2048 8 46.44 6 1 48 10643 False 6658859008
7b 1024 8 42.83 64 2 1024 10203 True 6654664704
3b 65536 8 26.81 1 2 16 3262 True 2814366720
3b 32768 8 28.84 3 6 144 5873 True 2730480640
3b 16384 8 36.34 1 6 48 11152 False 2688537600
3b 8192 8 40.31 3 6 144 16578 False 2667566080
3b 4096 8 42.31 5 6 240 20964 False 2657080320
3b 2048 64 40.8 6 3 1152 22525 False 2651837440
3b 2048 32 41.7 6 3 576 23021 False 2651837440
3b 2048 16 43.73 10 3 480 24142 False 2651837440
3b 1024 8 46.2 20 6 960 27046 False 2649216000
3b 512 8 46.32 40 6 1920 27965 False 2647905280
1b 65536 8 26.34 1 2 16 5506 True 1445974016
1b 32768 8 33.54 1 4 32 12025 False 1378865152
1b 16384 8 35.22 2 4 64 19649 False 1345310720
1b 8192 8 37.73 3 4 96 29157 False 1328533504
1b 4096 8 40.26 7 4 224 38535 False 1320144896
1b 2048 64 40.85 20 1 1280 44402 False 1315950592
1b 2048 32 41.52 20 1 640 45130 False 1315950592
1b 2048 16 42.36 20 1 320 46037 False 1315950592
1b 2048 8 41.82 14 1 112 45455 False 1315950592
1b 1024 8 41.95 18 4 576 48910 False 1313853440
1b 512 8 43.21 56 4 1792 52275 False 1312804864
760m 32768 8 31.84 1 2 16 16291 False 807656448
760m 16384 8 33.57 3 2 48 27815 False 782490624
760m 8192 8 34.84 6 2 96 41825 False 769907712
760m 4096 8 35.83 12 2 192 55459 False 763616256
760m 2048 32 37.57 24 1 768 67971 False 760470528
760m 2048 16 37.89 24 1 384 68551 False 760470528
760m 2048 8 34.9 24 2 384 63147 False 760470528
760m 1024 8 39.76 48 2 768 78581 False 758897664
760m 512 8 40.42 96 2 1536 83749 False 758111232
"""


def mpt_table() -> list[tuple[Any, ...]]:
    """``MPT_TABLE`` parsed: (model, seq, gpus, mfu %, mbs, accumulation, global batch, tokens/s/GPU,
    activation checkpointing, parameters) per row."""
    out = []
    for line in MPT_TABLE.strip().splitlines():
        model, seq, gpus, mfu, mbs, ga, gbs, tps, ac, params = line.split()
        out.append((model, int(seq), int(gpus), float(mfu), int(mbs), int(ga), int(gbs), float(tps), ac == "True",
                    int(params)))
    return out


def mpt_runs() -> list[Run]:
    out = []
    for model, seq, gpus, mfu, mbs, ga, _gbs, tps, ac, params in mpt_table():
        layers, h, heads = MPT_SHAPES[model]
        out.append(Run("MPT", f"mpt-{model}", "mpt", layers, h, heads, heads, 4 * h, MPT_VOCAB, seq, gpus, 1, 1, gpus,
                       3, mbs, ga, "full" if ac else "none", tps, params, "H100 80GB (h100_80gb)", mfu))
    return out


# -- [TT] -----------------------------------------------------------------------------------
def tt_runs() -> list[Run]:
    c = LLAMA_CONFIGS["8b"]
    shape = (c["num_hidden_layers"], c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"],
             c["intermediate_size"], c["vocab_size"], 8192)
    gpu = "H100 96GB HBM2e, 500 W"
    return [Run("TT", "llama3.1-8b FSDP 8", "llama3", *shape, 8, 1, 1, 8, 3, 2, 1, "selective", 5762, 8e9, gpu),
            Run("TT", "llama3.1-8b FSDP 128", "llama3", *shape, 128, 1, 1, 128, 3, 2, 1, "selective", 5605, 8e9, gpu)]


def runs() -> list[Run]:
    return mpt_runs() + tt_runs()


#: published H100 runs read for this benchmark and not priced, with why
SKIPPED = [
    ("TT", "Table 1-3: FSDP + torch.compile (8B, 8 and 128 GPUs)",
     "torch.compile fuses the memory-bound ops; the cost model prices eager kernels"),
    ("TT", "Tables 1-6: every Float8 row (8B, 70B 2D, 405B 3D 1F1B / interleaved, CP rows)",
     "fp8 matmuls are not priced (bf16 rows only)"),
    ("TT", "Tables 2 and 6: context parallelism", "the planner has no context parallelism"),
    ("MPT", "H100 80GB FP8 rows", "fp8 (amp_fp8), not priced"),
    ("Megatron-LM README", "GPT-3 175B on H100, TP 4 x PP 8, ~390 TFLOP/s/GPU (47 % MFU); weak-scaling table 2B-462B",
     "micro-batch, global batch, virtual stages and sequence length are not in the text (the table is an "
     "image, images/model_table.png); TP communication overlap with sequence parallelism"),
    ("NeMo 24.12 / 25.04 performance summary", "GPT3 175B, Llama 2/3 on H100", "FP8 rows"),
    ("Megatron-Bridge H100 BF16 recipes", "Llama 3 8B (8 GPUs, CP 2), 70B (64 GPUs, TP 4 PP 4 CP 2)",
     "context parallelism; their measured throughput was not found in a stored page"),
]


# -- pricing --------------------------------------------------------------------------------
def build(run: Run) -> tuple[torch.nn.Module, tuple[Any, ...]]:
    """The run's model on the meta device and its example inputs (the global batch)."""
    seq = run.seq
    if run.family == "mpt":
        with torch.device("meta"):
            model = GPT(run.layers, run.hidden, run.heads, seq, vocab=run.vocab, per_head_qkv=True)
        model.head.weight = model.wte.weight  # MPT ties its output layer to the token embedding
        ids = torch.zeros((run.global_batch, seq), dtype=torch.long, device="meta")
        return model, (ids, ids)
    from partitioner.tools.hf_model import load_hf

    folder = tempfile.mkdtemp()
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(LLAMA_CONFIGS["8b"], f)
    model, inputs = load_hf(f"hf:{folder}", seq, run.global_batch)
    return model, inputs


KINDS = ("gemm", "attn", "mem", "out")


def _head_start(order: Sequence[Any]) -> int:
    """Position of the first node of the output layer (module ``head`` / ``lm_head``)."""
    for i, node in enumerate(order):
        stack = node.meta.get("nn_module_stack") or {}
        paths = [str(v[0] if isinstance(v, tuple) else v) for v in stack.values()]
        if node.op == "call_module" and str(node.target) in ("head", "lm_head"):
            return i
        if any(p in ("head", "lm_head") or p.endswith((".head", ".lm_head")) for p in paths):
            return i
        if node.op == "call_function" and any(getattr(a, "target", None) in ("head.weight", "lm_head.weight")
                                              for a in node.all_input_nodes):
            return i
    raise ValueError("no output layer (module 'head' or 'lm_head') found in the captured graph")


def breakdown(pipe: Any, dev: Any, micro: int, seq: int) -> dict[str, float]:
    """Per micro-batch on the slowest stage: seconds by kind (``KINDS``), ``recomp`` (forwards
    run again) and ``stage`` (the plan's forward + backward of that stage, to check the sum)."""
    from partitioner.passes.meta import COST, RECOMPUTE
    from partitioner.pricing import compute_nodes, with_shape

    values = {"B": micro, "S": seq}
    stages = pipe.plan.stages
    slow = max(range(len(stages)), key=lambda i: stages[i].cost.fwd_time_s + stages[i].cost.bwd_time_s)
    names = set(stages[slow].nodes)
    redo = {n.name for n in pipe.stages[slow].graph.nodes if RECOMPUTE in n.meta}
    order = compute_nodes(pipe.graph)
    head = _head_start(order)
    out = dict.fromkeys((*KINDS, "recomp", *(f"recomp_{k}" for k in KINDS), "attn_fwd", "attn_bwd"), 0.0)
    for i, node in enumerate(order):
        if node.name not in names or COST not in node.meta:
            continue
        cost = with_shape(node, node.meta[COST])
        f, b = dev.node_time(cost, values, torch.bfloat16)
        if i >= head:
            kind = "out"
        elif cost.kind.startswith("attention"):
            kind = "attn"
        elif len(cost.shape or ()) == 3 or is_gemm(cost.ops):
            kind = "gemm"
        else:
            kind = "mem"
        out[kind] += f + b
        if kind == "attn":  # its two directions apart (each kernel's curve prices them apart)
            out["attn_fwd"] += f + (f if node.name in redo else 0.0)
            out["attn_bwd"] += b
        if node.name in redo:
            out["recomp"] += f
            out[f"recomp_{kind}"] += f
    out["stage"] = stages[slow].cost.fwd_time_s + stages[slow].cost.bwd_time_s
    out["params"] = float(sum(p.numel() for p in pipe.stages[slow].parameters()))
    return out


def predict(run: Run, dev: Any = None) -> dict[str, float]:
    """The run planned with its layout pinned: predicted iteration seconds and its parts.
    Nodes of 8 GPUs on ``nvlink4``, ``ib-ndr-400`` between them; ``dev``: the device (default
    the run's source's, ``device_for``)."""
    from partitioner.api import partition

    if run.tp != 1 or run.pp != 1:
        raise NotImplementedError(f"{run.name}: the breakdown is written for single-stage layouts without "
                                  f"tensor parallelism (tp={run.tp}, pp={run.pp})")
    model, inputs = build(run)
    nodes = run.gpus > 8
    dev = dev or get_device(device_for(run))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = partition(model, n_gpus=run.gpus, example_inputs=inputs, schedule="1f1b", n_microbatches=run.m,
                         device=dev, link="nvlink4", inter_link="ib-ndr-400" if nodes else None,
                         gpus_per_node=8 if nodes else None, precision="bf16-mixed", optimizer="adamw",
                         recompute=run.recompute, memory_limit=10**15, objective="bottleneck",
                         data_parallel=run.dp, tensor_parallel=run.tp, zero=run.zero)
    parts = breakdown(pipe, dev, run.micro, run.seq)
    step = pipe.plan.prediction.step_time_s
    shard = parts["params"] / run.tp / (run.dp if run.zero else 1)  # ZeRO / FSDP step their shard only
    opt = dev.optimizer_time(shard, "adam", "bf16-mixed")
    per_step = {k: run.m * v for k, v in parts.items() if k in KINDS or k.startswith(("recomp", "attn_"))}
    busy = run.m * parts["stage"]
    per_step["comm"] = step - busy  # exposed FSDP / all-reduce time (+ bubble and transfers for pp > 1)
    per_step["opt"] = opt
    per_step["check"] = busy - sum(per_step[k] for k in (*KINDS, "recomp"))
    per_step["exposed"] = pipe.plan.mesh.exposed_s
    per_step["predicted"] = step + opt
    return per_step


# -- checks of the table (tests/cost_models/test_h100_published.py) --------------------------
def problems(run: Run) -> list[str]:
    """What is wrong with a row of the table, in words (empty: well-formed): a source, a layout
    that multiplies to the GPU count, a shape giving the cited parameter count within 3 %, and
    for [MPT] rows the global batch and the MFU the source prints, recomputed from the row."""
    out = []
    if run.source not in SOURCES or not SOURCES[run.source]:
        out.append(f"source {run.source!r} is not cited in SOURCES")
    if run.tp * run.pp * run.dp != run.gpus:
        out.append(f"TP {run.tp} x PP {run.pp} x DP {run.dp} = {run.tp * run.pp * run.dp}, not {run.gpus} GPUs")
    if run.hidden % run.heads or run.heads % run.kv_heads:
        out.append(f"{run.heads} heads / {run.kv_heads} KV heads do not divide hidden {run.hidden}")
    if abs(run.params() / run.cited_params - 1) > 0.03:
        out.append(f"the shape gives {run.params():,} parameters, the source {run.cited_params:,.0f} (over 3 %)")
    if run.recompute not in ("none", "full", "selective") or run.zero not in (0, 1, 3) or run.tokens_per_gpu_s <= 0:
        out.append(f"recompute {run.recompute!r}, zero {run.zero}, {run.tokens_per_gpu_s} tokens/s/GPU")
    if run.mfu_pct is not None:  # [MPT]'s formula: (6 N + 12 L h S) FLOPs per token against 989 TFLOP/s
        flops = 6 * run.cited_params + 12 * run.layers * run.hidden * run.seq
        mfu = run.tokens_per_gpu_s * flops / H100_PEAK * 100
        if abs(mfu / run.mfu_pct - 1) > 0.01:
            out.append(f"{run.tokens_per_gpu_s} tokens/s/GPU gives MFU {mfu:.2f} %, the source prints {run.mfu_pct} %")
    return out


# -- report ---------------------------------------------------------------------------------
COLUMNS = ("gemm", "attn", "mem", "out", "recomp", "comm", "opt")


def totals(p: dict[str, float]) -> dict[str, float]:
    """Seconds per kind with its recomputed forwards included, and the rest (comm + optimizer)."""
    out = {k: p[k] + p[f"recomp_{k}"] for k in KINDS}
    out["rest"] = p["comm"] + p["opt"]
    return out


def fit_factors(rows: Sequence[tuple[Run, dict[str, float]]], groups: dict[str, Sequence[str]]
                ) -> tuple[dict[str, float], float, float]:
    """One factor per group of kinds so that ``sum factor x seconds + rest`` best matches each
    measured iteration in relative terms (least squares on time / measured, numpy's
    ``lstsq``): which predicted parts would have to grow, and by how much, for the rows to
    agree. Returns (factor per group, mean |error|, max |error|) after applying them."""
    t = [totals(p) for _, p in rows]
    meas = np.array([r.measured_s for r, _ in rows])
    a = np.array([[sum(x[k] for k in ks) for ks in groups.values()] for x in t]) / meas[:, None]
    y = 1.0 - np.array([x["rest"] for x in t]) / meas
    coef = np.linalg.lstsq(a, y, rcond=None)[0]
    errs = np.abs(a @ coef - y)  # relative error of the fitted iteration
    return dict(zip(groups, (float(c) for c in coef))), float(errs.mean()), float(errs.max())


def summary(done: Sequence[tuple[Run, dict[str, float]]]) -> None:
    errs = [p["predicted"] / r.measured_s - 1 for r, p in done]
    sets = (("all rows", lambda r: True), ("[MPT]", lambda r: r.source == "MPT"), ("[TT]", lambda r: r.source == "TT"),
            ("one node (8 GPUs)", lambda r: r.gpus == 8), ("more nodes", lambda r: r.gpus > 8),
            ("one node, S <= 2048", lambda r: r.gpus == 8 and r.seq <= 2048),
            ("one node, S 4096-8192", lambda r: r.gpus == 8 and 4096 <= r.seq <= 8192),
            ("one node, S >= 16384", lambda r: r.gpus == 8 and r.seq >= 16384),
            ("[MPT] rows _TRITON_SHARE was fitted on", in_triton_fit),
            ("[MPT] rows held out from that fit", lambda r: r.source == "MPT" and not in_triton_fit(r)))
    for label, keep in sets:
        e = [x for (r, _), x in zip(done, errs) if keep(r)]
        if e:
            print(f"{label}: {len(e)} rows, pred/meas mean {1 + sum(e) / len(e):.2f} (min {1 + min(e):.2f}, "
                  f"max {1 + max(e):.2f}); |error| max {100 * max(map(abs, e)):.1f} %, "
                  f"mean {100 * sum(map(abs, e)) / len(e):.1f} %")
    one = [(r, p) for r, p in done if r.gpus == 8]
    if len(one) >= 4:
        print("\nleast-squares factors on the predicted compute of the one-node rows (recomputed forwards in "
              "their kind; communication and optimizer x 1):")
        for groups in ({"all compute": KINDS}, {"attention": ("attn",), "rest of compute": ("gemm", "mem", "out")},
                       {"gemm": ("gemm",), "attention": ("attn",), "memory-bound + output/loss": ("mem", "out")}):
            f, mean, worst = fit_factors(one, groups)
            print("  " + ", ".join(f"{k} x {v:.2f}" for k, v in f.items())
                  + f": |error| mean {100 * mean:.1f} %, max {100 * worst:.1f} %")


#: The rows ``devices._TRITON_SHARE`` is fitted on (``fit_triton_share``): the one-node [MPT]
#: rows of three of the seven models; every other row is held out, and scored.
TRITON_FIT_MODELS = ("mpt-760m", "mpt-3b", "mpt-13b")


def in_triton_fit(run: Run) -> bool:
    return run.source == "MPT" and run.gpus == 8 and run.name in TRITON_FIT_MODELS


def fit_triton_share(rows: Sequence[dict[str, Any]], step: float = 0.05, top: float = 2.0
                     ) -> tuple[float, list[tuple[float, float]]]:
    """``devices._TRITON_SHARE``: the ``a`` of least mean |error| (in steps of ``step``) over
    ``rows`` (``--json`` rows priced on ``h100-sxm-fa2``), where the Triton kernel's attention
    takes ``1 + 0.4 a`` times FlashAttention-2's forward time and ``1 + a`` its backward
    ([FA2-T]'s ratios, scaled). Each row's iteration grows by exactly that (its other prices do
    not depend on the attention kernel; on one node FSDP's collectives stay hidden). Returns
    ``(a, [(a, mean |error|) over the grid])``."""
    grid = [round(i * step, 10) for i in range(int(round(top / step)) + 1)]
    scores = []
    for a in grid:
        errs = [abs((r["predicted"] + 0.4 * a * r["attn_fwd"] + a * r["attn_bwd"]) / r["measured_s"] - 1)
                for r in rows]
        scores.append((a, sum(errs) / len(errs)))
    return min(scores, key=lambda x: x[1])[0], scores


#: The profile each source's runs are priced on: the attention kernel they ran (cited in
#: ``cost_models/devices.py``): [MPT]'s table of 2023 ran llm-foundry's ``attn_impl: triton``
#: (``h100-sxm-triton``, [MPT-K] there), torchtitan's runs SDPA's flash backend, FlashAttention-2
#: on the 96 GB HBM2e, 500 W H100 they ran on (``h100-hbm2e-fa2``, [SDPA], [TT-HW]); ``h100-sxm``
#: is cuDNN's, ``h100-sxm-fa2`` FlashAttention-2's on the 80 GB SXM part.
DEVICES_BY_SOURCE = {"MPT": "h100-sxm-triton", "TT": "h100-hbm2e-fa2"}
DEVICE = DEVICES_BY_SOURCE["MPT"]


def device_for(run: Run) -> str:
    """The profile ``run`` is priced on by default (``DEVICES_BY_SOURCE``)."""
    return DEVICES_BY_SOURCE[run.source]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="per model, its shortest and longest sequence on one node")
    ap.add_argument("--source", nargs="*", choices=sorted(SOURCES), default=sorted(SOURCES))
    ap.add_argument("--device", default=None, help="one profile to price every run on (default: each source's "
                    f"kernel, {DEVICES_BY_SOURCE})")
    ap.add_argument("--json", default=None, help="write the rows here")
    ap.add_argument("--fit-triton", default=None, metavar="JSON",
                    help="fit devices._TRITON_SHARE on TRITON_FIT_MODELS' one-node rows of a --json file priced "
                         "with --device h100-sxm-fa2, print it, and exit")
    ap.add_argument("--cudnn", action="store_true", help="also price the one-node rows with attention as cuDNN runs "
                    "it (device h100-sxm), as a sensitivity")
    args = ap.parse_args()
    if args.fit_triton:
        with open(args.fit_triton) as f:
            rows = json.load(f)
        fit_rows = [p for p in rows if p["source"] == "MPT" and p["gpus"] == 8 and p["name"] in TRITON_FIT_MODELS]
        a, scores = fit_triton_share(fit_rows)
        print(f"{len(fit_rows)} rows ({', '.join(TRITON_FIT_MODELS)}, one node): _TRITON_SHARE = {a:.2f}")
        print("  " + ", ".join(f"{x:.2f}: {100 * e:.1f} %" for x, e in scores[::4]))
        return
    todo = [r for r in runs() if r.source in args.source]
    if args.quick:  # per model, its shortest and longest sequence on one node
        ends: dict[str, list[Run]] = {}
        for r in todo:
            if r.gpus == 8:
                ends.setdefault(r.name, []).append(r)
        todo = [r for rs in ends.values() for r in dict.fromkeys((min(rs, key=lambda x: x.seq),
                                                                   max(rs, key=lambda x: x.seq)))]
    bad = [f"{r.name} S={r.seq} {r.gpus} GPUs: {e}" for r in todo for e in problems(r)]
    if bad:
        raise SystemExit("malformed rows:\n" + "\n".join(bad))
    print("| source | run | seq | GPUs | D (FSDP) | mbs x m | recompute | measured s | predicted s | pred/meas | "
          "gemm | attn | mem | out+loss | recompute | comm exposed | optimizer |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    done: list[tuple[Run, dict[str, float]]] = []
    t0 = time.perf_counter()
    for r in todo:
        p = predict(r, dev=get_device(args.device or device_for(r)))
        done.append((r, p))
        print(f"| {r.source} | {r.name} | {r.seq} | {r.gpus} | {r.dp} | {r.micro} x {r.m} | {r.recompute} | "
              f"{r.measured_s:.3f} | {p['predicted']:.3f} | {p['predicted'] / r.measured_s:.2f} | "
              + " | ".join(f"{p[c]:.3f}" for c in COLUMNS) + " |", flush=True)
        if abs(p["check"]) > 1e-3 * r.measured_s:
            print(f"  (parts do not sum to the plan's stage time: {p['check']:+.4f} s)", flush=True)
    print()
    summary(done)
    one = [(r, p) for r, p in done if r.gpus == 8]
    if one and args.cudnn:
        print("\none node, attention as cuDNN runs it (sensitivity, device h100-sxm):")
        print("| source | run | seq | mbs x m | recompute | measured s | pred/meas as priced | attn as priced | "
              "attn as cuDNN | pred/meas |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        ratios = []
        for r, p in one:
            q = predict(r, dev=get_device("h100-sxm"))
            ratios.append(q["predicted"] / r.measured_s)
            print(f"| {r.source} | {r.name} | {r.seq} | {r.micro} x {r.m} | {r.recompute} | {r.measured_s:.3f} | "
                  f"{p['predicted'] / r.measured_s:.2f} | {p['attn'] + p['recomp_attn']:.3f} | "
                  f"{q['attn'] + q['recomp_attn']:.3f} | {ratios[-1]:.2f} |", flush=True)
        e = [abs(x - 1) for x in ratios]
        print(f"as cuDNN: pred/meas mean {sum(ratios) / len(ratios):.2f} (min {min(ratios):.2f}, max "
              f"{max(ratios):.2f}); |error| mean {100 * sum(e) / len(e):.1f} %, max {100 * max(e):.1f} %")
    print()
    for src, what, why in SKIPPED:
        print(f"skipped [{src}] {what}: {why}")
    print(f"({len(done)} rows priced in {time.perf_counter() - t0:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dict(source=r.source, name=r.name, seq=r.seq, gpus=r.gpus, micro=r.micro, m=r.m,
                            recompute=r.recompute, measured_s=r.measured_s, **p) for r, p in done], f, indent=1)


if __name__ == "__main__":
    main()
