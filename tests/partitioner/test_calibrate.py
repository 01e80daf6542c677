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


def test_the_overhead_fit_solves_both_runs_and_refuses_what_has_no_meaning() -> None:
    from partitioner.calibrate import fit_overhead

    # t = roof / k + overhead x ops at both sizes: k = 1/2, 10 us per op over 1,000 ops
    inv_k, ov = fit_overhead(roof_full=0.1, roof_small=0.0125, ops=1000, t_full=0.2 + 0.01, t_small=0.025 + 0.01)
    assert inv_k == pytest.approx(2.0) and ov == pytest.approx(1e-5)
    assert fit_overhead(0.1, 0.0125, 1000, 0.21, 0.25) is None  # the small run slower: noise, no fit
    assert fit_overhead(0.1, 0.0125, 1000, 0.2, 0.001) is None  # overhead would be negative
    assert fit_overhead(0.1, 0.1, 1000, 0.2, 0.1) is None  # the roofline does not grow with the batch


def test_op_overhead_prices_every_working_node_and_stays_out_of_plans_without_it() -> None:
    from dataclasses import replace

    from partitioner.cost_models.devices import DeviceSpec, get_device

    f = FIXTURES["mlp"]
    model, args = f.build(), f.inputs()
    cpu = get_device("cpu")
    assert "op_overhead_s" not in cpu.to_dict()  # profiles without it: plans as before
    slow = replace(cpu, op_overhead_s=1e-3)
    assert DeviceSpec.from_dict(slow.to_dict()) == slow and DeviceSpec.from_dict(cpu.to_dict()) == cpu
    a = partition(model, n_gpus=1, example_inputs=args, device=cpu, schedule="naive").plan
    b = partition(model, n_gpus=1, example_inputs=args, device=slow, schedule="naive").plan
    extra = (b.stages[0].cost.fwd_time_s + b.stages[0].cost.bwd_time_s) - (a.stages[0].cost.fwd_time_s
                                                                          + a.stages[0].cost.bwd_time_s)
    ops = extra / 1e-3
    assert ops == pytest.approx(round(ops), abs=1e-6) and 2 <= round(ops) <= 2 * len(a.stages[0].nodes)
    assert b.device["op_overhead_s"] == 1e-3 and "op_overhead_s" not in a.device
    from partitioner import load_plan

    assert load_plan(b.to_json()).to_json() == b.to_json()


def test_calibration_fits_an_overhead_that_prices_a_small_batch() -> None:
    """Two runs, the batch and an eighth of it: the profile predicts both (the fit is exact
    at the two points; timing noise only moves what it finds) and sets op_overhead_s >= 0."""
    f = FIXTURES["cnn"]
    model, args = f.build(), (torch.randn(64, 3, 16, 16),)
    dev = calibrate_device(model, args, device="cpu", repeats=5)
    assert dev.op_overhead_s >= 0
    for x in (args[0], args[0][:8]):
        c = partition(model, n_gpus=1, example_inputs=(x,), device=dev, schedule="naive").plan.stages[0].cost
        measured = _measured_step(model, (x,))
        assert 0.4 < (c.fwd_time_s + c.bwd_time_s) / measured < 2.5, (x.shape, c.fwd_time_s + c.bwd_time_s, measured)
