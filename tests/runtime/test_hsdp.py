"""Hybrid sharding (HSDP, ``partition(zero=3, fsdp_shard=S)``): FSDP2 on a 2-D
``(replicate, shard)`` mesh inside the pipeline ranks. On gloo, 4 ranks: one pipeline rank x
HSDP 2 replicate x 2 shard (both dimensions real), 2 pipeline ranks x HSDP 2 replicate x 1
shard (the GPT fixture's embedding tied across the pipeline ranks; 1F1B per unit, zb-h1 per step) train
like one process, and on 8 ranks 2 pipeline ranks x HSDP 2 x 2
(AdamW, gradient clipping: the norm is ``clip_grad_norm_``'s on the whole model, each shard
counted once however many replicas hold it), and the job's DCP checkpoint is the unsharded
model's and loads back into the shards; a plan ``zero="auto"`` picks as HSDP 2x2 trains so too, and
so does PP1 x HSDP 2x1 x TP2 (a ``(dp_replicate, dp_shard, tp)`` mesh); every member of a shard,
replicate or pipeline group issues its collectives in the same order. The pricing by formula (shards over S, gathers and
reduce-scatters over S inside a node, the 1/S shard all-reduced across nodes), the plan's
``mesh.shard`` (old plans unchanged), and the refusals."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
import torch

from partitioner import PartitionError, partition
from partitioner.runtime.launch import spawn
from tests.fixtures.models import FIXTURES
from tests.runtime.helpers import data
from tests.runtime.test_fsdp import BATCH, CLIP, OPTIMIZERS, RTOL, STEPS, _reference

TIMEOUT_S = 120.0


def _partition(n_gpus: int, dp: int, shard: int | None, **kw: Any) -> tuple[torch.nn.Module, Any]:
    torch.manual_seed(0)
    model = FIXTURES["gpt"].build()
    x, _, _ = data("gpt", BATCH)
    pipe = partition(model, n_gpus=n_gpus, data_parallel=dp, example_inputs=(x,), n_microbatches=2, zero=3,
                     fsdp_shard=shard, optimizer="adamw", **kw)
    return model, pipe


def _train(rank: int, world: int, pipe: Any, path: str, schedule: str) -> dict[str, Any]:
    from torch.distributed.tensor import DTensor

    x, y, loss_fn = data("gpt", BATCH)
    stage = pipe.build_stage(rank, "cpu")
    placed = {n: ([str(pl) for pl in p.placements], tuple(p.device_mesh.shape), tuple(p.to_local().shape))
              for n, p in stage.named_parameters() if isinstance(p, DTensor)}
    cls, kw = OPTIMIZERS["adamw"]
    opt = stage.optimizer(cls, **kw)
    runner = stage.runner(schedule, loss_fn=loss_fn)
    losses, norms = [], []
    for _ in range(STEPS):
        stage.zero_grad()
        losses.append(runner.step(x if stage.is_first else None, target=y if stage.is_last else None,
                                  loss_on_every_rank=True).item())
        norms.append(stage.clip_grad_norm_(CLIP).item())
        opt.step()
    params = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
              for n, p in stage.named_parameters(remove_duplicate=False)}
    stage.save_checkpoint(path)  # one DCP save of the job: each shard once, though dp/S replicas hold it
    with torch.no_grad():  # and back into the (Replicate, Shard) parameters: each rank reads its slice
        for p in stage.parameters():
            p.zero_()
    stage.load_checkpoint(path)
    reloaded = all(torch.equal(p.full_tensor(), params[n]) for n, p in stage.named_parameters())
    return {"dp": stage.dp_rank, "pp": stage.pp_rank, "placed": placed, "losses": losses, "norms": norms,
            "params": params, "n_params": len(list(stage.parameters())), "mode": stage.grad_sync.mode,
            "reloaded": reloaded}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("n_gpus,dp,shard,schedule", [(4, 4, 2, "1f1b"), (4, 2, 1, "1f1b"), (4, 2, 1, "zb-h1"),
                                                      (8, 4, 2, "1f1b")],
                         ids=["pp1-hsdp2x2", "pp2-hsdp2x1", "pp2-hsdp2x1-zb-h1", "pp2-hsdp2x2-8-ranks"])
def test_hsdp_trains_like_one_process(n_gpus: int, dp: int, shard: int, schedule: str, tmp_path: Any) -> None:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    model, pipe = _partition(n_gpus, dp, shard, schedule=schedule,
                             **({"pinned_cuts": ["transformer.h.2"]} if dp < n_gpus else {}))
    assert (pipe.plan.mesh.dp, pipe.plan.mesh.shard, pipe.plan.pp_ranks) == (dp, shard, n_gpus // dp)
    want_losses, want_norms, want = _reference(model, "adamw", True)
    assert min(want_norms) > CLIP, "clipping should change every step"
    results = spawn(_train, n_gpus, pipe, str(tmp_path / "dcp"), schedule, timeout_s=TIMEOUT_S)
    names = dict(model.named_parameters(remove_duplicate=False))
    for r in results:
        assert r["mode"] == ("step" if schedule == "zb-h1" else "unit")  # per step: reduced in FsdpSync.finish
        assert r["reloaded"]  # the checkpoint loads back into the hybrid shards exactly
        assert r["placed"] and len(r["placed"]) == r["n_params"]  # every parameter: a DTensor on the 2-D mesh
        for n, (placements, mesh, local) in r["placed"].items():
            assert placements == ["R", "S(0)"] and mesh == (dp // shard, shard), n
            assert local[0] == -(-names[n].shape[0] // shard), n  # 1/S of dim 0, replicated dp/S times
        assert r["losses"] == pytest.approx(want_losses, rel=1e-5)
        assert r["norms"] == pytest.approx(want_norms, rel=1e-5)  # each shard once, not once per replica
        for n, v in r["params"].items():
            torch.testing.assert_close(v, want[n], rtol=RTOL, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
    assert set().union(*(r["params"] for r in results)) == set(want)
    dcp_to_torch_save(str(tmp_path / "dcp"), str(tmp_path / "whole.pt"))  # the unsharded model's checkpoint
    saved = {k.removeprefix("model."): v for k, v in torch.load(tmp_path / "whole.pt", weights_only=True).items()}
    assert {n for n, _ in model.named_parameters()} <= set(saved) <= set(want) | set(dict(model.named_buffers()))
    for n in set(saved) & set(want):
        torch.testing.assert_close(saved[n], want[n], rtol=RTOL, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.timeout(240)
def test_a_plan_the_search_picks_as_hsdp_trains_like_one_process(tmp_path: Any) -> None:
    """``zero="auto"`` on 2 simulated nodes x 2 GPUs with 100 Gb/s Ethernet between them picks
    HSDP 2x2 (``partitioner.layout.joint``; the choice itself: tests/partitioner/test_hsdp_auto.py),
    and that plan, as emitted, trains on 4 gloo ranks like one process."""
    torch.manual_seed(0)
    model = FIXTURES["gpt"].build()
    x, _, _ = data("gpt", BATCH)
    pipe = partition(model, n_gpus=4, data_parallel=4, example_inputs=(x,), n_microbatches=2, zero="auto",
                     optimizer="adamw", gpus_per_node=2, inter_link="ethernet-100g")
    assert (pipe.plan.mesh.zero, pipe.plan.mesh.dp, pipe.plan.mesh.shard) == (3, 4, 2)
    picked = pipe.plan.rankings["layout"][0]
    assert picked["picked"] and "zero=3 HSDP 2x2" in picked["label"], picked
    want_losses, want_norms, want = _reference(model, "adamw", True)
    results = spawn(_train, 4, pipe, str(tmp_path / "dcp"), pipe.plan.prediction.schedule, timeout_s=TIMEOUT_S)
    for r in results:
        assert {tuple(pl) for pl, _, _ in r["placed"].values()} == {("R", "S(0)")}  # HSDP, as the plan says
        assert r["losses"] == pytest.approx(want_losses, rel=1e-5)
        assert r["norms"] == pytest.approx(want_norms, rel=1e-5)
        for n, v in r["params"].items():
            torch.testing.assert_close(v, want[n], rtol=RTOL, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


# -- pricing -----------------------------------------------------------------------------------

def test_hsdp_prices_shards_over_s_and_the_replicas_all_reduce_across_nodes() -> None:
    from partitioner.cost_models.devices import LINKS
    from partitioner.data_parallel import (
        Window,
        ZeroShard,
        allgather_s,
        price_fsdp,
        reduce_scatter_s,
        ring_allreduce_s,
    )
    from partitioner.plan import Mesh

    link, inter = LINKS["nvlink4"], LINKS["ib-ndr-400"]
    hsdp = Mesh(4, 1, ("dp", "pp"), 2, zero=3, shard=2)  # 2 nodes x 2 GPUs: a shard group per node
    assert not hsdp.shards_cross_nodes(0) and hsdp.replication_crosses_nodes(0)
    nbytes, m = 8 * 2**20, 4
    fast = Window(1.0, 1.1, (nbytes,), fwd=1e-6, bwd=2e-6, m=m)  # compute far shorter than the traffic
    ag, rs = allgather_s(nbytes, 2, link), reduce_scatter_s(nbytes, 2, link)
    ar = ring_allreduce_s(nbytes / 2, 2, inter)  # the 1/S gradient shard over the dp/S = 2 replicas, between nodes
    times, step = price_fsdp(hsdp, link, inter, [[fast]], pipeline_step=1.1)
    assert times == [pytest.approx(m * (2 * ag + rs + ar))]
    assert step == pytest.approx(1.1 + m * (2 * ag + rs + ar - 3e-6) + rs + ar)  # the excess, then the tail
    split = dataclasses.replace(fast, split=True)  # once per step: one gather, one reduction
    assert price_fsdp(hsdp, link, inter, [[split]], 1.1)[0] == [pytest.approx(ag + rs + ar)]
    flat = dataclasses.replace(hsdp, shard=0)  # plain FSDP over the 4 replicas: every gather crosses the nodes,
    assert flat.shards_cross_nodes(0)  # its ring over the 2 NICs of each node's 2 GPUs
    two_nics = dataclasses.replace(inter, bandwidth=2 * inter.bandwidth)
    want = m * (2 * allgather_s(nbytes, 4, two_nics) + reduce_scatter_s(nbytes, 4, two_nics))
    assert price_fsdp(flat, link, inter, [[fast]], 1.1)[0] == [pytest.approx(want)]
    assert times[0] < want
    # memory: the shards are 1/S, not 1/dp (fp32 AdamW: 16 bytes per element); what is gathered is the same
    uses, numel = [(1,), (2,), (3,)], {1: 1000, 2: 400, 3: 400}
    plain = ZeroShard(uses, numel, 4, 8, 3, {2: "h.0", 3: "h.1"})
    hybrid = dataclasses.replace(plain, shard=2)
    gathered = 4 * (1000 + 800) + 4 * 1000
    assert plain.fsdp_static(0, 3, 4) == 1800 * 16 // 4 + gathered
    assert hybrid.fsdp_static(0, 3, 4) == 1800 * 16 // 2 + gathered == plain.fsdp_static(0, 3, 2)
    assert hybrid.additive([16_000, 6_400, 6_400], 4) == [8000, 3200, 3200]


def test_partition_records_hsdp_in_the_mesh_and_prices_it() -> None:
    from partitioner.plan import load_plan

    plans = {shard: _partition(8, 4, shard, pinned_cuts=["transformer.h.2"], gpus_per_node=4)[1].plan
             for shard in (None, 2)}
    plain, hybrid = plans[None], plans[2]
    assert hybrid.mesh.shard == 2 and plain.mesh.shard == 0
    assert "shard" not in json.loads(plain.to_json())["mesh"]  # absent at its default: old plans read the same
    assert json.loads(hybrid.to_json())["mesh"]["shard"] == 2
    assert load_plan(hybrid.to_json()).mesh.shard == 2
    assert load_plan(plain.to_json()).to_json() == plain.to_json()
    half = _partition(4, 2, None, pinned_cuts=["transformer.h.2"])[1].plan  # plain FSDP over 2: the same shards
    for a, b, c in zip(hybrid.stages, plain.stages, half.stages):
        assert a.cost.static_bytes == c.cost.static_bytes > b.cost.static_bytes  # 1/2 of the state, not 1/4
    assert hybrid.mesh.allreduce_s != plain.mesh.allreduce_s
    bad = json.loads(hybrid.to_json())
    bad["mesh"]["shard"] = 3
    with pytest.raises(Exception, match=r"mesh.shard is 3 .* divides dp"):
        load_plan(json.dumps(bad))


@pytest.mark.parametrize("kw,match", [
    ({"data_parallel": 4, "fsdp_shard": 3}, r"fsdp_shard=3 does not divide data_parallel=4"),
    ({"data_parallel": 4, "fsdp_shard": 4, "gpus_per_node": 2}, r"fsdp_shard=4 exceeds gpus_per_node=2: .* one node"),
    ({"data_parallel": 4, "fsdp_shard": 2, "zero": 1}, r"hybrid sharding of zero=3"),
    ({"data_parallel": "auto", "fsdp_shard": 2}, r"needs data_parallel as a count"),
    ({"data_parallel": 4, "fsdp_shard": 0}, r"fsdp_shard must be an int >= 1"),
])
def test_hsdp_refusals(kw: dict[str, Any], match: str) -> None:
    x, _, _ = data("gpt", BATCH)
    args = {"zero": 3, **kw}
    with pytest.raises(PartitionError, match=match):
        partition(FIXTURES["gpt"].build(), n_gpus=4, example_inputs=(x,), **args)


def test_cli_plan_takes_fsdp_shard(tmp_path: Any) -> None:
    from tests.tools.helpers import cli

    out = tmp_path / "plan.json"
    done = cli("plan", "tests.tools.tiny_models:mlp", "--gpus", "4", "--dp", "4", "--zero", "3",
               "--fsdp-shard", "2", "--microbatches", "2", "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text())["mesh"]["shard"] == 2
    bad = cli("plan", "tests.tools.tiny_models:mlp", "--gpus", "4", "--dp", "4", "--zero", "3",
              "--fsdp-shard", "3", "-o", str(tmp_path / "b.json"))
    assert bad.returncode != 0 and "--fsdp-shard 3 does not divide --dp 4" in bad.stderr, bad.stderr


def _net_hsdp_tp2(n_gpus: int, *, dp: int, shard: int, m: int) -> tuple[torch.nn.Module, dict[str, torch.Tensor], Any]:
    """test_tensor_parallel's Net fixture (seed 0), its initial state, and a one-stage plan of it
    as HSDP (``dp`` replicas sharded in groups of ``shard``) x TP2 on ``n_gpus`` ranks."""
    from tests.runtime.test_tensor_parallel import Net, _data

    torch.manual_seed(0)
    model = Net()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    inputs, _ = _data("net")
    pipe = partition(model, n_gpus, inputs, device="cpu", link="loopback", data_parallel=dp, zero=3,
                     fsdp_shard=shard, tensor_parallel=2, n_microbatches=m)
    return model, init, pipe


@pytest.mark.timeout(240)
def test_hsdp_with_tensor_parallelism_trains_like_one_process() -> None:
    """PP1 x HSDP 2x1 x TP2 on 4 gloo ranks: the job's mesh is (dp_replicate, dp_shard, tp)
    (``runtime.stage.job_mesh``, as torchtitan composes HSDP with TP), FSDP2 shards the TP
    DTensors over the 2-D (dp_replicate, dp_shard) mesh, and the run (SGD, clipping) equals one
    process on the whole batch."""
    from tests.runtime.test_three_d import _check
    from tests.runtime.test_three_d import _train as train_3d

    model, init, pipe = _net_hsdp_tp2(4, dp=2, shard=1, m=2)
    assert (pipe.plan.mesh.dp, pipe.plan.mesh.shard, pipe.plan.mesh.tp, pipe.plan.pp_ranks) == (2, 1, 2, 1)
    results = spawn(train_3d, 4, pipe, timeout_s=TIMEOUT_S)
    _check(model, init, results, 1)
    assert {r["sync"] for r in results} == {"FsdpSync"}
    meshes = results[0]["meshes"]  # name -> (mesh dims, placements, local shape)
    assert {m[0] for m in meshes.values()} == {("dp_replicate", "dp_shard", "tp")}, meshes
    assert meshes["blocks.1.o.weight"][1][0] == "Replicate()"  # replicated over dp_replicate: HSDP
    assert meshes["blocks.1.o.weight"][2] == (32, 16)  # the row linear's TP half, whole over one shard


def _train_3d_and_reload(rank: int, world: int, pipe: Any, path: str) -> dict[str, Any]:
    """test_three_d's run (SGD, clipping) on the Net fixture, then the job's DCP checkpoint
    saved, the parameters zeroed and loaded back: whether each came back exactly."""
    import torch.nn.functional as F

    from partitioner.runtime.tensor_parallel import full_state
    from tests.runtime.helpers import dtensor_meshes, train_clipped
    from tests.runtime.test_tensor_parallel import _data
    from tests.runtime.test_three_d import LR, MAX_NORM, STEPS

    inputs, y = _data("net")
    stage = pipe.build_stage(rank, "cpu")
    losses, norms = train_clipped(stage, inputs, y, F.mse_loss, steps=STEPS, lr=LR, max_norm=MAX_NORM)
    meshes = dtensor_meshes(stage)
    params = full_state(stage.named_parameters())
    stage.save_checkpoint(path)
    with torch.no_grad():
        for p in stage.parameters():
            p.zero_()
    stage.load_checkpoint(path)
    reloaded = all(torch.equal(v, params[n]) for n, v in full_state(stage.named_parameters()).items())
    return {"dp": stage.dp_rank, "tp": stage.tp_rank, "losses": losses, "norms": norms, "meshes": meshes,
            "params": params, "reloaded": reloaded}


@pytest.mark.timeout(300)
def test_hsdp2x2_tp2_eight_ranks(tmp_path: Any) -> None:
    """8 ranks: HSDP 2 replicate x 2 shard x TP2 of a one-stage pipeline (both data-parallel
    dimensions real) trains like one process, and its checkpoint loads back into the 3-D shards."""
    from tests.runtime.test_three_d import ATOL, _reference
    from tests.runtime.test_three_d import RTOL as RTOL_3D

    model, init, pipe = _net_hsdp_tp2(8, dp=4, shard=2, m=1)
    assert (pipe.plan.mesh.dp, pipe.plan.mesh.shard, pipe.plan.mesh.tp) == (4, 2, 2)
    results = spawn(_train_3d_and_reload, 8, pipe, str(tmp_path / "dcp"), timeout_s=TIMEOUT_S * 2)
    ref = _reference(model, init)
    assert [(r["dp"], r["tp"]) for r in results] == [(d, t) for d in range(4) for t in range(2)]
    for r in results:
        assert r["reloaded"]
        assert r["meshes"]["blocks.1.o.weight"] == (("dp_replicate", "dp_shard", "tp"),
                                                    ("Replicate()", "Shard(dim=0)", "Shard(dim=1)"), (16, 16))
        assert r["losses"] == pytest.approx(ref.losses, rel=RTOL_3D)
        assert r["norms"] == pytest.approx(ref.norms, rel=RTOL_3D)
        for n, v in r["params"].items():
            torch.testing.assert_close(v, ref.params[n], rtol=RTOL_3D, atol=ATOL, msg=lambda m, n=n: f"{n}: {m}")
    assert set().union(*(r["params"] for r in results)) == set(ref.params)


def _train_recording(rank: int, world: int, pipe: Any, path: str, schedule: str) -> dict[str, Any]:
    """``_train`` with every ``all_gather_single`` / ``reduce_scatter_single`` / ``all_reduce``
    this rank issues recorded in order (FSDP2 calls them through ``torch.distributed``): the
    group's ranks and the tensors' sizes."""
    import torch.distributed as dist

    calls: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []

    def recording(name: str) -> Any:
        fn = getattr(dist, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            group = kwargs.get("group", next((a for a in args if isinstance(a, dist.ProcessGroup)), None))
            ranks = tuple(dist.get_process_group_ranks(group)) if group is not None else tuple(range(world))
            calls.append((name, ranks, tuple(a.numel() for a in args if isinstance(a, torch.Tensor))))
            return fn(*args, **kwargs)
        return call

    for name in ("all_gather_single", "reduce_scatter_single", "all_reduce"):
        setattr(dist, name, recording(name))  # this rank's process only (spawn forks one per rank)
    out = _train(rank, world, pipe, path, schedule)
    out["calls"] = calls
    return out


@pytest.mark.timeout(240)
@pytest.mark.parametrize("schedule", ["1f1b", "zb-h1"])
def test_every_member_of_a_group_issues_its_fsdp_collectives_in_the_same_order(schedule: str, tmp_path: Any) -> None:
    """2 pipeline ranks x HSDP 2x2 on 8 ranks (the GPT fixture's embedding tied across the
    pipeline ranks), per unit (1F1B) and per step (zb-h1): the collectives each rank issues on
    each of its groups (dp_shard: gathers and reduce-scatters; dp_replicate: all-reduces of the
    gradient shards; the pipeline's, for the tie; the job's) are, in order, those of every other
    member of that group (docs/ARCHITECTURE.md, "Data parallelism"), so NCCL, which matches a
    communicator's collectives by issue order, pairs them as gloo did here."""
    _, pipe = _partition(8, 4, 2, schedule=schedule, pinned_cuts=["transformer.h.2"])
    results = spawn(_train_recording, 8, pipe, str(tmp_path / "dcp"), schedule, timeout_s=TIMEOUT_S)
    per_group: dict[tuple[int, ...], dict[int, list[tuple[str, tuple[int, ...]]]]] = {}
    for rank, r in enumerate(results):
        for name, ranks, sizes in r["calls"]:
            assert rank in ranks
            per_group.setdefault(ranks, {}).setdefault(rank, []).append((name, sizes))
    # rank = d * pp + p, replica d = r * 2 + s: pipeline rank p's shard groups and replicate groups
    shard = [(p + 4 * r, p + 4 * r + 2) for p in range(2) for r in range(2)]
    replicate = [(p + 2 * s, p + 2 * s + 4) for p in range(2) for s in range(2)]
    for ranks, kinds in [(g, {"all_gather_single", "reduce_scatter_single"}) for g in shard] + [
            (g, {"all_reduce"}) for g in replicate]:
        assert ranks in per_group and kinds <= {name for name, _ in per_group[ranks][ranks[0]]}, (ranks, kinds)
    for ranks, seqs in per_group.items():
        assert set(seqs) == set(ranks), (ranks, sorted(seqs))  # every member took part
        first = seqs[ranks[0]]
        for rank, seq in seqs.items():
            assert seq == first, f"group {ranks}: rank {rank} issues {seq[:8]}..., rank {ranks[0]} {first[:8]}..."
