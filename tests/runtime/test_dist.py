"""Multi-process (gloo, CPU): the same transparency, failures that end fast, interop.

Ranks are forked by ``spawn``, so they inherit the pipes built here; every test has a
timeout and a hang becomes an error, never a stuck test run.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import time
from typing import Any

import pytest
import torch

from partitioner import poly
from partitioner.runtime.errors import PipelineRuntimeError
from partitioner.runtime.launch import spawn
from tests.runtime.helpers import LR, STEPS, assert_params, data, fresh, reference, sgd_reference

TIMEOUT_S = 120.0


def stage_zero_grad(params: list[torch.nn.Parameter]) -> None:
    for p in params:
        p.grad = None


def _train(rank: int, world: int, layout: str, schedule: str, m: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    _, pipe = fresh(layout)
    x, y, loss_fn = data(layout.split("-")[0])
    stage = pipe.build_stage(rank, "cpu")
    params = stage.parameters()  # a stage may hold none (U-Net's pooling between cuts)
    opt = torch.optim.SGD(params, lr=LR) if params else None
    runner = stage.runner(schedule, n_microbatches=m, loss_fn=loss_fn, batch_size=len(x))
    losses = []
    for _ in range(STEPS):
        stage_zero_grad(params)
        loss = runner.step(x if rank == 0 else None, target=y)
        losses.append(float("nan") if loss is None else loss.item())
        if opt is not None:
            opt.step()
    return losses, {n: p.detach() for n, p in stage.named_parameters(remove_duplicate=False)}


@pytest.mark.parametrize("layout,schedule,m", [
    ("gpt-2", "gpipe", 4), ("gpt-2", "1f1b", 4), ("gpt-2x2", "interleaved-1f1b", 4), ("gpt-4", "1f1b", 4),
    ("unet-2", "1f1b", 4), ("unet-4", "gpipe", 4), ("unet-2x2", "interleaved-1f1b", 2),
])
def test_ranks_train_like_the_unpartitioned_model(layout: str, schedule: str, m: int) -> None:
    model, pipe = fresh(layout)
    x, y, loss_fn = data(layout.split("-")[0])
    want_losses, want = reference(model, x, y, loss_fn)
    results = spawn(_train, pipe.plan.options["n_gpus"], layout, schedule, m, timeout_s=TIMEOUT_S)
    last = pipe.plan.stages[-1].rank
    assert results[last][0] == pytest.approx(want_losses, rel=1e-5)
    for _, params in results:  # tied copies on the first and last rank both match
        if params:
            assert_params(params, want)
    assert set().union(*(p for _, p in results)) == set(want)


def _fail_in_forward(rank: int, world: int) -> None:
    _, pipe = fresh("gpt-4")
    x, y, loss_fn = data("gpt")
    stage = pipe.build_stage(rank, "cpu")
    if rank == 2:
        def boom(*args: Any) -> Any:
            raise RuntimeError("injected failure")
        stage.modules[2].forward = boom  # type: ignore[method-assign]
    stage.runner("1f1b", n_microbatches=4, loss_fn=loss_fn).step(x, target=y)


def test_a_failing_rank_stops_all_and_is_named() -> None:
    fresh("gpt-4")
    t0 = time.monotonic()
    with pytest.raises(PipelineRuntimeError, match=r"rank 2 failed at action 2F0: .*injected failure") as info:
        spawn(_fail_in_forward, 4, timeout_s=TIMEOUT_S)
    assert info.value.rank == 2 and info.value.action == "2F0"
    assert time.monotonic() - t0 < 30  # not the 120 s timeout: the launcher stopped the others


def _bad_plan(rank: int, world: int) -> None:
    _, pipe = fresh("gpt-2")
    b0 = pipe.plan.boundaries[0]
    v = dataclasses.replace(b0.values[0], shape=("B", "S", 64))
    pipe.plan = dataclasses.replace(pipe.plan, boundaries=(dataclasses.replace(b0, values=(v,)),))
    x, y, loss_fn = data("gpt")
    pipe.build_stage(rank, "cpu").runner("gpipe", n_microbatches=4, loss_fn=loss_fn).step(x, target=y)


def test_shape_mismatch_is_reported_by_the_sender() -> None:
    fresh("gpt-2")
    with pytest.raises(PipelineRuntimeError, match=r"rank 0 failed at action 0F0: .*'add_4' does not match the plan: "
                       r"expected shape \(1, 16, 64\) float32, got \(1, 16, 32\)"):
        spawn(_bad_plan, 2, timeout_s=TIMEOUT_S)


def _ours_and_torch(rank: int, world: int, schedule: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe

    _, pipe = fresh("gpt-2")
    x, y, loss_fn = data("gpt")
    ours = pipe.build_stage(rank, "cpu")
    ours.runner(schedule, n_microbatches=4, loss_fn=loss_fn).step(x, target=y)
    theirs = pipe.build_stage(rank, "cpu")
    cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule]
    sched = cls(theirs.as_pipelining_stage(rank, n_microbatches=4), 4, loss_fn=loss_fn)
    if rank == 0:
        sched.step(x)
    else:
        sched.step(target=y)
    theirs.reduce_tied_grads()  # torch's schedules know nothing of weights tied across ranks
    grads = lambda st: {n: p.grad for n, p in st.named_parameters(remove_duplicate=False)}  # noqa: E731
    return grads(ours), grads(theirs)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_torch_pipelining_runs_our_stages_with_the_same_gradients(schedule: str) -> None:
    fresh("gpt-2")
    for ours, theirs in spawn(_ours_and_torch, 2, schedule, timeout_s=TIMEOUT_S):
        assert ours.keys() == theirs.keys()
        assert_params(ours, theirs)


def _train_counting(rank: int, world: int, schedule: str) -> tuple[dict[str, torch.Tensor], int, list[Any]]:
    _, pipe = fresh("unet-skip")
    x, y, loss_fn = data("unet")
    stage = pipe.build_stage(rank, "cpu")
    params = stage.parameters()
    opt = torch.optim.SGD(params, lr=LR) if params else None
    runner = stage.runner(schedule, n_microbatches=4, loss_fn=loss_fn, batch_size=len(x))
    for _ in range(STEPS):
        stage_zero_grad(params)
        runner.step(x if rank == 0 else None, target=y)
        if opt is not None:
            opt.step()
    sent = runner.interpreter.sent  # the last step's messages
    return {n: p.detach() for n, p in stage.named_parameters(remove_duplicate=False)}, runner.transport.bytes_sent, sent


def _relay_bytes(plan: Any, rank: int, microbatch: int, m: int) -> int:
    """What rank ``rank`` (stage ``rank``) would send per step relaying every value
    through each cut: activations over its right cut, gradients over its left cut."""
    def cut(b: int, grad: bool) -> int:
        return sum(poly.evaluate(poly.from_text(v.bytes), microbatch, 1)
                   for v in plan.boundaries[b].values if not grad or v.requires_grad)
    last = plan.n_stages - 1
    return m * ((cut(rank, False) if rank < last else 0) + (cut(rank - 1, True) if rank > 0 else 0))


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_skip_connections_go_straight_to_the_stage_that_uses_them(schedule: str) -> None:
    model, pipe = fresh("unet-skip")
    plan = pipe.plan
    # enc1_5 is made in stage 0 and crosses cuts 0, 1 and 2: relayed, stages 1 and 2 would pass it on.
    assert [b.index for b in plan.boundaries if "enc1_5" in [v.name for v in b.values]] == [0, 1, 2]
    assert "enc1_5" in plan.stages[3].inputs and "enc1_5" not in plan.stages[0].inputs
    x, y, loss_fn = data("unet")
    _, want = reference(model, x, y, loss_fn)
    results = spawn(_train_counting, 4, schedule, timeout_s=TIMEOUT_S)
    for params, _, _ in results:
        if params:
            assert_params(params, want)
    relay = [_relay_bytes(plan, r, len(x) // 4, 4) for r in range(4)]
    direct = [sent for _, sent, _ in results]
    assert [d // STEPS for d in direct] == [sum(n for _, _, n in log) for _, _, log in results]
    assert all(d <= r * STEPS for d, r in zip(direct, relay)), (direct, relay)
    assert direct[1] < relay[1] * STEPS and direct[2] < relay[2] * STEPS  # the pass-through ranks
    assert sum(direct) < sum(relay) * STEPS
    for _, _, log in results:
        for (_, src, dst, _), names, _ in log:
            if "enc1_5" in names:
                assert {src, dst} == {0, 3}
    assert any("enc1_5" in names for _, _, log in results for _, names, _ in log)
    print(f"\nU-Net {schedule}, bytes per step by rank: relay {relay}, direct {[d // STEPS for d in direct]}")


# -- DistTransport: one packed transfer per message, buffers reused across steps ----------

_MIXED = [((2, 3), torch.float32), ((1,), torch.int64), ((5,), torch.bool), ((3, 1), torch.float16),
          ((0, 4), torch.float32), ((7,), torch.float64)]


def _exchange(rank: int, world: int) -> list[Any]:
    import torch.distributed as dist

    from partitioner.runtime.dist import DistTransport

    tr = DistTransport(n_stages=2)
    key = ("F", 0, 1, 0)
    seen = []
    for step in range(2):
        if rank == 0:
            g = torch.Generator().manual_seed(step)
            tensors = [torch.randint(0, 2, shape, generator=g).to(dtype) if dtype == torch.bool
                       else (torch.randn(shape, generator=g) * 100).to(dtype) for shape, dtype in _MIXED]
            tr.post(0, [(key, 1, tensors)], [], "cpu")
            tr.flush()
            seen.append((tensors, tr.bytes_sent))
        else:
            got = tr.post(1, [], [(key, 0, _MIXED)], "cpu")[0].wait()
            new = [t.grad is None and not t.requires_grad for t in got]
            seen.append([(t.clone(), f, t.untyped_storage().data_ptr()) for t, f in zip(got, new)])
            got[0].requires_grad_()
            (got[0] * 2).sum().backward()  # a .grad on step 0's tensor must not reach step 1's
        dist.barrier()
    return seen


def test_a_message_of_mixed_dtypes_arrives_whole_and_its_buffers_are_reused() -> None:
    sent, got = spawn(_exchange, 2, timeout_s=TIMEOUT_S)
    payload = sum(torch.empty(s, dtype=d).nbytes for s, d in _MIXED)
    for step in range(2):
        tensors, bytes_sent = sent[step]
        assert bytes_sent == payload * (step + 1)  # payload only, not the alignment padding
        for want, (have, new, _) in zip(tensors, got[step]):
            assert have.dtype == want.dtype and have.shape == want.shape
            assert torch.equal(have, want)
            assert new  # new tensor objects: step 0's .grad and requires_grad do not carry over
    # the same bytes hold step 1's message (CPU buffers are kept per key) ...
    assert [p for _, _, p in got[0]] == [p for _, _, p in got[1]]
    assert len({p for _, _, p in got[0]}) == 1  # ... and every value is a view of one packed buffer


def _train_mid_block(rank: int, world: int, schedule: str) -> tuple[Any, ...]:
    _, pipe = _mid_block_pipe()
    x, y, loss_fn = data("gpt")
    stage = pipe.build_stage(rank, "cpu")
    params = stage.parameters()
    opt = torch.optim.SGD(params, lr=LR)
    runner = stage.runner(schedule, n_microbatches=4, loss_fn=loss_fn)
    losses = []
    for _ in range(STEPS):
        stage_zero_grad(params)
        loss = runner.step(x if rank == 0 else None, target=y)
        losses.append(float("nan") if loss is None else loss.item())
        opt.step()
    return (losses, {n: p.detach() for n, p in stage.named_parameters(remove_duplicate=False)},
            runner.interpreter.sent, runner.events)


def _mid_block_pipe() -> tuple[Any, Any]:
    from partitioner import partition
    from tests.fixtures.models import FIXTURES

    @functools.cache
    def built() -> tuple[Any, Any, dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        model = FIXTURES["gpt"].build()
        # Inside block 1: the residual and ln_2's output both cross (one message, two values).
        pipe = partition(model, example_inputs=FIXTURES["gpt"].inputs(), n_gpus=2,
                         pinned_cuts=["transformer.h.1.mlp"])
        return model, pipe, copy.deepcopy(model.state_dict())

    model, pipe, init = _MID.setdefault("built", built)()
    model.load_state_dict(init)
    model.zero_grad(set_to_none=True)
    return model, pipe


_MID: dict[str, Any] = {}


@pytest.mark.parametrize("schedule", ["1f1b", "zb-h1"])
def test_a_cut_inside_a_block_packs_its_values_and_trains_like_one_process(schedule: str) -> None:
    model, pipe = _mid_block_pipe()
    assert len(pipe.plan.boundaries[0].values) == 2
    x, y, loss_fn = data("gpt")
    want_losses, want = reference(model, x, y, loss_fn)
    results = spawn(_train_mid_block, 2, schedule, timeout_s=TIMEOUT_S)
    assert results[1][0] == pytest.approx(want_losses, rel=1e-5)
    for _, params, _, _ in results:
        assert_params(params, want)
    forward = [names for (d, _, _, _), names, _ in results[0][2] if d == "F"]
    assert forward and all(len(names) == 2 for names in forward)
    from partitioner.runtime.trace import breakdown

    for rank, (_, _, _, events) in enumerate(results):  # the last step, by action kind
        kinds = breakdown(events)
        assert kinds["F"] > 0 and ("B" in kinds) == (schedule == "1f1b") and ("W" in kinds) == (schedule != "1f1b")
        assert ("SEND_F" if rank == 0 else "SEND_B") in kinds
        assert sum(v for k, v in kinds.items() if k != "wall") == pytest.approx(kinds["wall"])


@functools.cache
def _hf_llama_mid_layer() -> tuple[Any, Any, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    from partitioner import partition
    from tests.hf.models import BATCH, CASES, SEQ

    torch.manual_seed(0)
    model = CASES["llama"].build(4)
    inputs = CASES["llama"].inputs(BATCH, SEQ)
    # Inside layer 1: two int sizes, the bool causal mask, rotary cos/sin and two activations cross.
    pipe = partition(model, 2, inputs, device="cpu", link="loopback", pinned_cuts=["model.layers.1.mlp"])
    return model, pipe, inputs, copy.deepcopy(model.state_dict())


def _hf_loss(out: Any, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), y.flatten())


def _hf_target() -> torch.Tensor:
    from tests.hf.models import BATCH, SEQ, VOCAB

    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(5))


def _train_hf_llama(rank: int, world: int) -> tuple[dict[str, torch.Tensor], list[Any]]:
    _, pipe, inputs, _ = _hf_llama_mid_layer()
    stage = pipe.build_stage(rank, "cpu")
    opt = torch.optim.SGD(stage.parameters(), lr=LR)
    runner = stage.runner("1f1b", n_microbatches=2, loss_fn=_hf_loss, batch_size=len(inputs["input_ids"]))
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        runner.step(**(inputs if rank == 0 else {}), target=_hf_target())
        opt.step()
    return {n: p.detach().clone() for n, p in stage.named_parameters(remove_duplicate=False)}, runner.interpreter.sent


def test_hf_llama_cut_inside_a_layer_sends_mixed_dtypes_in_one_message_and_trains_like_one_process() -> None:
    pytest.importorskip("transformers")
    model, pipe, inputs, init = _hf_llama_mid_layer()
    kinds = {(v.kind, v.dtype) for v in pipe.plan.boundaries[0].values}
    assert {("int", ""), ("tensor", "bool"), ("tensor", "float32")} <= kinds, kinds
    want = sgd_reference(model, inputs, _hf_target(), _hf_loss, steps=STEPS, lr=LR, init=init).params
    results = spawn(_train_hf_llama, 2, timeout_s=TIMEOUT_S)
    for params, _ in results:
        assert_params(params, want)
    forward = [names for (d, _, _, _), names, _ in results[0][1] if d == "F"]
    assert forward and all(len(names) == len(pipe.plan.boundaries[0].values) for names in forward)
