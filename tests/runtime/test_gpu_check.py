"""The GPU check script runs end to end on the CPU (``--smoke``), so it cannot rot between the
sessions that have a GPU to run it on."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any


def test_gpu_check_smoke_runs_every_schedule_and_the_multi_rank_path(tmp_path: Path) -> None:
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "gpu_check.json"
    result: dict[str, Any] = mod.main(["--smoke", "--steps", "2", "--out", str(out)])
    assert json.loads(out.read_text())["part1"]["schedules"].keys() == result["part1"]["schedules"].keys()
    rows = result["part1"]["schedules"]
    assert set(rows) == {"gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "zbv"}
    losses = {name: row["eager"]["losses"][0] for name, row in rows.items()}
    assert all(math.isfinite(v) for v in losses.values())
    assert max(losses.values()) - min(losses.values()) < 1e-4, losses  # every schedule: the same first loss
    assert all(r["fwd_pred_s"] > 0 for r in rows["1f1b"]["per_stage"])
    for name in ("1f1b", "zbv"):
        ranks = result["part2"]["schedules"][name]["ranks"]
        assert len(ranks) == 2 and all(len(r["step_s"]) == 2 for r in ranks)
