"""Routing: which stage makes each boundary value and which really use it."""

from __future__ import annotations

import pytest
import torch
from torch import fx

from partitioner.runtime.routing import Links, Route, consumed, routes
from partitioner.schedule import build_schedule
from tests.runtime.helpers import LR, STEPS, assert_params, data, fresh, reference


def _graph(code: str) -> fx.Graph:
    g = fx.Graph()
    a, b = g.placeholder("a"), g.placeholder("b")
    if code == "uses a":
        g.output((g.call_function(torch.relu, (a,)), b))
    else:
        g.output((a, b))
    return g


def test_a_returned_placeholder_is_consumed_only_by_the_last_stage() -> None:
    assert consumed(_graph("uses a"), ["a", "b"], last=False) == {"a"}
    assert consumed(_graph("returns both"), ["a", "b"], last=False) == set()
    assert consumed(_graph("returns both"), ["a", "b"], last=True) == {"a", "b"}


def test_unet_skip_connection_goes_straight_to_its_consumer() -> None:
    _, pipe = fresh("unet-skip")
    table = routes(pipe.plan, pipe.stages)
    assert table["enc1_5"] == Route("enc1_5", 0, (3,))
    assert table["enc1_5"].passes_through(1) and table["enc1_5"].passes_through(2)
    assert table["pool"] == Route("pool", 0, (1,))
    links = Links(table)
    assert links.sends(0) == [(1, ("pool",)), (3, ("enc1_5",))]
    assert links.receives(3) == [(0, ("enc1_5",)), (2, ("cat_1",))]
    assert all("enc1_5" not in names for s in (1, 2) for _, names in links.sends(s) + links.receives(s))


def test_a_skip_message_between_two_ranks_meets_its_own_receive_under_nccl_order() -> None:
    # Interleaved, 2 ranks: stage 0 sends to stages 1 and 3, both on rank 1, whose receives
    # come in another order than stage 0's sends; NCCL pairs the k-th send with the k-th
    # receive whatever the tags, so the lowering must put both sides in one order (the
    # model raises when a send meets another message's receive).
    from partitioner.comms import check, lower

    class Skip:
        out = {("F", 0): [1, 3], ("F", 1): [2], ("F", 2): [3], ("B", 3): [2, 0], ("B", 2): [1], ("B", 1): [0]}

        def targets(self, d: str, s: int) -> list[int]:
            return self.out.get((d, s), [])

        def sources(self, d: str, s: int) -> list[int]:
            return sorted(p for (dd, p), ts in self.out.items() if dd == d and s in ts)

    for m in (2, 4):
        low = lower(build_schedule("interleaved-1f1b", 2, m, 4), Skip())
        sends = [k for b in low.batches[0] for k, peer in b.sends if k[0] == "F"]
        assert ("F", 0, 3, 0) in sends and ("F", 0, 1, 0) in sends
        check(low)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_in_process_unet_skip_trains_like_the_unpartitioned_model(schedule: str) -> None:
    model, pipe = fresh("unet-skip")
    x, y, loss_fn = data("unet")
    want_losses, want = reference(model, x, y, loss_fn)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        losses.append(pipe.train_step(x, target=y, loss_fn=loss_fn, schedule=schedule, n_microbatches=4).item())
        opt.step()
    assert losses == pytest.approx(want_losses, rel=1e-5)
    assert_params(dict(model.named_parameters(remove_duplicate=False)), want)
