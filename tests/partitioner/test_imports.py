"""Import hygiene (issue 13 item 1): the library's module-level imports form no cycle, and the
torch-free modules (schedule, plan, options) load without torch, so ``partitioner show`` and
``partitioner diff A B`` start in well under a second."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: the repository's folders and the import names an install gives them (pyproject's package-dir)
PACKAGES = {"partitioner": "partitioner", "passes": "partitioner.passes",
            "cost_models": "partitioner.cost_models", "tools": "partitioner.tools"}


def _module_name(path: Path, root: Path, packages: dict[str, str]) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    parts = tuple(packages[parts[0]].split(".")) + parts[1:]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _module_level(body: list[ast.stmt]) -> list[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported: top level, and inside module-level
    ``if``/``try``/``with`` blocks, but not under ``if TYPE_CHECKING:`` and not in functions."""
    out: list[ast.Import | ast.ImportFrom] = []
    for stmt in body:
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            out.append(stmt)
        elif isinstance(stmt, ast.If):
            if not _is_type_checking(stmt.test):
                out += _module_level(stmt.body)
            out += _module_level(stmt.orelse)
        elif isinstance(stmt, ast.Try):
            for block in (stmt.body, stmt.orelse, stmt.finalbody, *(h.body for h in stmt.handlers)):
                out += _module_level(block)
        elif isinstance(stmt, ast.With):
            out += _module_level(stmt.body)
    return out


def import_graph(root: Path = ROOT, packages: dict[str, str] | None = None) -> dict[str, set[str]]:
    """module → first-party modules whose code runs when it is imported (parents' __init__ included).
    ``packages``: folder → import name (default: the library's)."""
    packages = PACKAGES if packages is None else packages
    files = {_module_name(p, root, packages): p for pkg in packages for p in (root / pkg).rglob("*.py")}

    def chain(name: str) -> set[str]:
        parts = name.split(".")
        return {".".join(parts[:i]) for i in range(1, len(parts) + 1)}

    def targets(name: str) -> set[str]:
        # importing a.b.c runs a/__init__, a/b/__init__ and a/b/c, except the packages that hold
        # the importing module: Python imported those first, before the module itself
        return (chain(name) - own) & files.keys()

    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        own = chain(mod) if is_pkg else chain(mod) - {mod}
        deps: set[str] = set()
        for node in _module_level(ast.parse(path.read_text(), str(path)).body):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    deps |= targets(alias.name)
                continue
            base = node.module or ""
            if node.level:  # relative: from . import x / from ..y import z
                anchor = mod.split(".") if is_pkg else mod.split(".")[:-1]
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            deps |= targets(base)
            for alias in node.names:  # from pkg import submodule
                if f"{base}.{alias.name}" in files:
                    deps.add(f"{base}.{alias.name}")
        deps.discard(mod)
        graph[mod] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_library_import_graph_has_no_cycle() -> None:
    graph = import_graph()
    assert {"partitioner.api", "partitioner.plan", "partitioner.pipe", "partitioner.runtime.stage"} <= graph.keys()
    assert "partitioner.plan" in graph["partitioner.api"]  # the graph sees real edges
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_cycles(tmp_path: Path) -> None:
    # The test above can fail: the same walk over a package whose modules import each other.
    pkg = tmp_path / "cyc"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from cyc.a import f\n")
    (pkg / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from cyc import b\n"
                              "def f():\n    from cyc import b\n")
    (pkg / "b.py").write_text("from cyc import a\nfrom cyc.sub.d import g\n")
    (pkg / "c.py").write_text("import json\nfrom . import b\n")
    (pkg / "sub").mkdir()
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "d.py").write_text("import cyc.c\nfrom cyc.sub import e\n")
    (pkg / "sub" / "e.py").write_text("")
    graph = import_graph(tmp_path, {"cyc": "cyc"})
    assert graph == {"cyc": {"cyc.a"}, "cyc.a": set(), "cyc.b": {"cyc.a", "cyc.sub", "cyc.sub.d"},
                     "cyc.c": {"cyc.b"}, "cyc.sub": set(), "cyc.sub.d": {"cyc.c", "cyc.sub.e"}, "cyc.sub.e": set()}
    assert find_cycle(graph) == ["cyc.b", "cyc.sub.d", "cyc.c", "cyc.b"]
    (pkg / "c.py").write_text("import json\n")
    assert find_cycle(import_graph(tmp_path, {"cyc": "cyc"})) is None


@pytest.mark.parametrize("module", ["partitioner.schedule", "partitioner.plan", "partitioner.options",
                                    "partitioner", "partitioner.cost_models.errors", "partitioner.cost_models.devices", "partitioner.tools.cli"])
def test_torch_free_modules_import_no_torch(module: str) -> None:
    code = (f"import sys, {module}; bad = sorted(m for m in ('torch', 'numpy') if m in sys.modules); "
            "assert not bad, bad")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_lazy_public_names_resolve() -> None:
    import partitioner
    import partitioner.cost_models

    for module in (partitioner, partitioner.cost_models):
        assert sorted(module.__all__) == sorted(module._WHERE)  # type: ignore[attr-defined]
        for name in module.__all__:
            assert getattr(module, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        partitioner.nope  # noqa: B018
    assert set(partitioner.__all__) <= set(dir(partitioner))


def test_torch_dtype_names_match_torch() -> None:
    import torch

    from partitioner.plan import TORCH_DTYPES

    assert TORCH_DTYPES == {n for n in dir(torch) if isinstance(getattr(torch, n, None), torch.dtype)}


def test_loading_a_plan_imports_no_torch(tmp_path: Path) -> None:
    # load_plan is the gate for plan files (schema, consistency, device/link profiles, schedule):
    # every check it runs must stay torch-free, or `partitioner show` pays seconds for torch
    from partitioner import partition
    from tests.fixtures.models import FIXTURES

    f = FIXTURES["mlp"]
    path = tmp_path / "plan.json"
    partition(f.build(), n_gpus=2, example_inputs=f.inputs()).plan.save(path)
    code = ("import sys; from partitioner.plan import load_plan; p = load_plan(sys.argv[1]); p.cost_at(batch=2); "
            "bad = sorted(m for m in ('torch', 'numpy') if m in sys.modules); assert not bad, bad; print(p.n_stages)")
    done = subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "2"


def test_the_install_puts_everything_under_one_package_name(tmp_path: Path) -> None:
    # a wheel of the repository: its folders passes/, cost_models/, tools/ land inside
    # partitioner/, so nothing named "tools" or "passes" reaches the top of site-packages
    import zipfile

    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    if done.returncode != 0 and "No module named" in done.stderr:
        pytest.skip(f"cannot build a wheel here: {done.stderr.strip()[-200:]}")
    assert done.returncode == 0, done.stderr
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"partitioner"}
    for folder, name in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            assert name.replace(".", "/") + "/" + path.relative_to(ROOT / folder).as_posix() in names, path
    assert "partitioner/plan.schema.json" in names


def test_the_code_imports_the_subpackages_by_their_installed_names() -> None:
    # in a checkout "import passes" would also work (the repository root is on sys.path) and
    # load a second copy of every module: the library and its tests must not use it
    bad = []
    for path in [*ROOT.glob("*/**/*.py")]:
        if ".venv" in path.parts or path.parts[len(ROOT.parts)].startswith("."):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            bad += [f"{path.relative_to(ROOT)}:{node.lineno}: {n}" for n in names
                    if n.split(".")[0] in ("passes", "cost_models", "tools")]
    assert not bad, "import these as partitioner.<name>: " + ", ".join(bad)
