"""Attention priced as the kernels run it: per-kernel curves by sequence length, mask and direction.

The curves' shape (time never falls as a sequence grows, rates inside (0, 1] of the peak, short
sequences well below the long-sequence rate, a causal mask below no mask), the cited figures
beside them in ``cost_models/devices.py``, the causal-FLOPs convention end to end (a causal SDPA
node counts the full square; the device halves it, because the causal rates are on half), and
the curve as plain data in a profile file.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from partitioner.cost_models.cost import SEQ, NodeCost
from partitioner.cost_models.devices import DEVICES, H100_ATTENTION, DeviceSpec, evaluate
from partitioner.cost_models.efficiency import Efficiency, attention_curve_efficiency, check_attention_curve
from partitioner.cost_models.errors import CostModelError
from partitioner.passes.annotate import AnnotateCosts, is_attention
from partitioner.passes.meta import COST
from partitioner.passes.shape_prop import ShapeProp, default_specs
from partitioner.pricing import with_shape

CURVED = sorted(n for n, d in DEVICES.items() if d.efficiency is not None and d.efficiency.attn_curve)
LENGTHS = [1, 16, 128, 500, 512, 700, 1024, 1500, 2048, 3000, 4096, 8192, 12000, 16384, 32768, 65536, 131072]
H100_PEAK = 989.0  # TFLOP/s, the figures below are TFLOP/s on H100 SXM5


def test_the_h100_profiles_carry_a_curve_of_their_kernel() -> None:
    kernels = {n: DEVICES[n].efficiency.attn_kernel for n in CURVED}  # type: ignore[union-attr]
    assert kernels == {"h100-sxm": "cudnn", "h100-sxm-fa2": "fa2", "h100-sxm-triton": "triton-fa1", "h200": "cudnn",
                       "h100-hbm2e-fa2": "fa2"}
    for name in CURVED:
        e = DEVICES[name].efficiency
        assert e is not None and e.attn_curve == H100_ATTENTION[e.attn_kernel]


@pytest.mark.parametrize("kernel", sorted(H100_ATTENTION))
def test_time_never_falls_as_the_sequence_grows_and_rates_stay_inside_the_peak(kernel: str) -> None:
    curve = H100_ATTENTION[kernel]
    for backward in (False, True):
        for causal in (False, True):
            tops = max(row[1 + int(backward) + 2 * int(causal)] for row in curve)
            for d in (64, 128, 256):
                last = 0.0
                for s in LENGTHS:
                    rate = attention_curve_efficiency(s, d, curve, backward, causal)
                    assert 0 < rate <= tops <= 1, (kernel, s, d, rate)
                    t = s * s / rate  # one sequence's time x peak / FLOP constant
                    assert t >= last * (1 - 1e-12), (kernel, backward, causal, s)
                    last = t
            by_head = [attention_curve_efficiency(4096, d, curve, backward, causal) for d in (32, 64, 96, 128, 256)]
            assert by_head == sorted(by_head) and by_head[-2] == by_head[-1]  # no gain past head dim 128


@pytest.mark.parametrize("kernel", ["fa2", "cudnn", "triton-fa1"])
def test_short_sequences_and_causal_masks_run_below_the_long_rate(kernel: str) -> None:
    curve = H100_ATTENTION[kernel]
    for backward in (False, True):
        long_full = attention_curve_efficiency(16384, 128, curve, backward)
        for s in (512, 1024, 2048, 4096, 16384):
            assert attention_curve_efficiency(s, 128, curve, backward, causal=True) < \
                attention_curve_efficiency(s, 128, curve, backward)
        # at 512 tokens the causal kernel runs at well under two thirds of its long-sequence rate
        assert attention_curve_efficiency(512, 128, curve, backward, causal=True) < 0.66 * long_full
        # past the last measured length the rate stays at the last one
        assert attention_curve_efficiency(65536, 128, curve, backward, True) == \
            attention_curve_efficiency(16384, 128, curve, backward, True)


def test_the_cited_figures() -> None:
    """[FA3-F] (FlashAttention-3, Figures 5-6, H100 SXM5, head dim 128), [FA2-T] (FlashAttention-2,
    Section 4.1's ratios to the Triton kernel) as written beside the curves in devices.py."""
    fa2, cudnn, tri = (H100_ATTENTION[k] for k in ("fa2", "cudnn", "triton-fa1"))
    seqs = [row[0] for row in fa2]
    assert seqs == [512, 1024, 2048, 4096, 8192, 16384]

    def col(curve: object, i: int) -> list[float]:
        return [round(row[i] * H100_PEAK, 6) for row in curve]  # type: ignore[attr-defined]

    assert col(fa2, 1) == [309, 350, 362, 368, 370, 370]  # forward, no mask
    assert col(fa2, 3) == [191, 260, 298, 319, 333, 335]  # forward, causal
    assert col(fa2, 2) == [214, 260, 291, 310, 318, 322]  # backward, no mask
    assert col(cudnn, 1) == [497, 574, 617, 609, 600, 595]
    assert col(cudnn, 3) == [315, 410, 484, 518, 529, 539]
    assert col(cudnn, 2) == [305, 408, 465, 499, 518, 516]
    # causal backward (no published H100 figure): the backward x the causal / full forward ratio
    for curve in (fa2, cudnn):
        for _s, f, b, fc, bc in curve:
            assert bc == pytest.approx(b * fc / f)
    # the Triton kernel: FlashAttention-2's curve over the FA2 paper's forward / backward ratios,
    # scaled by the held-out fitted share (devices._TRITON_SHARE)
    from partitioner.cost_models import devices

    a = devices._TRITON_SHARE
    for t_row, f_row in zip(tri, fa2):
        assert t_row[1] == pytest.approx(f_row[1] / (1 + 0.4 * a)) and t_row[3] == pytest.approx(f_row[3] / (1 + 0.4 * a))
        assert t_row[2] == pytest.approx(f_row[2] / (1 + 1.0 * a)) and t_row[4] == pytest.approx(f_row[4] / (1 + 1.0 * a))
    source = inspect.getsource(devices)
    for tag in ("[FA3-F]", "[FA2-T]", "[MPT-K]"):
        assert source.count(tag) >= 2, tag  # defined once, cited at least once beside a number
    # between two measured lengths: linear in log2(seq)
    mid = attention_curve_efficiency(2**11.5, 128, fa2)
    assert mid == pytest.approx((362 + 368) / 2 / H100_PEAK)


def test_a_causal_sdpa_node_counts_the_full_square_and_the_device_halves_it() -> None:
    """torch's FLOP count of SDPA ignores the mask; the curve's causal rates are on half the
    square's FLOPs; so the device prices 0.5 x counted FLOPs at the causal rate, consistently."""
    b, h, s, d = 2, 4, 4096, 128

    class Attn(nn.Module):
        def __init__(self, causal: bool) -> None:
            super().__init__()
            self.causal = causal

        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)

    dev = DEVICES["h100-sxm-fa2"]
    e = dev.efficiency
    assert e is not None
    times = {}
    for causal in (False, True):
        gm = fx.symbolic_trace(Attn(causal))
        q = torch.empty(b, h, s, d, dtype=torch.bfloat16, device="meta")
        gm = AnnotateCosts().run(ShapeProp(inputs=default_specs([q, q, q])).run(gm))
        node = next(n for n in gm.graph.nodes if is_attention(n))
        cost = with_shape(node, node.meta[COST])
        assert cost.kind.startswith("attention") and int(cost.shape[3]) == int(causal)  # (Sq, Sk, d, causal)
        values = {"B": b, "S": s}
        full = 4 * b * h * s * s * d  # QK^T and PV, the whole square: torch's count, mask or not
        assert evaluate([cost.fwd_flops], values) == [full]
        f, bw = dev.node_time(cost, values, torch.bfloat16)
        peak = dev.peak_flops_lowp
        done = 0.5 if causal else 1.0
        assert f == pytest.approx(done * full / (peak * e.attention(s, d, causal=causal)))
        assert bw == pytest.approx(done * 2.5 * full / (peak * e.attention(s, d, backward=True, causal=causal)))
        times[causal] = (f, bw)
    # causal: half the work at a lower rate: between half and all of the unmasked time
    for i in (0, 1):
        assert 0.5 * times[False][i] < times[True][i] < times[False][i]


def test_a_profile_without_a_curve_prices_as_before_and_writes_no_curve() -> None:
    a100 = DEVICES["a100-80gb"]
    assert a100.efficiency is not None and not a100.efficiency.attn_curve
    assert "attn_curve" not in a100.to_dict()["efficiency"] and "attn_kernel" not in a100.to_dict()["efficiency"]
    # without a curve a causal mask still counts the blocks on and below the diagonal at one rate
    attn = NodeCost(fwd_flops=4e12, bwd_flops=1e13, kind="attention", shape=(SEQ, SEQ, 128, 1), ops=("sdpa",))
    f, _ = a100.node_time(attn, {"B": 1, "S": 128 * 64}, torch.bfloat16)
    assert f == pytest.approx(4e12 * 65 / 128 / (312e12 * a100.efficiency.attention(128 * 64, 128)))


@pytest.mark.parametrize("name", CURVED)
def test_a_profile_with_a_curve_round_trips_through_a_file(name: str, tmp_path: Path) -> None:
    spec = DEVICES[name]
    path = tmp_path / "p.json"
    spec.save(path)
    data = json.loads(path.read_text())
    assert data["efficiency"]["attn_kernel"] == spec.efficiency.attn_kernel  # type: ignore[union-attr]
    assert len(data["efficiency"]["attn_curve"]) == len(spec.efficiency.attn_curve)  # type: ignore[union-attr]
    assert DeviceSpec.load(path) == spec


def test_a_bad_curve_is_refused_with_what_is_wrong() -> None:
    good = DEVICES["h100-sxm-fa2"].to_dict()
    eff = good["efficiency"]
    curve = eff["attn_curve"]

    def load(c: object) -> None:
        DeviceSpec.from_dict({**good, "efficiency": {**eff, "attn_curve": c}})

    with pytest.raises(CostModelError, match="sequence lengths must increase"):
        load([curve[1], curve[0]])
    with pytest.raises(CostModelError, match=r"fractions of the peak in \(0, 1\]"):
        load([[512, 1.2, 0.3, 0.3, 0.3]])
    with pytest.raises(CostModelError, match="faster than seq\\*\\*2"):
        load([[512, 0.01, 0.3, 0.3, 0.3], [1024, 0.5, 0.3, 0.3, 0.3]])
    with pytest.raises(CostModelError, match=r"attn_curve must be a list of \[seq, forward"):
        load([[512, 0.3, 0.3]])
    with pytest.raises(CostModelError, match="attn_kernel must be a string"):
        DeviceSpec.from_dict({**good, "efficiency": {**eff, "attn_kernel": 3}})
    with pytest.raises(CostModelError):
        check_attention_curve([])
    # made in code, the same check
    e = DEVICES["a100-80gb"].efficiency
    assert e is not None
    with pytest.raises(CostModelError, match="sequence lengths must increase"):
        replace(e, attn_curve=((1024.0, 0.3, 0.3, 0.3, 0.3), (512.0, 0.3, 0.3, 0.3, 0.3)))
    assert isinstance(Efficiency.from_dict(eff), Efficiency)
