"""In-process transparency: the pipelined step trains exactly like the plain model."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from partitioner.runtime.errors import PipelineRuntimeError
from tests.runtime.helpers import assert_params, data, fresh, train_in_process

CASES = [
    ("gpt-2", "gpipe", 4), ("gpt-2", "1f1b", 4), ("gpt-2x2", "interleaved-1f1b", 4),
    ("gpt-4", "1f1b", 4),
    ("unet-2", "gpipe", 2), ("unet-2", "1f1b", 4), ("unet-2x2", "interleaved-1f1b", 2),
]


@pytest.mark.parametrize("layout,schedule,m", CASES)
def test_train_step_matches_unpartitioned(layout: str, schedule: str, m: int) -> None:
    losses, want_losses, got, want = train_in_process(layout, schedule, m)
    assert losses == pytest.approx(want_losses, rel=1e-5)
    assert_params(got, want)


def test_batch_must_divide() -> None:
    _, pipe = fresh("gpt-2")
    x, y, loss_fn = data("gpt", batch=6)
    with pytest.raises(PipelineRuntimeError, match=r"batch of 6 samples does not split into 4 micro-batches.*\[1, 2, 3, 6\]"):
        pipe.train_step(x, target=y, loss_fn=loss_fn, n_microbatches=4)


def test_shape_mismatch_names_stage_value_and_shapes() -> None:
    # A plan whose cut promises a wider activation than the stage produces: what a plan
    # made for another config would do. The sending side catches it before any transfer.
    model, pipe = fresh("gpt-2")
    b0 = pipe.plan.boundaries[0]
    v = dataclasses.replace(b0.values[0], shape=("B", "S", 64))
    bad_plan = dataclasses.replace(pipe.plan, boundaries=(dataclasses.replace(b0, values=(v,)),))
    good_plan = pipe.plan
    x, y, loss_fn = data("gpt")
    try:
        pipe.plan = bad_plan
        with pytest.raises(PipelineRuntimeError, match=r"rank 0, action 0F0.*stage 0 micro-batch 0 output: value "
                           r"'add_4' does not match the plan: expected shape \(1, 16, 64\) float32, got \(1, 16, 32\)"):
            pipe.train_step(x, target=y, loss_fn=loss_fn, n_microbatches=4)
    finally:
        pipe.plan = good_plan


def test_stage_error_names_rank_and_action() -> None:
    _, pipe = fresh("gpt-2")
    x, y, _ = data("gpt")

    def bad_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")

    with pytest.raises(PipelineRuntimeError, match=r"rank 1, action 1F0 \(stage 1 forward, micro-batch 0\) failed: RuntimeError: boom"):
        pipe.train_step(x, target=y, loss_fn=bad_loss, n_microbatches=4)


def test_trace_has_every_action_and_a_prediction(tmp_path: object) -> None:
    _, pipe = fresh("gpt-2")
    x, y, loss_fn = data("gpt")
    path = f"{tmp_path}/trace.json"
    pipe.train_step(x, target=y, loss_fn=loss_fn, schedule="1f1b", n_microbatches=4, trace=path)
    trace = json.load(open(path))
    names = {(e["pid"], e["name"]) for e in trace["traceEvents"] if e["ph"] == "X"}
    assert {(0, "0F3"), (1, "1B3"), (0, "0SEND_F0"), (1, "1SEND_B2")} <= names
    assert {(1000, "0F0"), (1001, "1B3")} <= names  # the simulator's rows
    assert trace["otherData"]["predicted_step_s"] > 0


def test_breakdown_splits_a_ranks_step_by_action_kind() -> None:
    from partitioner.runtime.interpreter import TraceEvent
    from partitioner.runtime.trace import breakdown

    ms = 1_000_000
    evs = [TraceEvent(0, "0F0", 0, 10 * ms), TraceEvent(0, "0SEND_F0", 10 * ms, 11 * ms),
           TraceEvent(0, "wait B1>0:0", 12 * ms, 20 * ms), TraceEvent(0, "0RECV_B0", 11 * ms, 12 * ms),
           TraceEvent(0, "0I0", 20 * ms, 30 * ms), TraceEvent(0, "0W0", 31 * ms, 35 * ms)]
    got = breakdown(evs)
    assert got == pytest.approx({"F": 0.010, "SEND_F": 0.001, "RECV_B": 0.001, "wait B": 0.008, "I": 0.010,
                                 "W": 0.004, "between": 0.001, "wall": 0.035})
    with pytest.raises(ValueError, match=r"one rank's events, got ranks \[0, 1\]"):
        breakdown(evs + [TraceEvent(1, "1F0", 0, 1)])


class _ScalesInPlace(torch.nn.Module):
    """An in-place write into a view of an intermediate (``g[:, :4].mul_(2)``, as Funnel's
    attention does). Cut before the view, the intermediate arrives in stage 1 as a leaf that
    requires grad, which autograd refuses to write into: the stage writes into a copy. Cut
    between the view and the write, the base and the view would arrive as two tensors and
    the write would miss the base: that cut is refused."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.a(x) * 3
        g[:, :4].mul_(2)
        return self.b(g.relu())


@pytest.mark.parametrize("route,pin", [("fx", "getitem"), ("fx", None), ("export", None)])
def test_a_stage_writing_into_a_received_value_trains_like_one_process(route: str, pin: str | None) -> None:
    import copy

    from partitioner import PartitionError, partition

    torch.manual_seed(0)
    model, x = _ScalesInPlace(), torch.randn(4, 8)
    kw = dict(capture_route=route, device="cpu", pinned_cuts=[pin] if pin else [])
    pipe = partition(model, n_gpus=2, example_inputs=(x,), **kw)  # type: ignore[arg-type]
    if pin:
        assert pipe.plan.stages[1].nodes[:2] == ("getitem", "mul_")  # the view and the write in stage 1
    ref = copy.deepcopy(model)
    ref(x).pow(2).mean().backward()
    model.zero_grad(set_to_none=True)
    loss = pipe.train_step(x, target=torch.zeros(4), loss_fn=lambda out, y: out.pow(2).mean(), n_microbatches=2)
    torch.testing.assert_close(loss, ref(x).pow(2).mean().detach())
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(pipe(x), ref(x))
    if route == "fx":
        with pytest.raises(PartitionError, match=r"pinned cut 'mul_' cannot be used: mul_ writes in place into "
                                                 r"getitem, and two of its aliases would cross"):
            partition(model, n_gpus=2, example_inputs=(x,), capture_route="fx", device="cpu", pinned_cuts=["mul_"])
