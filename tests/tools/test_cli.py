"""The CLI as a user runs it: fresh processes, real files, golden output.

Plans are made once per session (``plans`` in conftest.py: partitioning costs seconds
per process); the tests that only read plans reuse them.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.tools.helpers import MODELS, check_golden, cli, json_golden


def test_plan_prints_table_and_writes_files(plans: Path, update_golden: bool) -> None:
    check_golden("plan_mlp_4.txt", (plans / "a.stdout").read_text(), update_golden)
    json_golden("plan_mlp_4.json", (plans / "a.json").read_text(), plans, update_golden)
    svg = ET.parse(plans / "a.svg").getroot()
    assert svg.tag.endswith("svg") and len(svg.findall(".//{http://www.w3.org/2000/svg}rect")) >= 10
    assert "B×16 float32" in (plans / "a.svg").read_text()  # boundary edges carry tensor sizes
    dot = (plans / "a.dot").read_text()
    assert dot.startswith("digraph") and dot.count("cluster_stage") == 4


def test_show_text(plans: Path, update_golden: bool) -> None:
    text = cli("show", str(plans / "a.json"))
    assert text.returncode == 0, text.stderr
    check_golden("show_mlp_4.txt", text.stdout, update_golden)


def test_diff_two_plans(plans: Path, update_golden: bool) -> None:
    a, b = str(plans / "a.json"), str(plans / "b.json")
    out = cli("diff", a, b, "--json", "--html", str(plans / "d.html"))
    assert out.returncode == 1, out.stderr  # like diff(1): 1 = different
    data = json_golden("diff_mlp_4_vs_2.json", out.stdout, plans, update_golden)
    assert data["moved"] and data["cuts"]["removed"]
    page = (plans / "d.html").read_text()
    for label in data["a"]["cuts"] + data["b"]["cuts"]:
        assert f"<li>{label}</li>" in page  # both plans' cuts, side by side
    assert "<link" not in page and "<script" not in page and "http" not in page.split("<style>")[0]


def test_diff_passes(update_golden: bool, tmp_path: Path) -> None:
    out = cli("diff", "--passes", f"{MODELS}:skip", "--gpus", "2", "--json", "--html", str(tmp_path / "p.html"))
    assert out.returncode == 1, out.stderr
    data = json_golden("diff_passes_skip.json", out.stdout, tmp_path, update_golden)
    assert data["passes"] == ["capture", "shape-prop", "annotate-costs", "order-for-cuts", "solve"]
    assert data["steps"][0]["meta_keys"]["pp.desc added"] == 8
    page = (tmp_path / "p.html").read_text()  # "unchanged" only for the steps whose text did not change
    assert page.count("(graph text unchanged)") == sum(1 for st in data["steps"] if not st["unified_diff"]) == 1


def test_run_trains_and_traces(tmp_path: Path) -> None:
    trace = tmp_path / "trace.json"
    out = cli("run", f"{MODELS}:mlp", "--gpus", "2", "--steps", "2", "--microbatches", "4", "--trace", str(trace))
    assert out.returncode == 0, out.stderr
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("step ")]
    assert len(lines) == 2 and all("loss" in ln for ln in lines)
    assert any(ev.get("name") == "0F0" for ev in json.loads(trace.read_text())["traceEvents"])


@pytest.mark.parametrize("args,needle", [
    (["plan", "tests/tools/nope.py:mlp"], "does not exist"),
    (["plan", f"{MODELS}:broken"], "raised RuntimeError: weights not found"),
])
def test_errors_are_one_line(args: list[str], needle: str) -> None:
    out = cli(*args)
    assert out.returncode == 2
    assert out.stderr.startswith("error: ") and needle in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


def test_malformed_plan_names_the_json_path(plans: Path, tmp_path: Path) -> None:
    data = json.loads((plans / "a.json").read_text())
    data["stages"][1]["cost"]["param_bytes"] = "lots"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    out = cli("show", str(bad))
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert "$.stages[1].cost.param_bytes" in out.stderr


def test_run_clips_evaluates_and_normalizes_by_tokens() -> None:
    out = cli("run", f"{MODELS}:tiny_gpt", "--gpus", "2", "--steps", "2", "--microbatches", "2",
              "--clip", "0.5", "--eval-every", "1", "--normalize", "tokens")
    assert out.returncode == 0, out.stderr
    steps = [ln for ln in out.stdout.splitlines() if ln.startswith("step ") and "eval" not in ln]
    evals = [ln for ln in out.stdout.splitlines() if "eval loss" in ln]
    assert len(steps) == 2 and all("gradient norm" in ln and "clipping to 0.5" in ln for ln in steps)
    assert len(evals) == 2


def test_run_refuses_token_normalization_for_a_model_without_tokens() -> None:
    out = cli("run", f"{MODELS}:mlp", "--gpus", "2", "--steps", "1", "--normalize", "tokens")
    assert out.returncode == 2 and out.stderr.startswith("error: --normalize tokens needs")
    assert len(out.stderr.strip().splitlines()) == 1


def test_plan_tp_auto_ranks_the_tensor_parallel_degrees(tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    done = cli("plan", "partitioner.examples:gpt_example", "--gpus", "4", "--tp", "auto", "--gpus-per-node", "4",
               "--device", "h100-sxm", "--link", "nvlink4", "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert "tensor parallelism: picked T=" in done.stdout
    ranked = [line for line in done.stdout.splitlines() if line.strip().startswith("#")]
    assert {line.split()[1] for line in ranked} == {"T=1", "T=2", "T=4"}
    picked = done.stdout.split("tensor parallelism: picked T=")[1].split()[0]
    assert json.loads(out.read_text())["mesh"].get("tp", 1) == int(picked)
    bad = cli("plan", "partitioner.examples:gpt_example", "--gpus", "4", "--tp", "3", "-o", str(tmp_path / "b.json"))
    assert bad.returncode == 2 and "--tp" in bad.stderr and "tensor_parallel" not in bad.stderr
