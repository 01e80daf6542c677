"""Predicted against measured: published pure pipeline-parallel training runs, planned here.

Each row is a run someone measured on real GPUs and published with its model shape, GPU,
layout, micro-batch and throughput. The benchmark builds the same model on the meta device
(no weights), plans it with the run's own layout pinned (``partition(pinned_cuts=...)``: the
published number of layers per stage, the schedule and micro-batch count) and compares the
predicted iteration time with the measured one, under the old device model (the datasheet
roofline: ``efficiency=None`` and bare links) and the new one (``partitioner.cost_models.efficiency``).

The iteration predicted is the plan's simulated pipeline step plus the optimizer step of the
slowest stage (``DeviceSpec.optimizer_time``: the runs step Adam once per iteration, after the
pipeline drains).

Source of the rows (cited per row as [ZB]):

[ZB] P. Qi, X. Wan, G. Huang, M. Lin, "Zero Bubble Pipeline Parallelism", ICLR 2024
     (arXiv 2401.10241), Table 3 (models: layers, heads, hidden size, sequence length 1024,
     pipeline GPUs, micro-batch size, micro-batch counts), Table 4 (samples per GPU per
     second of 1F1B, 1F1B-I, ZB-1p, ZB-2p) and Section 5.1: up to 32 NVIDIA A100 SXM 80G GPUs,
     4 nodes joined by a RoCE RDMA network, Megatron-LM, "the first and last stage have one
     fewer transformer layer" than the others. ZB-1p's bubble rate equals ZB-H1's in every
     setting of their Table 5, so ZB-1p is planned as this project's ``zb-h1``.

Not modelled here (said in RESULTS.md): Megatron's vocabulary padding beyond 50304, dropout
(the runs' Megatron default keeps it; it adds memory-bound kernels), and the inter-node
fabric's exact figures (the paper says RoCE, not its speed: ``ethernet-200g`` is assumed).

Run: ``python benchmarks/gpu_cost_bench.py [--quick] [--first] [--no-old] [--fit F ...]`` (meta
device, CPU only; --quick plans the smallest model only; --no-old skips the roofline column).
Prints one row per run and the schedule ratios. ``--fit 0.7 0.74 0.78`` prices the efficiency
model at each value of its fitted number (one column each) and names the value of least mean
|error|: how ``fit`` was re-fitted (each row's prediction is ``A / fit + C`` to within 0.03 %,
so a few values give the whole curve). Each model and batch is captured and annotated once and
shared by all its plans (``--check-sharing`` plans one row both ways and compares).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from partitioner.cost_models.devices import LINKS, DeviceSpec, LinkSpec, get_device  # noqa: E402

VOCAB = 50304  # GPT-2's 50257 tokens padded to a multiple of 128, as Megatron-LM pads them


@torch.library.custom_op("bench::scaled_upper_triang_masked_softmax", mutates_args=())
def scaled_upper_triang_masked_softmax(x: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(scale * x) over the last dimension with the causal (upper-triangular) mask: one
    kernel, as Megatron-LM's fused ``scaled_upper_triang_masked_softmax`` CUDA kernel runs it.

    A custom op rather than ``masked_fill`` + ``softmax`` (what PyTorch offers: its one fused
    masked softmax, ``aten._masked_softmax``, has no meta kernel, so it cannot be traced on
    the meta device) so that the cost model sees one kernel that reads the scores and writes
    the probabilities, not two passes over the S x S scores.
    """
    s_q, s_k = x.shape[-2], x.shape[-1]
    mask = torch.ones(s_q, s_k, dtype=torch.bool, device=x.device).triu(1 + s_k - s_q)
    return torch.softmax((x * scale).masked_fill(mask, float("-inf")), dim=-1)


@scaled_upper_triang_masked_softmax.register_fake
def _(x: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("bench::scaled_upper_triang_masked_softmax_backward", mutates_args=())
def scaled_upper_triang_masked_softmax_backward(dy: torch.Tensor, y: torch.Tensor, scale: float) -> torch.Tensor:
    """The fused kernel's backward: ``scale * y * (dy - sum(dy * y))`` (the masked entries of
    ``y`` are 0, so their gradient is too): one kernel reading ``dy`` and ``y``."""
    return scale * y * (dy - (dy * y).sum(dim=-1, keepdim=True))


@scaled_upper_triang_masked_softmax_backward.register_fake
def _(dy: torch.Tensor, y: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.empty_like(y)


def _fused_softmax_setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    ctx.save_for_backward(output)
    ctx.scale = inputs[1]


def _fused_softmax_backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor, None]:
    (y,) = ctx.saved_tensors
    return scaled_upper_triang_masked_softmax_backward(dy, y, ctx.scale), None


scaled_upper_triang_masked_softmax.register_autograd(_fused_softmax_backward, setup_context=_fused_softmax_setup)


class Block(nn.Module):
    """A Megatron-LM GPT layer (pre-LayerNorm, fused QKV, GELU MLP of 4h, biases).

    ``per_head_qkv``: the fused QKV output laid out as Megatron-LM lays it out, per head its q,
    k and v side by side (``[heads, 3 x head dim]``, split on the last dimension), so that a
    column split of the weight by whole heads gives each tensor-parallel rank its heads and the
    planner's region finder shards attention. False (the Zero Bubble rows, planned before it
    existed): ``[3, heads, head dim]``, which prices the same on the efficiency model (views
    launch no kernel) but leaves attention replicated under tensor parallelism.

    ``attention``: ``"flash"`` (the default: one ``scaled_dot_product_attention`` node, priced
    as a flash kernel that keeps no S x S scores) or ``"explicit"``, the attention Megatron-LM
    ran before FlashAttention (``ParallelAttention`` of 2021), kernel for kernel: the block
    works on ``[s, b, h]`` as Megatron's did, so q, k and v reach the batched matmuls as
    strided views (``[s, b * heads, d]`` transposed, no copy); ``q k^T`` (one ``bmm``), the
    fused scale + causal-mask + softmax kernel (``scaled_upper_triang_masked_softmax``),
    dropout on the probabilities, the ``bmm`` with ``v``, and one copy of the context back to
    ``[s, b, h]``; the S x S scores are written, read and kept for the backward as they were.
    Megatron folds the scale into the first matmul (``baddbmm``'s ``alpha``); here the fused
    softmax applies it: the same kernels and bytes. Tensor parallelism: the planner's region
    finder does not follow heads merged into the batch dimension, so explicit attention stays
    replicated under TP (use it for TP = 1 runs).

    ``dropout``: the probability of Megatron-LM's ``--attention-dropout`` (explicit attention
    only) and ``--hidden-dropout`` (after the attention projection and after the MLP, before
    each residual add); 0 (the default) builds no dropout. Dropout is ``torch.native_dropout``,
    the one kernel ``F.dropout`` runs on a GPU: on the meta device ``F.dropout`` decomposes
    into ``bernoulli_``, ``div_`` and ``mul``, which the cost model would price as three passes.
    """

    def __init__(self, h: int, heads: int, per_head_qkv: bool = False, attention: str = "flash",
                 dropout: float = 0.0) -> None:
        super().__init__()
        if attention not in ("flash", "explicit"):
            raise ValueError(f"attention must be 'flash' or 'explicit', got {attention!r}")
        self.heads, self.per_head_qkv, self.attention, self.p = heads, per_head_qkv, attention, dropout
        self.ln1, self.ln2 = nn.LayerNorm(h), nn.LayerNorm(h)
        self.qkv, self.proj = nn.Linear(h, 3 * h), nn.Linear(h, h)
        self.fc1, self.fc2 = nn.Linear(h, 4 * h), nn.Linear(4 * h, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.attention == "explicit":
            return self._explicit(x)
        b, s, h = x.shape
        d = h // self.heads
        if self.per_head_qkv:
            q, k, v = self.qkv(self.ln1(x)).view(b, s, self.heads, 3 * d).transpose(1, 2).split(d, dim=-1)
        else:
            q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, self.heads, d).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        o = self.proj(a.transpose(1, 2).reshape(b, s, h))
        x = x + _dropout(o, self.p, self.training)
        return x + _dropout(self.fc2(F.gelu(self.fc1(self.ln2(x)))), self.p, self.training)

    def _explicit(self, x: torch.Tensor) -> torch.Tensor:
        """Megatron-LM 2021's attention on ``x`` of ``[s, b, h]`` (class docstring)."""
        s, b, h = x.shape
        n, d = self.heads, h // self.heads
        q, k, v = self.qkv(self.ln1(x)).view(s, b * n, 3 * d).split(d, dim=-1)  # [s, b*n, d] views
        scores = torch.bmm(q.transpose(0, 1), k.permute(1, 2, 0))  # [b*n, s, s]
        probs = scaled_upper_triang_masked_softmax(scores.view(b, n, s, s), 1.0 / math.sqrt(d))
        probs = _dropout(probs, self.p, self.training)
        ctx = torch.bmm(probs.view(b * n, s, s), v.transpose(0, 1))  # [b*n, s, d]
        ctx = ctx.view(b, n, s, d).permute(2, 0, 1, 3).contiguous().view(s, b, h)
        x = x + _dropout(self.proj(ctx), self.p, self.training)
        return x + _dropout(self.fc2(F.gelu(self.fc1(self.ln2(x)))), self.p, self.training)


def _dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """``x`` through dropout of probability ``p`` (``Block``: ``torch.native_dropout``, the GPU's one kernel)."""
    if not p:
        return x
    return torch.native_dropout(x, p, training)[0]


class GPT(nn.Module):
    def __init__(self, layers: int, h: int, heads: int, seq: int, vocab: int = VOCAB, per_head_qkv: bool = False,
                 attention: str = "flash", dropout: float = 0.0) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, h), nn.Embedding(seq, h)
        self.blocks = nn.ModuleList(Block(h, heads, per_head_qkv, attention, dropout) for _ in range(layers))
        self.p, self.explicit = dropout, attention == "explicit"
        self.ln = nn.LayerNorm(h)
        self.head = nn.Linear(h, vocab, bias=False)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = _dropout(self.wte(ids) + self.wpe(torch.arange(ids.shape[1], device=ids.device)), self.p, self.training)
        if self.explicit:  # Megatron-LM 2021's transformer runs on [s, b, h], transposed in and out
            x = x.transpose(0, 1).contiguous()
        for blk in self.blocks:
            x = blk(x)
        x = self.ln(x)
        if self.explicit:
            x = x.transpose(0, 1).contiguous()
        logits = self.head(x)
        # the loss in fp32 over the whole vocabulary, as Megatron-LM computes it
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.view(-1))


@dataclass(frozen=True)
class Run:
    model: str
    layers: int
    heads: int
    hidden: int
    seq: int
    gpus: int
    micro: int  # micro-batch size
    m: int  # micro-batches per iteration
    schedule: str  # this project's schedule name
    published: str  # the paper's name for it
    samples_per_gpu_s: float  # measured
    source: str = "ZB"

    @property
    def measured_s(self) -> float:
        """Iteration seconds: the global batch over the cluster's measured throughput."""
        return self.micro * self.m / (self.samples_per_gpu_s * self.gpus)


_ZB_MODELS = {  # [ZB] Table 3: layers, heads, hidden, GPUs, micro-batch size, micro-batch counts
    "1.5B": (22, 24, 2304, 8, 6, (24, 32, 64)),
    "6.2B": (30, 32, 4096, 8, 3, (24, 32, 64)),
    "14.6B": (46, 40, 5120, 16, 1, (48, 64, 128)),
    "28.3B": (62, 48, 6144, 32, 1, (96, 128, 256)),
}
_ZB_TPUT = {  # [ZB] Table 4, samples per GPU per second, per micro-batch count
    ("1.5B", "1F1B"): (11.8, 12.5, 13.6), ("1.5B", "ZB-1p"): (12.9, 13.4, 14.2),
    ("6.2B", "1F1B"): (3.50, 3.70, 4.03), ("6.2B", "ZB-1p"): (3.88, 4.00, 4.20),
    ("14.6B", "1F1B"): (1.40, 1.49, 1.64), ("14.6B", "ZB-1p"): (1.61, 1.67, 1.76),
    ("28.3B", "1F1B"): (0.76, 0.80, 0.88), ("28.3B", "ZB-1p"): (0.87, 0.90, 0.96),
}
_SCHEDULES = {"1F1B": "1f1b", "ZB-1p": "zb-h1"}


def zb_runs() -> list[Run]:
    out = []
    for name, (layers, heads, hidden, gpus, micro, ms) in _ZB_MODELS.items():
        for published, ours in _SCHEDULES.items():
            for m, tput in zip(ms, _ZB_TPUT[name, published]):
                out.append(Run(name, layers, heads, hidden, 1024, gpus, micro, m, ours, published, tput))
    return out


def layout(layers: int, stages: int) -> list[int]:
    """[ZB]'s layout: every stage the same number of layers, the first and last one fewer."""
    per = (layers + 2) // stages
    assert per * stages - 2 == layers, (layers, stages)
    return [per - 1] + [per] * (stages - 2) + [per - 1]


def old_device(dev: DeviceSpec) -> DeviceSpec:
    return replace(dev, efficiency=None)


def old_link(link: LinkSpec) -> LinkSpec:
    return LinkSpec(link.name, link.bandwidth, link.latency)


def pins(counts: Sequence[int]) -> list[str]:
    """Pinned cuts for a layout of blocks per stage: a cut before ``blocks.<i>``; a cut after
    the last block is made before the final norm (``ln``), so the last stage may hold no block
    (only the norm, the head and the loss)."""
    out, at = [], 0
    for c in counts[:-1]:
        at += c
        out.append(f"blocks.{at}" if at < sum(counts) else "ln")
    return out


def plan_layout(model: nn.Module, counts: Sequence[int], *, pp: int, batch: int, seq: int, m: int, schedule: str,
                dev: DeviceSpec, link: LinkSpec, inter: LinkSpec | None = None, gpus_per_node: int | None = None,
                tp: int = 1, dp: int = 1, recompute: str = "none", precision: str = "bf16-mixed",
                virtual: int | None = None) -> tuple[float, float]:
    """(predicted pipeline step, optimizer step of the slowest rank) in seconds for ``model``
    planned with its layout pinned: ``counts`` blocks per stage (``pp`` x ``virtual`` stages),
    ``tp`` x ``dp`` x ``pp`` GPUs, ``batch`` sequences per iteration in ``m`` micro-batches per
    pipeline. The optimizer step prices the slowest stage's parameters over its ``tp`` ranks."""
    from partitioner.api import partition

    ids = torch.zeros((batch, seq), dtype=torch.long, device="meta")
    with _sharing(model, (batch, seq, precision)):
        pipe = partition(model, n_gpus=pp * tp * dp, example_inputs=(ids, ids), schedule=schedule, n_microbatches=m,
                         virtual_stages=virtual, device=dev, link=link, pinned_cuts=pins(counts), precision=precision,
                         recompute=recompute, memory_limit=10**15, objective="bottleneck", data_parallel=dp,
                         tensor_parallel=tp, gpus_per_node=gpus_per_node, inter_link=inter)
    step = pipe.plan.prediction.step_time_s
    params = max(_stage_params(pipe, i) for i in range(len(pipe.plan.stages))) / tp
    return step, dev.optimizer_time(params, "adam", precision)


def plan(run: Run, dev: DeviceSpec, link: LinkSpec, inter: LinkSpec, cache: dict[Any, Any]) -> tuple[float, float]:
    """(predicted pipeline step, optimizer step of the slowest stage) in seconds."""
    key = ("model", run.model)
    if key not in cache:  # one model per shape: its capture and annotation are shared (``_sharing``)
        with torch.device("meta"):
            cache[key] = GPT(run.layers, run.hidden, run.heads, run.seq)
    model = cache[key]
    many = run.gpus > 8
    return plan_layout(model, layout(run.layers, run.gpus), pp=run.gpus, batch=run.micro * run.m, seq=run.seq,
                       m=run.m, schedule=run.schedule, dev=dev, link=link, inter=inter if many else None,
                       gpus_per_node=8 if many else None)


_SHARED: weakref.WeakKeyDictionary[nn.Module, dict[Any, dict[str, Any]]] = weakref.WeakKeyDictionary()
SHARE = [True]  # False: every partition() call captures and annotates afresh


@contextlib.contextmanager
def _sharing(model: nn.Module, key: Any) -> Iterator[None]:
    """``partition()`` captures and annotates a (model, batch, sequence, precision) once and
    reuses both for every later call with the same key (other schedules, micro-batch counts,
    devices, efficiency fits): only the solve and the emit run again. The costs are symbolic
    in B and S and do not depend on the device (every profile here is a GPU), so the plans
    are the ones a fresh capture gives (``--check-sharing`` compares one row both ways)."""
    from partitioner import api

    if not SHARE[0]:
        yield
        return
    ent = _SHARED.setdefault(model, {}).setdefault(key, {})
    real_capture, real_context = api.capture, api.Context

    def capture(*a: Any, **k: Any) -> Any:
        if "cap" not in ent:
            ent["cap"] = real_capture(*a, **k)
        return ent["cap"]

    def context(model: Any, cap: Any, specs: Any, request: Any) -> Any:
        ctx = real_context(model, cap, specs, request, annotated=ent.get("annotated"),
                           views=ent.setdefault("views", {}))
        ent["ctx"] = ctx
        return ctx

    api.capture, api.Context = capture, context  # type: ignore[assignment]
    try:
        yield
    finally:
        api.capture, api.Context = real_capture, real_context  # type: ignore[assignment]
        ctx = ent.pop("ctx", None)
        if ctx is not None and ctx.annotated is not None:
            ent["annotated"] = ctx.annotated


def with_fit(dev: DeviceSpec, fit: float | None) -> DeviceSpec:
    """``dev`` with its efficiency's fitted number set to ``fit`` (None: as it is)."""
    if fit is None or dev.efficiency is None:
        return dev
    return replace(dev, efficiency=replace(dev.efficiency, fit=fit))


def _stage_params(pipe: Any, i: int) -> int:
    return sum(p.numel() for p in pipe.stages[i].parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the 1.5B model's rows only")
    ap.add_argument("--first", action="store_true", help="each model's fewest micro-batches, 1F1B only")
    ap.add_argument("--fit", nargs="*", type=float, default=None,
                    help="price the efficiency model at each of these values of its fitted number (default: the "
                         "profile's); with several, a column per value and the value of least mean |error|")
    ap.add_argument("--no-old", action="store_true", help="skip the datasheet roofline's column")
    ap.add_argument("--check-sharing", action="store_true",
                    help="plan the first row with and without the shared capture and stop")
    args = ap.parse_args()
    a100 = get_device("a100-80gb")
    nvl, roce = LINKS["nvlink3"], LINKS["ethernet-200g"]
    runs = [r for r in zb_runs() if not args.quick or r.model == "1.5B"]
    if args.first:
        runs = [r for r in runs if r.published == "1F1B" and r.m == _ZB_MODELS[r.model][5][0]]
    if args.check_sharing:
        r = runs[0]
        one: dict[Any, Any] = {}
        shared = [plan(r, a100, nvl, roce, one), plan(r, a100, nvl, roce, one)]  # the second reuses the first's
        SHARE[0] = False
        fresh = plan(r, a100, nvl, roce, {})
        print(f"{r}: shared {shared}, fresh {fresh}")
        assert shared[0] == shared[1] == fresh, "the shared capture changed the prediction"
        return
    fits: list[float | None] = list(args.fit) if args.fit else [None]
    label = [f"fit {f:g}" if f is not None else "new" for f in fits]
    print("| model | GPUs | mbs | m | schedule | measured s | " + ("old pred s | old/meas | " if not args.no_old else "")
          + " | ".join(f"{x} pred s | {x}/meas" for x in label) + " |")
    print("|---" * (6 + 2 * (not args.no_old) + 2 * len(fits)) + "|")
    res: dict[tuple[str, int, str], tuple[float, float, list[float]]] = {}
    cache: dict[Any, Any] = {}
    t0 = time.perf_counter()
    for r in runs:
        old = math.nan
        if not args.no_old:
            old_step, old_opt = plan(r, old_device(a100), old_link(nvl), old_link(roce), cache)
            old = old_step + old_opt
        news = []
        for f in fits:
            new_step, new_opt = plan(r, with_fit(a100, f), nvl, roce, cache)
            news.append(new_step + new_opt)
        res[r.model, r.m, r.published] = (r.measured_s, old, news)
        cols = "".join(f" {new:.3f} | {new / r.measured_s:.2f} |" for new in news)
        print(f"| {r.model} | {r.gpus} | {r.micro} | {r.m} | {r.published} | {r.measured_s:.3f} |"
              + (f" {old:.3f} | {old / r.measured_s:.2f} |" if not args.no_old else "") + cols, flush=True)
    print()
    print("| model | m | measured ZB-1p/1F1B | " + ("old predicted | " if not args.no_old else "")
          + " | ".join(f"{x} predicted | {x} error" for x in label) + " |")
    print("|---" * (3 + (not args.no_old) + 2 * len(fits)) + "|")
    for (model, m, pub), (meas, old, news) in res.items():
        if pub != "ZB-1p" or (model, m, "1F1B") not in res:
            continue
        base = res[model, m, "1F1B"]
        mr = meas / base[0]
        cols = "".join(f" {nr:.3f} | {100 * (nr / mr - 1):+.1f} % |"
                       for nr in (new / b for new, b in zip(news, base[2])))
        print(f"| {model} | {m} | {mr:.3f} |" + (f" {old / base[1]:.3f} |" if not args.no_old else "") + cols)
    print()
    means = []
    for j, x in enumerate(label):
        errs = [abs(news[j] / meas - 1) for meas, _, news in res.values()]
        means.append(sum(errs) / len(errs))
        signed = sum(news[j] / meas - 1 for meas, _, news in res.values()) / len(res)
        print(f"{len(res)} rows, {x}: max |error| {100 * max(errs):.1f} %, mean {100 * means[-1]:.1f} %, "
              f"mean signed {100 * signed:+.1f} %")
    if not args.no_old:
        olds = [abs(old / meas - 1) for meas, old, _ in res.values()]
        print(f"{len(res)} rows, old model: max |error| {100 * max(olds):.1f} %, mean {100 * sum(olds) / len(olds):.1f} %")
    if len(fits) > 1:
        print(f"least mean |error|: {label[min(range(len(fits)), key=means.__getitem__)]}")
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
