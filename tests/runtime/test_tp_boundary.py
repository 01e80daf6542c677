"""Boundary messages under tensor parallelism go once per TP group (``runtime.dist``): each
TP rank sends 1/T of a message and the receiving TP ranks all-gather the chunks. On gloo,
4 ranks (2 pipeline stages x 2 TP ranks): the plain attention + MLP model (1F1B, zb-h1) and
a tiny Llama (its cut carries several values, packed) train like one process; every send
of a boundary message carries half its bytes (counted at ``batch_isend_irecv``), and twice
that with ``PARTITIONER_TP_SCATTER=0``; the transport alone delivers messages whose size T
does not divide, scalars, integer and bool tensors and packed mixes exactly, both ways and
in the NCCL issue order (``tagless``)."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from partitioner.runtime.dist import DistTransport, _message_bytes, pack_layout
from partitioner.runtime.launch import spawn
from partitioner.runtime.tensor_parallel import full_state, with_tensor_parallel
from tests.runtime.test_tensor_parallel import ATOL, LOSS, LR, MAX_NORM, RTOL, STEPS, _built, _data, _reference

TIMEOUT_S = 90.0


def _record_sends() -> list[tuple[int, int]]:
    """Wrap ``dist.batch_isend_irecv`` in this process: (destination rank, bytes) of each send."""
    seen: list[tuple[int, int]] = []
    real = dist.batch_isend_irecv

    def wrapped(ops: list[dist.P2POp]) -> Any:
        seen.extend((op.peer, op.tensor.numel() * op.tensor.element_size()) for op in ops if op.op is dist.isend)
        return real(ops)

    dist.batch_isend_irecv = wrapped  # type: ignore[assignment]  # forked child: this rank only
    return seen


def _train(rank: int, world: int, name: str, pipe: Any, schedule: str, scatter: str,
           p2p: str = "auto") -> dict[str, Any]:
    os.environ["PARTITIONER_TP_SCATTER"] = scatter
    sends = _record_sends()
    inputs, y = _data(name)
    stage = pipe.build_stage(rank, "cpu")
    opt = torch.optim.SGD(stage.parameters(), lr=LR)
    runner = stage.runner(schedule, loss_fn=LOSS[name], p2p=p2p)
    kw = inputs if stage.is_first else {}
    target = y if stage.is_last else None
    losses, norms = [], []
    for _ in range(STEPS):
        stage.zero_grad()
        sends.clear()  # the last step's sends, as the interpreter's ``sent`` keeps the last step's
        loss = runner.step(**kw, target=target)
        norms.append(stage.clip_grad_norm_(MAX_NORM).item())
        opt.step()
        losses.append(None if loss is None else loss.item())
    tr = runner.transport
    payloads = [b for _, _, b in runner.interpreter.sent]  # each message's payload, as the interpreter gave it
    return {"pp": stage.pp_rank, "tp": stage.tp_rank, "losses": losses, "norms": norms, "scatter": tr.scatter,
            "tagless": tr.tagless, "log": list(runner.interpreter.comm_log),
            "sends": list(sends), "payloads": payloads, "bytes_sent": tr.bytes_sent, "wire_bytes": tr.wire_bytes,
            "step_wire": sum(w for _, w in sends),
            "params": full_state(stage.named_parameters())}


def _check(name: str, results: list[dict[str, Any]], scatter: bool) -> None:
    want_losses, want_norms, want = _reference(name)
    assert [(r["pp"], r["tp"]) for r in results] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for r in results[2:]:
        assert r["losses"] == pytest.approx(want_losses, rel=RTOL)
    for r in results:
        assert r["norms"] == pytest.approx(want_norms, rel=RTOL)
        for n, v in r["params"].items():
            torch.testing.assert_close(v, want[n], rtol=RTOL, atol=ATOL, msg=lambda m, n=n: f"{n}: {m}")
    assert set().union(*(r["params"] for r in results)) == set(want)
    for r in results:
        assert r["scatter"] is scatter
        # one send per boundary message (the interpreter's payloads), all counted by the transport
        assert r["payloads"] and len(r["sends"]) == len(r["payloads"])
        assert r["step_wire"] * STEPS == r["wire_bytes"]  # every step the same bytes, all counted


@pytest.mark.timeout(150)
@pytest.mark.parametrize("schedule", ["1f1b", "zb-h1"])
def test_net_with_boundary_scatter_trains_like_one_process(schedule: str) -> None:
    _, pipe, init = _built("net")
    _built("net")[0].load_state_dict(init)
    results = spawn(_train, 4, "net", with_tensor_parallel(pipe, 2), schedule, "1", timeout_s=TIMEOUT_S)
    _check("net", results, scatter=True)
    # the cut carries one (2, 8, 32) float32 activation / gradient per micro-batch: 2048 bytes,
    # each TP rank sends 1024 of them to its peer (the same TP index on the other stage)
    for r in results:
        assert [w for _, w in r["sends"]] == [1024] * len(r["sends"]) and r["payloads"] == [2048] * len(r["sends"])
        assert r["wire_bytes"] * 2 == r["bytes_sent"]
    # rank t of stage 0 sends to rank t of stage 1 (pipeline groups hold one TP index)
    assert {p for p, _ in results[0]["sends"]} == {2} and {p for p, _ in results[1]["sends"]} == {3}


@pytest.mark.timeout(150)
def test_llama_packed_boundary_scatter_trains_like_one_process() -> None:
    _, pipe, init = _built("llama")
    _built("llama")[0].load_state_dict(init)
    results = spawn(_train, 4, "llama", with_tensor_parallel(pipe, 2), "1f1b", "1", timeout_s=TIMEOUT_S)
    _check("llama", results, scatter=True)
    for r in results:  # packed messages: half the packed buffer each, never the whole
        for (_, got), payload in zip(r["sends"], r["payloads"]):
            assert payload / 2 <= got < payload, (got, payload)


@pytest.mark.timeout(150)
def test_scatter_off_sends_whole_messages() -> None:
    _, pipe, init = _built("net")
    _built("net")[0].load_state_dict(init)
    results = spawn(_train, 4, "net", with_tensor_parallel(pipe, 2), "1f1b", "0", timeout_s=TIMEOUT_S)
    _check("net", results, scatter=False)
    for r in results:
        assert [w for _, w in r["sends"]] == [2048] * len(r["sends"]) and r["wire_bytes"] == r["bytes_sent"]


# -- the transport alone ------------------------------------------------------------------

def _messages(mb: int, direction: str) -> list[torch.Tensor]:
    """Odd messages: sizes 2 does not divide, scalars, integer and bool tensors, a packed mix."""
    g = torch.Generator().manual_seed(mb * 2 + (direction == "B"))
    return [
        torch.randint(-100, 100, (7,), dtype=torch.int8, generator=g),  # 7 bytes: chunks of 4 and 3
        torch.randn((), generator=g),  # a 0-dim float32 scalar: 4 bytes, 2 each
        torch.tensor(True),  # 1 byte: fewer than T, sent whole
        torch.randint(0, 2**40, (3, 5), dtype=torch.int64, generator=g),
        torch.rand(5, generator=g) > 0.5,  # bool, 5 bytes
    ]


def _transport(rank: int, world: int, tagless: bool) -> dict[str, Any]:
    sends = _record_sends()
    dm = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "tp"))
    pp, tp = dm.get_local_rank("pp"), dm.get_local_rank("tp")
    tr = DistTransport(2, dm.get_group("pp"), tagless=tagless, tp_group=dm.get_group("tp"), scatter=True)
    got: list[tuple[str, int, int, list[torch.Tensor]]] = []
    for mb in range(2):
        for direction, src in (("F", 0), ("B", 1)):
            msgs = _messages(mb, direction)
            # each message on its own key (one value each), and all of them packed under one key
            cases = [[m] for m in msgs] + [msgs]
            for i, vals in enumerate(cases):
                key = (direction, src, 1 - src, mb * 100 + i)
                if pp == src:
                    tr.post(pp, [(key, 1 - src, vals)], [], "cpu")
                else:
                    layout = [(tuple(v.shape), v.dtype) for v in vals]
                    (pending,) = tr.post(pp, [], [(key, src, layout)], "cpu")
                    got.append((direction, mb, i, [t.clone() for t in pending.wait()]))
            tr.flush()
    return {"pp": pp, "tp": tp, "got": got, "sends": list(sends), "wire_bytes": tr.wire_bytes,
            "bytes_sent": tr.bytes_sent}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("tagless", [False, True])
def test_transport_scatters_odd_messages_exactly(tagless: bool) -> None:
    results = spawn(_transport, 4, tagless, timeout_s=60.0)
    for r in results:
        assert len(r["got"]) == 2 * len(_messages(0, "F")) + 2  # one direction per stage, two micro-batches
        for direction, mb, i, tensors in r["got"]:
            msgs = _messages(mb, direction)
            want = [msgs[i]] if i < len(msgs) else msgs
            assert len(tensors) == len(want)
            for t, w in zip(tensors, want):
                assert t.dtype == w.dtype and t.shape == w.shape and torch.equal(t, w), (direction, mb, i)
    # what each TP rank put on the wire per message: its chunk (ceil(B / 2) for TP rank 0,
    # the rest for TP rank 1), or the whole message when it has fewer bytes than TP ranks
    for r in results:
        msgs = _messages(0, "F")
        sizes = [_message_bytes([(tuple(m.shape), m.dtype)]) for m in msgs] + [pack_layout(
            [(tuple(m.shape), m.dtype) for m in msgs])[1]]
        want = [b if b < 2 else (-(-b // 2) if r["tp"] == 0 else b - -(-b // 2)) for b in sizes]
        assert [w for _, w in r["sends"]] == want * 2, r["sends"]
        assert sizes == [7, 4, 1, 120, 5, 64 * 4 + 128]


# -- pricing ------------------------------------------------------------------------------

def test_a_cut_is_priced_as_one_chunk_per_pair_plus_an_all_gather_in_the_group() -> None:
    from partitioner.cost_models.devices import get_link
    from partitioner.data_parallel import allgather_s
    from partitioner.tensor_parallel import boundary_time

    ib, nvlink = get_link("ib-ndr-400"), get_link("nvlink4")
    mib = 2**20
    assert boundary_time(ib, 1, nvlink)(mib) == ib.transfer_time(mib)  # no TP: as before
    want = ib.transfer_time(mib / 4) + allgather_s(mib, 4, nvlink)
    assert boundary_time(ib, 4, nvlink)(mib) == pytest.approx(want)
    # a large message: a quarter on the slow link, the all-gather on the fast one
    assert boundary_time(ib, 4, nvlink)(64 * mib) < 0.5 * ib.transfer_time(64 * mib)
    assert boundary_time(ib, 4, nvlink)(3) == ib.transfer_time(3)  # fewer bytes than ranks: sent whole
    assert boundary_time(ib, 4, nvlink)(0) == 0.0


def test_a_tensor_parallel_plan_prices_its_cuts_per_group_and_replays_the_same() -> None:
    from partitioner import partition
    from partitioner.cost_models.devices import get_link
    from partitioner.schedule import build_schedule
    from partitioner.simulator import boundary_bytes, predict_plan, predict_step
    from partitioner.tensor_parallel import boundary_time
    from tests.runtime.test_tensor_parallel import Net

    torch.manual_seed(0)
    kw = dict(example_inputs=(torch.randn(8, 64, 32),), device="h100-sxm", link="loopback", n_microbatches=4,
              pinned_cuts=["blocks.1"])
    plan = partition(Net(), n_gpus=4, tensor_parallel=2, **kw).plan
    assert plan.mesh.tp == 2 and len(plan.boundaries) == 1
    sched = build_schedule(plan.options["schedule"], plan.pp_ranks, plan.prediction.n_microbatches, plan.n_stages)
    assert predict_plan(plan, sched).step_time == pytest.approx(plan.prediction.step_time_s, rel=1e-9)
    # the plan's step is simulated with the cut priced per group (1/2 on the pair's link plus an
    # all-gather), not with the whole message per pair: on this latency-bound link and a 16 KiB
    # message that is dearer (two latencies), so the two predictions differ
    link = get_link("loopback")
    fwd, grad = boundary_bytes(plan.boundaries, plan.prediction.microbatch_size, plan.symbols.get("S", 1))
    times = ([st.cost.fwd_time_s for st in plan.stages], [st.cost.bwd_time_s for st in plan.stages])
    per_group = predict_step(sched, *times, boundary_time(link, 2), fwd, grad).step_time
    per_pair = predict_step(sched, *times, link.transfer_time, fwd, grad).step_time
    assert plan.prediction.step_time_s == pytest.approx(per_group, rel=1e-9)
    assert per_group > per_pair * (1 + 1e-6)
