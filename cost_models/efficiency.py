"""How close real GPU kernels come to the datasheet: efficiency curves as plain data.

A ``DeviceSpec`` with an ``Efficiency`` prices a node as the kernels that run it, not as a
roofline at the datasheet peaks (``DeviceSpec.node_time``):

- **matrix multiplies** (``gemm_time``): FLOPs at ``gemm_max`` of the dtype's peak (the best
  measured matmul, "MAMF"), scaled by tile and wave quantisation (the output is covered by
  thread-block tiles, run in waves of one tile per SM: a last partial wave costs a full one)
  and by a ramp in the reduction length K (short K loops pay their prologue and epilogue);
- **attention** (``Efficiency.attention``): the flash kernels' FLOPs (the causal half only, for a
  causal mask) at a fraction of the peak that depends on the kernel, the direction, the mask,
  the sequence length and the head dimension. A profile with an ``attn_curve`` reads it from
  the kernel's measured rates by sequence length (forward / backward, with and without a causal
  mask, at head dim 128: ``attention_curve_efficiency``); one without ramps ``attn_fwd`` /
  ``attn_bwd`` by sequence length (``attention_efficiency``). Both scale by head dimension
  (narrow heads keep the tensor cores less busy);
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
           "attention_efficiency", "attention_curve_efficiency", "check_attention_curve", "fit_ramp"]

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
    #: the attention kernel the curve below describes ("fa2", "cudnn", ...; "" without a curve)
    attn_kernel: str = ""
    #: the kernel's measured rates by sequence length, as fractions of the dense peak at head
    #: dim 128: rows ``(seq, forward, backward, causal forward, causal backward)``, ``seq``
    #: increasing. The causal rates count a causal mask's FLOPs as half of the full square (the
    #: FlashAttention papers' convention). Empty: ``attn_fwd`` / ``attn_bwd`` ramped by
    #: ``attn_seq_half`` price attention, as before curves existed (and then the field is left
    #: out of the JSON, so plans priced on such profiles are unchanged).
    attn_curve: tuple[tuple[float, float, float, float, float], ...] = ()

    def __post_init__(self) -> None:  # rows as tuples of floats, checked (a bad curve fails where it is made)
        if self.attn_curve:
            object.__setattr__(self, "attn_curve", check_attention_curve(self.attn_curve))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if self.measured:
            out["measured"] = dict(self.measured)
        else:
            del out["measured"]
        if self.attn_curve:
            out["attn_curve"] = [list(row) for row in self.attn_curve]
        else:
            del out["attn_curve"], out["attn_kernel"]
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
            if name == "attn_kernel":
                v = data.get(name, "")
                if not isinstance(v, str):
                    raise CostModelError(f"DeviceSpec.efficiency.attn_kernel must be a string, got {v!r}")
                out[name] = v
                continue
            if name == "attn_curve":
                if name in data:
                    out[name] = _curve(data[name])
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

    def attention(self, seq: float, head_dim: float, backward: bool = False, causal: bool = False) -> float:
        """Fraction of the dense peak the flash kernel reaches, x ``fit``: from ``attn_curve``
        where the profile has one (``attention_curve_efficiency``; with ``causal``, the rate on
        the causal half of the FLOPs), else ``attention_efficiency`` (which knows no mask: the
        caller counts the blocks a causal kernel computes)."""
        if self.attn_curve:
            return self.fit * attention_curve_efficiency(seq, head_dim, self.attn_curve, backward, causal)
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


def _curve(data: Any) -> tuple[tuple[float, float, float, float, float], ...]:
    if not isinstance(data, Sequence) or isinstance(data, str) or not all(
            isinstance(row, Sequence) and not isinstance(row, str) and len(row) == 5 for row in data):
        raise CostModelError("DeviceSpec.efficiency.attn_curve must be a list of [seq, forward, backward, causal "
                             f"forward, causal backward] rows, got {data!r}")
    rows = []
    for row in data:
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in row):
            raise CostModelError(f"DeviceSpec.efficiency.attn_curve rows hold numbers, got {list(row)!r}")
        rows.append(tuple(float(v) for v in row))
    return check_attention_curve(tuple(rows))  # type: ignore[arg-type]


def check_attention_curve(curve: Sequence[Sequence[float]]) -> tuple[tuple[float, float, float, float, float], ...]:
    """``curve`` as a tuple of rows, or ``CostModelError`` naming what makes it unusable.

    Each row is ``(seq, forward, backward, causal forward, causal backward)``: ``seq`` positive,
    finite and strictly increasing from row to row; every rate a fraction of the peak in
    (0, 1]; and no rate may rise faster than ``seq**2`` between two rows, so the time of one
    sequence (its FLOPs, ``~ seq**2``, over the rate) never falls as the sequence grows. A rate may
    dip at long sequences (cuDNN's forward peaks at 2k tokens on H100), within that bound.
    """
    rows = tuple(tuple(float(v) for v in row) for row in curve)
    if not rows or any(len(row) != 5 for row in rows):
        raise CostModelError(f"an attention curve needs rows of (seq, forward, backward, causal forward, causal "
                             f"backward), got {curve!r}")
    for row in rows:
        if not (math.isfinite(row[0]) and row[0] >= 1):
            raise CostModelError(f"attention curve: sequence length {row[0]!r} must be a finite number >= 1")
        if not all(math.isfinite(v) and 0 < v <= 1 for v in row[1:]):
            raise CostModelError(f"attention curve at seq {row[0]:g}: rates {row[1:]} must be fractions of the peak "
                                 "in (0, 1]")
    for a, b in zip(rows, rows[1:]):
        if not b[0] > a[0]:
            raise CostModelError(f"attention curve: sequence lengths must increase, got {a[0]:g} then {b[0]:g}")
        for i, what in enumerate(("forward", "backward", "causal forward", "causal backward"), start=1):
            if b[i] / a[i] > (b[0] / a[0]) ** 2 * (1 + 1e-9):
                raise CostModelError(f"attention curve: the {what} rate rises from {a[i]:g} at {a[0]:g} tokens to "
                                     f"{b[i]:g} at {b[0]:g}, faster than seq**2: a longer sequence would take less "
                                     "time than a shorter one")
    return rows  # type: ignore[return-value]


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
    return top * seq / (seq + seq_half) * _head_factor(head_dim)


def _head_factor(head_dim: float) -> float:
    """``(d / (d + 32)) / (128 / 160)``, capped at 1: 1 from head dim 128 on, ~0.83 at 64."""
    return min(1.0, (head_dim / (head_dim + 32.0)) / (128.0 / 160.0))


def attention_curve_efficiency(seq: float, head_dim: float, curve: Sequence[Sequence[float]], backward: bool = False,
                               causal: bool = False) -> float:
    """The rate ``curve`` gives a kernel at ``seq`` tokens, as a fraction of the peak, in (0, 1].

    The column is chosen by direction and mask (``check_attention_curve``'s rows). Between two
    rows the rate is interpolated linearly in ``log2(seq)`` (the papers measure at powers of
    two); past the last row it stays at the last rate; below the first it falls in proportion
    to ``seq`` (the time of one sequence then falls only linearly with its length: below the
    shortest measured length the kernel's fixed cost per tile row dominates, a model). The
    head-dimension factor of ``attention_efficiency`` scales the result (the curves are head
    dim 128's).
    """
    seq, head_dim = max(1.0, float(seq)), max(1.0, float(head_dim))
    col = 1 + int(backward) + 2 * int(causal)
    pts = [(float(row[0]), float(row[col])) for row in curve]
    if seq <= pts[0][0]:
        rate = pts[0][1] * seq / pts[0][0]
    elif seq >= pts[-1][0]:
        rate = pts[-1][1]
    else:
        i = next(i for i in range(1, len(pts)) if seq <= pts[i][0])
        (s0, r0), (s1, r1) = pts[i - 1], pts[i]
        t = (math.log2(seq) - math.log2(s0)) / (math.log2(s1) - math.log2(s0))
        rate = r0 + t * (r1 - r0)
    return rate * _head_factor(head_dim)


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
