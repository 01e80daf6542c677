"""GPU efficiency curves: their shapes, their cited figures, and the profiles as plain data."""

from __future__ import annotations

import inspect
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from partitioner.cost_models import devices
from partitioner.cost_models.cost import BATCH, SEQ, NodeCost
from partitioner.cost_models.devices import DEVICES, LINKS, DeviceSpec, LinkSpec
from partitioner.cost_models.efficiency import Efficiency, attention_efficiency, gemm_efficiency
from partitioner.cost_models.errors import CostModelError

GPUS = ("a100-80gb", "h100-sxm", "h200", "b200")
SIZES = [1, 7, 64, 100, 128, 129, 1000, 1024, 2304, 4096, 5000, 8192, 16384]


@pytest.mark.parametrize("name", GPUS)
def test_gemm_time_never_falls_as_a_dimension_grows_and_the_rate_stays_under_the_top(name: str) -> None:
    e = DEVICES[name].efficiency
    assert e is not None
    top = e.gemm_max * e.fit
    for fixed in ((4096, 4096), (1024, 50304), (6144, 2304)):
        for axis in range(3):
            last = 0.0
            for x in SIZES:
                dims = list(fixed)
                dims.insert(axis, x)
                m, k, n = dims
                eff = e.gemm(m, k, n)
                assert 0 < eff <= top + 1e-12, (dims, eff, top)
                t = 2 * m * k * n / eff  # seconds x peak
                assert t >= last * (1 - 1e-9), (axis, dims)  # a bigger problem is never faster
                last = t
    assert e.gemm(8192, 8192, 8192) > 0.9 * top  # large aligned problems run near the best rate
    assert e.gemm(64, 4096, 64) < 0.2 * top  # one tile on a whole GPU: most SMs idle


def test_gemm_quantisation_charges_a_partial_wave_as_a_whole_one() -> None:
    # 108 SMs, 256x128 tiles: 108 tiles are one full wave, 109 tiles need a second
    full = gemm_efficiency(256 * 108, 4096, 128, 108, 1.0, 0.0)
    over = gemm_efficiency(256 * 109, 4096, 128, 108, 1.0, 0.0)
    assert full == pytest.approx(1.0)
    assert over < 0.7 and 256 * 109 / over > 256 * 108 / full  # more time, not just a lower rate


@pytest.mark.parametrize("name", GPUS)
def test_attention_rate_rises_with_sequence_and_head_dim_and_stays_under_the_top(name: str) -> None:
    e = DEVICES[name].efficiency
    assert e is not None
    e = replace(e, attn_curve=())  # the ramp (profiles with a measured curve: test_attention_curves.py)
    for backward, top in ((False, e.attn_fwd * e.fit), (True, e.attn_bwd * e.fit)):
        for d in (32, 64, 96, 128, 256):
            rates = [e.attention(s, d, backward) for s in (64, 256, 512, 1024, 4096, 32768)]
            assert rates == sorted(rates) and all(0 < r <= top for r in rates)
        by_head = [e.attention(2048, d, backward) for d in (32, 64, 96, 128, 256)]
        assert by_head == sorted(by_head) and by_head[-2] == by_head[-1]  # no gain past head dim 128
    assert attention_efficiency(1e9, 128, 0.7, 128.0) == pytest.approx(0.7, rel=1e-6)


def test_profiles_carry_the_cited_figures() -> None:
    """The numbers beside the citations in cost_models/devices.py, checked against the sources'
    figures (measured / datasheet) so an edit to one without the other fails here."""
    a100, h100, h200, b200 = (DEVICES[n].efficiency for n in GPUS)
    assert a100 is not None and h100 is not None and h200 is not None and b200 is not None
    assert a100.gemm_max == pytest.approx(271.2 / 312, abs=1e-3)  # [MAMF]
    assert h100.gemm_max == pytest.approx(794.5 / 989, abs=1e-3)
    assert h200.gemm_max == pytest.approx(828.6 / 989, abs=1e-3)
    assert b200.gemm_max == pytest.approx(1745 / 2250, abs=1e-3)
    assert (a100.attn_fwd, a100.attn_bwd) == (0.73, 0.63)  # [FA2] forward up to 73 %, backward 196 of 312 TFLOP/s (Figure 5)
    # [FA3] Figures 5-6, head dim 128: cuDNN (what SDPA runs on Hopper [SDPA]) 595 / 516 TFLOP/s,
    # FlashAttention-2 (h100-sxm-fa2: SDPA's flash backend) 370 / 322
    assert (h100.attn_fwd, h100.attn_bwd) == (pytest.approx(595 / 989, abs=1e-3), pytest.approx(516 / 989, abs=1e-3))
    fa2 = DEVICES["h100-sxm-fa2"]
    for other in (fa2, DEVICES["h100-sxm-triton"]):  # only attention differs
        assert other.efficiency is not None and replace(other, name="h100-sxm", efficiency=replace(
            other.efficiency, attn_fwd=h100.attn_fwd, attn_bwd=h100.attn_bwd, attn_kernel=h100.attn_kernel,
            attn_curve=h100.attn_curve)) == DEVICES["h100-sxm"]
    assert fa2.efficiency is not None
    assert (fa2.efficiency.attn_fwd, fa2.efficiency.attn_bwd) == (pytest.approx(370 / 989, abs=1e-3),
                                                                  pytest.approx(322 / 989, abs=1e-3))
    assert (h200.attn_fwd, h200.attn_bwd) == (b200.attn_fwd, b200.attn_bwd) == (h100.attn_fwd, h100.attn_bwd)
    assert a100.mem == pytest.approx(1800 / 2039, abs=0.01) and h100.mem == pytest.approx(2900 / 3350, abs=0.01)
    assert a100.launch_s == pytest.approx(1 / 334_000, rel=0.05)  # [LAUNCH]
    assert (a100.sms, h100.sms, h200.sms, b200.sms) == (108, 132, 132, 148)  # [SM]
    assert DEVICES["a100-80gb"].peak_flops_lowp == 312e12 and DEVICES["b200"].peak_flops_lowp == 2.25e15
    assert LINKS["nvlink3"].bandwidth == 300e9 and LINKS["nvlink5"].bandwidth == 900e9  # [NVL]
    assert LINKS["nvlink3"].bandwidth * LINKS["nvlink3"].collective == pytest.approx(208e9, rel=0.02)  # [P2P]
    source = inspect.getsource(devices)
    for tag in ("[MAMF]", "[FA2]", "[FA3]", "[SDPA]", "[BW]", "[LAUNCH]", "[SM]", "[NVL]", "[P2P]", "[NVLS]", "[IB]"):
        assert source.count(tag) >= 2, tag  # defined once, cited at least once beside a number


@pytest.mark.parametrize("name", sorted(DEVICES))
def test_profile_files_round_trip(name: str, tmp_path: Path) -> None:
    spec = DEVICES[name]
    path = tmp_path / f"{name}.json"
    spec.save(path)
    assert DeviceSpec.load(path) == spec
    assert ("efficiency" in json.loads(path.read_text())) == (spec.kind == "gpu")


def test_old_plans_and_cpu_profiles_stay_rooflines() -> None:
    old = {k: v for k, v in DEVICES["h100-sxm"].to_dict().items() if k != "efficiency"}
    spec = DeviceSpec.from_dict(old)  # a plan written before efficiencies
    assert spec.efficiency is None and spec.to_dict() == old
    cost = NodeCost(fwd_flops=989e12 * BATCH, bwd_flops=2 * 989e12 * BATCH, fwd_bytes_moved=BATCH, ops=("aten.mm.default",))
    assert spec.node_time(cost, {"B": 1}, torch.bfloat16) == (1.0, 2.0)  # FLOPs / datasheet peak
    assert DEVICES["cpu"].efficiency is None
    link = {"name": "x", "bandwidth": 1e9, "latency": 1e-6}
    assert LinkSpec.from_dict(link).to_dict() == link and LinkSpec.from_dict(link).transfer_time(1e9) == 1 + 1e-6


def test_efficiency_from_dict_names_the_bad_field() -> None:
    good = DEVICES["a100-80gb"].to_dict()
    with pytest.raises(CostModelError, match=r"efficiency.gemm_max is a fraction .* got 1.5"):
        DeviceSpec.from_dict({**good, "efficiency": {**good["efficiency"], "gemm_max": 1.5}})
    with pytest.raises(CostModelError, match=r"efficiency is missing field 'sms'"):
        DeviceSpec.from_dict({**good, "efficiency": {k: v for k, v in good["efficiency"].items() if k != "sms"}})
    with pytest.raises(CostModelError, match=r"efficiency has unknown field\(s\) \['peak'\]"):
        DeviceSpec.from_dict({**good, "efficiency": {**good["efficiency"], "peak": 1}})
    with pytest.raises(CostModelError, match=r"LinkSpec.p2p is a fraction"):
        LinkSpec.from_dict({"name": "x", "bandwidth": 1, "latency": 0, "p2p": 2})


def _gpu(**kw: float) -> DeviceSpec:
    eff = Efficiency(sms=100, gemm_max=0.8, gemm_k_half=0.0, attn_fwd=0.5, attn_bwd=0.4, attn_seq_half=0.0,
                     mem=0.5, launch_s=1e-6)
    return DeviceSpec("toy", 1e12, 100e12, 1e12, 1, efficiency=replace(eff, **kw))


def test_node_time_with_efficiency_prices_each_kind_of_kernel() -> None:
    dev = _gpu()
    at = {"B": 2, "S": 1}
    # a matmul of known shape: M = 256 x 100 rows fill one wave of 256x128 tiles exactly
    m, k, n = 256 * 100 * BATCH / 2, 4096, 128
    gemm = NodeCost(fwd_flops=2 * m * k * n, bwd_flops=4 * m * k * n, fwd_bytes_moved=BATCH,
                    ops=("aten.t.default", "aten.mm.default"), shape=(m, k, n))
    f, _ = dev.node_time(gemm, at, torch.bfloat16)
    flops = 2 * 256 * 100 * 4096 * 128
    assert f == pytest.approx(flops / (100e12 * 0.8))  # the top rate, never above the peak
    assert f > flops / 100e12
    # memory-bound: bytes at the achievable bandwidth (mem x datasheet), backward twice
    ew = NodeCost(fwd_flops=BATCH, bwd_flops=BATCH, fwd_bytes_moved=1e9 * BATCH, ops=("aten.gelu.default",))
    assert dev.node_time(ew, at) == pytest.approx((2e9 / 0.5e12, 4e9 / 0.5e12))
    # a cast's backward is one pass
    cast = NodeCost(fwd_bytes_moved=1e9 * BATCH, bwd_flops=BATCH, ops=("aten._to_copy.default",))
    assert dev.node_time(cast, at) == pytest.approx((2e9 / 0.5e12, 2e9 / 0.5e12))
    # tiny: the launch floor per kernel; views launch nothing
    tiny = NodeCost(fwd_flops=BATCH, bwd_flops=BATCH, fwd_bytes_moved=BATCH, ops=("aten.mul.Tensor",) * 3)
    assert dev.node_time(tiny, at) == pytest.approx((3e-6, 3e-6))
    view = NodeCost(fwd_bytes_moved=BATCH, ops=("aten.view.default", "prim.device.default"))
    assert dev.node_time(view, at) == (0.0, 0.0)
    # attention: the causal half of the FLOPs at the flash rate
    attn = NodeCost(fwd_flops=4e12 * BATCH, bwd_flops=1e13 * BATCH, kind="attention",
                    shape=(SEQ, SEQ, 128, 1), ops=("sdpa",))
    f, b = dev.node_time(attn, {"B": 1, "S": 128 * 64}, torch.bfloat16)
    share = 65 / 128  # 64 blocks: 64 x 65 / 2 of 64 x 64
    assert (f, b) == pytest.approx((4e12 * share / (100e12 * 0.5), 1e13 * share / (100e12 * 0.4)))


def test_links_ramp_with_message_size_toward_nccls_fraction_of_the_line_rate() -> None:
    for name in ("nvlink3", "nvlink4", "ib-ndr-400", "ethernet-200g"):
        link = LINKS[name]
        sizes = [2**i for i in range(10, 34, 2)]
        times = [link.transfer_time(s) for s in sizes]
        assert times == sorted(times)
        rates = [s / t for s, t in zip(sizes, times)]
        assert rates == sorted(rates) and rates[-1] <= link.bandwidth * link.p2p
        assert rates[-1] > 0.95 * link.bandwidth * link.p2p
        big = 2**30  # large messages: the ring step at the collective share, the p2p at its own
        assert link.collective_step(big) == pytest.approx(link.latency + big / (link.bandwidth * link.collective))
        assert link.transfer_time(big) == pytest.approx(link.latency + (big + link.half_bytes) / (link.bandwidth * link.p2p))
    assert LINKS["nvlink3"].transfer_time(0) == 0.0


def test_optimizer_step_is_memory_bound_per_parameter() -> None:
    a100 = DEVICES["a100-80gb"]
    t = a100.optimizer_time(1e9, "adam", "bf16-mixed")
    assert t == pytest.approx(1e9 * 30 / (2.039e12 * 0.88))  # 30 bytes per parameter, achievable bandwidth
    assert a100.optimizer_time(2e9, "adam", "bf16-mixed") == pytest.approx(2 * t)
    assert a100.optimizer_time(1e9, "sgd", "bf16-mixed") < t and a100.optimizer_time(1e9, "none", "fp32") == 0
    with pytest.raises(CostModelError, match="no optimizer-step cost"):
        a100.optimizer_time(1, "lion", "fp32")
