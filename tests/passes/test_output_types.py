"""The pipe returns what the model returns, on both capture routes: the same container class
(a ``ModelOutput`` subclass, ``dict``, an ``OrderedDict`` subclass, a namedtuple, nested
ones), equal values, and a ``loss_fn`` that reads a field by name works in ``train_step``.

torch.fx rebuilds every mapping a traced ``forward`` returns as its ``immutable_dict``;
the structure is read from what ``forward`` itself returned instead.
"""

from __future__ import annotations

import collections
import copy
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

from partitioner import partition

try:
    from transformers.utils import ModelOutput
except ImportError:  # pragma: no cover - transformers is a test dependency
    ModelOutput = None  # type: ignore[assignment,misc]


if ModelOutput is not None:
    @dataclass
    class TinyOutput(ModelOutput):  # type: ignore[misc,valid-type]
        logits: Optional[torch.Tensor] = None
        hidden: Optional[torch.Tensor] = None


class Fields(collections.OrderedDict):  # a user's OrderedDict subclass pytree does not know
    pass


class Pair(NamedTuple):
    logits: torch.Tensor
    hidden: torch.Tensor


def _wrap(kind: str, logits: torch.Tensor, hidden: torch.Tensor) -> Any:
    if kind == "model_output":
        return TinyOutput(logits=logits, hidden=hidden)
    if kind == "dict":
        return {"logits": logits, "hidden": hidden}
    if kind == "ordered_dict":
        return collections.OrderedDict(logits=logits, hidden=hidden)
    if kind == "ordered_dict_subclass":
        return Fields(logits=logits, hidden=hidden)
    if kind == "namedtuple":
        return Pair(logits, hidden)
    if kind == "nested":
        return {"logits": logits, "more": (hidden, [Pair(logits, hidden), Fields(h=hidden)])}
    raise AssertionError(kind)


class Net(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> Any:
        for layer in self.layers:
            x = torch.relu(layer(x))
        return _wrap(self.kind, self.head(x), x)


KINDS = ["model_output", "dict", "ordered_dict", "ordered_dict_subclass", "namedtuple", "nested"]
#: torch.export refuses an output class pytree does not know (it asks for a registration)
EXPORTABLE = [k for k in KINDS if k not in ("ordered_dict_subclass", "nested")]


def _logits(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out["logits"]


def _same_structure(got: Any, want: Any) -> None:
    assert type(got) is type(want)
    g_leaves, g_spec = pytree.tree_flatten(got)
    w_leaves, w_spec = pytree.tree_flatten(want)
    assert g_spec == w_spec
    for a, b in zip(g_leaves, w_leaves):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    if isinstance(want, dict):
        assert list(got) == list(want)
        for k in want:
            if isinstance(want[k], (dict, tuple, list)):
                assert type(got[k]) is type(want[k])


@pytest.mark.parametrize("route", ["fx", "export"])
@pytest.mark.parametrize("kind", KINDS)
def test_the_pipe_returns_the_models_own_output_class(kind: str, route: str) -> None:
    if kind == "model_output" and ModelOutput is None:
        pytest.skip("needs transformers")
    if route == "export" and kind not in EXPORTABLE:
        pytest.skip("torch.export needs the class registered with pytree")
    torch.manual_seed(0)
    model = Net(kind)
    x = torch.randn(4, 8)
    pipe = partition(model, 2, (x,), device="cpu", link="loopback", capture_route=route)
    assert pipe.plan.capture == route
    _same_structure(pipe(x), model(x))
    if kind == "nested":  # the classes inside keep theirs too
        inner = pipe(x)["more"][1]
        assert type(inner) is list and type(inner[0]) is Pair and type(inner[1]) is Fields


@pytest.mark.parametrize("kind", ["model_output", "dict", "ordered_dict_subclass", "namedtuple"])
def test_a_loss_that_reads_a_field_trains_like_one_process_on_the_fx_route(kind: str) -> None:
    if kind == "model_output" and ModelOutput is None:
        pytest.skip("needs transformers")
    torch.manual_seed(0)
    model = Net(kind)
    ref = copy.deepcopy(model)
    x, y = torch.randn(4, 8), torch.randint(0, 3, (4,))
    pipe = partition(model, 2, (x,), device="cpu", link="loopback", capture_route="fx")

    def loss_fn(out: Any, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(_logits(out), target)

    loss = pipe.train_step(x, target=y, loss_fn=loss_fn, n_microbatches=2)
    want = loss_fn(ref(x), y)
    want.backward()
    torch.testing.assert_close(loss, want.detach())
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, msg=lambda m: f"{name}: {m}")
