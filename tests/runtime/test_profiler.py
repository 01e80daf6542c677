"""The pipeline as PyTorch's profiler sees it: each action a named range, the gradient
reduction over replicas too, and ``runner.step(profile=...)`` writing per-rank traces
beside the pipeline's measured-and-predicted timeline."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from partitioner import partition
from partitioner.runtime.launch import spawn
from partitioner.runtime.trace import PREDICTED_PID
from tests.runtime.helpers import data, fresh

TIMEOUT_S = 120.0


def _names(path: Path) -> set[str]:
    return {ev.get("name") for ev in json.loads(path.read_text())["traceEvents"]}


def test_a_users_profiler_sees_every_action_of_an_in_process_step() -> None:
    _, pipe = fresh("gpt-2")
    x, y, loss_fn = data("gpt")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        pipe.train_step(x, target=y, loss_fn=loss_fn, schedule="1f1b", n_microbatches=2)
    seen = {e.key for e in prof.key_averages()}
    want = {"0F0", "0F1", "1F0", "1B1", "0B0", "0SEND_F0", "1RECV_F1", "1SEND_B0", "0RECV_B1"}
    assert want <= seen, want - seen
    matmuls = [e for e in prof.events() if e.name == "aten::mm"]
    assert matmuls and all(any(p.name[:1] in "01" for p in _parents(e)) for e in matmuls)  # ops sit under actions


def _parents(e: Any) -> list[Any]:
    out = []
    while e.cpu_parent is not None:
        e = e.cpu_parent
        out.append(e)
    return out


def _profiled(rank: int, world: int, path: str, schedule: str) -> list[str]:
    _, pipe = fresh("gpt-2")
    x, y, loss_fn = data("gpt")
    stage = pipe.build_stage(rank, "cpu")
    runner = stage.runner(schedule, n_microbatches=4, loss_fn=loss_fn, batch_size=len(x))
    runner.step(x if rank == 0 else None, target=y)  # warm-up, unprofiled
    runner.step(x if rank == 0 else None, target=y, profile=path)
    return [str(a) for a in runner.interpreter.actions]


@pytest.mark.parametrize("schedule", ["1f1b", "zb-h1"])
def test_profile_writes_each_ranks_trace_naming_every_action_and_the_timeline(tmp_path: Path, schedule: str) -> None:
    path = tmp_path / "trace.json"
    actions = spawn(_profiled, 2, str(path), schedule, timeout_s=TIMEOUT_S)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trace.json", "trace.rank0.json", "trace.rank1.json"]
    for rank, acts in enumerate(actions):
        assert any("SEND" in a for a in acts) and any("RECV" in a for a in acts)
        trace = json.loads((tmp_path / f"trace.rank{rank}.json").read_text())
        ranges = [ev["name"] for ev in trace["traceEvents"] if ev.get("cat") == "user_annotation"
                  and re.fullmatch(r"\d+[A-Z_]+\d+", ev["name"])]  # besides gloo's own ("gloo:all_reduce")
        assert sorted(ranges) == sorted(acts)  # each action once, and no other
        assert any(ev.get("name") == "aten::mm" for ev in trace["traceEvents"])  # the ops they ran
        assert any(ev.get("cat") == "python_function" for ev in trace["traceEvents"])  # with_stack=True
    timeline = json.loads(path.read_text())
    real = {ev["name"] for ev in timeline["traceEvents"] if ev.get("ph") == "X" and ev["pid"] < PREDICTED_PID}
    predicted = {ev["name"] for ev in timeline["traceEvents"] if ev.get("ph") == "X" and ev["pid"] >= PREDICTED_PID}
    compute = {a for acts in actions for a in acts if "SEND" not in a and "RECV" not in a}
    assert compute <= real and compute == predicted
    assert timeline["otherData"]["predicted_step_s"] > 0


def _replica(rank: int, world: int, pipe: Any, x: torch.Tensor, y: torch.Tensor, path: str) -> None:
    stage = pipe.build_stage(rank, "cpu")
    stage.runner("1f1b", loss_fn=F.mse_loss).step(x, target=y, profile=path)


def test_the_gradient_reduction_over_replicas_is_named_in_the_trace(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    x, y = torch.randn(4, 8), torch.randn(4, 4)
    pipe = partition(model, n_gpus=2, data_parallel=2, example_inputs=(x,), n_microbatches=2)
    spawn(_replica, 2, pipe, x, y, str(tmp_path / "t.json"), timeout_s=TIMEOUT_S)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json", "t.rank0.json", "t.rank1.json"]
    for rank in (0, 1):
        names = _names(tmp_path / f"t.rank{rank}.json")
        assert "grad all-reduce: launch bucket 0 (stage 0)" in names and "grad all-reduce: wait bucket 0 (stage 0)" in names
        assert {"0F0", "0F1", "0B0", "0B1"} <= names
