"""Models as people call them (issue 9, items 1, 2, 3, 5): no argument of a call is dropped
silently, optional arguments left at their default trace on fx, slices bounded by traced
sizes are priced, and ``seq_dims`` marks a sequence dimension on both capture routes."""

from __future__ import annotations

import operator
import warnings

import pytest
import torch
from torch import fx, nn

from partitioner import PartitionError, load_plan, partition
from partitioner.passes.trace import capture

ROUTES = ("fx", "export")


class Biased(nn.Module):
    """An optional tensor argument with a Python default (item 2's shape of forward)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
        h = self.a(x) + (0 if bias is None else bias)
        return self.b(h) * scale


class Flags(nn.Module):
    """A keyword flag that changes what comes back, like ``output_hidden_states``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None, return_hidden: bool = False) -> dict:
        h = self.a(x)
        out = {"y": self.b(h)}
        if return_hidden:
            out["hidden"] = h
        if target is not None:
            out["loss"] = (out["y"] - target).pow(2).mean()
        return out


class LearnedPositions(nn.Module):
    """A learned positional table sliced to the input's length (item 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.pos = nn.Parameter(torch.randn(1, 32, 8))
        self.extra = nn.Parameter(torch.randn(32, 4))
        self.a, self.b = nn.Linear(12, 8), nn.Linear(8, 8)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        n = idx.shape[1]
        h = self.emb(idx) + self.pos[:, :n]
        # slices inside a list, a tuple and a keyword argument
        h = torch.cat([h, self.extra[:n].expand(idx.shape[0], n, 4)], dim=-1)
        h = self.a(h)
        h = h[(slice(None), slice(0, n, 1))]
        return self.b(torch.narrow(h, dim=1, start=0, length=n))


def _quiet(fn, *a, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **kw)


# item 1 ------------------------------------------------------------------------------

@pytest.mark.parametrize("route", ROUTES)
def test_a_keyword_argument_not_in_the_example_is_refused_by_name(route: str) -> None:
    model, x = Flags(), torch.randn(4, 8)
    pipe = _quiet(partition, model, 2, {"x": x}, capture_route=route, device="cpu")
    torch.testing.assert_close(pipe(x=x)["y"], model(x)["y"])
    with pytest.raises(PartitionError, match=r"target=a float32 tensor of shape \(4, 8\).*'target' was not in "
                                             r"the example inputs.*include target in the example inputs"):
        pipe(x=x, target=torch.randn(4, 8))
    with pytest.raises(PartitionError, match=r"return_hidden"):
        pipe(x=x, return_hidden=True)
    # passing the default explicitly changes nothing, so it is accepted
    torch.testing.assert_close(pipe(x=x, return_hidden=False, target=None)["y"], model(x)["y"])


@pytest.mark.parametrize("route", ROUTES)
def test_an_argument_in_the_example_is_honoured(route: str) -> None:
    model, x, t = Flags(), torch.randn(4, 8), torch.randn(4, 8)
    pipe = _quiet(partition, model, 2, {"x": x, "target": t, "return_hidden": True}, capture_route=route,
                  device="cpu")
    out, want = pipe(x=x, target=t, return_hidden=True), model(x, t, True)
    assert set(out) == {"y", "hidden", "loss"}
    torch.testing.assert_close(out["loss"], want["loss"])
    torch.testing.assert_close(out["hidden"], want["hidden"])


def test_export_refuses_another_value_of_a_constant_it_was_captured_with() -> None:
    model, x = Flags(), torch.randn(4, 8)
    pipe = _quiet(partition, model, 2, {"x": x, "return_hidden": True}, capture_route="export", device="cpu")
    with pytest.raises(PartitionError, match=r"return_hidden=False.*captured with return_hidden=True"):
        pipe(x=x, return_hidden=False)
    with pytest.raises(PartitionError, match=r"does not pass 'return_hidden'"):
        pipe(x=x)  # the model's default (False) is not what the graph computes


def test_a_missing_input_is_named_not_a_treespec() -> None:
    model, x, t = Flags(), torch.randn(4, 8), torch.randn(4, 8)
    pipe = _quiet(partition, model, 2, {"x": x, "target": t}, capture_route="export", device="cpu")
    with pytest.raises(PartitionError, match=r"does not pass 'target'.*a float32 tensor of shape \(4, 8\)") as info:
        pipe(x=x)
    assert "TreeSpec" not in str(info.value)


# item 2 ------------------------------------------------------------------------------

def test_an_optional_argument_left_at_its_default_traces_on_fx() -> None:
    model, x = Biased(), torch.randn(4, 8)
    pipe = _quiet(partition, model, 2, (x,), device="cpu")
    assert pipe.plan.capture == "fx" and not any("torch.export" in n or "fell back" in n for n in pipe.plan.notes)
    torch.testing.assert_close(pipe(x), model(x))
    torch.testing.assert_close(pipe(x, None, 1.0), model(x))
    with pytest.raises(PartitionError, match=r"bias=a float32 tensor.*'bias' was not in the example inputs"):
        pipe(x, torch.ones(8))
    with pytest.raises(PartitionError, match=r"scale=2.0.*'scale' was not in the example inputs"):
        pipe(x, scale=2.0)
    again = _quiet(load_plan(pipe.plan.to_json()).apply, model)  # the plan re-applies (same capture)
    torch.testing.assert_close(again(x), model(x))


def test_an_optional_argument_given_in_the_example_stays_an_input_on_fx() -> None:
    model, x, b = Biased(), torch.randn(4, 8), torch.randn(4, 8)
    pipe = _quiet(partition, model, 2, (x, b), device="cpu")
    assert pipe.plan.capture == "fx"
    b2 = torch.randn(4, 8)
    torch.testing.assert_close(pipe(x, b2), model(x, b2))


def test_leaving_out_a_tensor_the_example_had_names_it_on_fx() -> None:
    model, x, b = Biased(), torch.randn(4, 8), torch.randn(4, 8)
    pipe = _quiet(partition, model, 2, (x, b), device="cpu")
    assert pipe.plan.capture == "fx"
    with pytest.raises(PartitionError, match=r"does not pass 'bias', which the example inputs had \(a float32 tensor"):
        pipe(x)  # the graph adds bias: None would fail deep inside a stage


def test_concrete_args_are_checked_at_call_time() -> None:
    model, x = Biased(), torch.randn(4, 8)
    pipe = _quiet(partition, model, 2, (x,), example_kwargs={"scale": 2.0}, concrete_args={"scale": 2.0},
                  capture_route="fx", device="cpu")
    torch.testing.assert_close(pipe(x, scale=2.0), model(x, scale=2.0))
    with pytest.raises(PartitionError, match=r"captured with scale=2.0 \(concrete_args\)"):
        pipe(x)  # the model would use 1.0


# item 3 ------------------------------------------------------------------------------

@pytest.mark.parametrize("n_stages", [2, 3])
def test_a_slice_bounded_by_a_traced_size_is_priced(n_stages: int) -> None:
    model, idx = LearnedPositions(), torch.randint(0, 50, (4, 10))
    pipe = _quiet(partition, model, n_stages, (idx,), device="cpu")
    assert pipe.plan.capture == "fx"
    assert not any("static" in n for n in pipe.plan.notes), pipe.plan.notes  # symbolic in S
    torch.testing.assert_close(pipe(idx), model(idx))
    longer = torch.randint(0, 50, (4, 20))
    torch.testing.assert_close(pipe(longer), model(longer))
    cost10, cost20 = (sum(c["fwd_flops"] for c in pipe.plan.cost_at(batch=4, seq=s)) for s in (10, 20))
    assert cost20 > cost10
    again = _quiet(load_plan(pipe.plan.to_json()).apply, model)  # slice nodes survive the plan round trip
    assert again.plan.cuts == pipe.plan.cuts
    torch.testing.assert_close(again(longer), model(longer))


def test_no_graph_value_is_left_inside_a_slice() -> None:
    """Every walker of node arguments (pytree in the cost passes, fx.map_arg in split) must
    see the same nodes: after capture no slice holds one."""
    model, idx = LearnedPositions(), torch.randint(0, 50, (4, 10))
    gm = capture(model, (idx,), {}, route="fx").gm

    def slices_with_nodes(a: object) -> list[slice]:
        found: list[slice] = []

        def walk(v: object) -> None:
            if isinstance(v, slice):
                if any(isinstance(p, fx.Node) for p in (v.start, v.stop, v.step)):
                    found.append(v)
            elif isinstance(v, (tuple, list)):
                for e in v:
                    walk(e)
            elif isinstance(v, dict):
                for e in v.values():
                    walk(e)

        walk(a)
        return found

    for node in gm.graph.nodes:
        assert not slices_with_nodes((node.args, node.kwargs)), node.format_node()
    lifted = [n for n in gm.graph.nodes if n.target is slice]
    assert len(lifted) >= 3  # pos[:, :n], extra[:n], h[:, 0:n:1]
    assert all(any(u.target is operator.getitem for u in n.users) for n in lifted)


# item 5 ------------------------------------------------------------------------------

class Reshaping(nn.Module):
    """A float sequence input whose length the graph reshapes with (bakes in without S)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        h = h.reshape(h.shape[0], h.shape[1], 2, 4).flatten(2)
        return self.b(h + mask[..., None])


@pytest.mark.parametrize("route", ROUTES)
def test_seq_dims_marks_a_sequence_dimension_on_both_routes(route: str) -> None:
    model, x, mask = Reshaping(), torch.randn(4, 10, 8), torch.ones(4, 10)
    pipe = _quiet(partition, model, 2, {"x": x, "mask": mask}, seq_dims={"x": 1, "mask": -1},
                  capture_route=route, device="cpu")
    assert pipe.plan.symbols == {"B": 4, "S": 10}
    assert not any("static" in n for n in pipe.plan.notes), pipe.plan.notes
    assert {s.name: s.dims for s in pipe.plan.input_specs()} == {"x": ((0, "B"), (1, "S")), "mask": ((0, "B"), (1, "S"))}
    x2, m2 = torch.randn(4, 13, 8), torch.ones(4, 13)
    torch.testing.assert_close(pipe(x2, m2), model(x2, m2))  # another length runs: S was not baked in
    again = _quiet(load_plan(pipe.plan.to_json()).apply, model)
    torch.testing.assert_close(again(x2, m2), model(x2, m2))


@pytest.mark.parametrize("seq_dims, match", [
    ({"y": 1}, r"seq_dims names 'y', which is not a tensor in the example inputs; name one of x, mask"),
    ({"x": 0}, r"seq_dims\['x'\] = 0 is not a sequence dimension .* \(4, 10, 8\): use an int in 1..2"),
    ({"x": 3}, r"seq_dims\['x'\] = 3"),
    ({"x": "1"}, r"seq_dims\['x'\] = '1'"),
    ([("x", 1)], r"seq_dims must map input names to a dimension"),
])
def test_seq_dims_mistakes_are_named(seq_dims: object, match: str) -> None:
    model, x, mask = Reshaping(), torch.randn(4, 10, 8), torch.ones(4, 10)
    with pytest.raises(PartitionError, match=match):
        partition(model, 2, {"x": x, "mask": mask}, seq_dims=seq_dims, device="cpu")  # type: ignore[arg-type]
