"""The subcommands through ``main(argv)`` in this process: cheaper than a fresh process
each, so the many small cases (help, errors, pictures, export) stay fast."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from partitioner.tools.cli import build_parser, main
from tests.tools.helpers import MODELS, check_golden, json_golden

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_show_json(plans: Path, capsys: pytest.CaptureFixture[str], update_golden: bool) -> None:
    code, out, _ = run(capsys, "show", str(plans / "a.json"), "--json")
    assert code == 0
    data = json_golden("show_mlp_4.json", out, plans, update_golden)
    assert [s["index"] for s in data["stages"]] == [0, 1, 2, 3]


def test_diff_text_and_identical_plans(plans: Path, capsys: pytest.CaptureFixture[str], update_golden: bool) -> None:
    code, out, _ = run(capsys, "diff", str(plans / "a.json"), str(plans / "b.json"))
    assert code == 1
    check_golden("diff_mlp_4_vs_2.txt", out, update_golden)
    code, out, _ = run(capsys, "diff", str(plans / "a.json"), str(plans / "a.json"))
    assert code == 0 and "identical" in out


def test_diff_stages_accounts_for_every_node(capsys: pytest.CaptureFixture[str], update_golden: bool,
                                             tmp_path: Path) -> None:
    code, out, _ = run(capsys, "diff", "--stages", f"{MODELS}:skip", "--gpus", "4", "--html", str(tmp_path / "s.html"))
    assert code == 0  # no violations
    check_golden("diff_stages_skip_4.txt", out, update_golden)
    assert "passed through unchanged: a" in out  # the residual rides through a middle stage
    assert "exactly one stage" in (tmp_path / "s.html").read_text()


@pytest.mark.parametrize("suffix", ["png", "svg"])
def test_timeline_from_plan(plans: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path, suffix: str) -> None:
    out = tmp_path / f"t.{suffix}"
    code, _, err = run(capsys, "show", str(plans / "a.json"), "--timeline", str(out))
    assert code == 0, err
    data = out.read_bytes()
    if suffix == "png":
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    else:
        root = ET.fromstring(data)
        assert root.tag.endswith("svg") and b"rank 3" in data


def test_timeline_from_measured_trace(plans: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    events = [{"name": f"{r}{k}{mb}", "ph": "X", "pid": r, "tid": 0, "ts": t, "dur": 90}
              for r in range(2) for mb in range(2) for k, t in (("F", 100 * (mb + r)), ("B", 400 + 100 * (mb + 1 - r)))]
    events.append({"name": "0F0", "ph": "X", "pid": 1000, "ts": 0, "dur": 5})  # a predicted row: ignored
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"traceEvents": events}))
    png = tmp_path / "m.png"
    code, _, err = run(capsys, "show", str(plans / "b.json"), "--timeline", str(png), "--trace", str(trace))
    assert code == 0, err
    assert png.read_bytes().startswith(PNG_MAGIC) and png.stat().st_size > 10_000


def test_export_plan_applied_to_model(plans: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, "export", str(plans / "a.json"), "--model", f"{MODELS}:mlp", "--out", str(tmp_path))
    assert code == 0, err
    sources = sorted(p.name for p in tmp_path.glob("stage*.py"))
    assert sources == ["stage0.py", "stage1.py", "stage2.py", "stage3.py"]
    assert "def forward" in (tmp_path / "stage3.py").read_text()


def test_export_plan_for_another_model_fails_cleanly(plans: Path, capsys: pytest.CaptureFixture[str],
                                                     tmp_path: Path) -> None:
    code, _, err = run(capsys, "export", str(plans / "a.json"), "--model", f"{MODELS}:skip", "--out", str(tmp_path))
    assert code == 2 and err.startswith("error: $.fingerprint") and len(err.splitlines()) == 1


@pytest.mark.parametrize("args,needle", [
    (["plan", f"{MODELS}:nothere"], "has no attribute 'nothere'"),
    (["plan", f"{MODELS}:not_a_pair"], "must return (model, example_inputs)"),
    (["plan", MODELS], "has no ':factory' part"),
    (["plan", "no_such_package.mod:f"], "cannot import module"),
    (["plan", f"{MODELS}:mlp", "--memory-limit", "lots"], "cannot read 'lots' as a size"),
    (["plan", f"{MODELS}:mlp", "--device", "tpu"], "unknown device 'tpu'"),
    (["diff", "only_one.json"], "diff needs two plan files"),
    (["show", "missing.json"], "plan file 'missing.json' does not exist"),
    (["export", "plan.json", "--out", "x"], "needs --model MODEL"),
])
def test_user_errors(args: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, *args)
    assert code == 2 and err.startswith("error: ") and needle in err and len(err.splitlines()) == 1


def test_invalid_json_plan(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": 1')
    code, _, err = run(capsys, "show", str(bad))
    assert code == 2 and "$: not valid JSON" in err


def test_usage_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["show"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1


@pytest.mark.parametrize("command", ["plan", "show", "diff", "run", "export"])
def test_help_describes_every_option(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0 and "usage: partitioner" in capsys.readouterr().out
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]  # type: ignore[attr-defined]
    for action in sub._actions:
        assert action.help, f"{command}: {action.option_strings or action.dest} has no help"
        if action.default not in (None, False, [], "==SUPPRESS==") and action.option_strings:
            assert "default" in action.help, f"{command}: {action.option_strings} does not state its default"
