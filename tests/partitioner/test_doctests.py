"""The examples in the library's docstrings run (every module that has one), and something ran."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"partitioner": "partitioner", "passes": "partitioner.passes",
            "cost_models": "partitioner.cost_models", "tools": "partitioner.tools"}  # folder → import name


def _modules_with_examples() -> list[str]:
    names = []
    for folder, pkg in PACKAGES.items():
        for info in pkgutil.walk_packages([str(ROOT / folder)], pkg + "."):
            rel = info.name[len(pkg) + 1:].replace(".", "/")
            path = ROOT / folder / (rel + ("/__init__.py" if info.ispkg else ".py"))
            if path.exists() and re.search(r"^\s*>>> ", path.read_text(), re.M):
                names.append(info.name)
    return names


MODULES = _modules_with_examples()


def test_the_walk_finds_the_known_examples() -> None:
    assert {"partitioner.schedule", "partitioner.solver", "partitioner.api", "partitioner.simulator",
            "partitioner.runtime.routing"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, name
    # an example that is all "# doctest: +SKIP" (or not in a docstring doctest sees) runs nothing:
    # such text belongs in a literal block (::), not in a >>> example
    assert result.attempted > 0, f"{name} has >>> lines but no example ran"
