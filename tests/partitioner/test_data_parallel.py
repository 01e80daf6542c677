"""Pipeline x data parallelism in the planner: the mesh in the plan, the replicas' all-reduce
priced by the ring formula from each stage's own parameters and overlapped with each stage's
final backward, ZeRO-1's memory, the automatic degree and placement, and the refusals."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from partitioner import PartitionError, load_plan, partition
from partitioner.cost_models.devices import LINKS
from partitioner.data_parallel import (
    BUCKET_BYTES,
    Window,
    allgather_s,
    pack,
    price_replicas,
    reduction_end,
    reduction_windows,
    ring_allreduce_s,
    ring_link,
)
from partitioner.examples import gpt_example
from partitioner.plan import PlanError
from partitioner.schedule import build_schedule
from tests.tools.helpers import cli


@pytest.fixture(scope="module")
def gpt() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model, (idx,) = gpt_example(batch=8, seq=32)
    return model, idx


def _trainable(model: torch.nn.Module, names: tuple[str, ...]) -> int:
    by_name = dict(model.named_parameters(remove_duplicate=False))
    return sum(t.numel() for t in {id(by_name[n]): by_name[n] for n in names}.values() if t.requires_grad)


def test_each_replica_runs_its_share_and_the_plan_records_the_mesh(gpt) -> None:  # type: ignore[no-untyped-def]
    model, idx = gpt
    plan = partition(model, n_gpus=4, data_parallel=2, example_inputs=(idx,), n_microbatches=2).plan
    assert plan.options["n_gpus"] == 4 and plan.options["data_parallel"] == 2
    assert (plan.mesh.dp, plan.mesh.pp, plan.pp_ranks, plan.n_stages) == (2, 2, 2, 2)
    assert plan.mesh.dims == ("dp", "pp") and {st.rank for st in plan.stages} == {0, 1}
    assert plan.symbols["B"] == 8 and plan.prediction.microbatch_size == 2  # 8 / 2 replicas / 2 micro-batches
    assert [plan.mesh.coords(r) for r in range(4)] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    text = plan.to_json()
    assert load_plan(text).to_json() == text
    assert load_plan(text).apply(model).plan.to_json() == text


def test_the_all_reduce_is_the_ring_formula_over_each_stages_parameters(gpt) -> None:  # type: ignore[no-untyped-def]
    model, idx = gpt
    link = LINKS["nvlink4"]
    for zero in (0, 1):
        plan = partition(model, n_gpus=8, data_parallel=4, example_inputs=(idx,), n_microbatches=2, zero=zero).plan
        for st in plan.stages:  # one stage per rank here; fp32: 4-byte gradients
            grad = _trainable(model, st.parameters) * 4
            want = ring_allreduce_s(grad, 4, link) + (allgather_s(grad, 4, link) if zero else 0.0)
            assert want > 0 and plan.mesh.allreduce_s[st.rank] == pytest.approx(want, rel=1e-12)
        assert ring_allreduce_s(4e9, 4, link) == pytest.approx(  # each step at NCCL's ring bus bandwidth
            2 * 3 * (link.latency + 1e9 / (link.bandwidth * link.collective)))
        # rank r's all-reduce overlaps its final backward: the step waits only for what sticks out
        assert 0 <= plan.mesh.exposed_s <= max(plan.mesh.allreduce_s) + 1e-15


def test_zero_1_keeps_one_replicas_share_of_the_optimizer_state(gpt) -> None:  # type: ignore[no-untyped-def]
    model, idx = gpt
    kw = dict(n_gpus=4, data_parallel=2, example_inputs=(idx,), n_microbatches=2, pinned_cuts=["transformer.h.2"],
              optimizer="adam", precision="fp32")
    plain, sharded = partition(model, **kw).plan, partition(model, zero=1, **kw).plan
    assert sharded.mesh.zero == 1 and sharded.options["zero"] == 1
    for a, b in zip(plain.stages, sharded.stages):
        state = _trainable(model, a.parameters) * 8  # Adam in fp32: two 4-byte moments per parameter
        assert a.cost.static_bytes - b.cost.static_bytes == state - -(-state // 2)


def test_auto_picks_the_fastest_degree_each_candidate_as_planned_alone(gpt) -> None:  # type: ignore[no-untyped-def]
    model, idx = gpt
    auto = partition(model, n_gpus=4, data_parallel="auto", example_inputs=(idx,)).plan
    ranked = [n for n in auto.notes if n.startswith("dp: #")]
    assert len(ranked) == 3  # D = 1, 2, 4
    steps = {}
    for d in (1, 2, 4):
        alone = partition(model, n_gpus=4, data_parallel=d, example_inputs=(idx,)).plan
        steps[d] = alone.prediction.step_time_s
        line = next(n for n in ranked if f" D={d} " in n)
        assert f"predicted step {steps[d] * 1e3:.4g} ms" in line
    best = min(steps, key=steps.get)  # type: ignore[arg-type]
    assert auto.mesh.dp == best and auto.prediction.step_time_s == pytest.approx(steps[best])
    assert any(n.startswith("dp: picked") and "fastest predicted step" in n for n in auto.notes)


def test_across_nodes_the_faster_placement_is_chosen_and_priced_on_the_inter_link(gpt) -> None:  # type: ignore[no-untyped-def]
    model, idx = gpt
    kw = dict(n_gpus=4, data_parallel=2, example_inputs=(idx,), n_microbatches=2, gpus_per_node=2)
    slow = partition(model, inter_link="ethernet-100g", **kw).plan
    ib = partition(model, **kw).plan
    assert ib.mesh.inter_link["name"] == "ib-ndr-400" and slow.mesh.inter_link["name"] == "ethernet-100g"
    placed = [n for n in ib.notes if n.startswith("dp: placement")]
    assert len(placed) == 2
    times = [float(re.search(r"predicted step ([\d.e+-]+) ms", n).group(1)) for n in placed]  # type: ignore[union-attr]
    assert times == sorted(times) and ib.prediction.step_time_s * 1e3 == pytest.approx(times[0], rel=1e-3)
    crossing = [p for p in range(2) if ib.mesh.replicas_cross_nodes(p)]
    for p in range(2):  # replicas on one node use nvlink, across nodes the inter link
        want_link = LINKS["ib-ndr-400"] if p in crossing else LINKS["nvlink4"]
        grad = _trainable(model, tuple(n for st in ib.stages if st.rank == p for n in st.parameters)) * 4
        assert ib.mesh.allreduce_s[p] == pytest.approx(ring_allreduce_s(grad, 2, want_link), rel=1e-12)
    assert slow.prediction.step_time_s >= ib.prediction.step_time_s


def test_a_ring_across_nodes_crosses_at_the_nics_of_its_gpus_on_each_node() -> None:
    """One NIC per GPU: a ring collective whose group has k GPUs on every node crosses between
    nodes at k NICs' rate (NCCL's channels over the node's NICs), capped by the in-node link."""
    from partitioner.plan import Mesh

    nvl, ib = LINKS["nvlink4"], LINKS["ib-ndr-400"]
    wide = Mesh(16, 1, ("dp", "pp"), 8)  # 2 nodes, 8 replicas on each
    group = [[wide.rank(d, 0) for d in range(16)]]
    eight = ring_link(wide, group, nvl, ib)
    assert eight.bandwidth == pytest.approx(8 * ib.bandwidth) and eight.collective == ib.collective
    assert ring_allreduce_s(2**30, 16, eight) < ring_allreduce_s(2**30, 16, ib) / 7
    deep = Mesh(2, 8, ("dp", "pp"), 8)  # each node one whole pipeline: a stage's 2 replicas, one per node
    assert ring_link(deep, [[deep.rank(d, 3) for d in range(2)]], nvl, ib) == ib
    inside = Mesh(8, 1, ("dp", "pp"), 8)
    assert ring_link(inside, [list(range(8))], nvl, ib) == nvl
    # NVLink 3's ring (300 GB/s x 0.69) is slower than 8 NDR NICs (8 x 50 GB/s x 0.85): the cap
    capped = ring_link(wide, group, LINKS["nvlink3"], ib)
    assert capped.bandwidth * capped.collective == pytest.approx(300e9 * 0.69)
    # groups that run at once share the node's NICs: TP 2 leaves each replica group 4 GPUs per node
    tp = Mesh(8, 1, ("dp", "pp"), 8, tp=2)
    groups = [[tp.rank(d, 0, t) for d in range(8)] for t in range(2)]
    assert ring_link(tp, groups, nvl, ib).bandwidth == pytest.approx(4 * ib.bandwidth)
    # priced so: a 16-replica all-reduce across the 2 nodes
    win = [[Window(0.0, 1.0, (2**26,))]]
    times, _ = price_replicas(wide, 0, nvl, ib, win, [2**26], 1.0)
    assert times == [pytest.approx(ring_allreduce_s(2**26, 16, eight))]


def test_bad_data_parallel_arguments_are_refused(gpt) -> None:  # type: ignore[no-untyped-def]
    model, idx = gpt
    with pytest.raises(PartitionError, match=r"n_gpus=4 does not split into data_parallel=3.*\[1, 2, 4\]"):
        partition(model, n_gpus=4, data_parallel=3, example_inputs=(idx,))
    with pytest.raises(PartitionError, match=r"global batch of 6 samples does not split into 4 replicas \(data_parallel\); choose data_parallel among \[1, 2, 3, 6\]"):
        partition(model, n_gpus=4, data_parallel=4, example_inputs=(idx[:6],))
    with pytest.raises(PartitionError, match="give gpus_per_node= too"):
        partition(model, n_gpus=4, data_parallel=2, example_inputs=(idx,), inter_link="ib-ndr-400")
    with pytest.raises(PartitionError, match="zero must be 0 or 1"):
        partition(model, n_gpus=4, data_parallel=2, example_inputs=(idx,), zero=2)
    with pytest.raises(PartitionError, match="a Schedule object fixes the pipeline's rank count"):
        partition(model, n_gpus=4, data_parallel="auto", example_inputs=(idx,),
                  schedule=build_schedule("1f1b", 2, 2, 2))


def test_a_plan_whose_mesh_disagrees_is_refused_with_its_path(gpt) -> None:  # type: ignore[no-untyped-def]
    model, idx = gpt
    plan = partition(model, n_gpus=4, data_parallel=2, example_inputs=(idx,), n_microbatches=2).plan
    for damage, path in [(lambda d: d["mesh"].__setitem__("dp", 4), r"\$\.mesh\.dp"),
                         (lambda d: d["mesh"].__setitem__("pp", 4), r"\$\.mesh\.pp"),
                         (lambda d: d["mesh"].__setitem__("dims", ["dp", "dp"]), r"\$\.mesh\.dims"),
                         (lambda d: d["mesh"].__setitem__("allreduce_s", [0.1]), r"\$\.mesh\.allreduce_s"),
                         (lambda d: d["mesh"].__setitem__("inter_link", {"name": "x", "bandwidth": -1, "latency": 0}),
                          r"\$\.mesh\.inter_link")]:
        data = json.loads(plan.to_json())
        damage(data)
        with pytest.raises(PlanError, match=path):
            load_plan(data)


def test_cli_dp_auto_prints_every_candidate(tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    r = cli("plan", "partitioner.examples:gpt_example", "--gpus", "4", "--dp", "auto", "--gpus-per-node", "2",
            "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "data parallelism: picked D=" in r.stdout and "fastest predicted step" in r.stdout
    rows = [line for line in r.stdout.splitlines() if re.match(r"\s+#\d D=\d P=\d m=\d+ ", line)]
    assert len(rows) >= 3 and all("peak memory" in x and "bubble" in x for x in rows)
    assert load_plan(out.read_text()).mesh.gpus_per_node == 2


def test_the_plan_re_simulates_to_its_own_step_across_nodes(gpt) -> None:  # type: ignore[no-untyped-def]
    from partitioner.simulator import predict_plan

    model, idx = gpt
    for dp in (1, 2):  # one pipeline spread over nodes, and replicas
        plan = partition(model, n_gpus=4, data_parallel=dp, example_inputs=(idx,), n_microbatches=2,
                         gpus_per_node=2, inter_link="ethernet-100g").plan
        sched = build_schedule(plan.prediction.schedule, plan.pp_ranks, plan.prediction.n_microbatches, plan.n_stages)
        sim = predict_plan(plan, sched)  # what `partitioner show --timeline` draws: the pipeline alone
        assert plan.prediction.step_time_s - plan.mesh.exposed_s == pytest.approx(sim.step_time, rel=1e-9)
        assert plan.prediction.bubble_fraction == pytest.approx(sim.bubble_fraction, rel=1e-9)


def test_buckets_close_at_the_cap_and_never_split_a_tensor() -> None:
    assert pack([10, 10, 10, 30, 5], 20) == [[0, 1], [2, 3], [4]]
    assert pack([50], 20) == [[0]] and pack([], 20) == []
    assert BUCKET_BYTES == 25 * 2**20


def _old_step(windows: list[list[Window]], rank_end: list[float], pipeline_step: float, dp: int) -> float:
    """The model before overlap: each rank's whole all-reduce after its last action."""
    link = LINKS["nvlink4"]
    return max([pipeline_step, *(e + ring_allreduce_s(sum(b for w in ws for b in w.buckets), dp, link)
                                 for e, ws in zip(rank_end, windows))])


def test_the_reduction_overlaps_the_final_backward() -> None:
    """With perfect overlap (``slowdown=0``): the hidden buckets cost nothing."""
    from partitioner.plan import Mesh

    link, dp = LINKS["nvlink4"], 8
    mesh = Mesh(dp, 1, ("dp", "pp"), 0)
    grads = 40 * BUCKET_BYTES
    buckets = tuple(b for b in [BUCKET_BYTES] * 40)
    whole = ring_allreduce_s(grads, dp, link)
    last = ring_allreduce_s(BUCKET_BYTES, dp, link)
    # The final backward (start 1.0) is longer than the whole reduction: only the last bucket sticks out.
    for length in (2 * whole, 10 * whole):
        win = [[Window(1.0, 1.0 + length, buckets)]]
        times, step = price_replicas(mesh, 0, link, link, win, [grads], 1.0 + length, slowdown=0.0)
        assert times == [pytest.approx(whole)]
        assert step - (1.0 + length) == pytest.approx(last, rel=1e-9)
        assert step < _old_step(win, [1.0 + length], 1.0 + length, dp)
    # A short final backward: the reduction runs back to back from the first bucket on, and
    # ends between max(S + all of it, E + last bucket) and the old after-the-step model.
    for length in (0.0, whole / 10, whole / 2):
        win = [[Window(1.0, 1.0 + length, buckets)]]
        _, step = price_replicas(mesh, 0, link, link, win, [grads], 1.0 + length, slowdown=0.0)
        per_bucket = sum(ring_allreduce_s(b, dp, link) for b in buckets)
        assert step >= max(1.0 + length + last, 1.0 + per_bucket - 1e-12)
        assert step <= 1.0 + length + per_bucket + 1e-12  # never later than all of it after the step
        assert step - (1.0 + length) >= 0
    # never negative: a rank whose reduction ends before the pipeline does exposes nothing
    _, step = price_replicas(mesh, 0, link, link, [[Window(0.0, 1.0, buckets)]], [grads], 100.0, slowdown=0.0)
    assert step == 100.0
    # ZeRO-1's all-gather comes after the reduction
    times, step = price_replicas(mesh, 1, link, link, [[Window(1.0, 1.0 + 10 * whole, buckets)]], [grads],
                                 1.0 + 10 * whole, slowdown=0.0)
    gather = allgather_s(grads, dp, link)
    assert times == [pytest.approx(whole + gather)] and step == pytest.approx(1.0 + 10 * whole + last + gather)


def test_buckets_beside_the_final_backward_slow_it_as_zero_3s_collectives_do() -> None:
    """Every bucket but the last is on the link while the backward runs: each stretches
    the compute beside it by ``slowdown / (1 + slowdown)`` of its own time
    (``overlap_cost``'s charge), which pushes the last bucket and the step later."""
    from partitioner.data_parallel import OVERLAP_SLOWDOWN, overlap_cost, reduction_overlap
    from partitioner.plan import Mesh

    link, dp, n = LINKS["nvlink4"], 8, 40
    mesh = Mesh(dp, 1, ("dp", "pp"), 0)
    buckets = (BUCKET_BYTES,) * n
    c = ring_allreduce_s(BUCKET_BYTES, dp, link)
    length = 10 * n * c  # each bucket done long before the next is ready
    win = [Window(1.0, 1.0 + length, buckets)]
    end, delay = reduction_overlap(win, dp, link)
    assert delay == pytest.approx((n - 1) * overlap_cost(c, length / n), rel=1e-9)
    assert delay == pytest.approx((n - 1) * c * OVERLAP_SLOWDOWN / (1 + OVERLAP_SLOWDOWN), rel=1e-9)
    assert end == pytest.approx(1.0 + length + delay + c, rel=1e-12)
    _, step = price_replicas(mesh, 0, link, link, [win], [n * BUCKET_BYTES], 1.0 + length)
    assert step == pytest.approx(1.0 + length + delay + c, rel=1e-12)
    # slowdown 0 is the perfect-overlap model; the charge grows with the slowdown and never
    # exceeds running the hidden buckets' time again
    assert reduction_overlap(win, dp, link, 0.0) == (pytest.approx(1.0 + length + c, rel=1e-12), 0.0)
    steps = [price_replicas(mesh, 0, link, link, [win], [n * BUCKET_BYTES], 1.0 + length, slowdown=s)[1]
             for s in (0.0, 0.1, 0.189, 0.4)]
    assert steps == sorted(steps) and steps[-1] - steps[0] <= (n - 1) * c
    # one bucket, ready as the backward ends: nothing overlapped, nothing charged
    assert reduction_overlap([Window(1.0, 2.0, (BUCKET_BYTES,))], dp, link)[1] == 0.0
    # a second window on the rank starts later by what the first was slowed
    two = [Window(1.0, 1.0 + length, buckets), Window(2.0 + length, 2.0 + 2 * length, buckets)]
    _, delay2 = reduction_overlap(two, dp, link)
    assert delay2 == pytest.approx(2 * delay, rel=1e-6)
    with pytest.raises(ValueError, match="at least 0"):
        reduction_overlap(win, dp, link, -0.1)


def test_each_stages_window_is_its_final_backward_and_a_shared_tensor_goes_with_the_later() -> None:
    from partitioner.schedule import build_schedule
    from partitioner.simulator import simulate

    sched = build_schedule("interleaved-1f1b", 2, 4, 4)  # stages 0, 2 on rank 0; 1, 3 on rank 1
    sim = simulate(sched, [1.0] * 4, [2.0] * 4)
    params = [[("emb", 100), ("a", 10)], [("b", 10)], [("c", 10), ("emb", 100)], [("d", 10)]]  # emb: stages 0, 2
    wins = reduction_windows(sim.events, [0, 1, 0, 1], params, 2, cap=10)
    for r, ws in enumerate(wins):
        finals = sorted((e for e in sim.events if sched.rank_of(e.action.stage) == r and e.action.kind == "B"),
                        key=lambda e: e.end)
        last_of = {e.action.stage: e for e in finals}
        assert [(w.start, w.end) for w in ws] == sorted(((e.start, e.end) for e in last_of.values()),
                                                        key=lambda t: t[1])
    # rank 0: stage 0's final B comes after stage 2's, so emb goes with stage 0; buckets in
    # reverse registration order
    assert [w.buckets for w in wins[0]] == [(10,), (10, 100)]
    assert [w.buckets for w in wins[1]] == [(10,), (10,)]
    link = LINKS["nvlink4"]
    assert reduction_end([], 2, link) == 0.0


def test_the_planned_exposure_is_at_most_the_after_the_step_model(gpt) -> None:  # type: ignore[no-untyped-def]
    """This GPT's gradients fit one bucket, ready when the final backward ends: nothing to
    overlap, so the plan's exposure is the old model's; never more, never negative."""
    model, idx = gpt
    for sched in ("1f1b", "gpipe"):
        plan = partition(model, n_gpus=8, data_parallel=4, example_inputs=(idx,), n_microbatches=2,
                         schedule=sched, gpus_per_node=2, inter_link="ethernet-100g").plan
        from partitioner.simulator import predict_plan

        sim = predict_plan(plan, build_schedule(sched, plan.pp_ranks, 2, plan.n_stages))
        end = [max(e.end for e in sim.events if e.rank == r) for r in range(plan.pp_ranks)]
        old = max([sim.step_time, *(e + t for e, t in zip(end, plan.mesh.allreduce_s))])
        assert 0 <= plan.mesh.exposed_s <= old - sim.step_time + 1e-15
        assert plan.prediction.step_time_s == pytest.approx(sim.step_time + plan.mesh.exposed_s, rel=1e-9)
