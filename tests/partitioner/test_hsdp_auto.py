"""Hybrid sharding chosen by the planner (``zero="auto"``: ``partitioner.layout.joint`` lists
zero=3 as HSDP, ``data_parallel.hsdp_shards``): the shard group sizes worth pricing, HSDP
picked where the link between nodes is slow and memory allows it, plain FSDP where that link
is fast or HSDP's larger shards do not fit (each checked against the steps and memory of the
same layouts partitioned explicitly), and HSDP with tensor parallelism where a shard group's
GPUs fit a node. Training a plan picked so: tests/runtime/test_hsdp.py."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import torch

from partitioner import InfeasibleError, PartitionError, partition
from partitioner.data_parallel import hsdp_shards
from partitioner.examples import gpt_example

# 2 nodes x 4 GPUs: 4 replicas of a 2-rank pipeline, pipelines inside nodes (2 replicas per node)
COMMON = dict(n_gpus=8, data_parallel=4, gpus_per_node=4, schedule="1f1b", n_microbatches=2, optimizer="adamw",
              recompute="none")


@pytest.fixture(scope="module")
def gpt() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model, (idx,) = gpt_example(batch=8, seq=8)  # short: the parameters' bytes dominate
    return model, idx


def _peak(plan: Any) -> int:
    return max(st.cost.memory_bytes for st in plan.stages)


def test_hsdp_shards_are_the_replicas_per_node_and_twice_that() -> None:
    assert hsdp_shards(4, 2, 4) == [2]  # (dp, pp) order: 2 replicas of each pipeline rank per node; 4 = dp is FSDP
    assert hsdp_shards(8, 1, 4) == [4]  # 4 per node; 8 would be all of them
    assert hsdp_shards(16, 1, 4) == [4]  # not 8: a shard group is at most a node (partition(fsdp_shard=)'s rule)
    assert hsdp_shards(8, 2, 4) == [2, 4]  # (dp, pp): 2 per node, and 4: half the shards, gathered across two nodes
    assert hsdp_shards(4, 4, 4) == [2]  # one replica per node (a pipeline fills it): 1 is no sharding, 2 spans two
    assert hsdp_shards(4, 1, 8) == []  # one node: plain FSDP's gathers stay inside it already
    assert hsdp_shards(4, 2, None) == [] and hsdp_shards(1, 8, 4) == []
    assert hsdp_shards(8, 1, 8, tp=2) == [4]  # 4 replicas x 2 TP ranks per node


@pytest.mark.parametrize("inter_link,hsdp_wins", [("ethernet-100g", True), ("nvlink4", None)],
                         ids=["slow-inter-link", "fast-inter-link"])
def test_zero_auto_picks_hsdp_only_where_it_is_the_cheaper_layout(gpt: Any, inter_link: str,
                                                                   hsdp_wins: bool | None) -> None:
    """Between nodes on 100 Gb/s Ethernet, plain FSDP's gathers cross the nodes every
    micro-batch while HSDP's stay on NVLink and only the 1/S gradient shards cross: HSDP is
    faster. With NVLink between nodes the two cost about the same (within 1 %: which one is
    ahead turns on how the hidden traffic is charged, ``data_parallel.overlap_cost``), so only
    the rule is checked there: the pick must be the faster of the two explicit plans."""
    model, idx = gpt
    kw = dict(COMMON, inter_link=inter_link)
    fixed = {s: partition(model, example_inputs=(idx,), zero=3, fsdp_shard=s, **kw).plan for s in (None, 2)}
    assert fixed[2].mesh.shard == 2 and fixed[None].mesh.shard == 0
    faster = min(fixed, key=lambda s: fixed[s].prediction.step_time_s)
    steps = {s: p.prediction.step_time_s for s, p in fixed.items()}
    if hsdp_wins is None:
        assert steps[2] == pytest.approx(steps[None], rel=0.01), steps
        hsdp_wins = faster == 2
    assert (faster == 2) == hsdp_wins, steps
    plan = partition(model, example_inputs=(idx,), zero="auto", **kw).plan
    assert plan.mesh.zero == 3 and plan.mesh.shard == fixed[faster].mesh.shard
    assert plan.prediction.step_time_s == pytest.approx(fixed[faster].prediction.step_time_s, rel=1e-9)
    rows = [r for r in plan.rankings["layout"] if r["refused"] is None]
    assert rows[0]["picked"] and ("HSDP 2x2" in rows[0]["label"]) == hsdp_wins, rows[0]
    hsdp = [r for r in rows if "zero=3 HSDP 2x2" in r["label"] and "dp outer" in r["label"]]
    assert len(hsdp) == 1 and hsdp[0]["step_s"] == pytest.approx(fixed[2].prediction.step_time_s, rel=1e-9)
    assert [st.nodes for st in plan.stages] == [st.nodes for st in fixed[faster].stages]


def test_zero_auto_keeps_fsdp_where_hsdp_shards_do_not_fit(gpt: Any) -> None:
    """On the slow link where HSDP would win, a memory limit between the two layouts' peaks:
    HSDP (1/2 shards) does not fit, FSDP (1/4) does, and is picked."""
    model, idx = gpt
    kw = dict(COMMON, inter_link="ethernet-100g")
    peaks = {s: _peak(partition(model, example_inputs=(idx,), zero=3, fsdp_shard=s, **kw).plan) for s in (None, 2)}
    assert peaks[None] < peaks[2], peaks
    limit = (peaks[None] + peaks[2]) // 2
    with pytest.raises(InfeasibleError):
        partition(model, example_inputs=(idx,), zero=3, fsdp_shard=2, memory_limit=limit, **kw)
    plan = partition(model, example_inputs=(idx,), zero="auto", memory_limit=limit, **kw).plan
    assert (plan.mesh.zero, plan.mesh.shard) == (3, 0) and _peak(plan) <= limit
    refused = [r for r in plan.rankings["layout"] if "HSDP 2x2" in r["label"]]
    assert refused and all(r["refused"] for r in refused), refused  # listed, with why


def test_the_search_tries_hsdp_with_tensor_parallelism_where_a_shard_group_fits_a_node() -> None:
    """HSDP x TP runs (tests/runtime/test_hsdp.py): the joint search over T lists HSDP at T=2
    as at T=1, with shard groups whose S x T GPUs fit a node; an explicit one that does not is
    refused naming both."""
    from tests.runtime.test_tensor_parallel import Net, _data

    inputs, _ = _data("net")
    plan = partition(Net(), 8, inputs, device="cpu", link="loopback", data_parallel=4, gpus_per_node=4,
                     inter_link="ethernet-100g", zero="auto", tensor_parallel="auto", n_microbatches=1).plan
    labels = [r["label"] for r in plan.rankings["layout"]]
    assert any(re.match(r"T=1 D=4 P=2 zero=3 HSDP 2x2 ", lb) for lb in labels), labels
    assert any(re.match(r"T=2 D=4 P=1 zero=3 HSDP 2x2 ", lb) for lb in labels), labels  # 2 x 2 GPUs: one node
    assert hsdp_shards(4, 1, 4, tp=2) == [2] and hsdp_shards(4, 1, 4, tp=4) == []  # 2 x 4 GPUs exceed a node
    with pytest.raises(PartitionError, match=r"fsdp_shard=2 x tensor_parallel=4 exceeds gpus_per_node=4"):
        partition(Net(), 8, inputs, device="cpu", link="loopback", data_parallel=2, zero=3, fsdp_shard=2,
                  tensor_parallel=4, gpus_per_node=4)


def test_hsdp_with_tensor_parallelism_is_priced_on_each_tp_rank_share() -> None:
    """HSDP 2x2 x TP2 on 2 nodes of 4: each TP rank's 1/2 of the weights sharded over 2
    replicas (the static bytes of plain FSDP over 2 replicas at T=2), the shard groups inside a
    node and the replication across the nodes, and gathers priced apart from plain FSDP's."""
    from tests.runtime.test_tensor_parallel import Net, _data

    inputs, _ = _data("net")
    kw = dict(device="cpu", link="loopback", zero=3, tensor_parallel=2, n_microbatches=1, optimizer="adamw")
    hybrid, plain = (partition(Net(), 8, inputs, data_parallel=4, fsdp_shard=s, gpus_per_node=4,
                               inter_link="ethernet-100g", **kw).plan for s in (2, None))
    half = partition(Net(), 4, inputs, data_parallel=2, **kw).plan  # FSDP over 2 replicas: HSDP's shards
    assert (hybrid.mesh.tp, hybrid.mesh.shard, plain.mesh.shard) == (2, 2, 0)
    assert not hybrid.mesh.shards_cross_nodes(0) and hybrid.mesh.replication_crosses_nodes(0)
    assert plain.mesh.shards_cross_nodes(0)
    for a, b, c in zip(hybrid.stages, plain.stages, half.stages):
        assert a.cost.static_bytes == c.cost.static_bytes > b.cost.static_bytes
    assert hybrid.mesh.allreduce_s != plain.mesh.allreduce_s


def test_cli_zero_auto_prints_hsdp_in_the_ranking(tmp_path: Any) -> None:
    from tests.tools.helpers import cli

    out = tmp_path / "plan.json"
    done = cli("plan", "partitioner.examples:gpt_example", "--gpus", "4", "--dp", "4", "--zero", "auto",
               "--gpus-per-node", "2", "--inter-link", "ethernet-100g", "--microbatches", "2", "--optimizer", "adamw",
               "-o", str(out))
    assert done.returncode == 0, done.stderr
    ranked = [re.sub(r"^\s+#\d+ ", "", line).split(": predicted")[0] for line in done.stdout.splitlines()
              if re.match(r"\s+#\d+ T=", line)]
    assert "T=1 D=4 P=1 zero=3 HSDP 2x2 m=2 1f1b (2 nodes x 2 GPUs, replicas across them)" in ranked, done.stdout
    picked = "picked T=1 D=4 P=1 zero=3 HSDP 2x2 " in done.stdout
    assert json.loads(out.read_text())["mesh"].get("shard", 0) == (2 if picked else 0), done.stdout
    # the summary's data-parallel line names what was picked
    assert ("HSDP (zero=3, 2 x 2-way shards)" if picked else "FSDP (zero=3)") in done.stdout, done.stdout


@pytest.mark.parametrize("inter_link,hsdp_wins", [("ethernet-100g", True), ("nvlink4", None)],
                         ids=["slow-inter-link", "fast-inter-link"])
def test_zero3_with_replicas_left_open_also_tries_hsdp(gpt: Any, inter_link: str, hsdp_wins: bool | None) -> None:
    """``zero=3`` asked for, ``data_parallel="auto"``: the replica search solves HSDP where the
    replicas span nodes (the group sizes ``zero="auto"`` tries), beside plain FSDP, and keeps the
    faster: the step of the explicit plan it equals, its groups named in the ranking. Over a slow
    link between nodes HSDP is the faster; with NVLink between them the two are within 1 % (which
    wins there follows small terms, so only the rule is checked)."""
    model, idx = gpt
    kw = {k: v for k, v in COMMON.items() if k != "data_parallel"}
    kw.update(inter_link=inter_link, zero=3)
    fixed = {s: partition(model, example_inputs=(idx,), data_parallel=4, fsdp_shard=s, **kw).plan for s in (None, 2)}
    faster = min(fixed, key=lambda s: fixed[s].prediction.step_time_s)
    steps = {s: p.prediction.step_time_s for s, p in fixed.items()}
    if hsdp_wins is None:
        assert max(steps.values()) < 1.01 * min(steps.values()), steps
    else:
        assert (faster == 2) == hsdp_wins, steps
    plan = partition(model, example_inputs=(idx,), data_parallel="auto", **kw).plan
    rows = [r for r in plan.rankings["dp"] if r["refused"] is None]
    hsdp = [r for r in rows if r["label"].startswith("D=4 P=2 zero=3 HSDP 2x2 ")]
    plain = [r for r in rows if re.match(r"D=4 P=2 m=", r["label"])]
    assert hsdp and plain, [r["label"] for r in rows]  # both solved at D=4 (each placement), whichever wins
    for got, want in ((min(hsdp, key=lambda r: r["step_s"]), fixed[2]),
                      (min(plain, key=lambda r: r["step_s"]), fixed[None])):
        assert got["step_s"] == pytest.approx(want.prediction.step_time_s, rel=1e-9), got
    # the pick is the fastest row, and no slower than the faster explicit plan at D=4
    assert plan.prediction.step_time_s == pytest.approx(min(r["step_s"] for r in rows), rel=1e-9)
    assert plan.prediction.step_time_s <= fixed[faster].prediction.step_time_s * (1 + 1e-9)
    assert plan.mesh.zero == 3 and (plan.mesh.shard > 0) == ("HSDP" in rows[0]["label"])


def test_zero3_with_tensor_parallelism_left_open_also_tries_hsdp() -> None:
    """``zero=3`` and the replicas given, the tensor-parallel degree left open: each degree's
    placement ranking holds HSDP where its shard groups fit a node (at T=1 and T=2 here; at
    T=4 a 2 x 4 group would exceed a node of 4, so none), and the pick is the fastest listed.
    An explicit ``fsdp_shard`` or no degree left open keeps the one layout asked for."""
    from tests.runtime.test_tensor_parallel import Net, _data

    inputs, _ = _data("net")
    kw = dict(device="cpu", link="loopback", data_parallel=4, gpus_per_node=4, inter_link="ethernet-100g", zero=3,
              n_microbatches=1)
    plan = partition(Net(), 8, inputs, tensor_parallel="auto", **kw).plan
    picked = [r for r in plan.rankings["placement"] if r["refused"] is None] if "placement" in plan.rankings else []
    assert any("HSDP 2x2" in r["label"] for r in picked), plan.rankings
    hybrid = partition(Net(), 8, inputs, tensor_parallel=plan.mesh.tp, fsdp_shard=2, **kw).plan
    plain = partition(Net(), 8, inputs, tensor_parallel=plan.mesh.tp, **kw).plan
    assert plain.mesh.shard == 0  # both given: plain FSDP, as asked
    want = min(hybrid, plain, key=lambda p: p.prediction.step_time_s)
    assert (plan.mesh.shard or 0) == (want.mesh.shard or 0)
    assert plan.prediction.step_time_s == pytest.approx(want.prediction.step_time_s, rel=1e-9)
