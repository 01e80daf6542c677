"""Communication under NCCL's rules, proven on CPU.

gloo buffers every send and matches messages by tag; NCCL does neither: a rank's
point-to-point groups run in issue order on the group's communicator, the k-th send from
rank a to rank b meets the k-th receive b posts from a whatever its tag, and a (large)
send completes only when its receive runs. Three doubles check the runtime against those
rules: ``partitioner.comms.check`` on the lowering of every schedule, the in-process
``NcclTransport`` (``train_step(..., comm="nccl")``) with real tensors, and gloo ranks run
with every tag 0 (``runner(p2p="ordered")``, so gloo matches in issue order) whose
recorded operations are replayed under NCCL's rules (``comms.replay_log``).
"""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from partitioner.comms import DeadlockError, NcclModel, check, lower, lower_unfused, replay_log
from partitioner.runtime import interpreter
from partitioner.runtime.errors import PipelineRuntimeError
from partitioner.runtime.launch import spawn
from partitioner.schedule import SCHEDULES, Action, Schedule, ScheduleError, _with_comms, build_schedule, rank_of
from tests.runtime.helpers import LR, STEPS, assert_params, data, fresh, reference, train_in_process
from tests.runtime.test_dist import TIMEOUT_S
from tests.runtime.test_zero_bubble import _mixed  # also registers the zero-bubble layouts

BUILT_IN = ["gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "zbv"]


def _counts(name: str) -> list[tuple[int, int]]:
    return [(p, m) for p in (2, 3, 4, 8) for m in (1, 2, 3, 4, 8, 12)
            if not (SCHEDULES[name].microbatches_multiple_of_ranks and m % p)]


@pytest.mark.parametrize("name", BUILT_IN)
def test_every_built_in_schedule_runs_under_nccl_rules(name: str) -> None:
    for p, m in _counts(name):
        events = check(lower(build_schedule(name, p, m)))
        assert sum(e[0] == "compute" for e in events) == sum(
            a.is_compute for acts in build_schedule(name, p, m).actions for a in acts)


@pytest.mark.parametrize("name", ["1f1b", "interleaved-1f1b", "zb-h1", "zbv"])
def test_actions_issued_one_at_a_time_deadlock_and_the_report_names_who_waits(name: str) -> None:
    """What the runtime did before: each SEND/RECV its own group. The double must catch it."""
    with pytest.raises(DeadlockError) as info:
        check(lower_unfused(build_schedule(name, 2, 4)))
    text = str(info.value)
    assert "deadlocks under NCCL's rules" in text
    assert "rank 0 waits at" in text and "rank 1 waits at" in text
    assert "communicator runs batch [" in text  # which group each queue is stuck on, and why
    assert ("has not issued the matching" in text) or ("queued behind" in text)


def test_gpipe_issued_one_at_a_time_still_completes() -> None:
    check(lower_unfused(build_schedule("gpipe", 4, 4)))  # sends one way at a time: NCCL copes


def _random_schedule(rng: random.Random, p: int, m: int, v: int, placement: str, split: bool) -> Schedule:
    """A valid schedule unlike any builder: each rank, in turn, runs a random ready compute."""
    n = p * v
    where = [rank_of(s, p, placement) for s in range(n)]
    kinds = ("F", "I", "W") if split else ("F", "B")
    done: set[tuple[int, str, int]] = set()
    out: list[list[Action]] = [[] for _ in range(p)]
    todo = {(s, k, mb) for s in range(n) for k in kinds for mb in range(m)}

    def ready(s: int, k: str, mb: int) -> bool:
        if k == "F":
            return s == 0 or (s - 1, "F", mb) in done
        if k in ("B", "I"):
            nxt = {(s + 1, "B", mb), (s + 1, "I", mb)}
            return (s, "F", mb) in done and (s == n - 1 or bool(nxt & done))
        return (s, "I", mb) in done

    while todo:
        r = rng.randrange(p)
        options = sorted(t for t in todo if where[t[0]] == r and ready(*t))
        if options:
            t = rng.choice(options)
            todo.discard(t)
            done.add(t)
            out[r].append(Action(*t))
    s = Schedule("random", p, n, m, _with_comms(p, n, out, placement), placement)
    s.validate()
    return s


def test_any_valid_hand_written_schedule_is_lowered_into_one_that_cannot_deadlock() -> None:
    rng = random.Random(0)
    for _ in range(60):
        p, m = rng.choice([2, 3, 4]), rng.choice([1, 2, 3, 5])
        placement, v = rng.choice([("loop", 1), ("loop", 2), ("v", 2)])
        s = _random_schedule(rng, p, m, v, placement, split=rng.random() < 0.5)
        check(lower(s))


def test_the_model_pairs_messages_by_order_not_by_tag() -> None:
    model = NcclModel(2)
    model.issue(0, [(("F", 0, 1, 0), 1), (("F", 0, 1, 1), 1)], [])
    model.issue(1, [], [(("F", 0, 1, 1), 0), (("F", 0, 1, 0), 0)])  # posted in the other order
    with pytest.raises(ScheduleError, match="would land in the wrong place"):
        model.progress()


def test_a_send_waits_for_its_receive_and_blocks_what_is_queued_behind_it() -> None:
    model = NcclModel(2)
    model.issue(0, [(("F", 0, 1, 0), 1)], [])
    later = model.issue(0, [], [(("B", 1, 0, 0), 1)])
    model.issue(1, [(("B", 1, 0, 0), 0)], [])
    assert model.progress() == [] and not later.done  # both sends wait: nobody has a receive up
    model.issue(1, [], [(("F", 0, 1, 0), 0)])  # behind rank 1's send: the cycle of the 1F1B hang
    assert model.progress() == []
    assert any("queued behind" in w for w in model.waits())


# --- the runtime itself, in one process, on the NCCL double ------------------------

CASES = [("gpt-2", "gpipe", 4), ("gpt-2", "1f1b", 4), ("gpt-4", "1f1b", 4), ("gpt-2x2", "interleaved-1f1b", 4),
         ("gpt-zb2", "zb-h1", 4), ("gpt-zb4", "zb-h1", 4), ("gpt-zbv", "zbv", 4),
         ("unet-skip", "1f1b", 4), ("unet-zbskip", "zb-h1", 4), ("unet-2x2", "interleaved-1f1b", 2)]


def _train_nccl(layout: str, schedule: Any, m: int) -> tuple[list[float], list[float], dict, dict]:
    return train_in_process(layout, schedule, m, comm="nccl")


@pytest.mark.parametrize("layout,schedule,m", CASES)
def test_every_schedule_trains_like_one_process_under_nccl_rules(layout: str, schedule: str, m: int) -> None:
    """2 and 4 ranks, two stages per rank (interleaved, V), skip connections straight to the
    stage that uses them (U-Net's enc1 from stage 0 to stage 3), tied weights."""
    losses, want_losses, got, want = _train_nccl(layout, schedule, m)
    assert losses == pytest.approx(want_losses, rel=1e-5)
    assert_params(got, want)


@pytest.mark.parametrize("layout,name,m", [("gpt-2", "1f1b", 4), ("gpt-2x2", "interleaved-1f1b", 4),
                                           ("unet-skip", "gpipe", 2)])
def test_a_hand_written_schedule_trains_like_one_process_under_nccl_rules(layout: str, name: str, m: int) -> None:
    _, pipe = fresh(layout)
    s = _mixed(name, pipe.plan.pp_ranks, m, pipe.plan.n_stages)
    losses, want_losses, got, want = _train_nccl(layout, s, m)
    assert losses == pytest.approx(want_losses, rel=1e-5)
    assert_params(got, want)


def test_the_runtime_issued_one_action_at_a_time_hangs_on_the_double(monkeypatch: pytest.MonkeyPatch) -> None:
    """The double can fail: with the old one-action-per-group issue, 1F1B stops, and the
    error names the ranks and the groups each one's queue is stuck on."""
    monkeypatch.setattr(interpreter, "_lowered", lambda schedule, edges: lower_unfused(schedule, edges))
    with pytest.raises(PipelineRuntimeError) as info:
        _train_nccl("gpt-2", "1f1b", 4)
    text = str(info.value)
    assert "deadlocks under NCCL's rules" in text and "rank 0" in text and "rank 1" in text
    assert "communicator runs batch" in text
    # the same lists with buffered messages (gloo) complete: the difference is NCCL's rules
    losses, want_losses, _, _ = train_in_process("gpt-2", "1f1b", 4)
    assert losses == pytest.approx(want_losses, rel=1e-5)


# --- gloo ranks in NCCL's message order, their operations replayed under its rules --


def _ordered(rank: int, world: int, layout: str, schedule: str, m: int) -> tuple[list[float], dict, list]:
    _, pipe = fresh(layout)
    x, y, loss_fn = data(layout.split("-")[0])
    stage = pipe.build_stage(rank, "cpu")
    params = stage.parameters()
    opt = torch.optim.SGD(params, lr=LR) if params else None
    runner = stage.runner(schedule, n_microbatches=m, loss_fn=loss_fn, batch_size=len(x), p2p="ordered")
    assert not runner.transport.prepost
    losses = []
    for _ in range(STEPS):
        for p in params:
            p.grad = None
        loss = runner.step(x if rank == 0 else None, target=y)
        losses.append(float("nan") if loss is None else loss.item())
        if opt is not None:
            opt.step()
    return losses, {n: p.detach() for n, p in stage.named_parameters(remove_duplicate=False)}, \
        runner.interpreter.comm_log


@pytest.mark.parametrize("layout,schedule,m", [("gpt-2", "1f1b", 4), ("gpt-zbv", "zbv", 4), ("unet-skip", "zb-h1", 4)])
def test_gloo_ranks_in_nccl_message_order_train_like_one_process_and_replay_without_deadlock(
        layout: str, schedule: str, m: int) -> None:
    model, pipe = fresh(layout)
    x, y, loss_fn = data(layout.split("-")[0])
    want_losses, want = reference(model, x, y, loss_fn)
    results = spawn(_ordered, pipe.plan.pp_ranks, layout, schedule, m, timeout_s=TIMEOUT_S)
    assert results[pipe.plan.stages[-1].rank][0] == pytest.approx(want_losses, rel=1e-5)
    for _, params, _ in results:
        if params:
            assert_params(params, want)
    logs = [log for _, _, log in results]
    assert all(any(ev[0] == "batch" for ev in log) for log in logs)
    replay_log(logs)  # raises DeadlockError if NCCL would hang on what the ranks issued


def _replicas(rank: int, world: int, schedule: str) -> tuple[dict[str, Any], list]:
    from tests.runtime.test_data_parallel import BATCH, _pipe

    _, pipe = _pipe(schedule, **({"virtual_stages": 2} if schedule == "interleaved-1f1b" else {}))
    x, y, loss_fn = data("gpt", BATCH)
    stage = pipe.build_stage(rank, "cpu")
    opt = stage.optimizer(torch.optim.SGD, lr=LR)
    runner = stage.runner(schedule, loss_fn=loss_fn, p2p="ordered")
    for _ in range(STEPS):
        stage.zero_grad()
        runner.step(x if stage.is_first else None, target=y if stage.is_last else None)
        opt.step()
    return ({n: p.detach().clone() for n, p in stage.named_parameters(remove_duplicate=False)},
            [stage.dp_rank, stage.pp_rank, runner.interpreter.comm_log])


@pytest.mark.parametrize("schedule", ["1f1b", "zbv"])
def test_data_parallel_replicas_in_nccl_message_order_train_like_one_process(schedule: str) -> None:
    """2 replicas x 2 pipeline ranks: the pipeline's messages in NCCL's order while the
    replicas' gradient all-reduce runs on its own group; each replica's operations replay."""
    from tests.runtime.test_data_parallel import BATCH, _pipe

    model, _ = _pipe(schedule)
    x, y, loss_fn = data("gpt", BATCH)
    _, want = reference(model, x, y, loss_fn)
    results = spawn(_replicas, 4, schedule, timeout_s=TIMEOUT_S)
    for params, _ in results:
        assert_params(params, want)
    for d in (0, 1):
        replay_log([log for _, (dp, pp, log) in sorted(results, key=lambda r: r[1][1]) if dp == d])


@pytest.mark.timeout(150)
@pytest.mark.parametrize("schedule", ["1f1b", "zb-h1"])
def test_tensor_parallel_boundary_chunks_in_nccl_message_order_train_like_one_process(schedule: str) -> None:
    """2 pipeline stages x 2 TP ranks, each boundary message sent as one chunk per TP rank and
    all-gathered over the TP group when waited on (``runtime.dist``), gloo in NCCL's issue
    order (tag 0): trains like one process; the TP ranks of a stage issue and wait in the same
    order (so their all-gathers meet in the same order), and each TP index's pipeline replays
    under NCCL's rules. The double itself models P2P only, not the TP collective."""
    from partitioner.runtime.tensor_parallel import with_tensor_parallel
    from tests.runtime.test_tensor_parallel import _built
    from tests.runtime.test_tp_boundary import _check, _train

    _, pipe, init = _built("net")
    _built("net")[0].load_state_dict(init)
    results = spawn(_train, 4, "net", with_tensor_parallel(pipe, 2), schedule, "1", "ordered", timeout_s=TIMEOUT_S)
    _check("net", results, scatter=True)
    assert all(r["tagless"] for r in results)
    assert results[0]["log"] == results[1]["log"] and results[2]["log"] == results[3]["log"]
    assert any(kind == "wait" for kind, *_ in results[0]["log"])
    for t in (0, 1):
        replay_log([results[t]["log"], results[2 + t]["log"]])
