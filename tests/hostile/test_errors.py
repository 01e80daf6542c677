"""Requests the partitioner cannot honour: each gets a PartitionError that says why and what to do."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from partitioner import PartitionError, partition
from tests.fixtures.models import FIXTURES


def _mlp() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    return FIXTURES["mlp"].build(), FIXTURES["mlp"].inputs()  # 13 compute nodes, batch 8


class Gate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent Python control flow
            return self.lin(x)
        return x


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.gate, self.b = nn.Linear(4, 4), Gate(), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.gate(self.a(x)))


@pytest.mark.parametrize("route", ["auto", "fx"])
def test_data_dependent_control_flow_names_the_model_and_the_fixes(route: str) -> None:
    with pytest.raises(PartitionError, match=r"Gated.*leaf_modules.*concrete_args") as info:
        partition(Gated(), n_gpus=2, example_inputs=(torch.randn(4, 4),), capture_route=route, device="cpu")
    assert "control flow" in str(info.value)


def test_data_dependent_control_flow_names_the_submodule() -> None:
    with pytest.raises(PartitionError, match=r"Gate\b.*forward|'gate'"):
        partition(Gated(), n_gpus=2, example_inputs=(torch.randn(4, 4),), capture_route="fx", device="cpu")


def test_leaf_module_advice_from_the_capture_error_works() -> None:
    x = torch.randn(4, 4)
    model = Gated()
    pipe = partition(model, n_gpus=2, example_inputs=(x,), leaf_modules=[Gate], device="cpu")
    torch.testing.assert_close(pipe(x), model(x))


def test_concrete_args_advice_works_for_flags() -> None:
    class Flagged(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x: torch.Tensor, double: bool = False) -> torch.Tensor:
            h = self.a(x)
            if double:
                h = h * 2
            return self.b(h)

    model, x = Flagged(), torch.randn(4, 4)
    pipe = partition(model, n_gpus=2, example_inputs=(x,), example_kwargs={"double": True},
                     concrete_args={"double": True}, capture_route="fx", device="cpu")
    torch.testing.assert_close(pipe(x, double=True), model(x, True))


@pytest.mark.parametrize("n_gpus", [14, 500])
def test_more_gpus_than_the_model_splits_into(n_gpus: int) -> None:
    model, args = _mlp()
    with pytest.raises(PartitionError, match=rf"cannot make {n_gpus} stages from 13 nodes .*use at most 13 GPUs"):
        partition(model, n_gpus=n_gpus, example_inputs=args, device="cpu")


@pytest.mark.parametrize("limit, shown", [(1, "1 B"), (1000, "1000 B"), (40_000, "39.1 KiB")])
def test_device_memory_too_small_for_any_split(limit: int, shown: str) -> None:
    model, args = _mlp()
    with pytest.raises(PartitionError, match=rf"stage \d needs [\d.]+ KiB .* but the device holds {shown}; "
                                             r"use more GPUs"):
        partition(model, n_gpus=2, example_inputs=args, device="cpu", memory_limit=limit)


@pytest.mark.parametrize("m", [3, 5, 16])
def test_batch_that_does_not_divide_into_micro_batches(m: int) -> None:
    model, args = _mlp()
    with pytest.raises(PartitionError, match=rf"batch of 8 samples does not split into {m} micro-batches; "
                                             r"choose n_microbatches among \[1, 2, 4, 8\]"):
        partition(model, n_gpus=2, example_inputs=args, n_microbatches=m, device="cpu")


@pytest.mark.parametrize("inputs, kwargs, match", [
    ({"y": torch.randn(8, 32)}, None, "missing a required argument: 'x'"),
    ((torch.randn(8, 32), torch.randn(8, 32)), None, "too many positional arguments"),
    (None, {"inp": torch.randn(8, 32)}, "unexpected keyword argument 'inp'"),
    ((torch.randn(8, 32),), {"x": torch.randn(8, 32)}, "multiple values for argument 'x'"),
])
def test_example_inputs_that_do_not_fit_forward(inputs: Any, kwargs: Any, match: str) -> None:
    model, _ = _mlp()
    with pytest.raises(PartitionError, match=rf"example inputs do not match MLP\.forward\(x.*: .*{match}"):
        partition(model, n_gpus=2, example_inputs=inputs, example_kwargs=kwargs, device="cpu")


def test_example_inputs_that_disagree_on_the_batch() -> None:
    model = FIXTURES["multi_io"].build()
    kw = FIXTURES["multi_io"].kwargs()
    kw["scale"] = torch.randn(4, 1)
    with pytest.raises(PartitionError, match=r"disagree on the batch size .*\[4, 8\]"):
        partition(model, n_gpus=2, example_inputs=kw, device="cpu")


@pytest.mark.parametrize("thing, name", [(lambda x: x, "function"), (nn.Linear, "type"),
                                          ("model.pt", "str"), (None, "NoneType")])
def test_model_that_is_not_a_module(thing: Any, name: str) -> None:
    with pytest.raises(PartitionError, match=rf"model must be a torch\.nn\.Module, got {name}"):
        partition(thing, n_gpus=2, example_inputs=(torch.randn(8, 32),))


@pytest.mark.parametrize("kwargs, match", [
    ({"n_gpus": True}, "n_gpus must be an int >= 1, got True"),
    ({"n_gpus": 2.0}, "n_gpus must be an int >= 1, got 2.0"),
    ({"n_gpus": 2, "n_microbatches": 0}, "n_microbatches must be an int >= 1 or 'auto', got 0"),
    ({"n_gpus": 2, "optimizer": "lion"}, "unknown optimizer 'lion'"),
    ({"n_gpus": 2, "pinned_cuts": ["nowhere"]}, "pinned cut 'nowhere' names no node or module"),
    ({"n_gpus": 2, "capture_route": "jit"}, "unknown capture route 'jit'"),
])
def test_bad_options(kwargs: dict[str, Any], match: str) -> None:
    model, args = _mlp()
    with pytest.raises(PartitionError, match=match):
        partition(model, example_inputs=args, device="cpu", **kwargs)
