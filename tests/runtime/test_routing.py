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
