"""Every collective the runtime issues is NCCL-safe: each process group's members issue the
same sequence (operation, element count, dtype) in the same order.

gloo forgives what NCCL does not (a collective one member skips, or issues with another
size, hangs NCCL or reads the wrong bytes). Each rank of a gloo run records what it issued
(``runtime.collectives.CollectiveRecorder``: ``torch.distributed``'s collectives and the
functional collectives DTensor issues) and ``comms.check_collectives`` compares the records
group by group; ``comms.replay_collectives`` checks that the groups' sequences interleave
without a cycle even if every collective blocked. Layouts: 2 pipeline ranks x 2 TP ranks of
a GPT-2 whose embedding (first pipeline rank) and output layer (last) share one weight,
split by vocabulary, so each TP index sums its shard of the tie over its own group (1F1B and
zb-h1); 2 pipeline ranks x 2 replicas averaging in several buckets; 2 pipeline ranks x FSDP 2
(per unit under 1F1B, once per step under zb-h1; bf16-mixed, where the tie's copies reach the
sum in one dtype); 2 pipeline ranks x FSDP 2 x TP 2 (8 ranks, its own test). Each also trains
like one process. A rank that skips its tie sum is caught, naming the group, its ranks and the
position, and ``PARTITIONER_CHECK_COLLECTIVES=1`` refuses a step whose tie sum differs on one
rank. A tie that zbv puts on one rank stays one parameter under tensor parallelism.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist

from partitioner.comms import Collective, CollectiveMismatchError, DeadlockError, check_collectives, replay_collectives
from partitioner.runtime.collectives import CollectiveRecorder
from partitioner.runtime.launch import spawn
from tests.runtime.helpers import sgd_reference

TIMEOUT_S = 150.0
STEPS, LR, MAX_NORM = 2, 0.1, 1.0
RTOL, ATOL = 1e-5, 1e-6


# --- the checker on hand-made records ---------------------------------------------------

def _c(group: str, ranks: tuple[int, ...], op: str = "all_reduce(sum)", numel: int = 16, dtype: str = "float32",
       where: str = "") -> Collective:
    return Collective(group, ranks, op, numel, dtype, where)


TP0, TP1, TIE = (0, 1), (2, 3), (0, 2)


def _good() -> list[list[Collective]]:
    """4 ranks: two TP groups, and a tie group between TP rank 0 of each pipeline rank."""
    tp = [_c("tp0", TP0, numel=8), _c("tp0", TP0, "all_gather", 8)]
    tp1 = [_c("tp1", TP1, numel=8), _c("tp1", TP1, "all_gather", 8)]
    tie = _c("tie", TIE, numel=1024, where="runtime/stage.py:648 reduce_tied_grads")
    return [tp + [tie], list(tp), tp1 + [tie], list(tp1)]


def test_identical_sequences_pass_and_are_counted_per_group() -> None:
    assert check_collectives(_good()) == {"tp0": 2, "tp1": 2, "tie": 1}
    replay_collectives(_good())


def test_a_rank_that_skips_a_collective_is_named_with_the_group_and_the_position() -> None:
    logs = _good()
    logs[2] = logs[2][:-1]  # pipeline rank 1's TP rank 0 skips its tie sum
    with pytest.raises(CollectiveMismatchError) as info:
        check_collectives(logs)
    text = str(info.value)
    assert "process group 'tie' (global ranks [0, 2]) at its collective #1 (of 1)" in text
    assert "rank 0 issues all_reduce(sum) of 1024 float32 [runtime/stage.py:648 reduce_tied_grads]" in text
    assert "rank 2 issues nothing: its 0 collectives on this group end before" in text


@pytest.mark.parametrize("field,value,shown", [("numel", 512, "all_reduce(sum) of 512 float32"), ("dtype", "bfloat16", "all_reduce(sum) of 1024 bfloat16"),
                                               ("op", "all_reduce(avg)", "all_reduce(avg) of 1024")])
def test_a_size_dtype_or_operation_that_differs_is_caught(field: str, value: Any, shown: str) -> None:
    logs = _good()
    logs[2][-1] = logs[2][-1]._replace(**{field: value})
    with pytest.raises(CollectiveMismatchError, match="'tie'") as info:
        check_collectives(logs)
    assert f"rank 2 issues {shown}" in str(info.value)
    # where a collective was issued is never compared
    logs = _good()
    logs[2][-1] = logs[2][-1]._replace(where="elsewhere.py:1 f")
    check_collectives(logs)


def test_the_first_differing_position_is_reported_with_what_came_before() -> None:
    logs = _good()
    logs[1] = [logs[1][1], logs[1][0]]  # TP rank 1 swaps its two collectives
    with pytest.raises(CollectiveMismatchError) as info:
        check_collectives(logs)
    text = str(info.value)
    assert "'tp0' (global ranks [0, 1]) at its collective #1 (of 2)" in text
    assert "rank 0 issues all_reduce(sum) of 8 float32" in text and "rank 1 issues all_gather of 8 float32" in text


def test_a_group_whose_ranks_disagree_or_lack_a_record_is_refused() -> None:
    logs = _good()
    logs[3] = [c._replace(ranks=(3, 2)) for c in logs[3]]
    with pytest.raises(CollectiveMismatchError, match=r"'tp1' has ranks \[2, 3\] on rank 2 but \[3, 2\] on rank 3"):
        check_collectives(logs)
    with pytest.raises(CollectiveMismatchError, match=r"'tie' \(ranks \[0, 2\]\): no record of rank\(s\) \[2\]"):
        check_collectives({0: _good()[0], 1: _good()[1]})


def test_sequences_that_match_per_group_can_still_wait_on_each_other() -> None:
    """Three groups over three ranks issued in a cycle: each group's sequence is the same on its
    members, yet every rank blocks in a collective whose other member is blocked elsewhere."""
    a, b, c = _c("a", (0, 1)), _c("b", (1, 2)), _c("c", (0, 2))
    logs = [[a, c], [b, a], [c, b]]
    assert check_collectives(logs) == {"a": 1, "b": 1, "c": 1}
    with pytest.raises(DeadlockError) as info:
        replay_collectives(logs)
    assert "rank 0 waits in all_reduce(sum) of 16 float32 on group 'a'" in str(info.value)
    assert "rank 1 is in all_reduce(sum) on group 'b'" in str(info.value)
    replay_collectives([[a, c], [a, b], [c, b]])


# --- the recorder: what it sees ---------------------------------------------------------

def _probe(rank: int, world: int) -> dict[str, Any]:
    import threading

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    sub = dist.new_group([0, 1])
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    with CollectiveRecorder() as rec:
        dist.all_reduce(torch.ones(3), op=dist.ReduceOp.MAX, group=sub)
        DTensor.from_local(torch.ones(4, 2), mesh, [Shard(0)], run_check=False).redistribute(mesh, [Replicate()])
        DTensor.from_local(torch.ones(4, 2), mesh, [Partial()], run_check=False).redistribute(mesh, [Replicate()])
        x = torch.ones(2, requires_grad=True)  # a collective in a backward hook, as the replicas' buckets launch
        x.register_post_accumulate_grad_hook(lambda p: dist.all_reduce(torch.ones(5, dtype=torch.float64), group=sub))
        (x * 2).sum().backward()
        dist.broadcast(torch.ones(2, dtype=torch.bfloat16), src=1, group=sub)
        if rank == 0:  # point-to-point: recorded apart
            dist.send(torch.ones(1), 1, group=sub)
        else:
            dist.recv(torch.ones(1), 0, group=sub)
    complete = rec.unseen == {}
    with CollectiveRecorder() as missed:  # a thread the program starts does not carry the dispatch mode
        t = threading.Thread(target=lambda: dist.all_reduce(torch.ones(7), group=sub))
        t.start()
        t.join()
    return {"log": rec.log, "p2p": rec.p2p, "complete": complete, "missed": missed.unseen, "missed_log": missed.log,
            "sub": sub.group_name, "mesh": mesh.get_group().group_name}


def test_the_recorder_sees_c10d_functional_and_backward_collectives_and_counts_what_it_misses() -> None:
    results = spawn(_probe, 2, timeout_s=60.0)
    r = results[0]
    sub, mesh = r["sub"], r["mesh"]
    assert [(c.group, c.ranks, c.op, c.numel, c.dtype) for c in r["log"]] == [
        (sub, (0, 1), "all_reduce(max)", 3, "float32"),
        (mesh, (0, 1), "all_gather", 8, "float32"),  # DTensor's Shard -> Replicate (functional all-gather)
        (mesh, (0, 1), "all_reduce(sum)", 8, "float32"),  # Partial -> Replicate
        (sub, (0, 1), "all_reduce(sum)", 5, "float64"),  # from the backward's hook
        (sub, (0, 1), "broadcast(src=1)", 2, "bfloat16")]
    assert all(c.where.startswith("test_collectives.py:") for c in r["log"]), r["log"]
    assert r["p2p"] == [(sub, (0, 1), "send", 1, 1, "float32")] and results[1]["p2p"][0][2] == "recv"
    assert r["complete"] and r["missed_log"] == [] and r["missed"] == {sub: 1}
    check_collectives([x["log"] for x in results])


# --- the runtime: PP 2 x TP 2 with a weight tied across the pipeline ranks ---------------

def _tp_train(rank: int, world: int, pipe: Any, schedule: str, skip_tie_on: int | None = None) -> dict[str, Any]:
    from partitioner.runtime.tensor_parallel import full_state
    from tests.runtime.test_vocab_parallel import CASES

    _, inputs, y, loss_fn, _, _ = CASES["gpt2-two-stages"]
    stage = pipe.build_stage(rank, "cpu")
    (tie, _), = stage._tied
    opt = torch.optim.SGD(stage.parameters(), lr=LR)
    runner = stage.runner(schedule, loss_fn=loss_fn)
    kw, target = (inputs if stage.is_first else {}), (y if stage.is_last else None)
    out: dict[str, Any] = {"pp": stage.pp_rank, "tp": stage.tp_rank, "tie": (tie.group_name, dist.get_process_group_ranks(tie)),
                           "tp_group": stage.tp_mesh.get_group().group_name, "pp_group": stage.group.group_name}
    if skip_tie_on is not None:  # a broken rank: its tie sum skipped; its partner's times out quickly
        dist.distributed_c10d._set_pg_timeout(timedelta(seconds=3), tie)
        if rank == skip_tie_on:
            stage.reduce_tied_grads = lambda saved=None: None
        with CollectiveRecorder() as rec:
            try:
                runner.step(**kw, target=target)
                out["error"] = None
            except Exception as e:  # noqa: BLE001 - the partner of the skipping rank waits in vain
                out["error"] = f"{type(e).__name__}: {e}"
        return {**out, "log": rec.log}
    losses, norms, logs, unseen = [], [], [], []
    for _ in range(STEPS):
        with CollectiveRecorder() as rec:
            stage.zero_grad()
            loss = runner.step(**kw, target=target, loss_on_every_rank=True)
            norms.append(stage.clip_grad_norm_(MAX_NORM).item())
            opt.step()
        losses.append(loss.item())
        logs.extend(rec.log)
        unseen.append(rec.unseen)
    return {**out, "losses": losses, "norms": norms, "log": logs, "unseen": unseen,
            "params": full_state(stage.named_parameters())}


def _tp_pipe() -> tuple[Any, Any]:
    from partitioner.runtime.tensor_parallel import with_tensor_parallel
    from tests.runtime.test_vocab_parallel import CASES, _built

    pytest.importorskip("transformers")
    model, pipe, init = _built("gpt2-two-stages")
    model.load_state_dict(init)
    assert pipe.plan.tied_parameters, "the embedding and the output layer should share one weight across the cut"
    _, inputs, y, loss_fn, _, _ = CASES["gpt2-two-stages"]
    ref = sgd_reference(model, inputs, y, loss_fn, steps=STEPS, lr=LR, max_norm=MAX_NORM, init=init,
                        remove_duplicate=True)
    return with_tensor_parallel(pipe, 2), ref


@pytest.mark.timeout(240)
@pytest.mark.parametrize("schedule", ["1f1b", "zb-h1"])
def test_pp2_tp2_tied_weights_train_like_one_process_with_every_group_in_step(schedule: str) -> None:
    pipe, ref = _tp_pipe()
    assert min(ref.norms) > MAX_NORM, "clipping should change every step"
    results = spawn(_tp_train, 4, pipe, schedule, timeout_s=TIMEOUT_S)
    assert [(r["pp"], r["tp"]) for r in results] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for r in results:
        assert r["losses"] == pytest.approx(ref.losses, rel=RTOL)
        assert r["norms"] == pytest.approx(ref.norms, rel=RTOL)
        for n, v in r["params"].items():  # the output layer's copy is the embedding's weight
            want = ref.params["transformer.wte.weight" if n == "lm_head.weight" else n]
            torch.testing.assert_close(v, want, rtol=RTOL, atol=ATOL, msg=lambda m, n=n: f"{n}: {m}")
        assert r["unseen"] == [{}] * STEPS, "the recorder missed collectives"
    logs = [r["log"] for r in results]
    counts = check_collectives(logs)  # raises, naming the group and position, if NCCL would hang
    replay_collectives(logs)
    # not vacuous: each TP index has its own tie group (the same TP rank of each pipeline rank), which
    # sums that index's shard of the tied weight (32 of 64 rows x 32) once per step, after the TP
    # collectives of the pipeline; the TP groups carry DTensor's collectives (the split lookup's and
    # loss's all-reduces; GPT-2's Conv1D layers stay whole) and the transport's gathers
    for t in (0, 1):
        name, ranks = results[t]["tie"]
        assert ranks == [t, 2 + t] and results[2 + t]["tie"] == (name, ranks)
        sums = [c for c in logs[t] if c.group == name]
        assert [(c.op, c.numel, c.dtype) for c in sums] == [("all_reduce(sum)", 32 * 32, "float32")] * STEPS
        assert all("reduce_tied_grads" in c.where for c in sums), sums
    assert len({r["tie"][0] for r in results}) == 2
    for r in results:
        assert counts[r["tp_group"]] >= 4 * STEPS
        assert counts[r["pp_group"]] >= STEPS  # the gradient norm's sum, per step
        ops = {c.op for c in r["log"] if c.group == r["tp_group"]}
        assert {"all_reduce(sum)", "all_gather"} <= ops, ops


@pytest.mark.timeout(120)
def test_a_rank_that_skips_its_tie_sum_is_caught_not_hung() -> None:
    """Pipeline rank 1's TP rank 0 (global rank 2) skips its tie sum. Its partner, global rank 0,
    waits in the tie's all-reduce (NCCL would wait forever; the test gives the tie group a 3 s
    timeout); the check of the records names the tie group, its ranks and the position. The
    other TP index sums its shard as usual."""
    pipe, _ = _tp_pipe()
    results = spawn(_tp_train, 4, pipe, "1f1b", 2, timeout_s=60.0)
    assert results[0]["error"] is not None and results[2]["error"] is None
    assert results[1]["error"] is None and results[3]["error"] is None
    name, ranks = results[0]["tie"]
    with pytest.raises(CollectiveMismatchError) as info:
        check_collectives([r["log"] for r in results])
    text = str(info.value)
    assert f"process group {name!r} (global ranks {ranks}) at its collective #1 (of 1)" in text
    assert "rank 0 issues all_reduce(sum) of 1024 float32" in text and "reduce_tied_grads" in text
    assert "rank 2 issues nothing: its 0 collectives on this group end before" in text
    # that sum is the only difference: without it every group matches (the other TP index's tie included)
    logs = [r["log"] for r in results]
    logs[0] = [c for c in logs[0] if c.group != name]
    assert check_collectives(logs)[results[1]["tie"][0]] == 1


def _v_train(rank: int, world: int, pipe: Any) -> dict[str, Any]:
    from partitioner.runtime.tensor_parallel import full_state
    from tests.runtime.helpers import data

    x, y, loss_fn = data("gpt", 4)
    stage = pipe.build_stage(rank, "cpu")
    opt = torch.optim.SGD(stage.parameters(), lr=LR)
    runner = stage.runner("zbv", loss_fn=loss_fn)
    losses, logs = [], []
    for _ in range(STEPS):
        with CollectiveRecorder() as rec:
            stage.zero_grad()
            losses.append(runner.step(x if stage.is_first else None, target=y if stage.is_last else None,
                                      loss_on_every_rank=True).item())
            opt.step()
        logs.extend(rec.log)
    named = dict(stage.named_parameters(remove_duplicate=False))
    one = "lm_head.weight" in named and named["lm_head.weight"] is named["transformer.wte.weight"]
    return {"losses": losses, "log": logs, "ties": len(stage._tied), "one": one, "stages": sorted(stage.modules),
            "params": full_state(stage.named_parameters(remove_duplicate=False))}


@pytest.mark.timeout(240)
def test_a_tie_a_v_schedule_puts_on_one_rank_stays_one_parameter_under_tp() -> None:
    """zbv puts the GPT's first stage (embedding) and last stage (output layer, the same weight)
    on pipeline rank 0: one tensor there, no tie group, no sum. Tensor parallelism made each
    stage's copy its own DTensor parameter, so each got half the gradient and the copies drifted
    apart from one process; the stages now share one DTensor (split alike in both)."""
    import copy

    from partitioner import partition
    from partitioner.runtime.tensor_parallel import with_tensor_parallel
    from tests.fixtures.models import FIXTURES
    from tests.runtime.helpers import data

    torch.manual_seed(0)
    model = FIXTURES["gpt"].build()
    init = copy.deepcopy(model.state_dict())
    x, y, loss_fn = data("gpt", 4)
    pipe = partition(model, n_gpus=2, example_inputs=(x,), schedule="zbv", n_microbatches=2,
                     pinned_cuts=["transformer.h.1", "transformer.h.2", "transformer.h.3"])
    assert pipe.plan.tied_parameters and [s.rank for s in pipe.plan.stages] == [0, 1, 1, 0]
    ref = sgd_reference(model, x, y, loss_fn, steps=STEPS, lr=LR, init=init)
    results = spawn(_v_train, 4, with_tensor_parallel(pipe, 2), timeout_s=TIMEOUT_S)
    assert [r["stages"] for r in results] == [[0, 3], [0, 3], [1, 2], [1, 2]]
    for r in results:
        assert r["losses"] == pytest.approx(ref.losses, rel=RTOL)
        for n, v in r["params"].items():
            torch.testing.assert_close(v, ref.params[n], rtol=RTOL, atol=ATOL, msg=lambda m, n=n: f"{n}: {m}")
    assert [(r["ties"], r["one"]) for r in results] == [(0, True), (0, True), (0, False), (0, False)]
    check_collectives([r["log"] for r in results])


# --- the runtime: PP 2 x DP 2 (bucketed all-reduce) and PP 2 x FSDP 2 --------------------

def _dp_train(rank: int, world: int, pipe: Any, schedule: str, bucket_bytes: int | None) -> dict[str, Any]:
    from torch.distributed.tensor import DTensor

    from tests.runtime.helpers import data

    x, y, loss_fn = data("gpt", 8)
    stage = pipe.build_stage(rank, "cpu")
    if bucket_bytes is not None:
        stage.grad_sync.bucket_bytes = bucket_bytes
    opt = stage.optimizer(torch.optim.SGD, lr=LR)
    runner = stage.runner(schedule, loss_fn=loss_fn)
    losses, logs, unseen = [], [], []
    for _ in range(STEPS):
        with CollectiveRecorder() as rec:
            stage.zero_grad()
            loss = runner.step(x if stage.is_first else None, target=y if stage.is_last else None,
                               loss_on_every_rank=True)
            stage.clip_grad_norm_(MAX_NORM)
            opt.step()
        losses.append(loss.item())
        logs.extend(rec.log)
        unseen.append(rec.unseen)
    params = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
              for n, p in stage.named_parameters(remove_duplicate=False)}
    return {"dp": stage.dp_rank, "pp": stage.pp_rank, "losses": losses, "log": logs, "unseen": unseen,
            "params": params, "dp_group": stage.dp_group.group_name,
            "buckets": len(getattr(stage.grad_sync, "buckets", []))}


def _check_dp(model: Any, pipe: Any, results: list[dict[str, Any]]) -> dict[str, int]:
    from tests.runtime.helpers import data

    x, y, loss_fn = data("gpt", 8)
    ref = sgd_reference(model, x, y, loss_fn, steps=STEPS, lr=LR, max_norm=MAX_NORM)
    assert min(ref.norms) > MAX_NORM, "clipping should change every step"
    for r in results:
        assert r["losses"] == pytest.approx(ref.losses, rel=RTOL)
        for n, v in r["params"].items():
            torch.testing.assert_close(v, ref.params[n], rtol=RTOL, atol=ATOL, msg=lambda m, n=n: f"{n}: {m}")
        assert r["unseen"] == [{}] * STEPS, "the recorder missed collectives"
    logs = [r["log"] for r in results]
    counts = check_collectives(logs)
    replay_collectives(logs)
    return counts


@pytest.mark.timeout(240)
def test_pp2_dp2_buckets_reduce_in_the_same_order_on_every_replica() -> None:
    """Small buckets (4 KiB), so each pipeline rank averages its gradients in several
    all-reduces launched from backward hooks, interleaved with the pipeline's messages."""
    from tests.runtime.test_data_parallel import _pipe

    model, pipe = _pipe("1f1b")
    results = spawn(_dp_train, 4, pipe, "1f1b", 4096, timeout_s=TIMEOUT_S)
    counts = _check_dp(model, pipe, results)
    for r in results:
        assert r["buckets"] > 3
        reduces = [c for c in r["log"] if c.group == r["dp_group"]]
        assert len(reduces) >= r["buckets"] * STEPS and counts[r["dp_group"]] == len(reduces)
        assert any("grad_sync.py" in c.where for c in reduces)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("schedule", ["1f1b", "zb-h1"])  # FSDP per unit; once per step (split backward)
def test_pp2_fsdp2_gathers_and_scatters_in_the_same_order_on_every_replica(schedule: str) -> None:
    from tests.runtime.test_fsdp import _pipe

    model, pipe = _pipe(schedule)
    results = spawn(_dp_train, 4, pipe, schedule, None, timeout_s=TIMEOUT_S)
    counts = _check_dp(model, pipe, results)
    for r in results:
        ops = {c.op for c in r["log"] if c.group == r["dp_group"]}
        assert {"all_gather", "reduce_scatter(sum)"} <= ops or {"all_gather", "reduce_scatter(avg)"} <= ops, ops
        assert counts[r["dp_group"]] > 4 * STEPS


def _mixed_split_train(rank: int, world: int, pipe: Any) -> dict[str, Any]:
    from torch.distributed.tensor import DTensor

    from tests.runtime import test_precision as tp
    from tests.runtime.test_fsdp import MIXED_CLIP

    x, y = tp._data()
    stage = pipe.build_stage(rank, "cpu")
    opt = stage.optimizer(torch.optim.AdamW, lr=tp.LR)
    runner = stage.runner("zb-h1", loss_fn=tp.loss_fn)
    losses, norms, logs = [], [], []
    for _ in range(tp.STEPS):
        with CollectiveRecorder() as rec:
            opt.zero_grad()
            loss = runner.step(x if stage.is_first else None, target=y if stage.is_last else None,
                               loss_on_every_rank=True)
            norms.append(stage.clip_grad_norm_(MIXED_CLIP).item())
            opt.step()
        losses.append(loss.item())
        logs.extend(rec.log)
    (tie, _), = stage.grad_sync.tied
    return {"losses": losses, "norms": norms, "log": logs, "mode": stage.grad_sync.mode, "tie": tie.group_name,
            "masters": {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
                        for n, p in stage.named_parameters(remove_duplicate=False)}}


@pytest.mark.timeout(240)
def test_pp2_fsdp2_bf16_mixed_split_backward_sums_tied_copies_in_one_dtype() -> None:
    """bf16-mixed FSDP under zb-h1 (reduced once per step): the tied embedding's gradient on the
    first pipeline rank went through FSDP's backward hooks (accumulated in fp32), the output
    layer's on the last was written by hand in W (bf16). Their sum across the pipeline ranks
    must use one dtype on both (fp32, FSDP's reduce dtype) and each copy's whole gradient; it
    did not (fp32 beside bf16: NCCL reads the wrong bytes, gloo aborts the process). Trains like
    one process under the same recipe, with the tolerances of test_fsdp's bf16-mixed test."""
    from tests.runtime import test_precision as tp
    from tests.runtime.test_fsdp import MIXED_CLIP, _mixed_reference

    torch.manual_seed(0)
    model = tp.TinyLlama()
    x, _ = tp._data()
    from partitioner import partition

    pipe = partition(model, n_gpus=4, data_parallel=2, zero=3, example_inputs=(x,), precision="bf16-mixed",
                     schedule="zb-h1", n_microbatches=2, pinned_cuts=["blocks.2"], optimizer="adamw")
    assert pipe.plan.tied_parameters
    results = spawn(_mixed_split_train, 4, pipe, timeout_s=TIMEOUT_S)
    logs = [r["log"] for r in results]
    check_collectives(logs)
    replay_collectives(logs)
    for r in results:
        assert r["mode"] == "step"
        sums = [c for c in r["log"] if c.group == r["tie"]]
        assert [(c.op, c.numel, c.dtype) for c in sums] == [("all_reduce(sum)", 64 * 32, "float32")] * tp.STEPS
    want = _mixed_reference(model, torch.bfloat16, microbatches=4)
    assert min(want["norms"]) > MIXED_CLIP
    for r in results:
        assert r["losses"] == pytest.approx(want["losses"], rel=1e-2)
        assert r["norms"] == pytest.approx(want["norms"], rel=2e-2)
        total, count = 0.0, 0
        for n, m in r["masters"].items():
            diff = (m - want["masters"][n]).abs()
            assert diff.mean().item() <= tp.LR / 4, n
            total, count = total + diff.sum().item(), count + diff.numel()
        assert total / count <= tp.LR / 20, total / count


# --- the opt-in diagnostic: PARTITIONER_CHECK_COLLECTIVES=1 ---------------------------------

def _diagnosed(rank: int, world: int, pipe: Any, tie_op_on: int | None) -> dict[str, Any]:
    """One PP2 x TP2 step with the diagnostic on; on rank ``tie_op_on`` the tie's all-reduce takes
    the maximum instead of the sum (a mismatch gloo runs without complaint)."""
    import os

    import partitioner.runtime.stage as stage_module
    from partitioner.runtime.errors import PipelineRuntimeError
    from tests.runtime.test_vocab_parallel import CASES

    os.environ["PARTITIONER_CHECK_COLLECTIVES"] = "1"
    _, inputs, y, loss_fn, _, _ = CASES["gpt2-two-stages"]
    stage = pipe.build_stage(rank, "cpu")
    if rank == tie_op_on:
        (tie, _), = stage._tied

        class _MaxTie:
            def __getattr__(self, name: str) -> Any:
                return getattr(dist, name)

            def all_reduce(self, t: torch.Tensor, **kw: Any) -> Any:
                return dist.all_reduce(t, **kw, **({"op": dist.ReduceOp.MAX} if kw.get("group") is tie else {}))

        stage_module.dist = _MaxTie()  # type: ignore[assignment]  # reduce_tied_grads's all-reduce
    runner = stage.runner("1f1b", loss_fn=loss_fn)
    try:
        loss = runner.step(**(inputs if stage.is_first else {}), target=y if stage.is_last else None,
                           loss_on_every_rank=True)
        return {"loss": loss.item(), "error": None}
    except PipelineRuntimeError as e:
        return {"loss": None, "error": str(e)}


@pytest.mark.timeout(240)
def test_the_runtime_diagnostic_checks_every_step_across_the_job() -> None:
    pipe, ref = _tp_pipe()
    results = spawn(_diagnosed, 4, pipe, None, timeout_s=TIMEOUT_S)
    assert [r["error"] for r in results] == [None] * 4
    assert [r["loss"] for r in results] == pytest.approx([ref.losses[0]] * 4, rel=RTOL)
    results = spawn(_diagnosed, 4, pipe, 2, timeout_s=TIMEOUT_S)
    for r in results:  # every rank refuses the step, naming the group, its ranks and the position
        assert r["error"] is not None and "PARTITIONER_CHECK_COLLECTIVES" in r["error"], r
        assert "at its collective #1 (of 1)" in r["error"] and "global ranks [0, 2]" in r["error"]
        assert "rank 2 issues all_reduce(max) of 1024 float32" in r["error"]


# --- PP 2 x FSDP 2 x TP 2 with the tie: 8 ranks, its own test (deselect it on a loaded machine) ---

def _three_d_train(rank: int, world: int, pipe: Any, schedule: str) -> dict[str, Any]:
    from partitioner.runtime.tensor_parallel import full_state
    from tests.runtime.test_vocab_parallel import CASES

    _, inputs, y, loss_fn, _, _ = CASES["gpt2-two-stages"]
    stage = pipe.build_stage(rank, "cpu")
    opt = stage.optimizer(torch.optim.SGD, lr=LR)
    runner = stage.runner(schedule, loss_fn=loss_fn)
    losses, logs = [], []
    for _ in range(STEPS):
        with CollectiveRecorder() as rec:
            stage.zero_grad()
            loss = runner.step(**(inputs if stage.is_first else {}), target=y if stage.is_last else None,
                               loss_on_every_rank=True)
            stage.clip_grad_norm_(MAX_NORM)
            opt.step()
        losses.append(loss.item())
        logs.extend(rec.log)
    return {"losses": losses, "log": logs, "mode": stage.grad_sync.mode,
            "params": full_state(stage.named_parameters(remove_duplicate=False))}


@pytest.mark.timeout(400)
def test_pp2_fsdp2_tp2_eight_ranks_sum_the_tie_per_step() -> None:
    """FSDP over TP's DTensors, reduced once per step (zb-h1): the tie's sum over the pipeline
    ranks runs on the gathered parameter's TP shard (it called ``dist.all_reduce`` on the DTensor,
    which DTensor has no rule for, so the step failed); trains like one process, every group in step."""
    import copy

    from partitioner import partition
    from partitioner.runtime.tensor_parallel import with_tensor_parallel
    from tests.runtime.test_vocab_parallel import CASES, _gpt2

    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = _gpt2()
    init = copy.deepcopy(model.state_dict())
    _, inputs, y, loss_fn, _, _ = CASES["gpt2-two-stages"]
    pipe = partition(model, 4, inputs, device="cpu", link="loopback", data_parallel=2, zero=3,
                     pinned_cuts=["transformer.h.1"], n_microbatches=2, schedule="zb-h1")
    ref = sgd_reference(model, inputs, y, loss_fn, steps=STEPS, lr=LR, max_norm=MAX_NORM, init=init,
                        remove_duplicate=True)
    results = spawn(_three_d_train, 8, with_tensor_parallel(pipe, 2), "zb-h1", timeout_s=TIMEOUT_S * 2)
    for r in results:
        assert r["mode"] == "step"
        assert r["losses"] == pytest.approx(ref.losses, rel=RTOL)
        for n, v in r["params"].items():
            want = ref.params["transformer.wte.weight" if n == "lm_head.weight" else n]
            torch.testing.assert_close(v, want, rtol=RTOL, atol=ATOL, msg=lambda m, n=n: f"{n}: {m}")
    logs = [r["log"] for r in results]
    check_collectives(logs)
    replay_collectives(logs)
