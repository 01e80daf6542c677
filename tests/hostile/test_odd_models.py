"""Models that trace but do odd things: each one works (checked against the model) or is
refused with a message that says why.

Every model here is small on purpose; where the solver would not choose the awkward cut by
itself, ``pinned_cuts`` forces it (a pin names the first node of the second stage).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

from partitioner import PartitionError, Pipe, partition


def _split(model: nn.Module, *args: Any, **kw: Any) -> Pipe:
    return partition(model, n_gpus=2, example_inputs=args, device="cpu", link="loopback", **kw)


def _crossing(pipe: Pipe) -> dict[str, tuple[str, str]]:
    """Values crossing the (single) cut: name → (kind, dtype)."""
    (b,) = pipe.plan.boundaries
    return {v.name: (v.kind, v.dtype) for v in b.values}


def _is_float(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point()


def _transparent(model: nn.Module, pipe_of: Any, *args: torch.Tensor, grads: bool = True) -> Pipe:
    """Pipe and model (a deep copy, so in-place ops and buffers do not interfere) agree."""
    ref = copy.deepcopy(model)
    pipe = pipe_of(model)
    out = pipe(*(a.clone() for a in args))
    expected = ref(*(a.clone() for a in args))
    torch.testing.assert_close(out, expected)
    if grads:
        loss = sum(t.float().sum() for t in pytree.tree_leaves(out) if _is_float(t))
        ref_loss = sum(t.float().sum() for t in pytree.tree_leaves(expected) if _is_float(t))
        loss.backward()
        ref_loss.backward()
        for name, p in ref.named_parameters():
            torch.testing.assert_close(model.get_parameter(name).grad, p.grad, msg=name)
    return pipe


class Three(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)


# -- in-place ops --------------------------------------------------------------------------

class InPlace(Three):
    def __init__(self) -> None:
        super().__init__()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        h.add_(1)
        h = self.act(h)
        g = self.b(h)
        g.mul_(2)
        return self.c(g) + h  # h crosses the cut after its in-place updates


@pytest.mark.parametrize("pin", [[], ["b"], ["mul_"], ["c"]])
def test_in_place_ops_on_either_side_of_a_cut(pin: list[str]) -> None:
    pipe = _transparent(InPlace(), lambda m: _split(m, torch.randn(4, 8), pinned_cuts=pin), torch.randn(4, 8))
    if pin:
        assert pipe.plan.stages[1].nodes[0] == pin[0]


def test_in_place_on_the_model_input_matches_the_model() -> None:
    class Scribble(Three):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x.mul_(0.5)  # mutates the caller's tensor, in the model as in the pipe
            return self.c(self.b(self.a(x))) + x

    x = torch.randn(4, 8)
    _transparent(Scribble(), lambda m: _split(m, x.clone(), pinned_cuts=["c"]), x, grads=False)


# -- buffers updated in forward -------------------------------------------------------------

class Normed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn1, self.b, self.bn2 = nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 8), nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.b(self.bn1(self.a(x))))


def test_batch_norm_running_stats_follow_one_forward_of_the_batch() -> None:
    """Running statistics in training mode.

    Stages share their buffers with the model (no copies), so after ``pipe(x)`` on a whole
    batch in one process the model's running mean/var and ``num_batches_tracked`` equal
    those of a copy that ran ``model(x)`` once on the same batch. Under micro-batching
    (``train_step``, or one process per stage) every micro-batch runs the batch-norm
    forward, so the statistics are updated once per micro-batch from micro-batch
    statistics, as with gradient accumulation: they then differ from one full-batch step.
    """
    model = Normed().train()
    ref = copy.deepcopy(model)
    pipe = _split(model, torch.randn(8, 8), pinned_cuts=["b"])
    assert {"bn1.running_mean"} <= set(pipe.plan.stages[0].buffers)
    assert {"bn2.running_mean"} <= set(pipe.plan.stages[1].buffers)
    x = torch.randn(8, 8)
    torch.testing.assert_close(pipe(x), ref(x))
    for name, buf in ref.named_buffers():
        torch.testing.assert_close(model.get_buffer(name), buf, msg=name)
        owner = next(s for s in pipe.stages if name in dict(s.named_buffers()))
        assert owner.get_buffer(name) is model.get_buffer(name)  # shared, not copied
    assert int(model.bn1.num_batches_tracked) == 1


def test_batch_norm_in_eval_mode_uses_running_stats() -> None:
    model = Normed()
    with torch.no_grad():
        model.bn1.running_mean.uniform_()
    pipe = _split(model, torch.randn(8, 8), pinned_cuts=["b"])
    pipe.eval()
    model.eval()
    x = torch.randn(8, 8)
    torch.testing.assert_close(pipe(x), model(x))
    assert int(model.bn1.num_batches_tracked) == 0


# -- randomness ----------------------------------------------------------------------------

class Dropper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.d1, self.b, self.d2 = nn.Linear(8, 8), nn.Dropout(0.5), nn.Linear(8, 8), nn.Dropout(0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.d2(self.b(self.d1(self.a(x))))


def test_dropout_draws_the_same_masks_in_one_process() -> None:
    """Dropout and the RNG.

    With ``torch.manual_seed(s)`` before each call, ``pipe(x)`` in one process equals
    ``model(x)``: the stages run in graph order and draw from the one global generator
    in the same sequence as the model. Across processes (one per stage) each rank has its
    own generator, so masks differ from the single-process run unless each rank seeds its
    own stream; only the distribution is the same.
    """
    model = Dropper().train()
    pipe = _split(model, torch.randn(16, 8), pinned_cuts=["b"])
    x = torch.randn(16, 8)
    torch.manual_seed(1234)
    out = pipe(x)
    torch.manual_seed(1234)
    expected = model(x)
    assert torch.equal(out, expected)
    torch.manual_seed(99)
    assert not torch.equal(pipe(x), out)  # dropout is really on


# -- values of other types crossing a cut --------------------------------------------------

class Masked(Three):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = x > 0  # bool, computed early, used late
        idx = x.argmax(dim=-1)  # int64
        h = self.c(self.b(self.a(x)))
        return h.masked_fill(mask, 0.0) + idx.unsqueeze(-1)


def test_bool_and_int_tensors_cross_a_pinned_cut() -> None:
    pipe = _transparent(Masked(), lambda m: _split(m, torch.randn(4, 8), pinned_cuts=["c"]), torch.randn(4, 8))
    crossing = _crossing(pipe)
    assert crossing["gt"] == ("tensor", "bool")
    assert crossing["argmax"] == ("tensor", "int64")
    (b,) = pipe.plan.boundaries
    assert next(v for v in b.values if v.name == "gt").requires_grad is False


class SizeLater(Three):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.size(0)  # a Python int (a SymInt while tracing) used after the cut
        return self.c(self.b(self.a(x))).reshape(n, 2, -1)


def test_python_int_crosses_a_cut_and_follows_the_batch() -> None:
    pipe = _transparent(SizeLater(), lambda m: _split(m, torch.randn(4, 8), pinned_cuts=["c"]), torch.randn(4, 8))
    assert _crossing(pipe)["size"] == ("int", "")
    model = SizeLater()
    pipe = _split(model, torch.randn(4, 8), pinned_cuts=["c"])
    x = torch.randn(6, 8)  # another batch size: the int is computed at run time, not baked in
    torch.testing.assert_close(pipe(x), model(x))


class Nothing(nn.Module):
    def forward(self, x: torch.Tensor) -> None:
        return None


class NoneLater(Three):
    def __init__(self) -> None:
        super().__init__()
        self.nothing = Nothing()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.nothing(x)  # None, produced early (a leaf module keeps it a graph value)
        h = self.b(self.a(x))
        return F.linear(self.c(h), self.c.weight, bias=bias)


def test_none_crosses_a_cut() -> None:
    pipe = _transparent(NoneLater(), lambda m: _split(m, torch.randn(4, 8), pinned_cuts=["c"],
                                                      leaf_modules=[Nothing]), torch.randn(4, 8))
    assert _crossing(pipe)["nothing"] == ("none", "")


class Chunked(Three):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = x.chunk(2, dim=-1)  # a tuple of tensors, live until the end
        h = self.c(self.b(self.a(x)))
        return h + torch.cat(parts, dim=-1)


class DeviceLater(Three):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dev = x.device  # a torch.device, first used early and again late
        x = x + torch.zeros(8, device=dev)
        h = self.c(self.b(self.a(x)))
        return h + torch.ones(8, device=dev)


NON_WIRE = [(Chunked, "chunk", "c"), (DeviceLater, "getattr_1", "b")]


@pytest.mark.parametrize("cls, value, pin", NON_WIRE)
def test_non_wire_values_steer_the_solver_to_other_cuts(cls: type[nn.Module], value: str, pin: str) -> None:
    pipe = _transparent(cls(), lambda m: _split(m, torch.randn(4, 8)), torch.randn(4, 8))
    assert value not in _crossing(pipe)
    assert all(kind in ("tensor", "int", "float", "bool", "none") for kind, _ in _crossing(pipe).values())


@pytest.mark.parametrize("cls, value, pin", NON_WIRE)
def test_pinning_a_cut_that_a_non_wire_value_crosses_is_refused(cls: type[nn.Module], value: str, pin: str) -> None:
    with pytest.raises(PartitionError, match="pinned cut"):
        _split(cls(), torch.randn(4, 8), pinned_cuts=[pin])


@pytest.mark.parametrize("cls, value, pin", NON_WIRE)
def test_pinned_non_wire_cut_error_names_the_value(cls: type[nn.Module], value: str, pin: str) -> None:
    with pytest.raises(PartitionError, match=f"{pin!r}.*{value}"):
        _split(cls(), torch.randn(4, 8), pinned_cuts=[pin])


class SizeTuple(Three):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.size()  # torch.Size: a tuple, live from the first node to the last
        return self.c(self.b(self.a(x))).reshape(shape)


def test_no_cut_left_is_refused() -> None:
    with pytest.raises(PartitionError, match="only 0 positions can be cut"):
        _split(SizeTuple(), torch.randn(4, 8))


def test_no_cut_left_names_the_blocking_value() -> None:
    with pytest.raises(PartitionError, match="size"):
        _split(SizeTuple(), torch.randn(4, 8))


# -- nested outputs --------------------------------------------------------------------------

class Nested(Three):
    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        h = self.a(x)
        g = self.b(h)
        return {"out": (h, [g, {"deep": self.c(g) * 2}]), "inputs": [x], "n": (x.size(0), None)}


@pytest.mark.parametrize("pin", [["b"], ["c"]])
def test_nested_outputs_keep_their_structure(pin: list[str]) -> None:
    x = torch.randn(4, 8)
    pipe = _transparent(Nested(), lambda m: _split(m, x, pinned_cuts=pin), x)
    out = pipe(x)
    assert isinstance(out, dict) and isinstance(out["out"], tuple) and isinstance(out["out"][1], list)
    assert out["n"] == (4, None)
