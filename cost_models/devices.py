"""Devices and links as plain data, and the roofline time of a node on them.

A node takes ``max(FLOPs / peak, bytes moved / memory bandwidth)`` (a roofline without
the ridge refinement); a transfer takes ``latency + bytes / bandwidth``. Figures are the
vendors' datasheet peaks (dense, no sparsity), cited beside each profile; real kernels
reach perhaps 50-80 % of them, which scales every stage alike and so does not move cuts.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

import sympy

from cost_models.cost import NodeCost
from cost_models.cost import evaluate as cost_evaluate
from cost_models.errors import CostModelError

if TYPE_CHECKING:  # torch only where a device is measured: loading a plan's profiles needs none
    import torch

__all__ = ["DEVICES", "LINKS", "DeviceSpec", "LinkSpec", "evaluate", "get_device", "get_link"]

_LOWP = ("bfloat16", "float16", "half")  # dtype names that get the low-precision (tensor-core) peak


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
        return (
            max(fwd / peak, moved / self.mem_bandwidth) + (ov if fwd or moved else 0.0),
            max(bwd / peak, 2 * moved / self.mem_bandwidth) + (ov if bwd or moved else 0.0),
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if not self.op_overhead_s:  # optional: plans of profiles without it stay as they were
            del out["op_overhead_s"]
        return out

    @classmethod
    def from_dict(cls, data: Any) -> DeviceSpec:
        return cls(**_validated(cls, data))

    @classmethod
    def measure_local(cls, seconds: float = 0.5) -> DeviceSpec:
        """This machine's CPU, measured: fp32 and bf16 matmul FLOP/s and copy bandwidth."""
        import torch

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
    name: str
    bandwidth: float  # bytes/s, one direction
    latency: float  # seconds per message

    def transfer_time(self, nbytes: float) -> float:
        return self.latency + nbytes / self.bandwidth if nbytes else 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> LinkSpec:
        return cls(**_validated(cls, data))


DEVICES: dict[str, DeviceSpec] = {
    d.name: d
    for d in [
        # NVIDIA H100 SXM5 datasheet: FP32 67 TFLOPS, BF16 989 TFLOPS dense (1979 is with
        # sparsity), HBM3 3.35 TB/s, 80 GB. fp32 matmuls get plain FP32 unless TF32 is on.
        DeviceSpec("h100-sxm", 67e12, 989e12, 3.35e12, 80 * 10**9),
        # NVIDIA H200 SXM datasheet: same compute as H100 SXM, HBM3e 4.8 TB/s, 141 GB.
        DeviceSpec("h200", 67e12, 989e12, 4.8e12, 141 * 10**9),
        # NVIDIA A100 80GB SXM datasheet: FP32 19.5 TFLOPS, BF16 312 TFLOPS dense,
        # HBM2e 2.039 TB/s, 80 GB.
        DeviceSpec("a100-80gb", 19.5e12, 312e12, 2.039e12, 80 * 10**9),
        # A generic server CPU socket (order of magnitude only: ~16 AVX-512 cores,
        # ~1 TFLOP/s fp32, no bf16 speed-up assumed, ~100 GB/s DDR). Prefer measure_local().
        DeviceSpec("cpu", 1e12, 1e12, 100e9, 64 * 2**30, "cpu"),
    ]
}

LINKS: dict[str, LinkSpec] = {
    l.name: l
    for l in [
        LinkSpec("nvlink4", 450e9, 3e-6),  # H100 NVLink 4: 900 GB/s total = 450 GB/s each way
        LinkSpec("pcie4", 32e9, 10e-6),  # PCIe 4.0 x16: 31.5 GB/s each way
        LinkSpec("pcie5", 64e9, 10e-6),  # PCIe 5.0 x16: 63 GB/s each way
        LinkSpec("ethernet-100g", 12.5e9, 25e-6),  # 100 Gb/s line rate; TCP round trips ~25 us
        # Between nodes, one NIC per GPU (the DGX H100 layout: 8 x ConnectX-7 per node).
        # InfiniBand NDR: 400 Gb/s = 50 GB/s each way; ~2 us through one switch hop plus
        # NCCL's per-message software cost, ~5 us end to end.
        LinkSpec("ib-ndr-400", 50e9, 5e-6),
        # 200 Gb/s Ethernet with RoCE v2: 25 GB/s each way, ~10 us (switch and NIC latency
        # are higher than InfiniBand's; NCCL over RoCE).
        LinkSpec("ethernet-200g", 25e9, 10e-6),
        LinkSpec("loopback", 4e9, 50e-6),  # gloo over TCP on one host: a few GB/s, ~50 us
    ]
}


def get_device(spec: str | DeviceSpec) -> DeviceSpec:
    """A built-in profile by name, ``"local"`` (measured now), or a spec passed through."""
    if isinstance(spec, DeviceSpec):
        return spec
    if spec == "local":
        return _local()
    if spec not in DEVICES:
        raise CostModelError(f"unknown device {spec!r}; valid names: {', '.join([*DEVICES, 'local'])}")
    return DEVICES[spec]


def get_link(spec: str | LinkSpec) -> LinkSpec:
    if isinstance(spec, LinkSpec):
        return spec
    if spec not in LINKS:
        raise CostModelError(f"unknown link {spec!r}; valid names: {', '.join(LINKS)}")
    return LINKS[spec]


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
    import torch

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
        if name not in data:
            raise CostModelError(f"{cls.__name__} is missing field {name!r}")
        v = data[name]
        if name == "name":
            if not isinstance(v, str) or not v:
                raise CostModelError(f"{cls.__name__}.name must be a non-empty string, got {v!r}")
        elif isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or v == float("inf"):
            raise CostModelError(f"{cls.__name__}.{name} must be a finite non-negative number, got {v!r}")
        elif name not in ("latency", "memory_bytes", "op_overhead_s") and v == 0:
            raise CostModelError(f"{cls.__name__}.{name} must be positive, got {v!r}")
        out[name] = int(v) if typ in ("int", int) else (v if name == "name" else float(v))
    return out
