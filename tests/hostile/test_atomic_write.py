"""Saving a plan is all or nothing: a failure midway leaves no half-written file behind."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from partitioner import load_plan
from partitioner import plan as plan_module
from partitioner.plan import write_atomic
from tests.hostile.conftest import base


class Boom(OSError):
    pass


def _listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def _fail_replace(monkeypatch: pytest.MonkeyPatch) -> None:
    def replace(*a: Any, **k: Any) -> None:
        raise Boom(28, "No space left on device")

    monkeypatch.setattr(plan_module.os, "replace", replace)


def _fail_write_halfway(monkeypatch: pytest.MonkeyPatch) -> None:
    real = Path.write_text

    def write_text(self: Path, data: str, *a: Any, **k: Any) -> int:
        real(self, data[: len(data) // 2], *a, **k)  # half the bytes reach the disk, then the disk is full
        raise Boom(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", write_text)


FAILURES = [_fail_replace, _fail_write_halfway]


@pytest.mark.parametrize("fail", FAILURES)
def test_failed_save_leaves_no_file_and_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail: Any) -> None:
    plan = base("mlp")[2].plan
    target = tmp_path / "plans" / "mlp.json"
    fail(monkeypatch)
    with pytest.raises(Boom):
        plan.save(target)
    assert not target.exists()
    assert _listing(target.parent) == []  # no .mlp.json.tmp<pid> left behind


@pytest.mark.parametrize("fail", FAILURES)
def test_failed_save_keeps_the_existing_file_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail: Any) -> None:
    old, new = base("mlp")[2].plan, base("gpt")[2].plan
    target = tmp_path / "plan.json"
    old.save(target)
    before = target.read_bytes()
    fail(monkeypatch)
    with pytest.raises(Boom):
        new.save(target)
    assert target.read_bytes() == before
    assert load_plan(target) == old
    assert _listing(tmp_path) == ["plan.json"]


def test_failed_bytes_write_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "blob.bin"
    target.write_bytes(b"original")
    real = Path.write_bytes

    def write_bytes(self: Path, data: bytes) -> int:
        real(self, data[:3])
        raise Boom(5, "Input/output error")

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    with pytest.raises(Boom):
        write_atomic(target, b"replacement")
    assert target.read_bytes() == b"original"
    assert _listing(tmp_path) == ["blob.bin"]


def test_interrupt_during_write_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C (KeyboardInterrupt is no Exception) between write and rename still removes the temp."""
    def replace(*a: Any, **k: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(plan_module.os, "replace", replace)
    target = tmp_path / "plan.json"
    with pytest.raises(KeyboardInterrupt):
        base("mlp")[2].plan.save(target)
    assert _listing(tmp_path) == []


def test_successful_save_round_trips_and_replaces(tmp_path: Path) -> None:
    target = tmp_path / "plan.json"
    target.write_text("stale")
    plan = base("mlp")[2].plan
    plan.save(target)
    assert target.read_text() == plan.to_json()
    assert load_plan(target) == plan
    assert _listing(tmp_path) == ["plan.json"]


def test_save_into_a_path_that_is_a_directory_fails_cleanly(tmp_path: Path) -> None:
    target = tmp_path / "plan.json"
    target.mkdir()
    with pytest.raises(OSError):
        base("mlp")[2].plan.save(target)
    assert target.is_dir() and _listing(target) == []
    assert _listing(tmp_path) == ["plan.json"]


@pytest.mark.skipif(not hasattr(os, "getuid") or os.getuid() == 0, reason="root ignores file modes")
def test_unreadable_plan_file_is_a_plan_error(tmp_path: Path) -> None:
    from partitioner import PlanError

    target = tmp_path / "plan.json"
    base("mlp")[2].plan.save(target)
    target.chmod(0)
    with pytest.raises(PlanError, match="cannot read plan file .*Permission denied"):
        load_plan(target)
