"""Shared pieces for the hostile-input tests: quiet torch logging, small base plans."""

from __future__ import annotations

import copy
import functools
import json
import logging
from typing import Any

import pytest
import torch

from partitioner import Pipe, partition
from tests.fixtures.models import FIXTURES

#: Two small models whose plans the fuzzers start from: a chain, and a transformer with tied weights.
BASE_MODELS = ("mlp", "gpt")


@pytest.fixture(autouse=True)
def _quiet_fake_tensor_logs() -> Any:
    # a mutated input shape makes FakeTensor log a full traceback at ERROR before our PlanError
    log = logging.getLogger("torch._subclasses.fake_tensor")
    level = log.level
    log.setLevel(logging.CRITICAL)
    yield
    log.setLevel(level)


@functools.cache
def base(name: str) -> tuple[torch.nn.Module, tuple[Any, ...], Pipe, dict[str, Any]]:
    """(model, inputs, pipe, plan as parsed JSON), built once per session with a fixed seed."""
    torch.manual_seed(0)
    model = FIXTURES[name].build()
    args = FIXTURES[name].inputs()
    pipe = partition(model, n_gpus=2, example_inputs=args, device="cpu")  # nvlink: both stages get work
    return model, args, pipe, json.loads(pipe.plan.to_json())


def plan_dict(name: str) -> dict[str, Any]:
    return copy.deepcopy(base(name)[3])
