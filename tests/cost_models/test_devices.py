"""Device and link specs: round trips, validation errors, roofline times, evaluation."""

from __future__ import annotations

import json

import pytest
import sympy
import torch

from partitioner.cost_models import devices
from partitioner.cost_models.cost import BATCH, SEQ, NodeCost
from partitioner.cost_models.devices import DEVICES, LINKS, DeviceSpec, LinkSpec, evaluate, get_device, get_link
from partitioner.cost_models.errors import CostModelError


@pytest.mark.parametrize("name", sorted(DEVICES))
def test_device_round_trip_through_json(name: str) -> None:
    spec = DEVICES[name]
    assert DeviceSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


@pytest.mark.parametrize("name", sorted(LINKS))
def test_link_round_trip_through_json(name: str) -> None:
    spec = LINKS[name]
    assert LinkSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_required_profiles_exist() -> None:
    assert {"h100-sxm", "a100-80gb", "cpu"} <= set(DEVICES)
    assert {"nvlink4", "pcie4", "pcie5", "ethernet-100g", "loopback"} <= set(LINKS)


@pytest.mark.parametrize(
    "data, message",
    [
        ([1, 2], r"DeviceSpec must be a JSON object, got list"),
        (
            {"name": "x", "peak_flops": 1.0, "peak_flops_lowp": 1.0, "mem_bandwidth": 1.0},
            r"missing field 'memory_bytes'",
        ),
        ({**DEVICES["cpu"].to_dict(), "peak_flop": 1.0}, r"unknown field\(s\) \['peak_flop'\]"),
        (
            {**DEVICES["cpu"].to_dict(), "mem_bandwidth": "fast"},
            r"DeviceSpec.mem_bandwidth must be a finite non-negative number, got 'fast'",
        ),
        ({**DEVICES["cpu"].to_dict(), "peak_flops": 0}, r"DeviceSpec.peak_flops must be positive, got 0"),
        ({**DEVICES["cpu"].to_dict(), "peak_flops": float("nan")}, r"DeviceSpec.peak_flops must be a finite"),
        ({**DEVICES["cpu"].to_dict(), "name": ""}, r"DeviceSpec.name must be a non-empty string"),
    ],
)
def test_device_from_dict_names_the_bad_field(data: object, message: str) -> None:
    with pytest.raises(CostModelError, match=message):
        DeviceSpec.from_dict(data)


def test_link_from_dict_errors_and_zero_latency() -> None:
    assert LinkSpec.from_dict({"name": "ideal", "bandwidth": 1e9, "latency": 0}).latency == 0.0
    with pytest.raises(CostModelError, match=r"LinkSpec.bandwidth must be positive, got 0"):
        LinkSpec.from_dict({"name": "dead", "bandwidth": 0, "latency": 0})
    with pytest.raises(CostModelError, match=r"LinkSpec.latency must be a finite non-negative number, got -1"):
        LinkSpec.from_dict({"name": "x", "bandwidth": 1, "latency": -1})


def test_lookup_by_name_lists_valid_names() -> None:
    assert get_device("h100-sxm") is DEVICES["h100-sxm"] and get_link(LINKS["pcie4"]) is LINKS["pcie4"]
    with pytest.raises(CostModelError, match=r"unknown device 'h100'; valid names: .*h100-sxm.*local"):
        get_device("h100")
    with pytest.raises(CostModelError, match=r"unknown link 'nvlink'; valid names: nvlink3, nvlink4, nvlink5, pcie4"):
        get_link("nvlink")


def test_peak_by_dtype() -> None:
    h100 = DEVICES["h100-sxm"]
    assert h100.peak(torch.bfloat16) == h100.peak("float16") == 989e12
    assert h100.peak(torch.float32) == h100.peak(None) == 67e12


def test_node_time_is_a_roofline() -> None:
    dev = DeviceSpec("toy", peak_flops=100.0, peak_flops_lowp=400.0, mem_bandwidth=10.0, memory_bytes=1)
    compute_bound = NodeCost(fwd_flops=100 * BATCH, bwd_flops=200 * BATCH, fwd_bytes_moved=BATCH)
    assert dev.node_time(compute_bound, {"B": 2}, torch.float32) == (2.0, 4.0)
    assert dev.node_time(compute_bound, {"B": 2}, torch.bfloat16) == (0.5, 1.0)
    memory_bound = NodeCost(fwd_flops=BATCH, bwd_flops=BATCH, fwd_bytes_moved=10 * BATCH * SEQ)
    assert dev.node_time(memory_bound, {"B": 2, "S": 3}) == (6.0, 12.0)  # backward moves 2x


def test_transfer_time() -> None:
    link = LinkSpec("toy", bandwidth=100.0, latency=0.5)
    assert link.transfer_time(200) == 2.5
    assert link.transfer_time(0) == 0.0  # nothing sent, no message


def test_evaluate_is_exact_and_cached() -> None:
    exprs = (3 * BATCH * SEQ**2 + 7, BATCH + 1, sympy.Integer(5))
    assert evaluate(exprs, {"B": 4, "S": 2048}) == [3 * 4 * 2048**2 + 7, 5, 5]
    from partitioner.cost_models import cost

    evaluate(exprs, {"B": 3, "S": 16})
    before = cost._evaluate.cache_info().misses
    for _ in range(50):
        evaluate(exprs, {"B": 3, "S": 16})
    assert cost._evaluate.cache_info().misses == before


def test_measure_local_is_plausible() -> None:
    spec = DeviceSpec.measure_local(seconds=0.05)
    assert spec.name == "local"
    assert 1e8 < spec.peak_flops < 1e15 and 1e8 < spec.mem_bandwidth < 1e13
    assert 1e8 < spec.peak_flops_lowp < 1e15 and spec.memory_bytes > 0
    assert DeviceSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize("fp32,bf16,want", [(4e9, 1e9, 4e9), (4e9, 9e9, 9e9)])
def test_measure_local_stores_the_faster_of_its_two_matmul_rates(monkeypatch: pytest.MonkeyPatch, fp32: float,
                                                                bf16: float, want: float) -> None:
    """The low-precision peak is the bf16 matmul rate, or the fp32 one where bf16 is slower (a
    CPU without bf16 units runs a bf16 model at no less than fp32 speed): the figures it measured,
    in the order it measures them (fp32, bf16, copy bandwidth), go where they belong."""
    rates = iter([fp32, bf16, 3e10])
    monkeypatch.setattr(devices, "_rate", lambda fn, work, seconds: next(rates))
    monkeypatch.setattr(devices, "_op_overhead", lambda seconds: 2e-6)
    spec = DeviceSpec.measure_local(seconds=0.01)
    assert (spec.peak_flops, spec.peak_flops_lowp, spec.mem_bandwidth) == (fp32, want, 3e10)
    assert spec.op_overhead_s == 2e-6
