"""load_plan is the single gate: a plan whose profiles or options cannot mean anything is
refused on load, naming the JSON path (not later, deep inside pricing or the runtime)."""

from __future__ import annotations

from typing import Any, Callable

import pytest

from partitioner import PlanError, load_plan, partition
from tests.hostile.conftest import base, plan_dict


def _set(path: tuple[Any, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def apply(d: dict[str, Any]) -> None:
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value
    return apply


@pytest.mark.parametrize(("damage", "where", "what"), [
    (_set(("device", "peak_flops"), 0), "$.device", "peak_flops must be positive"),
    (_set(("device", "name"), 7), "$.device", "name must be a non-empty string"),
    (_set(("device", "kind"), "tpu"), "$.device", "kind must be 'gpu' or 'cpu'"),
    (_set(("link", "bandwidth"), -5), "$.link", "bandwidth must be a finite non-negative number"),
    (_set(("options", "schedule"), "zigzag"), "$.options.schedule", "unknown schedule 'zigzag'"),
    (_set(("options", "n_microbatches"), 3), "$.options.n_microbatches", "do not divide the batch"),
    (_set(("stages", 0, "recompute"), "full"), "$.stages[0].recompute", "does not allow"),
])
def test_meaningless_values_are_refused_on_load(damage: Callable[[dict[str, Any]], None], where: str,
                                                 what: str) -> None:
    d = plan_dict("mlp")
    d["options"]["recompute"] = "none"  # so that a stage that recomputes contradicts it
    load_plan(d)  # the untouched plan (with recompute none) loads
    damage(d)
    with pytest.raises(PlanError, match=what) as err:
        load_plan(d)
    assert err.value.path.startswith(where), err.value.path


@pytest.mark.parametrize("name", ["mlp", "gpt"])
def test_plans_are_byte_stable_across_calls_and_round_trips(name: str) -> None:
    """Two partition() calls in one process give the same bytes, and re-applying a loaded
    plan gives it back byte for byte (notes, solver report and recompute included)."""
    model, args, pipe, _ = base(name)
    again = partition(model, n_gpus=2, example_inputs=args, device="cpu")
    assert again.plan.to_json() == pipe.plan.to_json()
    text = pipe.plan.to_json()
    assert load_plan(text).apply(model).plan.to_json() == text


def test_a_hugging_face_plan_is_byte_stable_across_calls() -> None:
    """The export route too: the first call in a process once recorded a one-time allocation
    (aten.empty) that later calls did not, which moved the predicted times."""
    pytest.importorskip("transformers")
    from tests.hf.models import CASES

    case = CASES["llama"]
    model = case.build(2)
    inputs = case.inputs(2, 16)
    first = partition(model, n_gpus=2, example_inputs=inputs, device="cpu").plan.to_json()
    assert partition(model, n_gpus=2, example_inputs=inputs, device="cpu").plan.to_json() == first
    assert load_plan(first).apply(model).plan.to_json() == first
