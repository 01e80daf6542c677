"""Calibration scales a profile to one measured run and leaves the model as it was."""

from __future__ import annotations

import statistics
import time

import pytest
import torch

from partitioner import PartitionError, calibrate_device, partition
from tests.fixtures.models import FIXTURES


def test_calibration_restores_model_state_and_fits_the_measured_run() -> None:
    f = FIXTURES["cnn"]  # batch norm: buffers that a training-mode forward would change
    model, args = f.build(), (torch.randn(64, 3, 16, 16),)  # ~10 ms a step: timer noise stays small
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.random.get_rng_state()
    dev = calibrate_device(model, args, device="cpu", repeats=9)
    assert dev.name == "cpu-calibrated"
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert torch.equal(torch.random.get_rng_state(), rng)
    # the generic profile's peak is an upper bound; real kernels are slower
    assert dev.peak_flops < 1e12
    # the calibrated profile predicts a whole-model step of the same order as a real one
    plan = partition(model, n_gpus=1, example_inputs=args, device=dev, schedule="naive").plan
    predicted = plan.stages[0].cost.fwd_time_s + plan.stages[0].cost.bwd_time_s
    measured = _measured_step(model, args)
    # calibration sets the rates so the two agree at calibration time; a second measurement on this
    # shared 2-core machine differs by load only (seen: ratios 1.1 to 1.6 while other tests ran), so a
    # factor of 2.5 either way fails only when the scale is wrong (inverted, squared, not applied),
    # which is off by far more (the uncalibrated cpu profile predicts about 10x too fast here)
    assert 0.4 < predicted / measured < 2.5, (predicted, measured)
    uncalibrated = partition(model, n_gpus=1, example_inputs=args, device="cpu", schedule="naive").plan.stages[0].cost
    assert uncalibrated.fwd_time_s + uncalibrated.bwd_time_s != pytest.approx(predicted, rel=0.01)


def _measured_step(model: torch.nn.Module, args: tuple[torch.Tensor, ...], repeats: int = 7) -> float:
    """Median wall time of forward + backward, as calibrate_device measures it (first run discarded)."""
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        model(*args).float().sum().backward()
        if i:
            times.append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    return statistics.median(times)


def test_calibration_needs_real_weights() -> None:
    with torch.device("meta"):
        model = FIXTURES["mlp"].build()
    with pytest.raises(PartitionError, match="meta device"):
        calibrate_device(model, (torch.randn(8, 32),))
