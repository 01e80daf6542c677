"""The order pass (issue 13 item 6): on a multi-branch graph it offers the solver an order with
fewer bytes crossing each position, the solver's answer improves, the stages still compute
what the model computes, a plan re-applies with the order it names, and graphs without real
branches keep their recorded order."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch

import partitioner.problem as problem
from partitioner import load_plan, partition
from partitioner.passes.order import OrderForCuts, crossing_bytes, pin_order, value_sizes
from partitioner.passes.split import compute_nodes
from tests.fixtures.branchy import Inception, TwoTower, inception_inputs, two_tower_inputs


def _partition(model: torch.nn.Module, args: Any, *, reorder: bool = True, **kw: Any) -> Any:
    original = problem.OrderForCuts
    if not reorder:
        problem.OrderForCuts = lambda: OrderForCuts(min_gain=1.0)  # type: ignore[misc,assignment]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return partition(model, 4, args, device="h100-sxm", link="pcie4", **kw)
    finally:
        problem.OrderForCuts = original  # type: ignore[misc]


def test_interleaved_towers_are_ordered_one_after_the_other() -> None:
    torch.manual_seed(0)
    inter, seq = TwoTower(width=256), TwoTower(width=256, interleaved=False)
    seq.load_state_dict(inter.state_dict())
    args = two_tower_inputs(16)
    pipe = _partition(inter, args)
    report = pipe.graph.meta["pp.order"]
    assert report.chosen in ("greedy", "demand") and report.moved > 0
    # the chosen order crosses exactly as few bytes as the towers written one after the other
    assert report.total_after == _partition(seq, args).graph.meta["pp.order"].total_before
    assert report.total_after < 0.6 * report.total_before and report.max_after < report.max_before
    order = compute_nodes(pipe.graph)
    assert sum(crossing_bytes(pipe.graph, order, value_sizes(pipe.graph, {"B": 16}))) == report.total_after
    towers = [n.meta["pp.module"].split(".")[0] for n in order if n.meta["pp.module"].startswith(("a.", "b."))]
    assert towers == sorted(towers) or towers == sorted(towers, reverse=True)  # one tower, then the other
    torch.testing.assert_close(pipe(*args), inter(*args))


@pytest.mark.parametrize("build,args", [(lambda: TwoTower(width=512, depth=8), lambda: two_tower_inputs(64)),
                                        (lambda: Inception(blocks=3, c=32), lambda: inception_inputs(16, 32))])
def test_the_solver_answer_improves(build: Any, args: Any) -> None:
    torch.manual_seed(0)
    model, x = build(), args()
    before = _partition(model, x, reorder=False).plan.solver
    after = _partition(model, x).plan.solver
    assert after.total_cut_bytes < before.total_cut_bytes
    assert after.bottleneck_s < before.bottleneck_s


def test_transformer_keeps_its_recorded_order() -> None:
    from partitioner.examples import gpt_example

    model, (idx,) = gpt_example()
    pipe = _partition(model, (idx,))
    assert pipe.graph.meta["pp.order"].chosen == "recorded"
    assert pipe.graph is pipe._captured.gm  # not even copied


def test_reordered_plan_reapplies_with_its_stages() -> None:
    torch.manual_seed(0)
    model, args = Inception(blocks=2), inception_inputs(4)
    pipe = _partition(model, args)
    assert pipe.graph.meta["pp.order"].moved > 0
    plan = load_plan(pipe.plan.to_json())
    again = plan.apply(model)
    assert [s.nodes for s in again.plan.stages] == [s.nodes for s in plan.stages]
    assert again.plan.to_json() == pipe.plan.to_json()
    torch.testing.assert_close(again(*args), model(*args))


def test_pin_order_refuses_an_order_that_breaks_data_flow() -> None:
    torch.manual_seed(0)
    gm = torch.fx.symbolic_trace(TwoTower(width=32, depth=3))
    names = [n.name for n in compute_nodes(gm)]
    assert pin_order(gm, names[::-1]) == compute_nodes(gm) and "pp.order_pinned" not in gm.meta
    assert pin_order(gm, names[:-1]) == compute_nodes(gm) and "pp.order_pinned" not in gm.meta
    assert [n.name for n in pin_order(gm, names)] == names and gm.meta["pp.order_pinned"] == tuple(names)


def test_pipe_split_markers_keep_the_recorded_order() -> None:
    from torch.distributed.pipelining import pipe_split

    class Marked(TwoTower):
        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            for i, (la, lb) in enumerate(zip(self.a, self.b)):
                if i == 2:
                    pipe_split()
                x = torch.relu(la(x))
                y = torch.relu(lb(y))
            return self.head(torch.cat([x, y], dim=-1))

    torch.manual_seed(0)
    model = Marked(width=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = partition(model, 2, two_tower_inputs(4), cut_at="markers")
    assert pipe.graph.meta["pp.order"].chosen == "recorded"
