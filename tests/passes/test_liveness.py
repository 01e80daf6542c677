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


class _SizeMask(torch.nn.Module):
    """Two attention-like products masked by one causal mask made from ``x``'s sizes, one on
    either side of the cut (``act``); ``write`` changes the mask through a view after it is
    made, so that only the mask as written is right."""

    def __init__(self, write: bool) -> None:
        super().__init__()
        self.write = write
        self.a, self.act, self.b = torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        i = torch.arange(x.size(1))
        future = i[:, None] < i[None, :]
        if self.write:
            future[0].fill_(False)
        h = self.act(self.a((x @ x.transpose(1, 2)).masked_fill(future, 0.0) @ x))
        return self.b((h @ h.transpose(1, 2)).masked_fill(future, 0.0) @ h)


@pytest.mark.parametrize("write", [False, True])
def test_a_tensor_made_from_sizes_crosses_no_cut_and_is_rebuilt_after_it(write: bool) -> None:
    from partitioner import partition
    from partitioner.passes.liveness import rebuilt_values

    torch.manual_seed(0)
    model = _SizeMask(write)
    x = torch.randn(2, 6, 4)
    pipe = partition(model, 2, (x,), pinned_cuts=["act"])
    gm = pipe.graph
    order = compute_nodes(gm)
    mask = next(n for n in gm.graph.nodes if n.name == "lt")
    size = next(n for n in gm.graph.nodes if n.op == "call_method" and n.target == "size")
    rebuilt = rebuilt_values(gm)
    cut = next(k for k, n in enumerate(order) if n.name == "act")
    crossing = Liveness(gm, order).crossing([cut])[0]
    sent = Liveness(gm, order, rebuild=False).crossing([cut])[0]
    assert mask in sent and size not in sent  # as captured: the mask crosses, the size does not
    if write:  # written through a view (mask[0]) after it was made: sent as it is
        assert mask not in rebuilt and crossing == sent
        assert "lt" in pipe.plan.stages[1].inputs
    else:  # made again after the cut from the size, which crosses instead (8 bytes)
        assert rebuilt[mask] == {size} and mask not in crossing and size in crossing
        assert set(crossing) == (set(sent) - {mask}) | {size}
        assert "lt" not in pipe.plan.stages[1].inputs and "size" in pipe.plan.stages[1].inputs
        assert "lt" in {n.name for n in pipe.stages[1].graph.nodes if n.op == "call_function"}
    vals = pipe.flatten_inputs((x,), {})
    for st in pipe.stages:
        vals = st(*vals)
    torch.testing.assert_close(vals[0], model(x))


def test_a_value_made_from_no_size_at_all_counts_as_made_from_sizes() -> None:
    from partitioner.passes.attention import size_only_values

    class Scaled(torch.nn.Module):  # a constant tensor, and one made from it, read on both sides of any cut
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            scale = torch.ones(4) * 2
            return self.b(self.a(x * scale) * scale)

    gm = torch.export.export(Scaled(), (torch.randn(2, 4),)).module()  # fx would fold the constant
    made = {n.name: leaves for n, leaves in size_only_values(gm).items()}
    assert made == {"ones": frozenset(), "mul": frozenset()}
