"""Calibrate a device profile: the efficiency curves measured on the device, or one model's run.

``calibrate_curves(device)`` measures, on the machine it runs on (a CUDA GPU, or the CPU with
the same code and small sizes), what the efficiency model (``partitioner.cost_models.efficiency``)
prices a node with: matmul throughput over a grid of shapes per dtype, causal flash attention
forward and backward by sequence length and head dimension, the achievable memory bandwidth,
the per-kernel launch floor, and an AdamW step. ``fit_curves`` fits the model's parameters to
those measurements (a pure function: no timing, testable on given numbers) and returns a
``DeviceSpec`` that ``DeviceSpec.save`` writes and ``partition(device="profile.json")`` loads.

``calibrate_device(model, inputs)`` instead scales a profile's rates to one measured
forward + backward of the model itself. The roofline model gets the *shares* of work right
(which op costs more than which), but its absolute seconds rest on peak figures that real
kernels never reach: on this CPU non-matmul ops run far below the GEMM peak. Timing one real
run of the model and scaling the profile's rates by predicted / measured fixes the absolute
level for this model, without touching the balance the solver sees.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import logging
import math
import os
import platform
import re
import statistics
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils import benchmark
from torch.utils import flop_counter as fc

from partitioner.api import partition
from partitioner.cost_models.cost import NodeCost
from partitioner.cost_models.devices import DEVICES, DeviceSpec, get_device
from partitioner.cost_models.devices import _causal_share as causal_share
from partitioner.cost_models.efficiency import Efficiency, attention_efficiency, fit_ramp, gemm_efficiency
from partitioner.cost_models.errors import PartitionError

logger = logging.getLogger(__name__)

__all__ = ["calibrate_device", "calibrate_curves", "measure_curves", "fit_curves", "compare", "Measurements",
           "GemmSample", "AttentionSample", "CopySample"]


def _loss(out: Any) -> torch.Tensor:
    leaves = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not leaves:
        raise PartitionError("calibration needs a model with at least one floating-point output")
    return sum((t.float().sum() for t in leaves), torch.zeros(()))


def calibrate_device(
    model: nn.Module, example_inputs: Any, *, device: str | DeviceSpec = "local", repeats: int = 5
) -> DeviceSpec:
    """``device`` fitted to measured forward + backward runs of ``model`` (median of
    ``repeats`` runs each): its rates scaled, and its per-op overhead (``op_overhead_s``) set.

    Two runs are fitted where the batch allows: ``example_inputs`` as given (batch B) and its
    first ``max(1, B // 8)`` samples, a pipeline micro-batch's size. The predicted time is
    ``roofline / k + op_overhead_s x ops`` (``ops``: forward and backward node executions,
    the same at both sizes), two equations for the two unknowns; so the profile prices small
    micro-batches as dear as eager PyTorch runs them, which one scale factor cannot (on this
    CPU a Llama-shaped model's 8 micro-batches cost 1.13-1.17x its whole batch). Where the fit
    is not meaningful (batch 1, no tensor with a batch dimension, or the two runs' difference
    lost in noise: k or the overhead would come out negative) only the rates are scaled, so the
    prediction at ``example_inputs`` equals the measured time, with no overhead.

    The model is left as it was: gradients, buffers (batch-norm statistics) and the RNG
    state are restored. Needs real weights (not the meta device).
    """
    if any(p.device.type == "meta" for p in model.parameters()):
        raise PartitionError("calibration runs the model for real: load its weights first (it is on the meta device)")
    base = replace(get_device(device), op_overhead_s=0.0)
    roof_full = _predicted(model, example_inputs, base)
    t_full = _measure(model, example_inputs, repeats)
    if roof_full <= 0 or t_full <= 0:
        raise PartitionError(f"cannot calibrate: predicted {roof_full} s, measured {t_full} s")
    fit = None
    small = _first(example_inputs)
    if small is not None:
        ops = (_predicted(model, example_inputs, replace(base, op_overhead_s=1e-3)) - roof_full) / 1e-3
        fit = fit_overhead(roof_full, _predicted(model, small, base), ops, t_full, _measure(model, small, repeats))
    inv_k, overhead = fit if fit is not None else (t_full / roof_full, 0.0)
    return replace(base, name=f"{base.name}-calibrated", peak_flops=base.peak_flops / inv_k,
                   peak_flops_lowp=base.peak_flops_lowp / inv_k, mem_bandwidth=base.mem_bandwidth / inv_k,
                   op_overhead_s=overhead)


def fit_overhead(roof_full: float, roof_small: float, ops: float, t_full: float, t_small: float
                 ) -> tuple[float, float] | None:
    """(1/k, overhead per op) with ``t = roof / k + overhead x ops`` at both sizes, or None where
    that has no meaningful solution (both non-negative, the roofline growing with the batch)."""
    if roof_full <= roof_small or ops <= 0 or t_full <= t_small:
        return None
    inv_k = (t_full - t_small) / (roof_full - roof_small)
    overhead = (t_full - roof_full * inv_k) / ops
    if inv_k <= 0 or overhead < 0:
        return None
    return inv_k, overhead


def _predicted(model: nn.Module, example_inputs: Any, dev: DeviceSpec) -> float:
    """Forward + backward seconds of the whole model, as one stage, on ``dev``."""
    pipe = partition(model, n_gpus=1, example_inputs=example_inputs, device=dev, link="loopback", schedule="naive")
    stage = pipe.plan.stages[0].cost
    return float(stage.fwd_time_s + stage.bwd_time_s)


def _first(example_inputs: Any) -> Any:
    """``example_inputs`` cut to their first ``B // 8`` samples (every tensor whose dim 0 is
    the batch B, the first tensor's dim 0), or None for batch 1 or no batched tensor."""
    leaves = [t for t in pytree.tree_leaves(example_inputs) if isinstance(t, torch.Tensor) and t.dim() > 0]
    if not leaves or leaves[0].shape[0] < 2:
        return None
    batch = int(leaves[0].shape[0])
    b = max(1, batch // 8)
    return pytree.tree_map(lambda v: v[:b] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch
                           else v, example_inputs)


def _measure(model: nn.Module, example_inputs: Any, repeats: int) -> float:
    """Median wall seconds of forward + backward (the first run discarded), the model restored."""
    args, kwargs = (((), dict(example_inputs)) if isinstance(example_inputs, dict)
                    else ((example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs), {}))
    grads = {id(p): p.grad for p in model.parameters()}
    buffers = copy.deepcopy({k: v for k, v in model.state_dict().items() if not isinstance(v, nn.Parameter)})
    rng = torch.random.get_rng_state()
    times = []
    try:
        for i in range(repeats + 1):
            start = time.perf_counter()
            _loss(model(*args, **kwargs)).backward()
            if i:  # the first run pays for allocation and warm-up
                times.append(time.perf_counter() - start)
    finally:
        for p in model.parameters():
            p.grad = grads[id(p)]
        model.load_state_dict(buffers, strict=False)
        torch.random.set_rng_state(rng)
    return statistics.median(times)


# -- the efficiency curves, measured on the device ------------------------------------------

_LOWP_DTYPES = ("bfloat16", "float16")
_DTYPES = ("bfloat16", "float16", "float32")
#: default time budgets (seconds): a few minutes on a GPU, a few seconds on the CPU
DEFAULT_BUDGET_S = {"cuda": 180.0, "cpu": 5.0}
#: the budget's shares: matmuls, attention, bandwidth, launch floor, optimizer step
_SHARES = {"gemm": 0.45, "attention": 0.3, "copy": 0.1, "launch": 0.05, "optimizer": 0.1}
#: a sample whose time the memory traffic or the launch floor could explain to this fraction
#: does not inform the compute rate, and is left out of the matmul and attention fits
_BOUND = 0.5
_LAUNCHES = 100  # tiny kernels timed back to back per call
_ROUNDS = 3  # passes over the matmul / attention / copy sizes (each sample: its fastest pass)


@dataclass(frozen=True)
class GemmSample:
    """One ``(m x k) @ (k x n)`` matmul in ``dtype``: seconds per call."""

    dtype: str
    m: int
    k: int
    n: int
    seconds: float


@dataclass(frozen=True)
class AttentionSample:
    """Causal ``scaled_dot_product_attention`` on q, k, v of ``(batch, heads, seq, head_dim)``:
    forward and backward seconds per call."""

    dtype: str
    batch: int
    heads: int
    seq: int
    head_dim: int
    fwd_s: float
    bwd_s: float


@dataclass(frozen=True)
class CopySample:
    """A memory-bound element-wise kernel (``"copy"``: dst = src, ``"add"``: out = a + b):
    ``nbytes`` read + written in ``seconds``."""

    what: str
    nbytes: int
    seconds: float


@dataclass(frozen=True)
class Measurements:
    """What ``measure_curves`` timed on one device; ``fit_curves`` turns it into a profile."""

    device: str  # the device's own name (torch.cuda.get_device_name, or the CPU model)
    backend: str  # "cuda" or "cpu"
    #: streaming multiprocessors (the tile-wave quantisation's width); 1 on a CPU, where only
    #: the padding of a partial tile is modelled
    sms: int
    memory_bytes: int
    torch_version: str
    date: str  # ISO 8601, UTC
    dtypes: tuple[str, ...]  # the matmul dtypes, the first one primary (attention runs in it)
    allow_tf32: bool  # torch.backends.cuda.matmul.allow_tf32 while float32 matmuls ran
    gemm: tuple[GemmSample, ...]
    attention: tuple[AttentionSample, ...]
    copies: tuple[CopySample, ...]
    launch_s: float  # seconds per tiny kernel, back to back (eager PyTorch's per-op floor)
    optimizer_params: int  # float32 parameters one AdamW step updated
    optimizer_s: float  # seconds of that step
    budget_s: float
    wall_s: float
    skipped: int = 0  # matmul / attention sizes not timed: over the free memory, or the budget


def calibrate_curves(device: str | torch.device = "cuda", *, dtypes: Sequence[str] | None = None,
                     budget_s: float | None = None, base: str | DeviceSpec | None = None,
                     name: str | None = None) -> DeviceSpec:
    """A profile of ``device`` ("cuda", "cuda:N" or "cpu") with its efficiency curves measured
    here: ``fit_curves(measure_curves(device, dtypes, budget_s), base, name)``.

    ``dtypes``: matmul dtypes, the first one primary (attention is measured in it; default:
    bfloat16, float16, float32 on a GPU; float32 on the CPU, where bf16 matmuls
    run hundreds of times slower on cores without bf16 instructions). ``budget_s``: seconds
    of timing, about (default ``DEFAULT_BUDGET_S``: 180 on a GPU, 5 on the CPU). ``base``: the
    datasheet profile whose peaks the measured rates are fractions of (default: the built-in
    profile whose name the GPU's name contains, ``"cpu"`` on the CPU; an unknown GPU gets its
    measured rates as peaks). Save the result with ``DeviceSpec.save(path)``; then
    ``partition(..., device=path)`` and ``partitioner plan --device path`` price on it.
    """
    ref = get_device(base) if base is not None else None  # a bad name is refused before minutes of timing
    measured = measure_curves(device, dtypes=dtypes, budget_s=budget_s)
    return fit_curves(measured, base=ref if ref is not None else default_base(measured), name=name)


def default_base(measured: Measurements) -> DeviceSpec | None:
    """The built-in profile for the measured device: by its name for a GPU, ``"cpu"`` for a CPU
    (None for a GPU with no built-in profile)."""
    if measured.backend == "cpu":
        return DEVICES["cpu"]
    name = measured.device.lower()
    for key, profile in (("h200", "h200"), ("h100", "h100-sxm"), ("a100", "a100-80gb"), ("b200", "b200")):
        if key in name:
            return DEVICES[profile]
    return None


def measure_curves(device: str | torch.device = "cuda", *, dtypes: Sequence[str] | None = None,
                   budget_s: float | None = None) -> Measurements:
    """Time the kernels the efficiency model prices (``Measurements``), in about ``budget_s``.

    Every timing is ``torch.utils.benchmark.Timer.blocked_autorange``: one warm-up call (lazy
    initialisation, cuBLAS / kernel selection, allocation), then blocks of calls until the
    sample's share of the budget is spent, the accelerator synchronised around each block so
    the queued kernels are what is timed; the fastest block's time per call, and of matmuls,
    attention and copies the fastest of three rounds over all sizes (``_rounds``). A GPU runs sizes a
    large GPU is busy with (matmuls up to 8192 x 8192 x 8192, 16k tokens of attention, 512 MiB
    copies), each only where it fits the free memory; the CPU runs small ones. Operands are
    built once per sample (out= buffers for matmuls), so the allocator is not timed.
    """
    dev = torch.device(device)
    if dev.type not in ("cuda", "cpu"):
        raise PartitionError(f"calibrate_curves measures a 'cuda' or 'cpu' device, got {str(device)!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise PartitionError(f"calibrate_curves(device={str(device)!r}): no CUDA device is available here; "
                                 "measure the CPU (device='cpu'; partitioner calibrate --device cpu) or run it on the "
                                 "GPU machine")
        dev = torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)
    names = tuple(dtypes) if dtypes is not None else (_DTYPES if dev.type == "cuda" else ("float32",))
    bad = [d for d in names if d not in _DTYPES]
    if not names or bad or len(set(names)) != len(names):
        raise PartitionError(f"calibrate_curves dtypes must be distinct names among {list(_DTYPES)}, got "
                             f"{list(names)}")
    budget = DEFAULT_BUDGET_S[dev.type] if budget_s is None else float(budget_s)
    if not budget > 0 or not math.isfinite(budget):
        raise PartitionError(f"calibrate_curves budget_s must be a positive number of seconds, got {budget_s!r}")
    # the accelerator synchronisation around each timing (Timer) is the current device's
    with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
        return _measure_device(dev, names, budget)


def _measure_device(dev: torch.device, names: tuple[str, ...], budget: float) -> Measurements:
    cuda = dev.type == "cuda"
    start = time.perf_counter()
    gemm_shapes, attn_shapes, copy_elems, opt_params = _sizes(cuda)
    gemm, skipped = _rounds(budget * _SHARES["gemm"], [(d, *shape) for d in names for shape in gemm_shapes],
                            lambda item, each: _gemm(dev, item[0], item[1], item[2], item[3], each))
    attention, skipped_attn = _rounds(budget * _SHARES["attention"], attn_shapes,
                                      lambda item, each: _attention(dev, names[0], item[0], item[1], item[2], item[3],
                                                                    each / 2))
    copy_elems = _fitting(dev, copy_elems, 3 * 4)
    copies, _ = _rounds(budget * _SHARES["copy"], ["copy", "add"], lambda what, each: _copy(dev, what, copy_elems, each))
    launch_s = _launch(dev, budget * _SHARES["launch"])
    opt_params, optimizer_s = _optimizer(dev, opt_params, budget * _SHARES["optimizer"])
    if cuda:
        props = torch.cuda.get_device_properties(dev)
        name, sms, memory = torch.cuda.get_device_name(dev), int(props.multi_processor_count), int(props.total_memory)
        torch.cuda.empty_cache()
    else:
        name, sms = _cpu_name(), 1
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    return Measurements(
        device=name, backend=dev.type, sms=sms, memory_bytes=int(memory), torch_version=torch.__version__,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), dtypes=names,
        allow_tf32=bool(torch.backends.cuda.matmul.allow_tf32), gemm=tuple(gemm), attention=tuple(attention),
        copies=tuple(copies), launch_s=launch_s, optimizer_params=opt_params, optimizer_s=optimizer_s,
        budget_s=budget, wall_s=time.perf_counter() - start, skipped=skipped + skipped_attn)


def _rounds(seconds: float, items: Sequence[Any], run: Callable[[Any, float], Any]) -> tuple[list[Any], int]:
    """``run(item, seconds each)`` for every item, in ``_ROUNDS`` rounds over all of them, and
    per item the fastest round: a slow spell of the machine (another process on a shared CPU, a
    clock change) then slows one round of a kernel, not all of its samples. A round that runs
    past twice its share of ``seconds`` (calls slower than their share) ends early, once two
    items are timed. Returns (the samples in item order, how many items got none: larger than
    the free memory, or over the time)."""
    each = seconds / (_ROUNDS * len(items))
    best: dict[int, Any] = {}
    start = time.perf_counter()
    for r in range(_ROUNDS):
        for i, item in enumerate(items):
            if len(best) >= 2 and time.perf_counter() - start > 2 * seconds * (r + 1) / _ROUNDS:
                break
            sample = run(item, each)
            if sample is not None:
                best[i] = _faster(best[i], sample) if i in best else sample
    return [best[i] for i in sorted(best)], len(items) - len(best)


def _faster(a: Any, b: Any) -> Any:
    if isinstance(a, AttentionSample):
        return replace(a, fwd_s=min(a.fwd_s, b.fwd_s), bwd_s=min(a.bwd_s, b.bwd_s))
    return replace(a, seconds=min(a.seconds, b.seconds))


def _sizes(cuda: bool) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int, int]], int, int]:
    """(matmul (m, k, n), attention (batch, heads, seq, head_dim), copy elements, optimizer params).

    Matmuls: K from short (where the ramp shows) to long at two output sizes, plus shapes whose
    tiles fill a last wave only partly. Attention: a fixed number of tokens (batch x seq) and
    of model width (heads x head_dim), so each sequence length does about the same work.
    """
    if cuda:
        gemm = [(mn, k, mn) for mn in (4096, 8192) for k in (256, 512, 1024, 2048, 4096, 8192)]
        gemm += [(2048, 4096, 2048), (4224, 4096, 4096), (8192, 4096, 1024), (1536, 4096, 1536)]
        attn = [(max(1, 16384 // s), 2048 // d, s, d) for d in (64, 128) for s in (256, 512, 1024, 2048, 4096, 8192)]
        return gemm, attn, 2**27, 2**26
    gemm = [(256, k, 256) for k in (32, 64, 128, 256, 512, 1024)] + [(512, 512, 256)]
    attn = [(1, 256 // d, s, d) for d in (32, 64) for s in (64, 128, 256, 512)]
    return gemm, attn, 2**22, 2**20


def _timed(fn: Callable[[], Any], seconds: float) -> float:
    """Seconds per call of ``fn``: the fastest block of calls of ``torch.utils.benchmark.Timer``
    (it synchronises the accelerator around each block, so queued kernels are what is timed),
    after one warm-up call, for about ``seconds``. The fastest, not the median: other work on
    the machine only ever adds time (microbenchmarks such as STREAM report the best too)."""
    fn()
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return float(min(timer.blocked_autorange(min_run_time=max(seconds, 1e-3)).times))


def _fits(dev: torch.device, nbytes: int) -> bool:
    """Whether ``nbytes`` of operands fit in half of the free device memory (always on a CPU)."""
    return dev.type != "cuda" or nbytes < torch.cuda.mem_get_info(dev)[0] // 2


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _gemm(dev: torch.device, dtype: str, m: int, k: int, n: int, seconds: float) -> GemmSample | None:
    dt = _dtype(dtype)
    if not _fits(dev, (m * k + k * n + m * n) * dt.itemsize):
        return None
    a, b = torch.randn(m, k, device=dev, dtype=dt), torch.randn(k, n, device=dev, dtype=dt)
    out = torch.empty(m, n, device=dev, dtype=dt)
    return GemmSample(dtype, m, k, n, _timed(lambda: torch.mm(a, b, out=out), seconds))


def _attention(dev: torch.device, dtype: str, batch: int, heads: int, seq: int, head_dim: int,
               seconds: float) -> AttentionSample | None:
    dt = _dtype(dtype)
    if not _fits(dev, 8 * batch * heads * seq * head_dim * dt.itemsize):  # q, k, v, out and their gradients
        return None
    q, k, v = (torch.randn(batch, heads, seq, head_dim, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
    fwd = _timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), seconds)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    grad = torch.randn_like(out)
    bwd = _timed(lambda: torch.autograd.grad(out, (q, k, v), grad, retain_graph=True), seconds)
    return AttentionSample(dtype, batch, heads, seq, head_dim, fwd, bwd)


def _fitting(dev: torch.device, elems: int, bytes_per_elem: int) -> int:
    """``elems`` halved until ``bytes_per_elem`` x it fits (``_fits``), down to 1 Mi elements."""
    while not _fits(dev, bytes_per_elem * elems) and elems > 2**20:
        elems //= 2
    return elems


def _copy(dev: torch.device, what: str, elems: int, seconds: float) -> CopySample:
    """A copy (read + write) or an add (two reads + a write) of ``elems`` float32s."""
    a, b = torch.ones(elems, device=dev), torch.ones(elems, device=dev)
    out = torch.empty_like(a)
    if what == "copy":
        return CopySample("copy", 2 * a.nbytes, _timed(lambda: out.copy_(a), seconds))
    return CopySample("add", 3 * a.nbytes, _timed(lambda: torch.add(a, b, out=out), seconds))


def _launch(dev: torch.device, seconds: float) -> float:
    """Seconds per one-element in-place add, ``_LAUNCHES`` back to back: what every kernel costs
    at least in eager PyTorch (dispatch + launch; on a GPU the queue stays ahead of nothing)."""
    x = torch.zeros(1, device=dev)

    def run() -> None:
        for _ in range(_LAUNCHES):
            x.add_(1.0)

    return _timed(run, seconds) / _LAUNCHES


def _optimizer(dev: torch.device, params: int, seconds: float) -> tuple[int, float]:
    """(parameters, seconds) of one ``torch.optim.AdamW`` step over about ``params`` float32
    parameters in 16 tensors (fewer where they do not fit; fused on a GPU, foreach on the CPU:
    the implementations a training run picks)."""
    params = _fitting(dev, params, 4 * 4)  # weights, gradients, two moments
    each = params // 16
    weights = [torch.zeros(each, device=dev, requires_grad=True) for _ in range(16)]
    for w in weights:
        w.grad = torch.full_like(w, 1e-3)
    cuda = dev.type == "cuda"
    opt = torch.optim.AdamW(weights, lr=1e-3, fused=True if cuda else None, foreach=None if cuda else True)
    return 16 * each, _timed(opt.step, seconds)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


# -- the fit: a pure function of the measurements -----------------------------------------

def gemm_cost(s: GemmSample) -> NodeCost:
    """The node the planner would price for this matmul (``DeviceSpec.node_time``'s inputs)."""
    size = _dtype(s.dtype).itemsize
    return NodeCost(fwd_flops=2 * s.m * s.k * s.n, fwd_bytes_moved=(s.m * s.k + s.k * s.n + s.m * s.n) * size,
                    ops=("aten.mm.default",), shape=(s.m, s.k, s.n))


def attention_cost(s: AttentionSample) -> NodeCost:
    """The node the planner would price for this causal attention (as ``passes.annotate`` prices
    SDPA for a GPU: torch's own SDPA FLOP formulas, q, k, v, out and the log-sum-exp moved)."""
    shape = (s.batch, s.heads, s.seq, s.head_dim)
    io = 4 * s.batch * s.heads * s.seq * s.head_dim * _dtype(s.dtype).itemsize + s.batch * s.heads * s.seq * 4
    return NodeCost(fwd_flops=fc.sdpa_flop_count(shape, shape, shape),
                    bwd_flops=fc.sdpa_backward_flop_count(shape, shape, shape, shape), fwd_bytes_moved=io,
                    kind="attention-causal", ops=("aten._scaled_dot_product_flash_attention",),
                    shape=(s.seq, s.seq, s.head_dim, 1))


def copy_cost(s: CopySample) -> NodeCost:
    return NodeCost(fwd_bytes_moved=s.nbytes, ops=("aten.copy_.default" if s.what == "copy" else "aten.add.Tensor",))


def compare(spec: DeviceSpec, measured: Measurements) -> list[tuple[str, float, float]]:
    """``(what, measured s, predicted s)`` per timed kernel, predicted by ``spec.node_time`` (the
    planner's own pricing) on the node each kernel is; the efficiency's ``fit`` (the in-step
    factor, which microbenchmarks do not see) is set to 1 for it."""
    if spec.efficiency is not None:
        spec = replace(spec, efficiency=replace(spec.efficiency, fit=1.0))
    rows = []
    for g in measured.gemm:
        rows.append((f"mm {g.dtype} {g.m}x{g.k}x{g.n}", g.seconds, spec.node_time(gemm_cost(g), {}, g.dtype)[0]))
    for a in measured.attention:
        f, b = spec.node_time(attention_cost(a), {}, a.dtype)
        label = f"sdpa {a.dtype} b{a.batch} h{a.heads} s{a.seq} d{a.head_dim}"
        rows += [(label + " fwd", a.fwd_s, f), (label + " bwd", a.bwd_s, b)]
    for c in measured.copies:
        rows.append((f"{c.what} {c.nbytes} B", c.seconds, spec.node_time(copy_cost(c), {}, "float32")[0]))
    return rows


def _ramp(groups: Sequence[Sequence[tuple[float, float, float]]], half: float | None, what: str, size: str
          ) -> tuple[list[float], float]:
    """``fit_ramp`` of the groups; where no group has rates at two sizes (a short budget on a busy
    machine, or every other size bound by memory or the launch floor), only the tops, on
    ``half`` (the base profile's ramp); with no base either, a ``PartitionError`` naming the fix."""
    if any(len({x for x, _, _ in g}) > 1 for g in groups):
        return fit_ramp(groups)
    if half is None:
        raise PartitionError(f"calibrate: every {what} rate outside the memory / launch bound was measured at one "
                             f"{size} only, so the ramp over {size} cannot be fitted; give it a larger budget "
                             "(--budget) or a base profile (--base) whose ramp to keep")
    logger.info("calibrate: %s measured at one %s only: keeping the base profile's ramp (half %.3g)", what, size, half)
    return fit_ramp(groups, half=half)


def fit_curves(measured: Measurements, base: str | DeviceSpec | None = None, name: str | None = None) -> DeviceSpec:
    """The ``DeviceSpec`` whose ``node_time`` reproduces ``measured``: no timing, only the fit.

    - bandwidth: the best of the copy / add rates (a STREAM-like achievable bandwidth), as
      ``efficiency.mem`` of the datasheet's (``base``'s; the measured rate itself if higher);
    - launch floor: ``efficiency.launch_s`` as measured;
    - matmuls: ``gemm_max`` (best rate / peak) and ``gemm_k_half`` fitted to
      ``gemm_efficiency``'s curve, with ``sms`` the device's and its tile quantisation as the
      planner computes it (``fit_ramp``; every dtype's own top, one K ramp for all);
    - attention: ``attn_fwd``, ``attn_bwd`` and ``attn_seq_half`` fitted to
      ``attention_efficiency``'s curve on torch's SDPA FLOP counts, the causal share as the
      planner takes it;
    - peaks: the primary dtype's class (low precision or float32) keeps ``base``'s datasheet
      peak unless a measured rate exceeds it (then that rate is the peak); the other class's
      peak is set so its measured top rate is ``gemm_max`` of it (where unmeasured, in ``base``'s
      ratio to the primary peak).

    Matmul and attention samples that the memory traffic or the launch floor could explain to
    half their time (``_BOUND``) say nothing of the compute rate and are left out of those
    fits (the planner takes the max of the three). ``fit`` (the in-step factor) is ``base``'s.
    The optimizer step is priced by the planner from the bandwidth (``optimizer_time``): its
    measured time and the ratio are recorded, not fitted. ``efficiency.measured`` records the
    device, date, torch version and the fit's quality (``compare``).
    """
    ref = get_device(base) if base is not None else None
    if not measured.copies or not measured.gemm:
        raise PartitionError("fit_curves needs matmul and copy measurements; measure_curves found none that fit "
                             "the device's memory")
    bw = max(c.nbytes / c.seconds for c in measured.copies)
    launch = measured.launch_s

    def free(t: float, nbytes: float) -> bool:
        return nbytes / bw < _BOUND * t and launch < _BOUND * t

    # -- matmuls: a group per dtype, one K ramp ------------------------------------------------
    dtypes = [d for d in measured.dtypes if any(g.dtype == d for g in measured.gemm)]
    groups: dict[str, list[tuple[float, float, float]]] = {d: [] for d in dtypes}
    for g in measured.gemm:
        if free(g.seconds, gemm_cost(g).fwd_bytes_moved):
            groups[g.dtype].append((g.k, gemm_efficiency(g.m, g.k, g.n, measured.sms, 1.0, 0.0),
                                    2 * g.m * g.k * g.n / g.seconds))
    kept = {d: pts for d, pts in groups.items() if pts}
    if not kept or dtypes[0] not in kept:
        raise PartitionError(f"fit_curves: every {dtypes[0] if dtypes else ''} matmul was bound by memory or the "
                             f"launch floor; measure larger matmuls")
    tops, k_half = _ramp(list(kept.values()), ref.efficiency.gemm_k_half if ref and ref.efficiency else None,
                         "matmul", "K")
    gemm_top = dict(zip(kept, tops))
    primary = dtypes[0]
    # -- attention: forward and backward tops, one sequence ramp --------------------------------
    fwd_pts, bwd_pts = [], []
    for a in measured.attention:
        cost = attention_cost(a)
        share = causal_share(a.seq, a.seq)  # the planner's own
        head = attention_efficiency(a.seq, a.head_dim, 1.0, 0.0)
        if free(a.fwd_s, cost.fwd_bytes_moved):
            fwd_pts.append((a.seq, head, float(cost.fwd_flops) * share / a.fwd_s))
        if free(a.bwd_s, 2 * cost.fwd_bytes_moved):
            bwd_pts.append((a.seq, head, float(cost.bwd_flops) * share / a.bwd_s))
    attn_dtype = measured.attention[0].dtype if measured.attention else primary
    if fwd_pts and bwd_pts:
        (attn_f, attn_b), seq_half = _ramp([fwd_pts, bwd_pts], ref.efficiency.attn_seq_half
                                           if ref and ref.efficiency else None, "attention", "sequence length")
    elif ref is not None and ref.efficiency is not None:  # not measured: base's rates
        e = ref.efficiency
        attn_f, attn_b, seq_half = (e.attn_fwd * ref.peak(attn_dtype), e.attn_bwd * ref.peak(attn_dtype),
                                    e.attn_seq_half)
    else:
        raise PartitionError("fit_curves: no attention measurement outside the memory / launch bound, and no base "
                             "profile with attention figures to take them from; pass base=")
    # -- peaks and the fractions of them ------------------------------------------------------
    lowp = primary in _LOWP_DTYPES
    peak = max(ref.peak(primary) if ref is not None else 0.0, gemm_top[primary], attn_f, attn_b)
    gemm_max = gemm_top[primary] / peak
    other = next((d for d in kept if (d in _LOWP_DTYPES) != lowp), None)
    if other is not None:
        other_peak = gemm_top[other] / gemm_max
    elif ref is not None:  # base's ratio of the two peaks
        other_peak = (ref.peak_flops if lowp else ref.peak_flops_lowp) * peak / ref.peak(primary)
    else:
        raise PartitionError(f"fit_curves: no {'float32' if lowp else 'bfloat16/float16'} matmul was measured and "
                             "no base profile gives its peak; measure both or pass base=")
    mem_bandwidth = max(ref.mem_bandwidth if ref is not None else 0.0, bw)
    eff = Efficiency(sms=measured.sms, gemm_max=gemm_max, gemm_k_half=k_half, attn_fwd=attn_f / peak,
                     attn_bwd=attn_b / peak, attn_seq_half=seq_half, mem=bw / mem_bandwidth, launch_s=launch,
                     fit=ref.efficiency.fit if ref is not None and ref.efficiency is not None else 1.0)
    label = name or re.sub(r"[^a-z0-9]+", "-", measured.device.lower()).strip("-") + "-calibrated"
    spec = DeviceSpec(label, peak_flops=peak if not lowp else other_peak, peak_flops_lowp=peak if lowp else other_peak,
                      mem_bandwidth=mem_bandwidth, memory_bytes=measured.memory_bytes,
                      kind="gpu" if measured.backend == "cuda" else "cpu",
                      op_overhead_s=ref.op_overhead_s if ref is not None else 0.0, efficiency=eff)
    rows = compare(spec, measured)
    errors = sorted(abs(math.log(p / m)) for _, m, p in rows if p > 0 and m > 0)
    optimizer_pred = spec.optimizer_time(measured.optimizer_params, "adamw", "fp32")
    record: dict[str, str | bool | int | float] = {
        "profile": label, "device": measured.device, "backend": measured.backend, "date": measured.date,
        "torch": measured.torch_version, "base": ref.name if ref is not None else "", "dtypes": ",".join(dtypes),
        "attention_dtype": attn_dtype, "allow_tf32": measured.allow_tf32, "budget_s": round(measured.budget_s, 3),
        "wall_s": round(measured.wall_s, 3), "samples": len(rows), "skipped": measured.skipped,
        "left_out_bound": (len(measured.gemm) - sum(len(p) for p in groups.values())
                           + 2 * len(measured.attention) - len(fwd_pts) - len(bwd_pts)),
        "fit_median_ratio": round(math.exp(statistics.median(errors)), 4) if errors else 1.0,
        "fit_worst_ratio": round(math.exp(errors[-1]), 4) if errors else 1.0,
        "bandwidth_Bps": bw, "optimizer_params": measured.optimizer_params,
        "optimizer_s_per_param": measured.optimizer_s / measured.optimizer_params if measured.optimizer_params else 0.0,
        "optimizer_predicted_over_measured": round(optimizer_pred / measured.optimizer_s, 4)
        if measured.optimizer_s > 0 else 0.0,
        **{f"matmul_top_flops.{d}": t for d, t in gemm_top.items()},
        "attention_top_flops.fwd": attn_f, "attention_top_flops.bwd": attn_b,
    }
    return replace(spec, efficiency=replace(eff, measured=tuple(sorted(record.items()))))

