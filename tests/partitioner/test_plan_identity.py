"""benchmarks/plan_identity.py, the check that a reorganised planner writes the same plans:
planning the same cases twice gives byte-identical files and ``compare`` finds no difference;
a plan altered in one value, a refusal that reads differently and a case missing on one side
are each reported, the JSON case with the path of the first differing value."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: a few cheap cases: a plain split, data parallelism with ZeRO-1, a re-applied plan, a refusal
ONLY = ["mlp.pp2", "mlp.dp2-zero1", "multi_io.apply", "mlp.tight-memory"]


def _plan_identity() -> ModuleType:
    spec = importlib.util.spec_from_file_location("plan_identity", ROOT / "benchmarks" / "plan_identity.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("plan_identity", module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModuleType, Path, Path]:
    pi = _plan_identity()
    a, b = tmp_path_factory.mktemp("before"), tmp_path_factory.mktemp("after")
    assert sorted(pi.write_plans(str(a), ONLY, verbose=False)) == sorted(ONLY)
    pi.write_plans(str(b), ONLY, verbose=False)
    return pi, a, b


def test_the_same_cases_twice_are_byte_identical(written: tuple[ModuleType, Path, Path]) -> None:
    pi, a, b = written
    files = sorted(p.name for p in a.iterdir())
    assert files == ["mlp.dp2-zero1.json", "mlp.pp2.json", "mlp.tight-memory.error", "multi_io.apply.json"]
    assert json.loads((a / "mlp.dp2-zero1.json").read_text())["mesh"]["zero"] == 1  # the options took effect
    assert pi.compare(str(a), str(b)) == []
    assert pi.main(["--compare", str(a), str(b)]) == 0


def test_an_altered_plan_is_reported_with_its_first_differing_path(
        written: tuple[ModuleType, Path, Path], tmp_path: Path) -> None:
    pi, a, b = written
    for p in b.iterdir():
        (tmp_path / p.name).write_bytes(p.read_bytes())
    plan = json.loads((tmp_path / "mlp.pp2.json").read_text())
    plan["stages"][1]["cost"]["fwd_time_s"] *= 1.0001
    (tmp_path / "mlp.pp2.json").write_text(json.dumps(plan, indent=1, sort_keys=True) + "\n")
    (tmp_path / "mlp.tight-memory.error").write_text("InfeasibleError: something else\n")
    (tmp_path / "multi_io.apply.json").unlink()
    diffs = pi.compare(str(a), str(tmp_path))
    assert diffs[0] == "mlp.pp2: differs at $.stages[1].cost.fwd_time_s"
    assert diffs[1].startswith("mlp.tight-memory: the refusal differs")
    assert diffs[2] == f"multi_io.apply: only in {a}"
    assert len(diffs) == 3
    assert pi.main(["--compare", str(a), str(tmp_path)]) == 1


def test_first_difference_walks_dicts_and_lists() -> None:
    first = _plan_identity().first_difference
    assert first({"a": [1, {"b": 2}]}, {"a": [1, {"b": 2}]}) is None
    assert first({"a": [1, {"b": 2}]}, {"a": [1, {"b": 3}]}) == "$.a[1].b"
    assert first({"a": [1]}, {"a": [1, 2]}) == "$.a[1]"
    assert first({"a": 1}, {"a": 1, "z": 0}) == "$.z"
    assert first({"a": 1}, {"a": 1.0}) == "$.a"
