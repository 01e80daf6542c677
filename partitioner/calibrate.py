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

from cost_models.devices import DeviceSpec, get_device
from cost_models.errors import PartitionError

__all__ = ["calibrate_device"]


def _loss(out: Any) -> torch.Tensor:
    leaves = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not leaves:
        raise PartitionError("calibration needs a model with at least one floating-point output")
    return sum((t.float().sum() for t in leaves), torch.zeros(()))


def calibrate_device(
    model: nn.Module, example_inputs: Any, *, device: str | DeviceSpec = "local", repeats: int = 5
) -> DeviceSpec:
    """``device`` with its rates scaled so that the predicted forward + backward time of
    ``model`` on ``example_inputs`` equals the measured one (median of ``repeats`` runs).

    The model is left as it was: gradients, buffers (batch-norm statistics) and the RNG
    state are restored. Needs real weights (not the meta device).
    """
    from partitioner.api import partition

    if any(p.device.type == "meta" for p in model.parameters()):
        raise PartitionError("calibration runs the model for real: load its weights first (it is on the meta device)")
    base = get_device(device)
    pipe = partition(model, n_gpus=1, example_inputs=example_inputs, device=base, link="loopback",
                     schedule="naive")
    stage = pipe.plan.stages[0].cost
    predicted = stage.fwd_time_s + stage.bwd_time_s
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
    measured = statistics.median(times)
    if predicted <= 0 or measured <= 0:
        raise PartitionError(f"cannot calibrate: predicted {predicted} s, measured {measured} s")
    scale = predicted / measured
    return replace(base, name=f"{base.name}-calibrated", peak_flops=base.peak_flops * scale,
                   peak_flops_lowp=base.peak_flops_lowp * scale, mem_bandwidth=base.mem_bandwidth * scale)
