"""The simulator replays the same action lists and reproduces the textbook figures on
uniform stages (Huang et al. 2019; Narayanan et al. 2021)."""

from __future__ import annotations

import itertools

import pytest

from partitioner.schedule import Action, Schedule, ScheduleError, build_schedule
from partitioner.simulator import simulate, timeline

F, B = 1.0, 2.0  # uniform per-stage forward / backward time, no communication


@pytest.mark.parametrize("name, p, m", list(itertools.product(("gpipe", "1f1b"), (1, 2, 3, 4, 6), (1, 2, 3, 4, 8, 13))))
def test_gpipe_and_1f1b_match_the_analytic_bubble(name: str, p: int, m: int) -> None:
    r = simulate(build_schedule(name, p, m), [F] * p, [B] * p)
    assert r.step_time == (m + p - 1) * (F + B)
    assert r.bubble_fraction == pytest.approx((p - 1) / (m + p - 1))
    assert r.busy == (m * (F + B),) * p
    # GPipe keeps every micro-batch alive; 1F1B caps stage i at p - i.
    want = (m,) * p if name == "gpipe" else tuple(min(m, p - i) for i in range(p))
    assert r.peak_inflight == want


@pytest.mark.parametrize("p, v, k", list(itertools.product((1, 2, 3, 4), (1, 2, 3), (1, 2, 3))))
def test_interleaved_bubble_shrinks_by_v(p: int, v: int, k: int) -> None:
    """Exact on uniform stages: step = (v*m + p - 1)(f + b) with f, b per *virtual*
    stage, so each rank idles (p - 1)(f + b) = (p - 1)(F_rank + B_rank) / v, where
    F_rank = v*f is a rank's whole forward; bubble fraction (p - 1) / (v*m + p - 1)."""
    m, n = k * p, v * p
    r = simulate(build_schedule("interleaved-1f1b", p, m, n), [F] * n, [B] * n)
    assert r.step_time == (v * m + p - 1) * (F + B)
    idle = r.step_time - r.busy[0]
    assert idle == pytest.approx((p - 1) * (v * F + v * B) / v)
    assert r.bubble_fraction == pytest.approx((p - 1) / (v * m + p - 1))


def test_naive_is_plain_model_parallel() -> None:
    r = simulate(build_schedule("naive", 4, 8), [F] * 4, [B] * 4)
    assert r.step_time == 4 * (F + B) and r.bubble_fraction == pytest.approx(3 / 4)


def test_transfer_times_land_on_the_receiver() -> None:
    # 0F0 | 0.5 | 1F0 1B0 | 0.25 | 0B0, and the per-stage times are not uniform.
    r = simulate(build_schedule("gpipe", 2, 1), [1, 3], [2, 4], send_time=[0.5], bwd_send_time=[0.25])
    assert r.step_time == 1 + 0.5 + 3 + 4 + 0.25 + 2
    recv = {str(e.action): e for e in r.events}
    assert (recv["1RECV_F0"].start, recv["1RECV_F0"].end) == (0.0, 1.5)
    assert (recv["0SEND_F0"].start, recv["0SEND_F0"].end) == (1.0, 1.5)
    assert recv["0B0"].start == 8.75


def test_split_backward_lets_the_gradient_leave_early() -> None:
    # Rank 1 sends the input grad before its weight grad, so rank 0 starts sooner.
    s = Schedule.from_text(
        "schedule gpipe-iw ranks=2 stages=2 microbatches=1\n"
        "rank 0: 0F0 0SEND_F0 0RECV_B0 0I0 0W0\n"
        "rank 1: 1RECV_F0 1F0 1I0 1SEND_B0 1W0\n"
    )
    # rank 1: F [1,2], I [2,3], W [3,4]; rank 0: F [0,1], I [3,4], W [4,5].
    r = simulate(s, [F, F], [B, B])
    assert r.step_time == 5.0 and r.busy == (3.0, 3.0)
    assert simulate(s, [F, F], [B, B], igrad_time=[0.5, 0.5]).step_time == 4.5  # 2.5 + 0.5 + 1.5
    assert r.peak_inflight == (1, 1)
    assert simulate(build_schedule("gpipe", 2, 1), [F, F], [B, B]).step_time == 6.0  # unsplit


def test_events_respect_program_order_and_messages() -> None:
    s = build_schedule("interleaved-1f1b", 2, 4, 4)
    r = simulate(s, [1, 2, 1, 2], [2, 3, 2, 3], send_time=[0.1, 0.2, 0.3], bwd_send_time=[0.3, 0.2, 0.1])
    assert sorted((e.rank, e.action) for e in r.events) == sorted(
        (q, a) for q, acts in enumerate(s.actions) for a in acts
    )
    for q in range(2):
        comp = sorted((e for e in r.events if e.rank == q and e.action.is_compute), key=lambda e: e.start)
        assert all(x.end <= y.start for x, y in itertools.pairwise(comp))  # a rank runs one thing at a time
    sends = {
        (e.action.kind[-1], e.action.stage, e.action.microbatch): e.end
        for e in r.events
        if e.action.kind.startswith("SEND")
    }
    for e in r.events:
        if e.action.kind.startswith("RECV"):
            src = e.action.stage + (1 if e.action.kind == "RECV_B" else -1)
            assert e.end >= sends[(e.action.kind[-1], src, e.action.microbatch)]


def test_timeline_picture() -> None:
    r = simulate(build_schedule("1f1b", 2, 2), [1, 1], [1, 1])
    assert timeline(r, 2) == "rank 0: 0F0 0F1 .   0B0 .   0B1\nrank 1: .   1F0 1B0 1F1 1B1 ."


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"fwd_time": [1], "bwd_time": [1, 1]}, r"fwd_time needs 2 values \(one per stage\), got 1"),
        ({"fwd_time": [1, 1], "bwd_time": [1, -1]}, r"bwd_time must be finite and >= 0, got -1"),
        ({"fwd_time": [1, float("nan")], "bwd_time": [1, 1]}, r"fwd_time must be finite"),
        (
            {"fwd_time": [1, 1], "bwd_time": [1, 1], "send_time": [1, 1]},
            r"send_time needs 1 values \(one per boundary\), got 2",
        ),
        (
            {"fwd_time": [1, 1], "bwd_time": [1, 1], "igrad_time": [2, 0]},
            r"igrad_time must not exceed bwd_time",
        ),
    ],
)
def test_input_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ScheduleError, match=match):
        simulate(build_schedule("gpipe", 2, 2), **kwargs)


def test_invalid_schedule_is_rejected_not_simulated() -> None:
    s = build_schedule("gpipe", 2, 1)
    bad = Schedule(
        "bad",
        2,
        2,
        1,
        (
            (Action(0, "F", 0), Action(0, "RECV_B", 0), Action(0, "SEND_F", 0), Action(0, "B", 0)),
            s.actions[1],
        ),
    )
    with pytest.raises(ScheduleError, match="deadlock"):
        simulate(bad, [1, 1], [1, 1])


def test_zero_bubble_activations_live_until_w() -> None:
    """A micro-batch's activations count as in flight from F to W (W needs the stage's
    inputs and the saved graph), not to I: zb-h1 on 2 ranks keeps 2 on the last stage,
    where 1F1B keeps 1; this is what the solver prices memory with."""
    one = simulate(build_schedule("1f1b", 2, 4), [1.0, 1.0], [2.0, 2.0])
    zb = simulate(build_schedule("zb-h1", 2, 4), [1.0, 1.0], [2.0, 2.0])
    assert one.peak_inflight == (2, 1) and zb.peak_inflight == (2, 2)
    s = Schedule.from_text("schedule iw ranks=1 stages=1 microbatches=2\nrank 0: 0F0 0I0 0F1 0I1 0W0 0W1\n")
    assert simulate(s, [1.0], [2.0]).peak_inflight == (2,)  # I released nothing
    s = Schedule.from_text("schedule iw ranks=1 stages=1 microbatches=2\nrank 0: 0F0 0I0 0W0 0F1 0I1 0W1\n")
    assert simulate(s, [1.0], [2.0]).peak_inflight == (1,)


def test_plan_and_timeline_predict_the_same_step() -> None:
    """One prediction (issue 13 item 4): ``partitioner timeline`` re-simulates a loaded plan with
    ``predict_plan``, the plan builder simulates with ``predict_step`` on the same records. Before,
    the CLI sent every boundary's bytes back as gradients, so a model whose token ids cross the
    cuts (no gradient) got a different step from the CLI than from its own plan."""
    import torch
    from torch import nn

    from partitioner import load_plan, partition
    from partitioner.simulator import boundary_bytes, predict_plan
    from partitioner.tools.timeline import predicted_events

    class IdsEverywhere(nn.Module):  # token ids are read by every layer: an int64 tensor crosses every cut
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(64, 64)
            self.layers = nn.ModuleList(nn.Linear(64, 64) for _ in range(4))
            self.bias = nn.ModuleList(nn.Embedding(64, 64) for _ in range(4))

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            h = self.emb(ids)
            for layer, bias in zip(self.layers, self.bias):
                h = torch.relu(layer(h)) + bias(ids)
            return h

    torch.manual_seed(0)
    ids = torch.randint(0, 64, (16, 1024))
    plan = partition(IdsEverywhere(), 4, (ids,), link="ethernet-100g").plan
    fwd, grad = boundary_bytes(plan.boundaries, plan.prediction.microbatch_size, plan.symbols.get("S", 1))
    assert all(g < f for f, g in zip(fwd, grad))  # the ids go forward only
    loaded = load_plan(plan.to_json())
    sched = build_schedule(plan.prediction.schedule, 4, plan.prediction.n_microbatches)
    assert predict_plan(loaded, sched).step_time == plan.prediction.step_time_s
    assert predicted_events(loaded)[1] == plan.prediction.step_time_s
