"""Two prices behind the published H100 rows: compute slowed by the collectives it hides
(``data_parallel.overlap_cost``) and the 96 GB HBM2e H100 torchtitan ran on (``h100-hbm2e-fa2``)."""

from __future__ import annotations

import inspect
import json

import pytest

from partitioner import data_parallel
from partitioner.cost_models import devices
from partitioner.cost_models.devices import DEVICES, DeviceSpec
from partitioner.data_parallel import OVERLAP_SLOWDOWN, Window, allgather_s, overlap_cost, price_fsdp, reduce_scatter_s


def test_the_slowdown_is_the_cited_mean() -> None:
    assert OVERLAP_SLOWDOWN == 0.189
    source = inspect.getsource(data_parallel)
    assert "2507.03114" in source and "18.9 %" in source  # the paper and its figure, where the constant is


@pytest.mark.parametrize("compute", [1e-3, 0.5, 3.0])
def test_overlap_cost_shape(compute: float) -> None:
    """0 without traffic; the excess over compute only when the slowdown is 0; otherwise never
    less than that excess, rising with the traffic, at most slowdown x compute more than it."""
    assert overlap_cost(0.0, compute) == 0.0
    comms = [compute * f for f in (0.01, 0.1, 0.5, 0.9, 1.0, 1.2, 2.0, 10.0)]
    for c in comms:
        assert overlap_cost(c, compute, 0.0) == pytest.approx(max(0.0, c - compute))
        got = overlap_cost(c, compute)
        assert max(0.0, c - compute) <= got <= max(0.0, c - compute) + OVERLAP_SLOWDOWN * compute + 1e-15
    costs = [overlap_cost(c, compute) for c in comms]
    assert costs == sorted(costs) and costs[0] > 0
    # short traffic: the compute it overlaps stretches by the slowdown while the traffic runs
    small = compute * 0.01
    assert overlap_cost(small, compute) == pytest.approx(small * OVERLAP_SLOWDOWN / (1 + OVERLAP_SLOWDOWN))
    # traffic far longer than the compute: all of the compute is slowed and hidden, the excess shows
    assert overlap_cost(10 * compute, compute) == pytest.approx(9 * compute)
    assert overlap_cost(0.3, 0.0) == 0.3  # nothing to hide behind


def test_overlap_cost_refuses_a_negative_slowdown() -> None:
    with pytest.raises(ValueError, match="slowdown is a fraction of the compute's time, at least 0, got -0.1"):
        overlap_cost(1.0, 1.0, -0.1)


def test_fsdp_step_grows_by_the_slowdown_of_the_hidden_traffic() -> None:
    """Per unit, m micro-batches whose compute hides their gathers and reduce-scatters: the step
    is the pipeline's + m x the stretch + the last reduce-scatter; with slowdown 0 the stretch is gone."""
    from partitioner.plan import Mesh

    link = devices.LINKS["nvlink4"]
    mesh = Mesh(8, 1, ("dp", "pp"), 0)
    nbytes, m = 512 * 2**20, 3
    per_mb = 2 * allgather_s(nbytes, 8, link) + reduce_scatter_s(nbytes, 8, link)
    w = Window(1.0, 2.0, (nbytes,), fwd=0.2, bwd=0.4, m=m)
    assert per_mb < 0.6  # hidden
    rs = reduce_scatter_s(nbytes, 8, link)
    _, step = price_fsdp(mesh, link, link, [[w]], pipeline_step=2.0)
    _, ideal = price_fsdp(mesh, link, link, [[w]], pipeline_step=2.0, slowdown=0.0)
    assert ideal == pytest.approx(2.0 + rs)
    assert step == pytest.approx(2.0 + m * per_mb * OVERLAP_SLOWDOWN / (1 + OVERLAP_SLOWDOWN) + rs)


def test_hbm2e_profile_takes_the_cited_figures() -> None:
    """2.4 TB/s and 96 GB from torchtitan's benchmark page; the peak the middle of the bracket it
    gives (between H100 SXM, 989, and H100 NVL, 1671 / 2 dense BF16 TFLOP/s); FlashAttention-2."""
    d = DEVICES["h100-hbm2e-fa2"]
    sxm, fa2 = DEVICES["h100-sxm"], DEVICES["h100-sxm-fa2"]
    assert d.mem_bandwidth == 2.4e12 and d.memory_bytes == 96 * 10**9
    nvl = 1671e12 / 2
    assert nvl < d.peak_flops_lowp < sxm.peak_flops_lowp
    assert d.peak_flops_lowp == pytest.approx((nvl + sxm.peak_flops_lowp) / 2, rel=1e-3)
    assert 60e12 < d.peak_flops < sxm.peak_flops  # FP32: NVL 60, SXM 67
    assert d.efficiency == fa2.efficiency and d.efficiency is not None and d.efficiency.attn_kernel == "fa2"
    source = inspect.getsource(devices)
    for cited in ("[TT-HW]", "96GB HBM2e with 2.4 TB/sec", "between SXM and NVL", "[NVL-DS]", "1,671"):
        assert cited in source
    assert DeviceSpec.from_dict(json.loads(json.dumps(d.to_dict()))) == d


def test_hbm2e_profile_prices_memory_bound_work_by_its_bandwidth() -> None:
    """A large memory-bound op costs 3.35 / 2.4 as long as on H100 SXM (the same fraction of
    the bandwidth; the launch floor is negligible at 4 GiB)."""
    import torch

    from partitioner.cost_models.cost import NodeCost

    d, sxm = DEVICES["h100-hbm2e-fa2"], DEVICES["h100-sxm-fa2"]
    mem = NodeCost(fwd_bytes_moved=4 * 2**30)
    f_d, b_d = d.node_time(mem, {}, torch.bfloat16)
    f_s, b_s = sxm.node_time(mem, {}, torch.bfloat16)
    assert f_d / f_s == pytest.approx(3.35 / 2.4, rel=0.01) and b_d / b_s == pytest.approx(3.35 / 2.4, rel=0.01)
