"""Calibrate a device profile against one short measured run of the model itself.

The roofline model gets the *shares* of work right (which op costs more than which),
but its absolute seconds rest on peak figures that real kernels never reach: on this CPU
non-matmul ops run far below the GEMM peak. Timing one real forward + backward of the
model and scaling the profile's rates by predicted / measured fixes the absolute level
for this model, without touching the balance the solver sees.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from partitioner.api import partition
from partitioner.cost_models.devices import DeviceSpec, get_device
from partitioner.cost_models.errors import PartitionError

__all__ = ["calibrate_device"]


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
