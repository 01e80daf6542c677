"""Logging (issue 13 item 9): a failed step logs the schedule grid around the failing action, and
PARTITIONER_LOG=debug shows the library's capture and pass log lines."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from partitioner.runtime.diagnose import failure_grid
from partitioner.runtime.errors import PipelineRuntimeError
from partitioner.schedule import build_schedule
from tests.logs import captured
from tests.runtime.helpers import data, fresh

ROOT = Path(__file__).resolve().parents[2]


def test_grid_marks_the_failing_action_and_cuts_to_its_neighbourhood() -> None:
    s = build_schedule("1f1b", n_ranks=2, n_microbatches=8)
    grid = failure_grid(s, 1, "1B5", context=2)
    assert grid is not None
    lines = grid.splitlines()
    assert lines[0].split() == ["Rank", "0", "Rank", "1"]
    marked = [ln for ln in lines if "<-- rank 1" in ln]
    assert len(marked) == 1 and "[1B5]" in marked[0]
    assert lines[1] == "..." and lines[-1] == "..."  # 2 rows either side of the mark, not the whole list
    assert len(lines) == 1 + 1 + 5 + 1
    full = s.grid(comms=True).splitlines()
    assert len(full) > len(lines)
    assert failure_grid(s, 1, "0F0") is None  # rank 1 does not run stage 0
    assert failure_grid(s, 5, "1B5") is None


def test_a_failed_step_logs_the_grid_around_its_action() -> None:
    _, pipe = fresh("gpt-2")
    x, y, _ = data("gpt")

    def bad_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")

    with captured("partitioner.runtime") as records, pytest.raises(PipelineRuntimeError, match="boom"):
        pipe.train_step(x, target=y, loss_fn=bad_loss, schedule="1f1b", n_microbatches=4)
    assert len(records) == 1 and records[0].levelno == logging.ERROR
    text = records[0].getMessage()
    assert "schedule '1f1b', rank 1, action 1F0" in text and "boom" in text
    assert "[1F0]" in text and "<-- rank 1" in text and "Rank 0" in text


def test_partitioner_log_debug_prints_capture_and_pass_lines() -> None:
    code = ("import torch; from partitioner import partition; "
            "from tests.fixtures.models import FIXTURES; f = FIXTURES['mlp']; "
            "partition(f.build(), n_gpus=2, example_inputs=f.inputs())")
    env = {**os.environ, "PARTITIONER_LOG": "debug", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "partitioner.passes.trace DEBUG: captured MLP with torch.fx" in done.stderr
    assert "partitioner.passes.manager DEBUG: pass shape-prop:" in done.stderr
    quiet = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                           env={k: v for k, v in env.items() if k != "PARTITIONER_LOG"})
    assert quiet.returncode == 0 and "DEBUG" not in quiet.stderr
    bad = subprocess.run([sys.executable, "-c", "import partitioner"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, env={**env, "PARTITIONER_LOG": "loud"})
    assert bad.returncode != 0 and "PARTITIONER_LOG='loud'" in bad.stderr
