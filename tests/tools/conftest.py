"""Plans made once per session by the real CLI, shared by every tools test that reads plans."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tools.helpers import MODELS, cli, normalise


@pytest.fixture(scope="session")
def plans(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("plans")
    a = cli("plan", f"{MODELS}:mlp", "--gpus", "4", "-o", str(tmp / "a.json"),
            "--svg", str(tmp / "a.svg"), "--dot", str(tmp / "a.dot"))
    assert a.returncode == 0, a.stderr
    (tmp / "a.stdout").write_text(normalise(a.stdout, tmp))
    b = cli("plan", f"{MODELS}:mlp", "--gpus", "2", "-o", str(tmp / "b.json"), "--quiet")
    assert b.returncode == 0 and b.stdout == "", b.stderr
    return tmp
