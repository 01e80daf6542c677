"""The one definition of what crosses a cut (``partitioner.passes.liveness``), checked against
the definition written out node by node, on graphs with skips, several inputs and outputs,
non-tensor values and a shuffled (still topological) order."""

from __future__ import annotations

import random

import pytest
import torch
from torch import fx

from partitioner.passes.liveness import Liveness
from partitioner.passes.split import compute_nodes, live_values
from tests.fixtures.models import FIXTURES


def _brute(gm: fx.GraphModule, order: list[fx.Node]) -> list[list[fx.Node]]:
    """Per cut k: values produced before position k (inputs: before 0) and used at or after k
    (the output: at the end), in the order inputs, then ``order``."""
    n, pos = len(order), {v: i for i, v in enumerate(order)}
    values = [v for v in gm.graph.nodes if v.op == "placeholder"] + order
    return [[v for v in values if pos.get(v, -1) < k and any(pos.get(u, n) >= k for u in v.users)]
            for k in range(n + 1)]


def _shuffled(order: list[fx.Node], seed: int) -> list[fx.Node]:
    """A random topological order of ``order`` (Kahn's algorithm, random pick among ready)."""
    rng = random.Random(seed)
    inside = set(order)
    deps = {v: {a for a in v.all_input_nodes if a in inside} for v in order}
    done: set[fx.Node] = set()
    out: list[fx.Node] = []
    while len(out) < len(order):
        ready = [v for v in order if v not in done and deps[v] <= done]
        pick = rng.choice(ready)
        done.add(pick)
        out.append(pick)
    return out


def _graphs() -> list[tuple[str, fx.GraphModule]]:
    class Odd(torch.nn.Module):  # a size (an int) crossing, two outputs, an unused input
        def forward(self, x: torch.Tensor, y: torch.Tensor, unused: torch.Tensor) -> tuple[torch.Tensor, ...]:
            n = x.size(0)
            h = torch.relu(x) + y
            return h.view(n, -1) * 2, x

    out = [("odd", fx.symbolic_trace(Odd()))]
    for name in ("resnet", "unet", "multi_io"):
        out.append((name, fx.symbolic_trace(FIXTURES[name].build())))
    return out


@pytest.mark.parametrize("name,gm", _graphs(), ids=lambda x: x if isinstance(x, str) else "")
def test_every_question_matches_the_definition(name: str, gm: fx.GraphModule) -> None:
    base = compute_nodes(gm)
    for seed in range(3):
        order = base if seed == 0 else _shuffled(base, seed)
        truth = _brute(gm, order)
        live = Liveness(gm, order)
        odd = {v for v in gm.graph.nodes if len(v.name) % 2}
        assert live.crossing(list(range(len(order) + 1))) == [tuple(c) for c in truth]
        assert live.count() == [len(c) for c in truth]
        assert live.count(odd.__contains__) == [sum(v in odd for v in c) for c in truth]
        size = {v: 1 + len(v.name) for v in gm.graph.nodes}  # a weight per value that differs between values
        assert live.totals(lambda v: size[v]) == [sum(size[v] for v in c) for c in truth]
        assert live.totals([size[v] for v in live.values]) == live.totals(size.__getitem__)
        assert live.first(odd.__contains__) == [next((v for v in c if v in odd), None) for c in truth]
        for s in live.spans:
            assert all(s.value in truth[k] for k in s.cuts)
            assert set(s.consumers) == set(s.value.users)
    assert any(truth[k] for k in range(1, len(base)))  # the graph has something to cross


def test_split_lists_the_same_values_at_arbitrary_cuts() -> None:
    gm = fx.symbolic_trace(FIXTURES["unet"].build())
    n = len(compute_nodes(gm))
    cuts = [n - 3, 2, n // 2, 2]  # unsorted, repeated: answered per entry, in the order asked
    truth = _brute(gm, compute_nodes(gm))
    assert live_values(gm, cuts) == [tuple(v.name for v in truth[k]) for k in cuts]


def test_a_node_outside_the_order_counts_as_produced_before_it() -> None:
    gm = fx.symbolic_trace(FIXTURES["mlp"].build())
    order = compute_nodes(gm)
    live = Liveness(gm, order)
    x = next(v for v in gm.graph.nodes if v.op == "placeholder")
    assert live.span(x) == (x, -1, 0)  # used by the first node only: crosses cut 0
    last = order[-1]
    assert live.span(last) == (last, len(order) - 1, len(order))  # the graph output uses it at the end
