"""How close real GPU kernels come to the datasheet: efficiency curves as plain data.

A ``DeviceSpec`` with an ``Efficiency`` prices a node as the kernels that run it, not as a
roofline at the datasheet peaks (``DeviceSpec.node_time``):

- **matrix multiplies** (``gemm_time``): FLOPs at ``gemm_max`` of the dtype's peak (the best
  measured matmul, "MAMF"), scaled by tile and wave quantisation (the output is covered by
  thread-block tiles, run in waves of one tile per SM: a last partial wave costs a full one)
  and by a ramp in the reduction length K (short K loops pay their prologue and epilogue);
- **attention** (``attention_time``): the flash kernels' FLOPs (the causal half only, for a
  causal mask) at ``attn_fwd`` / ``attn_bwd`` of the peak, ramped by sequence length and head
  dimension (short sequences and narrow heads keep the tensor cores less busy);
- **everything else** (element-wise ops, norms, softmax, the loss, embeddings, the optimizer
  step): bytes moved at the *achievable* bandwidth (``mem`` x datasheet, a STREAM-like copy),
  FLOPs at the non-tensor peak;
- every kernel costs at least ``launch_s`` (the GPU-side launch and scheduling floor), so a
  node of many tiny ops costs what eager PyTorch pays for it.

Every built-in figure is cited beside the profile that carries it (``partitioner.cost_models.devices``).
Pure Python: no torch, so plans load without it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from partitioner.cost_models.errors import CostModelError

__all__ = ["Efficiency", "TILES", "OPTIMIZER_BYTES", "optimizer_bytes_per_param", "gemm_efficiency",
           "attention_efficiency", "fit_ramp"]

#: thread-block tiles a GEMM library chooses among (rows, columns, relative speed of the tile):
#: CUTLASS/cuBLAS tensor-core kernels use 256x128 and 128x128 tiles for large problems and
#: fall back to 64x64 (more tiles, less reuse per tile) to fill the SMs on small ones.
TILES: tuple[tuple[int, int, float], ...] = ((256, 128, 1.0), (128, 128, 0.95), (64, 64, 0.75))

#: bytes the optimizer step reads + writes per parameter, by (optimizer, precision): Adam reads
#: the weight, its gradient and the two moments and writes the weight and the moments; mixed
#: precision keeps fp32 masters and main gradients (Megatron-LM's ``main_grad``) and writes the
#: bf16/fp16 copy of the weight too. SGD with momentum has one moment, plain SGD none.
OPTIMIZER_BYTES: dict[str, dict[str, int]] = {
    "adam": {"fp32": 16 + 12, "bf16-mixed": 16 + 14, "fp16-mixed": 16 + 14, "bf16": 8 + 6},
    "momentum": {"fp32": 12 + 8, "bf16-mixed": 12 + 10, "fp16-mixed": 12 + 10, "bf16": 6 + 4},
    "sgd": {"fp32": 8 + 4, "bf16-mixed": 8 + 6, "fp16-mixed": 8 + 6, "bf16": 4 + 2},
    "none": {"fp32": 0, "bf16-mixed": 0, "fp16-mixed": 0, "bf16": 0},
}
OPTIMIZER_BYTES["adamw"] = OPTIMIZER_BYTES["adam"]


def optimizer_bytes_per_param(optimizer: str, precision: str) -> int:
    """Bytes one optimizer step moves per parameter (``OPTIMIZER_BYTES``)."""
    try:
        return OPTIMIZER_BYTES[optimizer][precision]
    except KeyError:
        raise CostModelError(f"no optimizer-step cost for optimizer={optimizer!r}, precision={precision!r}; "
                             f"known: {sorted(OPTIMIZER_BYTES)} x {sorted(OPTIMIZER_BYTES['adam'])}") from None


@dataclass(frozen=True)
class Efficiency:
    """The fractions of a device's datasheet figures its kernels reach, and its launch floor."""

    sms: int  # streaming multiprocessors: one thread-block tile per SM per wave
    gemm_max: float  # best measured matmul / dense peak (MAMF)
    gemm_k_half: float  # reduction length K at which a GEMM runs at half of gemm_max
    attn_fwd: float  # flash attention forward, long sequences, head dim 128: fraction of peak
    attn_bwd: float  # the same for its backward
    attn_seq_half: float  # sequence length at which attention runs at half its long-sequence rate
    mem: float  # achievable / datasheet memory bandwidth (copy kernels)
    launch_s: float  # seconds every kernel costs at least
    #: tensor-core kernels inside a training step / in a microbenchmark: the rate a model's
    #: matmuls and attention reach between the other kernels, with bias epilogues, transposed
    #: weight-gradient operands and the memory allocator, against the best isolated shape.
    #: Fitted to end-to-end runs (1.0: the microbenchmark rates as they are)
    fit: float = 1.0
    #: where a measured profile's figures come from (``partitioner.calibrate.calibrate_curves``:
    #: device, date, torch version, what was timed, the fit's quality), as (key, value) pairs
    #: sorted by key; a JSON object in the profile. Empty for the cited profiles (and then left
    #: out of the JSON, so plans priced on them are unchanged). Never used to price anything.
    measured: tuple[tuple[str, str | bool | int | float], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if self.measured:
            out["measured"] = dict(self.measured)
        else:
            del out["measured"]
        return out

    @classmethod
    def from_dict(cls, data: Any) -> Efficiency:
        if not isinstance(data, Mapping):
            raise CostModelError(f"DeviceSpec.efficiency must be a JSON object, got {type(data).__name__}")
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise CostModelError(f"DeviceSpec.efficiency has unknown field(s) {unknown}; valid fields: {sorted(names)}")
        out: dict[str, Any] = {}
        for name in names:
            if name == "fit" and name not in data:
                continue
            if name == "measured":
                if name in data:
                    out[name] = _measured(data[name])
                continue
            if name not in data:
                raise CostModelError(f"DeviceSpec.efficiency is missing field {name!r}")
            v = data[name]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise CostModelError(f"DeviceSpec.efficiency.{name} must be a finite non-negative number, got {v!r}")
            if name in ("gemm_max", "attn_fwd", "attn_bwd", "mem", "fit") and not 0 < v <= 1:
                raise CostModelError(f"DeviceSpec.efficiency.{name} is a fraction of the datasheet figure: "
                                     f"it must be in (0, 1], got {v!r}")
            if name == "sms" and (v < 1 or v != int(v)):
                raise CostModelError(f"DeviceSpec.efficiency.sms must be a positive integer, got {v!r}")
            out[name] = int(v) if name == "sms" else float(v)
        return cls(**out)

    # -- curves ----------------------------------------------------------------------------
    def gemm(self, m: float, k: float, n: float) -> float:
        """Fraction of the dense peak an ``(m x k) @ (k x n)`` GEMM reaches (``gemm_efficiency``)."""
        return gemm_efficiency(m, k, n, self.sms, self.gemm_max * self.fit, self.gemm_k_half)

    def attention(self, seq: float, head_dim: float, backward: bool = False) -> float:
        """Fraction of the dense peak the flash kernel reaches (``attention_efficiency``)."""
        top = (self.attn_bwd if backward else self.attn_fwd) * self.fit
        return attention_efficiency(seq, head_dim, top, self.attn_seq_half)


def _measured(data: Any) -> tuple[tuple[str, str | bool | int | float], ...]:
    if not isinstance(data, Mapping):
        raise CostModelError(f"DeviceSpec.efficiency.measured must be a JSON object, got {type(data).__name__}")
    for key, v in data.items():
        if not isinstance(key, str) or not (isinstance(v, (str, bool, int)) or (isinstance(v, float)
                                                                              and math.isfinite(v))):
            raise CostModelError(f"DeviceSpec.efficiency.measured.{key} must be a string or a finite number, "
                                 f"got {v!r}")
    return tuple(sorted(data.items()))


def _ceil(a: float, b: float) -> int:
    return int(-(-a // b))


def gemm_efficiency(m: float, k: float, n: float, sms: int, top: float, k_half: float) -> float:
    """``top`` x the best tile's quantisation x ``k / (k + k_half)``, in (0, top].

    Quantisation of tile ``(tm, tn)`` of relative speed ``r``: the output's ``m x n`` over the
    area the kernel really computes, ``ceil(tiles / sms)`` full waves of ``sms`` tiles each,
    times ``r``; the library picks the best tile (``TILES``). So time never falls as a
    dimension grows (a new wave costs a whole wave) and the fraction never exceeds ``top``.
    """
    m, k, n = max(1.0, float(m)), max(1.0, float(k)), max(1.0, float(n))
    best = 0.0
    for tm, tn, r in TILES:
        tiles = _ceil(m, tm) * _ceil(n, tn)
        waves = _ceil(tiles, sms)
        best = max(best, r * (m * n) / (waves * sms * tm * tn))
    return top * min(1.0, best) * k / (k + k_half)


def attention_efficiency(seq: float, head_dim: float, top: float, seq_half: float) -> float:
    """``top`` x ``seq / (seq + seq_half)`` x a head-dimension factor, in (0, top].

    The head factor ``(d / (d + 32)) / (128 / 160)``, capped at 1, is 1 from head dim 128 on
    and ~0.83 at 64: a narrower head does less matmul work per softmax element (the
    FlashAttention-2 paper's benchmarks run head dim 64 slower than 128 at every length).
    """
    seq, head_dim = max(1.0, float(seq)), max(1.0, float(head_dim))
    head = min(1.0, (head_dim / (head_dim + 32.0)) / (128.0 / 160.0))
    return top * seq / (seq + seq_half) * head


def fit_ramp(groups: Sequence[Sequence[tuple[float, float, float]]], half: float | None = None
             ) -> tuple[list[float], float]:
    """Per group a ``top``, and one ``half``, for ``rate ~ top x g x x / (x + half)`` over
    measured ``(x, g, rate)`` points: ``([top of each group], half)``.

    The shape of ``gemm_efficiency`` (``x`` = K, ``g`` = the tile quantisation; a group per
    dtype, which share ``gemm_k_half``) and of ``attention_efficiency`` (``x`` = sequence
    length, ``g`` = the head-dimension factor; forward and backward share ``attn_seq_half``).
    Minimises the squared error of ``log(rate)``, so a short kernel weighs as much as a long
    one. For a given ``half`` each group's best ``top`` is closed-form (the geometric mean of
    ``rate / (g x ramp)``), so only ``half`` is searched: a log-spaced scan over
    ``[min x / 1000, max x x 1000]``, then a golden-section refinement around the best point
    (a one-parameter search needs no optimisation library, and this module imports neither
    torch nor scipy, so that plans load without them). Given ``half``, only the tops are
    fitted. Raises ``CostModelError`` on an empty group or a non-positive value, and when
    ``half`` is to be fitted but no group has rates at two distinct sizes.
    """
    pts = [[(float(x), float(g), float(r)) for x, g, r in group] for group in groups]
    if not pts or any(not group for group in pts) or any(
            not (v > 0 and math.isfinite(v)) for group in pts for p in group for v in p):
        raise CostModelError(f"fit_ramp needs non-empty groups of positive, finite (x, g, rate) points, got {groups!r}")

    def fitted(h: float) -> tuple[list[float], float]:
        tops, loss = [], 0.0
        for group in pts:
            logs = [math.log(r / (g * x / (x + h))) for x, g, r in group]
            mean = math.fsum(logs) / len(logs)
            tops.append(math.exp(mean))
            loss += math.fsum((v - mean) ** 2 for v in logs)
        return tops, loss

    if half is None:
        if not any(len({x for x, _, _ in group}) > 1 for group in pts):
            raise CostModelError("fit_ramp needs rates at two or more sizes in one group to fit the ramp, got "
                                 f"sizes {[sorted({x for x, _, _ in group}) for group in pts]}")
        xs = [x for group in pts for x, _, _ in group]
        lo, hi = math.log(min(xs) / 1e3), math.log(max(xs) * 1e3)
        n = 240
        grid = [lo + (hi - lo) * i / n for i in range(n + 1)]
        best = min(range(n + 1), key=lambda i: fitted(math.exp(grid[i]))[1])
        a, b = grid[max(0, best - 1)], grid[min(n, best + 1)]
        ratio = (math.sqrt(5) - 1) / 2
        for _ in range(80):
            c, d = b - ratio * (b - a), a + ratio * (b - a)
            if fitted(math.exp(c))[1] <= fitted(math.exp(d))[1]:
                b = d
            else:
                a = c
        half = math.exp((a + b) / 2)
    return fitted(half)[0], half
