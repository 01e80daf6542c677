"""Devices and links as plain data, and the time of a node or a message on them.

Without an ``efficiency`` a node takes ``max(FLOPs / peak, bytes moved / memory bandwidth)``
(a roofline at the datasheet figures: the CPU profiles, ``measure_local`` and
``calibrate_device``, and plans written before efficiencies existed). The GPU profiles carry
an ``Efficiency`` (``partitioner.cost_models.efficiency``): matrix multiplies by shape (tile and wave
quantisation under the best measured matmul rate), flash attention by sequence length and head
dimension, memory-bound ops at the achievable bandwidth, and a per-kernel launch floor; every
figure is cited beside the profile. A message takes ``latency + bytes / bandwidth``, with
NCCL's achieved fractions of the line rate where the link profile has them.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import TYPE_CHECKING, Any

import sympy

from partitioner.cost_models.cost import NodeCost
from partitioner.cost_models.cost import evaluate as cost_evaluate
from partitioner.cost_models.efficiency import Efficiency, optimizer_bytes_per_param
from partitioner.cost_models.errors import CostModelError

if TYPE_CHECKING:  # torch only where a device is measured: loading a plan's profiles needs none
    import torch

__all__ = ["DEVICES", "LINKS", "DeviceSpec", "LinkSpec", "evaluate", "get_device", "get_link"]

_LOWP = ("bfloat16", "float16", "half")  # dtype names that get the low-precision (tensor-core) peak

#: aten ops that launch no kernel (views, metadata): not counted against the launch floor
_NO_KERNEL = tuple(f"aten.{name}." for name in (
    "view", "_unsafe_view", "t", "transpose", "permute", "expand", "unsqueeze", "squeeze", "select", "slice",
    "alias", "detach", "as_strided", "split", "split_with_sizes", "unbind", "chunk", "reshape", "empty",
    "empty_like", "empty_strided", "lift_fresh", "numpy_T", "_reshape_alias", "unsafe_split", "diagonal",
    "sym_size", "sym_stride", "sym_numel", "size", "stride", "dim", "is_contiguous", "new_empty",
    "new_empty_strided")) + ("prim.",)
#: aten ops that are matrix multiplies (priced by ``Efficiency.gemm``)
_GEMM = tuple(f"aten.{name}." for name in (
    "mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "convolution", "_convolution", "addbmm", "_scaled_mm"))


#: ops whose backward moves about what their forward moves (casts, copies, the loss)
_ONE_PASS = tuple(f"aten.{name}." for name in (
    "_to_copy", "copy", "copy_", "clone", "_log_softmax", "log_softmax", "nll_loss_forward", "nll_loss",
    "cross_entropy_loss", "mean", "sum", "div", "ne", "masked_fill", "where", "gather", "scalar_tensor", "lt", "ge"))


def _one_pass(op: str) -> bool:
    return op.startswith(_ONE_PASS) or op.startswith(_NO_KERNEL)


def kernels(ops: Sequence[str]) -> int:
    """How many GPU kernels a node's aten ops launch (views and allocations launch none)."""
    return sum(1 for op in ops if not op.startswith(_NO_KERNEL))


def is_gemm(ops: Sequence[str]) -> bool:
    return any(op.startswith(_GEMM) for op in ops)


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    peak_flops: float  # dense fp32/tf32 FLOP/s (what float32 matmuls get)
    peak_flops_lowp: float  # dense bf16/fp16 FLOP/s
    mem_bandwidth: float  # device memory bytes/s
    memory_bytes: int  # device memory capacity
    #: "gpu" or "cpu": which kernels the costs describe (attention on a GPU keeps no S x S)
    kind: str = "gpu"
    #: seconds every node costs on top of its roofline, in forward and again in backward: eager
    #: PyTorch's per-op dispatch and autograd bookkeeping, which a CPU pays in line with the
    #: compute and which makes small micro-batches dearer than their FLOPs say. 0 for the GPU
    #: profiles (kernel launches overlap the device's work at the sizes pipelines run);
    #: ``measure_local`` and ``calibrate_device`` measure it.
    op_overhead_s: float = 0.0
    #: how close kernels come to the figures above (None: a roofline at them, as the CPU
    #: profiles and plans written before efficiencies existed are priced)
    efficiency: Efficiency | None = None

    def peak(self, dtype: torch.dtype | str | None = None) -> float:
        """Peak FLOP/s for compute in ``dtype`` (low precision gets the tensor-core peak)."""
        name = str(dtype).removeprefix("torch.") if dtype is not None else None  # torch.bfloat16 -> "bfloat16"
        return self.peak_flops_lowp if name in _LOWP else self.peak_flops

    def node_time(
        self, cost: NodeCost, values: Mapping[str, int], dtype: torch.dtype | str | None = None
    ) -> tuple[float, float]:
        """(forward, backward) seconds of one node: roofline of FLOPs and bytes moved.

        The backward moves about twice the forward's bytes (it reads the saved inputs and
        the output gradient, and writes input and weight gradients). A node that computes or
        moves anything also pays ``op_overhead_s`` in each direction where it does.
        """
        fwd, bwd, moved = evaluate((cost.fwd_flops, cost.bwd_flops, cost.fwd_bytes_moved), values)
        peak = self.peak(dtype)
        ov = self.op_overhead_s
        if self.efficiency is not None:
            f, b = self._kernel_time(cost, values, fwd, bwd, moved, peak)
            return f + (ov if fwd or moved else 0.0), b + (ov if bwd or moved else 0.0)
        return (
            max(fwd / peak, moved / self.mem_bandwidth) + (ov if fwd or moved else 0.0),
            max(bwd / peak, 2 * moved / self.mem_bandwidth) + (ov if bwd or moved else 0.0),
        )

    def _kernel_time(self, cost: NodeCost, values: Mapping[str, int], fwd: float, bwd: float, moved: float,
                     peak: float) -> tuple[float, float]:
        """(forward, backward) seconds with the efficiency curves (module docstring)."""
        e = self.efficiency
        assert e is not None
        bw = self.mem_bandwidth * e.mem
        shape = evaluate(cost.shape, values) if cost.shape else []
        if cost.kind.startswith("attention") and len(shape) == 4:
            sq, sk, d, causal = shape
            if e.attn_curve:  # the curve's causal rates are on half the square's FLOPs (its convention)
                done = 0.5 if causal else 1.0
            else:  # one rate for both: count the blocks the flash kernel computes (it skips masked-out ones)
                done = _causal_share(sq, sk) if causal else 1.0
            cf = fwd * done / (peak * e.attention(sk, d, causal=bool(causal)))
            cb = bwd * done / (peak * e.attention(sk, d, backward=True, causal=bool(causal)))
        elif len(shape) == 3:
            m, k, n = shape
            cf = fwd / (peak * e.gemm(m, k, n))
            # input gradient (m x n) @ (n x k) and weight gradient (k x m) @ (m x n), half each
            cb = bwd / 2 / (peak * e.gemm(m, n, k)) + bwd / 2 / (peak * e.gemm(k, m, n))
        elif is_gemm(cost.ops) or cost.kind.startswith("attention"):  # shape unknown: the best rate
            top = (e.attn_fwd if cost.kind.startswith("attention") else e.gemm_max) * e.fit
            cf, cb = fwd / (peak * top), bwd / (peak * top)
        else:  # element-wise, norms, the loss, embeddings: CUDA cores, not tensor cores
            cf, cb = fwd / self.peak_flops, bwd / self.peak_flops
        if cost.ops and not kernels(cost.ops):  # views and metadata only: no kernel runs
            return 0.0, 0.0
        launches = max(1, kernels(cost.ops)) * e.launch_s
        # A backward reads the saved input and the output gradient and writes the input
        # gradient: twice the forward's traffic, except for casts and the loss, whose backward
        # is one pass like their forward (the gradient of a cast is a cast; the loss's is
        # softmax - one-hot, from the probabilities the forward kept)
        back = 1 if all(_one_pass(op) for op in cost.ops) else 2
        return (max(cf, moved / bw, launches) if fwd or moved else 0.0,
                max(cb, back * moved / bw, launches) if bwd or moved else 0.0)

    def optimizer_time(self, n_params: float, optimizer: str = "adam", precision: str = "bf16-mixed") -> float:
        """Seconds of one optimizer step over ``n_params`` parameters: memory-bound, the bytes of
        ``efficiency.OPTIMIZER_BYTES`` per parameter at the achievable bandwidth (a fused /
        foreach step: its few launches are negligible next to billions of parameters)."""
        nbytes = n_params * optimizer_bytes_per_param(optimizer, precision)
        mem = self.efficiency.mem if self.efficiency is not None else 1.0
        return nbytes / (self.mem_bandwidth * mem) if nbytes else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if not self.op_overhead_s:  # optional: plans of profiles without it stay as they were
            del out["op_overhead_s"]
        if self.efficiency is None:
            del out["efficiency"]
        else:  # its own form: a measured profile's record as an object, left out when empty
            out["efficiency"] = self.efficiency.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Any) -> DeviceSpec:
        return cls(**_validated(cls, data))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> DeviceSpec:
        """A profile from a JSON file (``to_dict``'s form), e.g. one ``calibrate_device`` wrote."""
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            raise CostModelError(f"cannot read device profile {str(path)!r}: {e}") from None
        try:
            return cls.from_dict(data)
        except CostModelError as e:
            raise CostModelError(f"device profile {str(path)!r}: {e}") from None

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write this profile as JSON (``load`` reads it back equal)."""
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1, sort_keys=True)
            f.write("\n")

    @classmethod
    def measure_local(cls, seconds: float = 0.5) -> DeviceSpec:
        """This machine's CPU, measured: fp32 and bf16 matmul FLOP/s and copy bandwidth."""
        import torch  # noqa: PLC0415 - torch-free module (plan loading and the CLI must not import torch)

        n = 512
        a, b = torch.randn(n, n), torch.randn(n, n)
        fp32 = _rate(lambda: torch.mm(a, b), 2 * n**3, seconds * 0.4)
        lowp = _rate(lambda: torch.mm(a.bfloat16(), b.bfloat16()), 2 * n**3, seconds * 0.2)
        src = torch.empty(16 * 2**20 // 4)  # 16 MiB: past most caches' reach per pass
        dst = torch.empty_like(src)
        bw = _rate(lambda: dst.copy_(src), 2 * src.nbytes, seconds * 0.4)  # read + write
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
        return cls("local", fp32, max(lowp, fp32), bw, int(mem), "cpu", _op_overhead(seconds * 0.2))


@dataclass(frozen=True)
class LinkSpec:
    """A link between two GPUs: line rate one way, latency per message, and what NCCL gets of it.

    A message of ``n`` bytes takes ``latency + (n + half_bytes) / (bandwidth x p2p)``: NCCL's
    point-to-point rate ramps up with the message size, reaching half of its large-message rate
    (``p2p`` x line rate) at ``half_bytes``. One step of a ring collective (``collective_step``)
    moves at ``collective`` x line rate instead (the bus bandwidth nccl-tests reports, over the
    line rate), paying the latency per step. Without the three optional fields a message takes ``latency + n / bandwidth``.
    """

    name: str
    bandwidth: float  # bytes/s, one direction
    latency: float  # seconds per message
    p2p: float = 1.0  # NCCL send/recv rate for large messages / line rate
    collective: float = 1.0  # NCCL ring all-reduce bus bandwidth / line rate
    half_bytes: float = 0.0  # message size at which half the large-message rate is reached

    def __post_init__(self) -> None:  # numbers as JSON gives them back, so a plan re-applies byte for byte
        for name in ("bandwidth", "latency", "p2p", "collective", "half_bytes"):
            object.__setattr__(self, name, float(getattr(self, name)))

    def transfer_time(self, nbytes: float) -> float:
        if not nbytes:
            return 0.0
        return self.latency + (nbytes + self.half_bytes) / (self.bandwidth * self.p2p)

    def collective_step(self, nbytes: float) -> float:
        """One of a ring collective's steps moving ``nbytes`` per rank: ``latency + nbytes /
        (bandwidth x collective)``. No ramp per step: NCCL pipelines a ring's chunks, so the
        per-message cost is paid per step (the latency), not the point-to-point ramp."""
        if not nbytes:
            return 0.0
        return self.latency + nbytes / (self.bandwidth * self.collective)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for name, default in (("p2p", 1.0), ("collective", 1.0), ("half_bytes", 0.0)):
            if out[name] == default:  # optional: plans of links without them stay as they were
                del out[name]
        return out

    @classmethod
    def from_dict(cls, data: Any) -> LinkSpec:
        return cls(**_validated(cls, data))


# -- sources of the efficiency figures (cited by tag beside each number) ----------------------
# [MAMF]  S. Bekman, "Machine Learning Engineering", compute/accelerator/README.md, "Maximum
#         Achievable Matmul FLOPS comparison table" (github.com/stas00/ml-engineering): best BF16
#         torch.matmul over a sweep of shapes, mean of 100 iterations. A100 SXM 271.2 of 312
#         TFLOPS (86.9 %), H100 SXM 794.5 of 989 (80.3 %), GH200 (H200-class, 141 GB HBM3e)
#         828.6 of 989 (83.8 %), B200 SXM ~1745 of 2250 (77.6 %).
# [FA2]   T. Dao, "FlashAttention-2" (arXiv 2307.08691): forward "up to 230 TFLOPs/s, 73% of the
#         theoretical maximum TFLOPs/s on A100" (Section 4); backward, Figure 5 (A100 80GB SXM4,
#         head dim 128, 16k tokens, FLOPs = 2.5 x the forward's, halved with a causal mask), as
#         read in the paper summaries of the code index (the figure is an image): 196 TFLOPs/s
#         without and 186 with a causal mask, i.e. up to 63 % of 312.
# [FA3]   J. Shah et al., "FlashAttention-3" (arXiv 2407.08608): FP16 forward up to 740 TFLOPS,
#         75 % of H100's peak (head dim 256); FlashAttention-2 reaches 35 % on H100. Its Figures 5-6
#         (H100 80GB SXM5, head dim 128, no causal mask, 16k tokens; images, read from transcriptions
#         in the page index): forward FlashAttention-2 370, cuDNN 595, FlashAttention-3 648 TFLOPs/s;
#         backward FlashAttention-2 322, cuDNN 516, FlashAttention-3 561.
# [FA3-F] FlashAttention-3 (arXiv 2407.08608), Figures 5 and 6: H100 80GB SXM5, BF16/FP16,
#         sequence 512-16k at 16k tokens per batch, hidden 2048 (16 heads of 128), TFLOPs/s with
#         a causal mask counted on half the FLOPs (FlashAttention-2's benchmark convention: its
#         ``flops(..., causal)`` divides by 2). Images, read from the page index's transcriptions
#         of them (subtext.edge.nugit.net/image/e27582d2..., 4ec66906..., f60142e2...). Head dim
#         128, at 512 / 1k / 2k / 4k / 8k / 16k tokens:
#           forward, no mask:   FlashAttention-2 309 350 362 368 370 370; cuDNN 497 574 617 609 600
#                               595; standard attention 74 100 119 133 139 (OOM at 16k)
#           forward, causal:    FlashAttention-2 191 260 298 319 333 335; cuDNN 315 410 484 518
#                               529 539; standard attention 26 31 34 35 35
#           backward, no mask:  FlashAttention-2 214 260 291 310 318 322; cuDNN 305 408 465 499
#                               518 516; standard attention 104 131 159 174 181
#         No causal backward is published for H100 (the paper's backward figures have no mask):
#         model: the causal backward is the backward without mask times the same kernel's
#         causal-over-full forward ratio at that length (both pay the same diagonal blocks).
# [FA2-T] FlashAttention-2 (arXiv 2307.08691), Section 4.1 (A100 80GB SXM4, Figure 4):
#         "FlashAttention-2 is around 1.3-1.5x faster than FlashAttention in Triton in the forward
#         pass and around 2x faster in the backward pass". That Triton kernel (HazyResearch's
#         flash_attn_triton.py) is the one llm-foundry's ``attn_impl: triton`` ran [MPT-K].
#         Model: the A100 ratios (1.4, the middle of 1.3-1.5, and 2) carried to H100, where both
#         kernels run without Hopper's wgmma; no H100 figure of that kernel was found.
# [MPT-K] Which kernel llm-foundry's "H100 80GB BF16" benchmark rows ran: the table came in
#         with commit b2a43a1 (2023-10-19, "Update_pretrain_benchmarks (#543)"), whose
#         scripts/train/benchmarking/submit_benchmarks.py sets ``attn_impl`` from
#         ``--attn_impl`` (default 'triton'), which sweep.sh does not pass; the mpt-*.yaml files
#         say ``attn_impl: triton`` too. ``triton_flash_attn_fn`` (llmfoundry/models/layers/
#         attention.py) then runs llmfoundry/models/layers/flash_attn_triton.py (HazyResearch's
#         Triton FlashAttention, causal). From commit 5e85bd6 (2024-01-06) the benchmark
#         default became 'flash' with flash-attn 2 (``.[gpu-flash2]``): later tables ran FA2.
# [SDPA]  Which kernel torch.nn.functional.scaled_dot_product_attention runs on Hopper: its flash
#         backend is FlashAttention-2. From 2.5.1 PyTorch put flash first there (cuDNN made
#         opt-in: pytorch/pytorch #138522; #142132, a 2.6 nightly of 2024-12-04 on H100, head dim
#         128: the default SDPA 329 TFLOPs/s, the cuDNN backend 631, FlashAttention-3 632) until
#         #162073 (for 2.9) made cuDNN the default on sm90 / sm100, since gated on the bundled
#         cuDNN's version (> 9.15, which the wheels bundle from 2.11 on: huggingface/transformers
#         #48163). torchtitan keeps SDPA to [flash, efficient, math] except on B200
#         (pytorch/torchtitan #1196).
# [BW]    "Memory bandwidth analysis" table (fridayswithfaraday.com/posts/memory-bandwidth-
#         analysis-2019): achieved HBM bandwidth A100 ~1,800 of 2,039 GB/s (88 %), H100 SXM
#         ~2,900 of 3,350 GB/s (87 %).
# [LAUNCH] M. Boyer, "CUDA kernel overhead" (cs.virginia.edu/~mwb7w/cuda_support/
#         kernel_overhead.html): at most ~334,000 asynchronous empty-kernel launches per second,
#         i.e. ~3 us per kernel.
# [SM]    NVIDIA A100 / H100 architecture whitepapers: 108 SMs (A100), 132 SMs (H100 SXM5, and
#         H200, the same GH100 die); NVIDIA Blackwell datasheet: 148 SMs (B200).
# Parameters that no measurement gives directly are marked "model:" (set by judgment, not
# fitted); the one fitted number is _FIT below, fitted once to the published pipeline runs of
# benchmarks/gpu_cost_bench.py (RESULTS.md), not per row.
_LAUNCH_S = 3e-6  # [LAUNCH]
_K_HALF = 96.0  # model: K at which a GEMM runs at half its best rate (K = 2304 -> 96 %, 4096 -> 98 %)
_SEQ_HALF = 128.0  # model: attention at 1k tokens runs at 89 % of its long-sequence rate
#: fitted: the one number adjusted to [ZB]'s 24 measured A100 iterations (benchmarks/gpu_cost_bench.py,
#: RESULTS.md "GPU step times"): the value, in steps of 0.01, of least mean |error| over the 24
#: (``gpu_cost_bench.py --fit ...``); the microbenchmarks' rates above are kept as measured.
#: 0.8 until memory-bound ops were charged their real bytes (a metadata query had been priced
#: as a read of its tensor); re-fitted then to 0.76 (mean |error| 2.5 %, max 5.9 %). No published
#: pipeline run on the other GPUs was found to fit theirs: they take A100's.
_FIT = 0.76

#: fitted, on held-out rows: the share of [FA2-T]'s A100 slowdown (forward 1.4x, backward 2x)
#: that the Triton kernel keeps against FlashAttention-2 on H100, i.e. forward 1 + 0.4 a,
#: backward 1 + a. No H100 figure of that kernel exists; fitted once (steps of 0.05, least mean
#: |error|) on the one-node [MPT] rows of mpt-760m, mpt-3b and mpt-13b (19 rows), and scored on
#: the other 33 [MPT] rows (benchmarks/h100_published.py, RESULTS.md "GPU step times on
#: published H100 runs"). 1.0 would be the A100 ratios as they are. 0.45: 4.7 % mean |error| on
#: the fit rows (0: 12.9 %, 1.0: 15.3 %), 7.3 % on the held-out ones (0: 12.6 %, 1.0: 10.4 %).
_TRITON_SHARE = 0.45


def _h100_curve(fwd: Sequence[float], fwd_causal: Sequence[float], bwd: Sequence[float],
                seqs: Sequence[int] = (512, 1024, 2048, 4096, 8192, 16384), fwd_scale: float = 1.0,
                bwd_scale: float = 1.0) -> tuple[tuple[float, float, float, float, float], ...]:
    """An ``Efficiency.attn_curve`` from TFLOPs/s on H100 (dense BF16 peak 989): rows (seq,
    forward, backward, causal forward, causal backward); the causal backward is the [FA3-F]
    model (backward x causal / full forward); ``*_scale`` divide the rates ([FA2-T])."""
    rows = []
    for s_, f, fc, b in zip(seqs, fwd, fwd_causal, bwd):
        rows.append((float(s_), f / fwd_scale / 989, b / bwd_scale / 989, fc / fwd_scale / 989,
                     b * (fc / f) / bwd_scale / 989))
    return tuple(rows)


#: H100 attention by kernel, head dim 128 ([FA3-F]; "triton-fa1" [FA2-T]; "math" is PyTorch's
#: unfused attention, the papers' "standard attention", to 8k tokens: it ran out of memory at 16k).
#: Isolated-kernel rates, as the GEMM's [MAMF]: a profile multiplies them by its ``fit`` as it
#: does every tensor-core rate. No H100 figure was found for the memory-efficient (xFormers /
#: CUTLASS) kernel: it has no curve.
H100_ATTENTION: dict[str, tuple[tuple[float, float, float, float, float], ...]] = {
    "fa2": _h100_curve((309, 350, 362, 368, 370, 370), (191, 260, 298, 319, 333, 335),
                       (214, 260, 291, 310, 318, 322)),
    "cudnn": _h100_curve((497, 574, 617, 609, 600, 595), (315, 410, 484, 518, 529, 539),
                         (305, 408, 465, 499, 518, 516)),
    "triton-fa1": _h100_curve((309, 350, 362, 368, 370, 370), (191, 260, 298, 319, 333, 335),
                              (214, 260, 291, 310, 318, 322), fwd_scale=1 + 0.4 * _TRITON_SHARE,
                              bwd_scale=1 + 1.0 * _TRITON_SHARE),
    "math": _h100_curve((74, 100, 119, 133, 139), (26, 31, 34, 35, 35), (104, 131, 159, 174, 181),
                        seqs=(512, 1024, 2048, 4096, 8192)),
}

A100_EFF = Efficiency(sms=108, gemm_max=0.869, gemm_k_half=_K_HALF,  # [SM], [MAMF] 271.2 / 312
                      attn_fwd=0.73, attn_bwd=0.63, attn_seq_half=_SEQ_HALF,  # [FA2] 73 % / 63 % (196 / 312)
                      mem=0.88, launch_s=_LAUNCH_S, fit=_FIT)  # [BW] 1800 / 2039 GB/s
H100_EFF = Efficiency(sms=132, gemm_max=0.803, gemm_k_half=_K_HALF,  # [SM], [MAMF] 794.5 / 989
                      # attention as PyTorch's SDPA runs it on Hopper with the cuDNN it bundles
                      # [SDPA]: cuDNN, at head dim 128 (the curve's reference) [FA3] 595 / 989
                      # forward, 516 / 989 backward (Megatron-LM / Transformer Engine run cuDNN or
                      # FlashAttention-3, 648 / 561: within 10 %). Before: 0.75 (FA3's head-dim-256
                      # headline) and 0.51 (a model: A100's old backward-to-forward ratio)
                      attn_fwd=0.602, attn_bwd=0.522, attn_seq_half=_SEQ_HALF,
                      # by sequence length, mask and direction: cuDNN's measured curve [FA3-F]
                      # (attn_fwd / attn_bwd above then only price attention of unknown shape)
                      attn_kernel="cudnn", attn_curve=H100_ATTENTION["cudnn"],
                      mem=0.87, launch_s=_LAUNCH_S, fit=_FIT)  # [BW] 2900 / 3350 GB/s
#: attention as FlashAttention-2 runs on H100: SDPA's flash backend, what PyTorch chose there by
#: default before it preferred cuDNN and what torchtitan keeps SDPA to [SDPA]; [FA3] 370 / 989
#: forward, 322 / 989 backward (its "35 %" of H100's peak), by length and mask [FA3-F]
H100_FA2_EFF = replace(H100_EFF, attn_fwd=0.374, attn_bwd=0.326, attn_kernel="fa2", attn_curve=H100_ATTENTION["fa2"])
#: attention as llm-foundry's ``attn_impl: triton`` ran it in 2023 [MPT-K]: FlashAttention-2's
#: H100 curve slowed by the FA2 paper's ratios to that Triton kernel [FA2-T]
H100_TRITON_EFF = replace(H100_EFF, attn_fwd=0.374 / (1 + 0.4 * _TRITON_SHARE),
                          attn_bwd=0.326 / (1 + 1.0 * _TRITON_SHARE), attn_kernel="triton-fa1",
                          attn_curve=H100_ATTENTION["triton-fa1"])
H200_EFF = Efficiency(sms=132, gemm_max=0.838, gemm_k_half=_K_HALF,  # [SM], [MAMF] GH200 828.6 / 989
                      attn_fwd=H100_EFF.attn_fwd, attn_bwd=H100_EFF.attn_bwd,  # as H100 (same die, [SDPA])
                      attn_seq_half=_SEQ_HALF, attn_kernel="cudnn", attn_curve=H100_ATTENTION["cudnn"],
                      mem=0.87, launch_s=_LAUNCH_S, fit=_FIT)  # model: H100's measured fraction [BW]
B200_EFF = Efficiency(sms=148, gemm_max=0.776, gemm_k_half=_K_HALF,  # [SM], [MAMF] 1745 / 2250
                      # model: no public B200 attention measurement found; H100's fractions (SDPA
                      # runs cuDNN there too [SDPA])
                      attn_fwd=H100_EFF.attn_fwd, attn_bwd=H100_EFF.attn_bwd, attn_seq_half=_SEQ_HALF,
                      mem=0.87, launch_s=_LAUNCH_S, fit=_FIT)  # model: H100's measured fraction [BW]

DEVICES: dict[str, DeviceSpec] = {
    d.name: d
    for d in [
        # NVIDIA H100 SXM5 datasheet: FP32 67 TFLOPS, BF16 989 TFLOPS dense (1979 is with
        # sparsity), HBM3 3.35 TB/s, 80 GB. fp32 matmuls get plain FP32 unless TF32 is on.
        DeviceSpec("h100-sxm", 67e12, 989e12, 3.35e12, 80 * 10**9, efficiency=H100_EFF),
        # The same GPU with attention as FlashAttention-2 runs it (H100_FA2_EFF): PyTorch before
        # it preferred cuDNN on Hopper, and torchtitan, which keeps SDPA to its flash backend.
        # (The profile, not the model, chooses the kernel: the graph shows SDPA either way.)
        DeviceSpec("h100-sxm-fa2", 67e12, 989e12, 3.35e12, 80 * 10**9, efficiency=H100_FA2_EFF),
        # And with llm-foundry's 2023 Triton FlashAttention (H100_TRITON_EFF), what its published
        # H100 benchmark rows ran [MPT-K].
        DeviceSpec("h100-sxm-triton", 67e12, 989e12, 3.35e12, 80 * 10**9, efficiency=H100_TRITON_EFF),
        # The H100 torchtitan's published runs used [TT-HW]: SXM, 96 GB of HBM2e at 2.4 TB/s,
        # run at a 500 W limit; its peak "is between SXM and NVL, and we don't know its exact
        # value" [TT-HW]. Priced at the middle of that bracket (model): BF16 (989 + 835.5) / 2
        # = 912 TFLOP/s dense and FP32 (67 + 60) / 2 = 63.5 TFLOP/s (H100 SXM5 above; H100 NVL
        # datasheet: BF16 1,671 TFLOPS with sparsity, FP32 60 TFLOPS [NVL-DS]); the bracket's
        # ends move a step by at most +-8 % of its compute. Attention as FlashAttention-2 runs it
        # (torchtitan keeps SDPA's flash backend); the fractions of peak and of bandwidth as
        # H100 SXM's (model: no measurement of this part was found).
        DeviceSpec("h100-hbm2e-fa2", 63.5e12, 912e12, 2.4e12, 96 * 10**9, efficiency=H100_FA2_EFF),
        # NVIDIA H200 SXM datasheet: same compute as H100 SXM, HBM3e 4.8 TB/s, 141 GB.
        DeviceSpec("h200", 67e12, 989e12, 4.8e12, 141 * 10**9, efficiency=H200_EFF),
        # NVIDIA A100 80GB SXM datasheet: FP32 19.5 TFLOPS, BF16 312 TFLOPS dense,
        # HBM2e 2.039 TB/s, 80 GB.
        DeviceSpec("a100-80gb", 19.5e12, 312e12, 2.039e12, 80 * 10**9, efficiency=A100_EFF),
        # NVIDIA B200 (HGX B200 / DGX B200 datasheets): BF16 2.25 PFLOPS dense (4.5 with
        # sparsity), FP32 ~75 TFLOPS, HBM3e 8 TB/s, 180 GB.
        DeviceSpec("b200", 75e12, 2.25e15, 8e12, 180 * 10**9, efficiency=B200_EFF),
        # A generic server CPU socket (order of magnitude only: ~16 AVX-512 cores,
        # ~1 TFLOP/s fp32, no bf16 speed-up assumed, ~100 GB/s DDR). Prefer measure_local().
        # Hardware figures, not fitted: no byte count went into them, so they stayed as they were
        # when metadata queries stopped being charged as reads. No per-op overhead either (eager
        # dispatch costs 15-19 us per node and direction on this repository's CPU: RESULTS.md,
        # "Pricing small micro-batches"); calibrate_device(model, inputs, device="cpu") fits the
        # rates and that overhead to one machine (benchmarks/cost_model_bench.py checks that path).
        DeviceSpec("cpu", 1e12, 1e12, 100e9, 64 * 2**30, "cpu"),
    ]
}

# [TT-HW]  torchtitan, benchmarks/llama3_h100_202412_torchtitan.md (github.com/pytorch/torchtitan,
#          commit 31a17bfdb70bab6f62a13d21816a5339b911d6e3), "Hardware" and footnote 2: "Each H100
#          GPU is equipped with 96GB HBM2e with 2.4 TB/sec peak memory bandwidth", "the default
#          500W power limit", "HBM2e-based SXM H100 with lower TDP, the actual peak TFLOPs number
#          is between SXM and NVL, and we don't know its exact value".
# [NVL-DS] NVIDIA H100 datasheet, H100 NVL column: FP32 60 TFLOPS, BF16 Tensor Core 1,671
#          TFLOPS (with sparsity; 835.5 dense), 94 GB HBM3 at 3.9 TB/s, 350-400 W.

# -- sources of the link figures -------------------------------------------------------------
# [NVL]   NVIDIA datasheets: NVLink 3 (A100) 600 GB/s, NVLink 4 (H100/H200) 900 GB/s, NVLink 5
#         (B200) 1.8 TB/s, all bidirectional per GPU: half of it each way.
# [P2P]   nccl-tests issue #149 (8x A100-SXM4-80GB, NVLink): CUDA p2pBandwidthLatencyTest
#         430-520 GB/s bidirectional between two GPUs, i.e. ~240 of 300 GB/s each way (0.8);
#         all_reduce_perf bus bandwidth ~200 GB/s; issue #178 (A100, NVLink pair): 208 GB/s.
#         So a ring all-reduce step runs at ~0.69 of NVLink 3's 300 GB/s.
# [NVLS]  nccl-tests issue #309 (2 HGX H100 hosts): ~370 GB/s all-reduce bus bandwidth of
#         450 GB/s each way (0.82).
# [RAMP]  nccl-tests issue #44 (all_reduce_perf, 2 GPUs over an NVLink bridge): bus bandwidth
#         reaches half its plateau around 1 MB and the plateau from ~8 MB on; we put the half
#         point at 4 MiB for NVLink (model: ~15 us of fixed cost at 240 GB/s) and 1 MiB between
#         nodes (~40 us at 25 GB/s).
# [IB]    nccl-tests issue #119 (3 nodes of 8x A100, 4x HDR 200 Gb/s per node): all-reduce bus
#         bandwidth 84.8 GB/s average and 96 GB/s peak of 100 GB/s, 0.85-0.96 of the line rate.
LINKS: dict[str, LinkSpec] = {
    l.name: l
    for l in [
        # A100 NVLink 3: 600 GB/s total = 300 GB/s each way [NVL]; NCCL p2p 0.8, ring 0.69 [P2P]
        LinkSpec("nvlink3", 300e9, 3e-6, p2p=0.8, collective=0.69, half_bytes=4 * 2**20),
        # H100 NVLink 4: 900 GB/s total = 450 GB/s each way [NVL]; p2p as NVLink 3 (model:
        # [P2P]'s fraction), collectives 0.82 [NVLS]
        LinkSpec("nvlink4", 450e9, 3e-6, p2p=0.8, collective=0.82, half_bytes=4 * 2**20),
        # B200 NVLink 5: 1.8 TB/s total = 900 GB/s each way [NVL]; fractions as NVLink 4 (model)
        LinkSpec("nvlink5", 900e9, 3e-6, p2p=0.8, collective=0.82, half_bytes=4 * 2**20),
        LinkSpec("pcie4", 32e9, 10e-6),  # PCIe 4.0 x16: 31.5 GB/s each way
        LinkSpec("pcie5", 64e9, 10e-6),  # PCIe 5.0 x16: 63 GB/s each way
        # 100 Gb/s line rate; TCP round trips ~25 us. NCCL's socket transport: model, under
        # RoCE's fractions, with the same ramp as the other networks between nodes
        LinkSpec("ethernet-100g", 12.5e9, 25e-6, p2p=0.8, collective=0.75, half_bytes=2.0**20),
        # Between nodes, one NIC per GPU (the DGX H100 layout: 8 x ConnectX-7 per node).
        # InfiniBand NDR: 400 Gb/s = 50 GB/s each way; ~2 us through one switch hop plus
        # NCCL's per-message software cost, ~5 us end to end. NCCL reaches 0.9 (p2p) and 0.85
        # (all-reduce) of the line rate [IB], half of it at 1 MiB [RAMP].
        LinkSpec("ib-ndr-400", 50e9, 5e-6, p2p=0.9, collective=0.85, half_bytes=2**20),
        # InfiniBand HDR: 200 Gb/s = 25 GB/s each way (the DGX A100 layout); fractions [IB]
        LinkSpec("ib-hdr-200", 25e9, 5e-6, p2p=0.9, collective=0.85, half_bytes=2**20),
        # 200 Gb/s Ethernet with RoCE v2: 25 GB/s each way, ~10 us (switch and NIC latency
        # are higher than InfiniBand's; NCCL over RoCE). Fractions: model, a little under [IB].
        LinkSpec("ethernet-200g", 25e9, 10e-6, p2p=0.85, collective=0.8, half_bytes=2**20),
        LinkSpec("loopback", 4e9, 50e-6),  # gloo over TCP on one host: a few GB/s, ~50 us
    ]
}


def get_device(spec: str | DeviceSpec) -> DeviceSpec:
    """A built-in profile by name, ``"local"`` (measured now), a profile file (a path ending in
    ``.json``, as ``DeviceSpec.save`` and ``partitioner calibrate`` write it), or a spec passed through."""
    if isinstance(spec, DeviceSpec):
        return spec
    if spec == "local":
        return _local()
    if spec.endswith(".json"):
        return DeviceSpec.load(spec)
    if spec not in DEVICES:
        raise CostModelError(f"unknown device {spec!r}; valid names: {', '.join([*DEVICES, 'local'])}, "
                             f"or a profile file path/to/profile.json")
    return DEVICES[spec]


def get_link(spec: str | LinkSpec) -> LinkSpec:
    if isinstance(spec, LinkSpec):
        return spec
    if spec not in LINKS:
        raise CostModelError(f"unknown link {spec!r}; valid names: {', '.join(LINKS)}")
    return LINKS[spec]


def _causal_share(sq: float, sk: float, block: int = 128) -> float:
    """Share of a causal attention's blocks a flash kernel computes: the ``n(n+1)/2`` blocks of
    ``block`` rows on or below the diagonal of ``n x n`` (square case; FlashAttention-2's tiles)."""
    n = max(1, -(-int(max(sq, sk)) // block))
    return (n + 1) / (2 * n)


def evaluate(exprs: Sequence[sympy.Expr], values: Mapping[str, int]) -> list[float]:
    """Several expressions at ``values`` ({"B": .., "S": ..}): ``cost.evaluate`` on each."""
    b, s = values.get("B", 1), values.get("S", 1)
    return [float(cost_evaluate(e, b, s)) for e in exprs]


@functools.cache
def _local() -> DeviceSpec:
    return DeviceSpec.measure_local()


def _rate(fn: Callable[[], Any], work: float, seconds: float) -> float:
    fn()  # warm up: first calls pay for allocation and thread-pool start
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or count < 3:
        fn()
        count += 1
    return work * count / elapsed


def _op_overhead(seconds: float) -> float:
    """Seconds per op per direction of a chain of element-wise ops on 8 floats that autograd
    records (forward + backward, halved): eager PyTorch's dispatch and bookkeeping alone."""
    import torch  # noqa: PLC0415 - torch-free module (plan loading and the CLI must not import torch)

    n = 100
    x = torch.ones(8, requires_grad=True)

    def run() -> None:
        y = x
        for _ in range(n):
            y = y * 1.0001
        y.sum().backward()

    run()
    best, deadline = float("inf"), time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() > deadline:
            return best / (2 * n)


def _validated(cls: type, data: Any) -> dict[str, Any]:
    """Check a spec dict field by field, so a bad plan file names what is wrong."""
    if not isinstance(data, Mapping):
        raise CostModelError(f"{cls.__name__} must be a JSON object, got {type(data).__name__}")
    names = {f.name: f.type for f in fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise CostModelError(f"{cls.__name__} has unknown field(s) {unknown}; valid fields: {sorted(names)}")
    out: dict[str, Any] = {}
    for name, typ in names.items():
        if name == "kind":  # optional (plans before it priced every device as a GPU)
            kind = data.get("kind", "gpu")
            if kind not in ("gpu", "cpu"):
                raise CostModelError(f"{cls.__name__}.kind must be 'gpu' or 'cpu', got {kind!r}")
            out[name] = kind
            continue
        if name == "op_overhead_s" and name not in data:  # optional, 0 when absent
            continue
        if name == "efficiency":  # optional: absent in CPU profiles and in plans written before it
            if data.get(name) is not None:
                out[name] = Efficiency.from_dict(data[name])
            continue
        if name in ("p2p", "collective", "half_bytes") and name not in data:  # optional link fields
            continue
        if name not in data:
            raise CostModelError(f"{cls.__name__} is missing field {name!r}")
        v = data[name]
        if name == "name":
            if not isinstance(v, str) or not v:
                raise CostModelError(f"{cls.__name__}.name must be a non-empty string, got {v!r}")
        elif isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or v == float("inf"):
            raise CostModelError(f"{cls.__name__}.{name} must be a finite non-negative number, got {v!r}")
        elif name in ("collective", "p2p") and v > 1:
            raise CostModelError(f"{cls.__name__}.{name} is a fraction of the line rate: at most 1, got {v!r}")
        elif name not in ("latency", "memory_bytes", "op_overhead_s", "half_bytes") and v == 0:
            raise CostModelError(f"{cls.__name__}.{name} must be positive, got {v!r}")
        out[name] = int(v) if typ in ("int", int) else (v if name == "name" else float(v))
    return out
