"""``launch.spawn``: a job whose ranks all fail to join the process group for a transient socket
reason starts once more on a new port; any other joining failure is raised at once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from partitioner.runtime import launch
from partitioner.runtime.errors import PipelineRuntimeError


def _rank(rank: int, world: int) -> int:
    return rank * 10


def _flaky_join(marks: Path, message: str) -> Any:
    """An ``init_from_env`` that fails with ``message`` the first time each rank joins (a file per
    rank and attempt, so the forked ranks' calls are counted), then joins for real."""
    real = launch.init_from_env

    def join(*args: Any, **kwargs: Any) -> Any:
        import os

        rank = int(os.environ["RANK"])
        tries = len(list(marks.glob(f"rank{rank}-*")))
        (marks / f"rank{rank}-{tries}").touch()
        if tries == 0:
            raise RuntimeError(message)
        return real(*args, **kwargs)

    return join


def test_a_transient_join_failure_starts_the_ranks_once_more(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launch, "init_from_env", _flaky_join(tmp_path, "Gloo connectFullMesh failed with [pair.cc:553] "
                                                                       "Connection closed by peer [127.0.0.1]:41664"))
    assert launch.spawn(_rank, 2, timeout_s=60.0, start_method="fork") == [0, 10]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0-0", "rank0-1", "rank1-0", "rank1-1"]


def test_another_join_failure_is_raised_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launch, "init_from_env", _flaky_join(tmp_path, "Invalid backend: 'nccl' needs CUDA"))
    with pytest.raises(PipelineRuntimeError, match="at action join the process group: RuntimeError: Invalid backend"):
        launch.spawn(_rank, 2, timeout_s=60.0, start_method="fork")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0-0", "rank1-0"]
