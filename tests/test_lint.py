"""Pyflakes-level lint over the whole tree, and mypy over the library packages."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing() -> None:
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[dev]')")
    result = subprocess.run([ruff, "check", str(ROOT)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_finds_nothing_in_the_library() -> None:
    mypy = shutil.which("mypy", path=str(Path(sys.executable).parent)) or shutil.which("mypy")
    if mypy is None:
        pytest.skip("mypy is not installed (pip install -e '.[dev]')")
    # mypy reads folders, not the install's package-dir mapping: give it the installed layout
    # (partitioner/ with passes/ and cost_models/ inside) as links into the repository
    with tempfile.TemporaryDirectory() as tmp:
        pkg = Path(tmp) / "partitioner"
        pkg.mkdir()
        for item in (ROOT / "partitioner").iterdir():
            if item.name != "__pycache__":
                (pkg / item.name).symlink_to(item)
        for folder in ("passes", "cost_models"):
            (pkg / folder).symlink_to(ROOT / folder)
        result = subprocess.run([mypy, "--config-file", str(ROOT / "pyproject.toml"), "--cache-dir",
                                 str(Path(tmp) / ".mypy_cache"), "-p", "partitioner"], cwd=tmp,
                                capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success" in result.stdout
