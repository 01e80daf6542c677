"""PassManager checks node and graph metadata keys: every key a pass names
is declared in passes/meta.py, graph keys are checked like node keys, and every ``pp.*``
literal the library reads or writes is declared, and spelled only there."""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import fx, nn

from partitioner.passes import meta
from partitioner.passes.base import Pass
from partitioner.passes.errors import GraphError
from partitioner.passes.manager import PassManager

ROOT = Path(__file__).resolve().parents[2]


def _gm() -> fx.GraphModule:
    return fx.symbolic_trace(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))


@dataclass(frozen=True)
class SetsGraphKey(Pass):
    name = "sets-symbolic"
    graph_provides = (meta.SYMBOLIC,)

    def run(self, gm: fx.GraphModule) -> fx.GraphModule:
        gm.meta[meta.SYMBOLIC] = True
        return gm


@dataclass(frozen=True)
class ForgetsGraphKey(Pass):
    name = "forgets"
    graph_provides = (meta.SYMBOLIC,)

    def run(self, gm: fx.GraphModule) -> fx.GraphModule:
        return gm


@dataclass(frozen=True)
class NeedsGraphKey(Pass):
    name = "needs-symbolic"
    graph_requires = (meta.SYMBOLIC,)

    def run(self, gm: fx.GraphModule) -> fx.GraphModule:
        assert gm.meta[meta.SYMBOLIC] is True
        return gm


@dataclass(frozen=True)
class Undeclared(Pass):
    name = "undeclared"
    graph_provides = ("pp.not_a_key",)

    def run(self, gm: fx.GraphModule) -> fx.GraphModule:  # pragma: no cover - refused before running
        raise AssertionError("ran")


def test_graph_requires_is_checked_before_the_pass() -> None:
    with pytest.raises(GraphError, match=r"needs-symbolic.*needs gm.meta\['pp.symbolic'\]"):
        PassManager([NeedsGraphKey()]).run(_gm())


def test_graph_provides_is_checked_after_the_pass() -> None:
    with pytest.raises(GraphError, match=r"forgets.*did not set gm.meta\['pp.symbolic'\]"):
        PassManager([ForgetsGraphKey()]).run(_gm())


def test_graph_keys_flow_between_passes() -> None:
    gm = PassManager([SetsGraphKey(), NeedsGraphKey()]).run(_gm())
    assert gm.meta[meta.SYMBOLIC] is True


def test_undeclared_key_refused_before_anything_runs() -> None:
    ran = []

    @dataclass(frozen=True)
    class First(Pass):
        name = "first"

        def run(self, gm: fx.GraphModule) -> fx.GraphModule:
            ran.append(True)
            return gm

    with pytest.raises(GraphError, match=r"pp.not_a_key.*passes/meta.py does not declare.*GRAPH_KEYS"):
        PassManager([First(), Undeclared()]).run(_gm())
    assert not ran

    @dataclass(frozen=True)
    class BadNode(Pass):
        name = "bad-node"
        requires = ("pp.nope",)

        def run(self, gm: fx.GraphModule) -> fx.GraphModule:  # pragma: no cover
            return gm

    with pytest.raises(GraphError, match=r"node.meta\['pp.nope'\].*NODE_KEYS"):
        PassManager([BadNode()]).run(_gm())


def _pp_literals() -> dict[str, list[str]]:
    """Every ``"pp.xxx"`` string constant in library code, with where it appears."""
    found: dict[str, list[str]] = {}
    for pkg in ("passes", "partitioner", "tools", "cost_models"):  # the folders
        for path in (ROOT / pkg).rglob("*.py"):
            for key in _literals_in(path.read_text()):
                found.setdefault(key, []).append(str(path.relative_to(ROOT)))
    return found


def _literals_in(source: str) -> list[str]:
    """The string constants of ``source`` that are exactly a key (``"pp.xxx"``), in order."""
    hits = [(node.lineno, node.col_offset, node.value) for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and re.fullmatch(r"pp\.[a-z_]+", node.value)]
    return [value for _, _, value in sorted(hits)]


def test_every_pp_key_the_library_uses_is_declared() -> None:
    literals = _pp_literals()
    assert "pp.fake_mode" in literals  # the scan sees shape-prop's graph keys
    undeclared = {k: v for k, v in literals.items() if k not in meta.NODE_KEYS and k not in meta.GRAPH_KEYS}
    assert not undeclared, f"declare these in passes/meta.py: {undeclared}"
    assert not set(meta.NODE_KEYS) & set(meta.GRAPH_KEYS)


#: Files that may spell a key as a literal, with why.
_LITERALS_ALLOWED = {"passes/meta.py": "where the keys are declared"}


def test_pp_keys_are_spelled_only_in_meta() -> None:
    """Outside passes/meta.py the library names a key by its constant (``meta.COST``), so a
    renamed or mistyped key is an import error, not a silently missing entry."""
    elsewhere = {k: sorted(set(p) - set(_LITERALS_ALLOWED)) for k, p in _pp_literals().items()}
    elsewhere = {k: p for k, p in elsewhere.items() if p}
    assert not elsewhere, f"use the constants of partitioner.passes.meta instead of these literals: {elsewhere}"


def test_the_literal_scan_finds_a_literal() -> None:
    """The scan above can fail: it sees a key literal in code, and not one in a docstring."""
    code = 'def f(n):\n    """Reads ``n.meta["pp.cost"]``."""\n    return n.meta["pp.cost"], "pp.stage"\n'
    assert _literals_in(code) == ["pp.cost", "pp.stage"]


def test_library_passes_declare_only_known_keys() -> None:
    from partitioner.passes.annotate import AnnotateCosts
    from partitioner.passes.order import OrderForCuts
    from partitioner.passes.shape_prop import ShapeProp

    for p in (ShapeProp, AnnotateCosts, OrderForCuts):
        for key in (*p.requires, *p.provides):
            assert meta.is_declared(key, graph=False), (p.name, key)
        for key in (*p.graph_requires, *p.graph_provides):
            assert meta.is_declared(key, graph=True), (p.name, key)


def test_build_plan_takes_records() -> None:
    import inspect

    from partitioner import plan_builder

    params = list(inspect.signature(plan_builder.build_plan).parameters)
    assert params == ["source", "hardware", "solved"]
    from partitioner import partition
    from partitioner.examples import gpt_example

    model, (idx,) = gpt_example()
    pipe = partition(model, 2, (idx,))
    assert pipe.plan.model == type(model).__name__ and pipe.plan.capture in ("fx", "export")
    assert torch.equal(pipe(idx), model(idx))
