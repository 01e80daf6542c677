"""Fuzzing the plan loader: a hostile or damaged plan file gets a PlanError naming a JSON path.

Start from the real plans of two fixture models, damage them (wrong types, missing and
extra fields, huge/negative/NaN numbers, unknown or moved nodes, stages that no longer
chain, garbage cost polynomials, truncated text), and hold two properties:

1. ``load_plan`` raises nothing but ``PlanError``, whose message starts with its ``.path``
   (``$.stages[1].nodes: ...``);
2. a plan that loads either applies to its own model and computes what the model
   computes, with the stages the file names, or is refused with a ``PartitionError``;
   applied to the other model it is always refused.
"""

from __future__ import annotations

import builtins
import copy
import json
import math
import pickle
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from partitioner import PartitionError, PlanError, load_plan
from tests.hostile.conftest import BASE_MODELS, base, plan_dict

PAYLOAD = "__import__('os').system('touch {marker}')"

HOSTILE_VALUES: list[Any] = [
    None, True, False, 0, -1, 1, 2**80, -(2**80), 1e308, -1e308, 0.5, math.nan, math.inf, -math.inf,
    "", "x", "B", "1/0", "B^99999999999", "12*B^2*S + 7", "float32", "sha256:" + "0" * 64,
    PAYLOAD.format(marker="/tmp/pp_hostile_never"), [], [None], ["x", "x"], {}, {"a": 1}, [[0, "B"]],
]

FUZZ = settings(max_examples=120, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _paths(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [path]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*path, i))
    return out


def _get(root: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        root = root[p]
    return root


def _set(root: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    _get(root, path[:-1])[path[-1]] = value
    return root


@st.composite
def mutated_plan(draw: Callable[..., Any], name: str | None = None) -> tuple[str, Any]:
    """A fixture plan with one to three random mutations at random JSON paths."""
    name = name or draw(st.sampled_from(BASE_MODELS))
    data: Any = plan_dict(name)
    for _ in range(draw(st.integers(1, 3))):
        if not isinstance(data, dict):
            break
        path = draw(st.sampled_from(_paths(data)))
        target = _get(data, path)
        kind = draw(st.sampled_from(["replace", "delete", "extra", "dup", "reverse", "truncate", "node"]))
        if kind == "replace" or (kind in ("delete", "extra") and not isinstance(target, dict) and not path):
            data = _set(data, path, draw(st.sampled_from(HOSTILE_VALUES)))
        elif kind == "delete" and path:
            parent = _get(data, path[:-1])
            del parent[path[-1]]
        elif kind == "extra" and isinstance(target, dict):
            target[draw(st.sampled_from(["extra", "__class__", "eval", ""]))] = draw(st.sampled_from(HOSTILE_VALUES))
        elif kind == "dup" and isinstance(target, list) and target:
            target.append(copy.deepcopy(target[draw(st.integers(0, len(target) - 1))]))
        elif kind == "reverse" and isinstance(target, list):
            target.reverse()
        elif kind == "truncate" and isinstance(target, list) and target:
            del target[draw(st.integers(0, len(target) - 1)):]
        elif kind == "node" and isinstance(data.get("stages"), list) and len(data["stages"]) == 2:
            # move, rename or duplicate a node between the two stages
            a, b = data["stages"][0]["nodes"], data["stages"][1]["nodes"]
            how = draw(st.sampled_from(["move_last", "move_first", "rename", "dup", "swap"]))
            if how == "move_last" and len(a) > 1:
                b.insert(0, a.pop())
            elif how == "move_first" and len(b) > 1:
                a.append(b.pop(0))
            elif how == "rename":
                a[draw(st.integers(0, len(a) - 1))] = draw(st.sampled_from(["zzz", b[0], "x", "output"]))
            elif how == "dup":
                b.append(a[0])
            elif how == "swap" and len(a) > 1 and len(b) > 1:
                a[-1], b[0] = b[0], a[-1]
    return name, data


def _assert_clean_refusal(e: PlanError) -> None:
    assert e.path.startswith("$"), e.path
    assert str(e).startswith(e.path + ": "), str(e)


def _graph_order(name: str) -> list[str]:
    return [n for s in base(name)[2].plan.stages for n in s.nodes]


def _contiguous(name: str, stages: Any) -> bool:
    stage_of = {n: s.index for s in stages for n in s.nodes}
    seq = [stage_of[n] for n in _graph_order(name)]
    return seq == sorted(seq)


_CHECKED: set[str] = set()


def _check_loaded(name: str, plan: Any) -> None:
    """Property 2: applies faithfully to its own model, or is refused; never fits the other one.

    ``apply_plan`` reads only the fields keyed below, so each distinct combination is applied
    once (most mutations that load touch notes, predictions or costs: apply ignores those).
    """
    key = json.dumps([name, plan.fingerprint, plan.capture, plan.inputs, plan.options, plan.device,
                      plan.link, [s.nodes for s in plan.stages]], sort_keys=True, default=str)
    if key in _CHECKED:
        return
    _CHECKED.add(key)
    model, args, _, _ = base(name)
    try:
        pipe = plan.apply(model)
    except PartitionError:
        pass
    else:
        if _contiguous(name, plan.stages):  # non-contiguous: see test_noncontiguous_stages_are_refused
            assert [s.nodes for s in pipe.plan.stages] == [s.nodes for s in plan.stages]
        torch.manual_seed(0)
        out = pipe(*args)
        torch.manual_seed(0)
        torch.testing.assert_close(out, model(*args))
    other = next(m for m in BASE_MODELS if m != name)
    with pytest.raises(PartitionError):
        plan.apply(base(other)[0])


@FUZZ
@given(mutated_plan())
def test_loader_refuses_damaged_plans_with_a_json_path(case: tuple[str, Any]) -> None:
    name, data = case
    try:
        plan = load_plan(data)
    except PlanError as e:
        _assert_clean_refusal(e)
        return
    _check_loaded(name, plan)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(case=mutated_plan())
def test_every_source_kind_refuses_the_same_way(case: tuple[str, Any], tmp_path_factory: Any) -> None:
    """A parsed dict, JSON text and a file path give the same plan or the same refusal (same JSON
    path, same words). Text and files go through json.loads first; NaN text must still be refused."""
    _, data = case
    text = json.dumps(data)  # writes NaN/Infinity literals, which json.loads reads back
    file = tmp_path_factory.mktemp("plan") / "plan.json"
    file.write_text(text)
    sources: dict[str, Any] = {"file": file}
    if isinstance(data, dict):  # a root that is not an object: load_plan takes only a Mapping as parsed
        # data, and reads text as JSON only when it starts with "{" (else as a path); the file must refuse
        sources.update(dict=copy.deepcopy(data), text=text)
    outcomes = {}
    for how, source in sources.items():
        try:
            outcomes[how] = ("loaded", load_plan(source).to_json())
        except PlanError as e:
            _assert_clean_refusal(e)
            outcomes[how] = ("refused", str(e))
    assert len(set(outcomes.values())) == 1, outcomes
    assert isinstance(data, dict) or outcomes["file"][0] == "refused"


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.sampled_from(BASE_MODELS), st.data())
def test_truncated_json_text_is_refused(name: str, data: Any) -> None:
    text = base(name)[2].plan.to_json()
    cut = data.draw(st.integers(1, len(text) - 2))  # drop at least the closing brace
    with pytest.raises(PlanError, match=r"^\$: not valid JSON") as info:
        load_plan(text[:cut])
    _assert_clean_refusal(info.value)


@pytest.mark.parametrize("source, match", [
    ([], "expected JSON text, a path or a dict, got list"),
    (5, "expected JSON text, a path or a dict, got int"),
    (None, "got NoneType"),
    (b"{}", "got bytes"),
    ('"plan"', "cannot read plan file"),
    ("[1, 2]", "cannot read plan file"),
    ("{}", "'boundaries' is a required property"),
    ('{"version": 99}', r"^\$\.version: plan version 99 is not supported"),
    ('{"a": ' * 5000 + "1" + "}" * 5000, "nested too deeply|not valid JSON"),
    ("{" + '"x": 1, ' * 10 + "}", "not valid JSON"),
])
def test_non_plan_sources(source: Any, match: str) -> None:
    with pytest.raises(PlanError, match=match) as info:
        load_plan(source)
    _assert_clean_refusal(info.value)


def _mutate(name: str, edit: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    data = plan_dict(name)
    edit(data)
    return data


def _stages(d: dict[str, Any]) -> list[dict[str, Any]]:
    return d["stages"]


@pytest.mark.parametrize("edit, path, match", [
    (lambda d: d.__setitem__("version", "1"), "$.version", r"is not one of \[3, 4\]"),
    (lambda d: d.__setitem__("version", 0), "$.version", "not supported"),
    (lambda d: d.pop("stages"), "$", "'stages' is a required property"),
    (lambda d: d.__setitem__("surprise", 1), "$", "Additional properties"),
    (lambda d: _stages(d)[1].__setitem__("index", 0), "$.stages[1].index", "out of order"),
    (lambda d: _stages(d).reverse(), "$.stages[0].index", "out of order"),
    (lambda d: _stages(d).append(copy.deepcopy(_stages(d)[1])), "$.stages", "options say 2 stages"),
    (lambda d: d["options"].__setitem__("n_stages", 3), "$.stages", "options say 3 stages"),
    (lambda d: d["boundaries"].clear(), "$.boundaries", "2 stages need 1 boundaries"),
    (lambda d: _stages(d)[1]["nodes"].append(_stages(d)[0]["nodes"][0]), "$.stages[1].nodes[", "is in stage 0 and stage 1"),
    (lambda d: _stages(d)[1].__setitem__("nodes", []), "$.stages[1].nodes", "should be non-empty|too short"),
    (lambda d: _stages(d)[1].__setitem__("inputs", ["zzz"]), "$.stages[1].inputs", "do not match stage 0 outputs"),
    (lambda d: d["boundaries"][0]["values"].pop(), "$.boundaries[0].values", "do not match stage 0 outputs"),
    (lambda d: _stages(d)[0]["cost"].__setitem__("fwd_flops", "1/0*B"), "$.stages[0].cost.fwd_flops", "division by zero"),
    (lambda d: _stages(d)[0]["cost"].__setitem__("fwd_flops", "B^1000000000000"), "$.stages[0].cost.fwd_flops", "powers above"),
    (lambda d: _stages(d)[0]["cost"].__setitem__("bwd_flops", "B + + S"), "$.stages[0].cost.bwd_flops", "bad term"),
    (lambda d: _stages(d)[0]["cost"].__setitem__("saved_bytes", "exec('1')"), "$.stages[0].cost.saved_bytes", "does not match"),
    (lambda d: d["boundaries"][0]["values"][0].__setitem__("bytes", "4/0"), "$.boundaries[0].values[0].bytes", "division by zero"),
    (lambda d: d["boundaries"][0]["values"][0]["shape"].__setitem__(0, "B^99"), "$.boundaries[0].values[0].shape[0]", "powers above"),
    (lambda d: _stages(d)[0]["cost"].__setitem__("param_bytes", -1), "$.stages[0].cost.param_bytes", "less than the minimum"),
    (lambda d: _stages(d)[0]["cost"].__setitem__("fwd_time_s", math.nan), "$.stages[0].cost.fwd_time_s", "finite"),
    (lambda d: d["prediction"].__setitem__("step_time_s", math.inf), "$.prediction.step_time_s", "finite"),
    (lambda d: d["device"].__setitem__("peak_flops", -math.inf), "$.device.peak_flops", "finite"),
    (lambda d: _stages(d)[1].__setitem__("rank", 2**80), "$.stages[1].rank", "must run on rank 1"),
    (lambda d: _stages(d)[0].__setitem__("rank", 1), "$.stages[0].rank", "must run on rank 0"),
    (lambda d: d["options"].__setitem__("n_microbatches", 0), "$.options.n_microbatches", "minimum"),
    (lambda d: d["options"].__setitem__("n_microbatches", 2**40), "$.options.n_microbatches", "maximum"),
    (lambda d: d["options"].__setitem__("optimizer", "lion"), "$.options.optimizer", "is not one of"),
    (lambda d: d["options"].__setitem__("extra", 1), "$.options", "Additional properties"),
    (lambda d: d["options"].pop("n_gpus"), "$.options", "'n_gpus' is a required property"),
    (lambda d: d["options"].__setitem__("cut_at", 3), "$.options.cut_at", "not of type"),
    (lambda d: d["options"].__setitem__("n_gpus", 3), "$.options.n_gpus", "do not spread evenly"),
    (lambda d: d["inputs"][0].__setitem__("dtype", "load"), "$.inputs[0].dtype", "unknown tensor dtype"),
    (lambda d: d["inputs"][0].__setitem__("dims", [[7, "B"]]), "$.inputs[0].dims[0]", "does not exist"),
    (lambda d: d["inputs"][0].__setitem__("dims", [["B", 0]]), "$.inputs[0].dims[0][0]", "not of type 'integer'"),
    (lambda d: d["inputs"][0].__setitem__("shape", [-1]), "$.inputs[0].shape[0]", "minimum"),
    (lambda d: d.__setitem__("fingerprint", "md5:abc"), "$.fingerprint", "does not match"),
    (lambda d: d.__setitem__("symbols", {"T": 3}), "$.symbols", "is not one of"),
])
@pytest.mark.parametrize("name", BASE_MODELS)
def test_each_damage_names_its_path(name: str, edit: Callable[[dict[str, Any]], Any], path: str, match: str) -> None:
    with pytest.raises(PlanError, match=match) as info:
        load_plan(_mutate(name, edit))
    assert info.value.path.startswith(path), (info.value.path, path)
    _assert_clean_refusal(info.value)


@pytest.mark.parametrize("name", BASE_MODELS)
def test_moved_node_still_applies_faithfully(name: str) -> None:
    """Moving a boundary node to the next stage is a different, valid plan: it applies as written."""
    def move(d: dict[str, Any]) -> None:
        _stages(d)[1]["nodes"].insert(0, _stages(d)[0]["nodes"].pop())
    plan = load_plan(_mutate(name, move))
    _check_loaded(name, plan)


@pytest.mark.parametrize("name", BASE_MODELS)
def test_unknown_or_missing_node_is_refused_on_apply(name: str) -> None:
    model = base(name)[0]
    renamed = load_plan(_mutate(name, lambda d: _stages(d)[0]["nodes"].__setitem__(0, "zzz")))
    with pytest.raises(PlanError, match=r"unknown: \['zzz'\]"):
        renamed.apply(model)
    dropped = load_plan(_mutate(name, lambda d: _stages(d)[0]["nodes"].pop(0)))
    with pytest.raises(PlanError, match="plan nodes do not match"):
        dropped.apply(model)


@pytest.mark.parametrize("name", BASE_MODELS)
def test_noncontiguous_stages_are_refused(name: str) -> None:
    def swap(d: dict[str, Any]) -> None:
        a, b = _stages(d)[0]["nodes"], _stages(d)[1]["nodes"]
        a[-1], b[0] = b[0], a[-1]
    plan = load_plan(_mutate(name, swap))
    with pytest.raises(PlanError, match="contiguous"):
        plan.apply(base(name)[0])


def test_options_schema_knows_every_optimizer() -> None:
    from partitioner.api import OPTIMIZER_STATES, Options
    from partitioner.plan import _schema

    opts = _schema()["properties"]["options"]
    assert opts["properties"]["optimizer"]["enum"] == list(OPTIMIZER_STATES)
    # every option is required but custom and inter_link (not in options: inter_link is in
    # plan.mesh), tensor_parallel and sequence_parallel (written only when > 1 / on, so older
    # plans load), fsdp_reshard (what it chose is plan.mesh.fsdp) and fsdp_shard (plan.mesh.shard)
    assert sorted(opts["required"]) == sorted(k for k in Options.__dataclass_fields__
                                              if k not in ("custom", "inter_link", "tensor_parallel",
                                                           "sequence_parallel", "fsdp_reshard", "fsdp_shard"))
    assert set(Options.__dataclass_fields__) - {"custom", "inter_link", "fsdp_reshard", "fsdp_shard"} == \
        set(opts["properties"]) - {"schedule_text"}


# -- loading never runs code -------------------------------------------------------------

def _every_string(value: Any, payload: str) -> Any:
    if isinstance(value, str):
        return payload
    if isinstance(value, dict):
        return {k: _every_string(v, payload) for k, v in value.items()}
    if isinstance(value, list):
        return [_every_string(v, payload) for v in value]
    return value


@pytest.fixture
def no_code_execution(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every way of running text as code fail loudly while the loader works."""
    import sympy.parsing.sympy_parser as parser

    def refuse(*a: Any, **k: Any) -> Any:
        raise AssertionError(f"the plan loader ran code: {a[:1]!r}")

    for mod, attr in [(builtins, "eval"), (builtins, "exec"), (builtins, "compile"), (pickle, "loads"),
                      (pickle, "load"), (parser, "parse_expr"), (torch, "load")]:
        monkeypatch.setattr(mod, attr, refuse)


@pytest.mark.parametrize("name", BASE_MODELS)
@pytest.mark.parametrize("how", ["dict", "text"])
def test_strings_are_never_executed(name: str, how: str, tmp_path: Any, no_code_execution: None) -> None:
    marker = tmp_path / "pwned"
    payload = PAYLOAD.format(marker=marker)
    data = _every_string(plan_dict(name), payload)
    with pytest.raises(PlanError):  # the payload is no valid fingerprint, capture route, cost...
        load_plan(data if how == "dict" else json.dumps(data))
    assert not marker.exists()


@settings(FUZZ, max_examples=60)
@given(st.sampled_from(BASE_MODELS), st.data())
def test_payload_in_any_one_string_field_loads_or_fails_cleanly(name: str, data: Any) -> None:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        marker = Path(tmp) / "pwned"
        plan = plan_dict(name)
        strings = [p for p in _paths(plan) if isinstance(_get(plan, p), str)]
        path = data.draw(st.sampled_from(strings))
        _set(plan, path, PAYLOAD.format(marker=marker))
        try:
            loaded = load_plan(plan)
        except PlanError as e:
            _assert_clean_refusal(e)
        else:
            _check_loaded(name, loaded)
        assert not marker.exists()
