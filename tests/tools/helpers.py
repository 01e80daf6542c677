"""Running the CLI the way a user does, and golden files that tolerate volatile bits."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).parent / "golden"
MODELS = "tests/tools/tiny_models.py"


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``python -m partitioner.tools.cli ARGS`` in the repo root, as a fresh process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1", "COLUMNS": "160", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "partitioner.tools.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def normalise(text: str, tmp: Path | None = None) -> str:
    if tmp is not None:
        text = text.replace(str(tmp), "<tmp>")
    # pass timings vary run to run; everything else the tools print is deterministic
    return re.sub(r'"seconds": [0-9.e-]+', '"seconds": 0', text)


def check_golden(name: str, text: str, update: bool) -> None:
    """Compare with tests/tools/golden/NAME; UPDATE_GOLDEN=1 (or --update-golden) rewrites it."""
    path = GOLDEN / name
    if update or not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        if not update:
            raise AssertionError(f"golden file {path} did not exist; wrote it, check it in and re-run")
        return
    want = path.read_text()
    assert text == want, f"output differs from {path}; refresh with UPDATE_GOLDEN=1 if the change is intended"


def json_golden(name: str, text: str, tmp: Path | None, update: bool) -> Any:
    data = json.loads(text)  # must parse before we compare it
    check_golden(name, normalise(json.dumps(data, indent=1, sort_keys=True), tmp) + "\n", update)
    return data
