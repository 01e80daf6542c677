"""The command line as a new user meets it (issue 12): every case runs the real CLI in a fresh
process, the way the README and a user's shell do."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from tests.tools.helpers import MODELS, ROOT, cli

SVG = "{http://www.w3.org/2000/svg}"


def one_error_line(out: subprocess.CompletedProcess[str], needle: str) -> None:
    assert out.returncode == 2, (out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert needle in lines[0], lines[0]
    assert "\x1b[" not in out.stderr  # no raw colour codes in the message


# -- 1, 2: ONNX export ------------------------------------------------------------------------------

def test_onnx_export_of_a_cut_inside_attention_is_refused_up_front(tmp_path: Path) -> None:
    plan = tmp_path / "gpt4.json"
    assert cli("plan", "partitioner.examples:quickstart", "--gpus", "4", "--device", "cpu", "-o", str(plan),
               "-q").returncode == 0
    out = cli("export", str(plan), "--model", "partitioner.examples:quickstart", "--out", str(tmp_path / "onnx"),
              "--onnx")
    one_error_line(out, "carries Python values")
    assert "--cut-at" in out.stderr
    assert not (tmp_path / "onnx").exists()  # nothing left behind, not even the folder


def test_readme_onnx_export_works_and_chains(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    plan = tmp_path / "gpt4b.json"
    out = cli("plan", "partitioner.examples:quickstart", "--gpus", "4", "--device", "cpu",
              "--cut-at", "transformer.h.*", "-o", str(plan), "-q")
    assert out.returncode == 0, out.stderr
    out = cli("export", str(plan), "--model", "partitioner.examples:quickstart", "--out", str(tmp_path / "s"), "--onnx",
              timeout=600)
    assert out.returncode == 0 and out.stderr == "", out.stderr  # no exporter warnings either
    assert out.stdout.startswith("wrote ") and "stage3.onnx" in out.stdout
    names = sorted(p.name for p in (tmp_path / "s").iterdir())  # no temporaries left
    assert names == sorted(f"stage{i}.{ext}" for i in range(4) for ext in ("onnx", "py"))
    sessions = [ort.InferenceSession(str(tmp_path / "s" / f"stage{i}.onnx")) for i in range(4)]
    # A batch of 3: not the micro-batch the stages were traced at.
    values = {sessions[0].get_inputs()[0].name: np.zeros((3, 64), dtype=np.int64)}
    for sess in sessions:
        got = sess.run(None, {i.name: values[i.name] for i in sess.get_inputs()})  # chained by name
        values.update({o.name: v for o, v in zip(sess.get_outputs(), got)})
    assert got[0].shape[0] == 3


def test_onnx_export_of_residual_stages_loads_runs_at_any_batch_and_chains_by_name(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    import torch

    sys.path.insert(0, str(ROOT))
    from tests.tools.tiny_models import residual

    plan = tmp_path / "res.json"
    assert cli("plan", f"{MODELS}:residual", "--gpus", "4", "--device", "cpu", "-o", str(plan), "-q").returncode == 0
    out = cli("export", str(plan), "--model", f"{MODELS}:residual", "--out", str(tmp_path / "r"), "--onnx")
    assert out.returncode == 0 and out.stderr == "", out.stderr
    model, _ = residual()
    x = torch.randn(5, 16)
    values = {"x": x.numpy()}
    for i in range(4):
        sess = ort.InferenceSession(str(tmp_path / "r" / f"stage{i}.onnx"))  # loads: no duplicate names
        got = sess.run(None, {inp.name: values[inp.name] for inp in sess.get_inputs()})
        values.update({o.name: v for o, v in zip(sess.get_outputs(), got)})
    with torch.no_grad():
        np.testing.assert_allclose(got[0], model.eval()(x).numpy(), rtol=1e-4, atol=1e-5)


# -- 3: a model file that imports a module beside it ------------------------------------------------------

def test_model_file_imports_its_neighbour(tmp_path: Path) -> None:
    (tmp_path / "layers.py").write_text("import torch\nclass Block(torch.nn.Linear):\n    pass\n")
    (tmp_path / "model.py").write_text(
        "import torch\nfrom layers import Block\n\ndef make():\n"
        "    return torch.nn.Sequential(Block(8, 8), torch.nn.ReLU(), Block(8, 2)), (torch.randn(4, 8),)\n")
    out = cli("plan", f"{tmp_path}/model.py:make", "--gpus", "2", "-o", str(tmp_path / "p.json"), "-q")
    assert out.returncode == 0, out.stderr
    assert str(tmp_path) not in os.environ.get("PYTHONPATH", "")


# -- 4: reaching the command ------------------------------------------------------------------------------

def test_readme_says_how_to_reach_the_command() -> None:
    setup = (ROOT / "README.md").read_text().split("## Set-up", 1)[1].split("\n## ", 1)[0]
    assert "source .venv/bin/activate" in setup and ".venv/bin/partitioner" in setup
    exe = ROOT / ".venv" / "bin" / "partitioner"
    if exe.exists():  # what the set-up installs
        done = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "usage: partitioner" in done.stdout


# -- 5: pictures of deep models keep the box promise ----------------------------------------------------

@pytest.mark.parametrize("depth", [[], ["--depth", "2"]])
def test_deep_model_picture_folds_repeated_blocks(tmp_path: Path, depth: list[str]) -> None:
    svg = tmp_path / "deep.svg"
    out = cli("plan", f"{MODELS}:residual_200", "--gpus", "4", "-o", str(tmp_path / "p.json"), "--svg", str(svg),
              "-q", *depth)
    assert out.returncode == 0, out.stderr
    root = ET.parse(svg).getroot()
    boxes = [g for g in root.iter(f"{SVG}g") if g.find(f"{SVG}rect") is not None]
    assert 3 <= len(boxes) <= 60  # was 406
    assert float(root.get("height", "0")) < 2000
    texts = [t.text or "" for t in root.iter(f"{SVG}text")]
    assert any(re.search(r"layers\.\d+–\d+ ×\d+", t) for t in texts), texts


# -- 6: the timeline draws communication and is never blank -----------------------------------------------

def test_timeline_of_a_tiny_model_shows_blocks_and_communication(plans: Path, tmp_path: Path) -> None:
    import matplotlib.image as mpimg

    png = tmp_path / "t.png"
    out = cli("show", str(plans / "a.json"), "--timeline", str(png))
    assert out.returncode == 0, out.stderr
    pixels = (mpimg.imread(str(png))[..., :3] * 255).round().astype(int)

    def count(hex_colour: str) -> int:
        rgb = [int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)]
        return int((np.abs(pixels - rgb).sum(axis=2) <= 6).sum())

    legend_only = 300  # the legend swatch alone
    assert count("#4c78a8") > legend_only  # forward blocks, though each lasts nanoseconds
    assert count("#7f3c8d") > legend_only  # transfers on the link
    svg = tmp_path / "t.svg"
    assert cli("show", str(plans / "a.json"), "--timeline", str(svg)).returncode == 0
    text = svg.read_text()
    assert "waiting for data" in text and "idle (bubble)" in text and "gaps are the bubble" not in text


# -- 7: one error line, library logs silenced, --debug anywhere --------------------------------------------

@pytest.mark.parametrize("factory,needle", [
    ("wrong_inputs", "shape propagation failed"),
    ("branchy", "cannot capture _Branchy"),
])
def test_library_failures_are_one_line(factory: str, needle: str, tmp_path: Path) -> None:
    out = cli("plan", f"{MODELS}:{factory}", "--gpus", "2", "-o", str(tmp_path / "p.json"))
    one_error_line(out, needle)
    assert out.stdout == ""  # no graph dumps
    assert not (tmp_path / "p.json").exists()


def test_unwritable_trace_is_refused_before_training(tmp_path: Path) -> None:
    start = time.monotonic()
    out = cli("run", f"{MODELS}:mlp", "--gpus", "2", "--steps", "2", "--trace", "/proc/run.json")
    one_error_line(out, "--trace /proc/run.json: cannot write")
    assert "step" not in out.stdout and time.monotonic() - start < 30


def test_debug_works_before_the_subcommand() -> None:
    out = cli("--debug", "show", "missing.json")
    assert out.returncode != 0 and "Traceback" in out.stderr


# -- 8: options a command would ignore are refused --------------------------------------------------------

@pytest.mark.parametrize("args,needle", [
    (["plan", f"{MODELS}:mlp", "--schedule", "naive", "--microbatches", "16"], "drop --microbatches 16"),
    (["export", "{a}", "--model", f"{MODELS}:mlp", "--out", "{tmp}/x", "--gpus", "2"], "--gpus is not used"),
    (["export", "{a}", "--model", f"{MODELS}:mlp", "--out", "{tmp}/x", "--device", "cpu"], "--device is not used"),
    (["diff", "{a}", "{b}", "--gpus", "8"], "--gpus is not used"),
    (["run", f"{MODELS}:mlp", "--plan", "{b}", "--microbatches", "2"], "--microbatches is not used"),
])
def test_ignored_options_are_refused(args: list[str], needle: str, plans: Path, tmp_path: Path) -> None:
    filled = [a.format(a=plans / "a.json", b=plans / "b.json", tmp=tmp_path) for a in args]
    one_error_line(cli(*filled), needle)
    assert not (tmp_path / "x").exists()


# -- 9: outputs all or nothing ---------------------------------------------------------------------------------

def test_two_outputs_on_one_path_are_refused(tmp_path: Path) -> None:
    same = tmp_path / "same.json"
    out = cli("plan", f"{MODELS}:mlp", "-o", str(same), "--svg", str(same))
    one_error_line(out, "name the same file")
    assert not same.exists()


def test_a_failing_output_leaves_no_other_output(tmp_path: Path) -> None:
    ok = tmp_path / "ok.json"
    out = cli("plan", f"{MODELS}:mlp", "-o", str(ok), "--svg", "/proc/no/seg.svg")
    one_error_line(out, "--svg /proc/no/seg.svg")
    assert not ok.exists()


def test_timeline_may_not_overwrite_its_plan(plans: Path, tmp_path: Path) -> None:
    copy = tmp_path / "p.json"
    copy.write_text((plans / "a.json").read_text())
    one_error_line(cli("show", str(copy), "--timeline", str(copy)), f"--timeline {copy}")
    assert copy.read_text() == (plans / "a.json").read_text()
    trace = tmp_path / "t.svg"
    trace.write_text("{}")
    one_error_line(cli("show", str(copy), "--timeline", str(trace), "--trace", str(trace)),
                   "would overwrite the input file")
    assert trace.read_text() == "{}"


# -- 10: absurd micro-batch counts do not hang the timeline ---------------------------------------------------

def test_timeline_of_a_huge_microbatch_count_is_refused_quickly(plans: Path, tmp_path: Path) -> None:
    data = json.loads((plans / "b.json").read_text())
    data["prediction"]["n_microbatches"] = data["options"]["n_microbatches"] = 65536
    data["symbols"]["B"] = 65536 * data["prediction"]["microbatch_size"]  # a plan that loads: only its size is extreme
    big = tmp_path / "big.json"
    big.write_text(json.dumps(data))
    start = time.monotonic()
    out = cli("show", str(big), "--timeline", str(tmp_path / "t.png"), timeout=60)
    one_error_line(out, "draws at most")
    assert time.monotonic() - start < 30 and not (tmp_path / "t.png").exists()


# -- 11: plan-only commands stay light ------------------------------------------------------------------------

def test_show_and_diff_do_not_import_torch(plans: Path) -> None:
    code = ("import sys; from partitioner.tools.cli import main; rc = main(['show', sys.argv[1]]); "
            "rc2 = main(['diff', sys.argv[1], sys.argv[2]]); "
            "assert 'torch' not in sys.modules, 'torch was imported'; print(rc, rc2)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # what keeps them light is not importing torch (asserted inside); a wall-clock bound here
    # would fail on a loaded machine, not on a heavy import
    done = subprocess.run([sys.executable, "-c", code, str(plans / "a.json"), str(plans / "b.json")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


# -- 12: errors name the flags; the flags users need exist -----------------------------------------------------

def test_errors_name_flags_not_python_arguments(tmp_path: Path) -> None:
    out = cli("plan", f"{MODELS}:mlp", "--virtual-stages", "2", "-o", str(tmp_path / "p.json"))
    one_error_line(out, "--virtual-stages 2 needs --schedule interleaved-1f1b")
    assert "virtual_stages" not in out.stderr
    out = cli("plan", f"{MODELS}:leafy", "--gpus", "2", "-o", str(tmp_path / "p.json"))
    one_error_line(out, "pass --leaf-module router so that it runs eagerly")  # the submodule, as a flag
    assert "leaf_modules" not in out.stderr


def test_leaf_module_and_optimizer_flags(tmp_path: Path) -> None:
    plan = tmp_path / "p.json"
    out = cli("plan", f"{MODELS}:leafy", "--gpus", "2", "--leaf-module", "router", "--optimizer", "sgd",
              "-o", str(plan), "-q")
    assert out.returncode == 0, out.stderr
    options = json.loads(plan.read_text())["options"]
    assert options["optimizer"] == "sgd" and "router" in json.dumps(options.get("leaf_modules", ["router"]))


def test_choices_match_the_library() -> None:
    from partitioner.memory import OPTIMIZER_STATES, PRECISIONS, RECOMPUTE
    from partitioner.tools.cli import build_parser

    plan = next(a for a in build_parser()._actions if a.dest == "command").choices["plan"]  # type: ignore[attr-defined]
    choices = {a.dest: set(a.choices) for a in plan._actions if a.choices}
    assert choices["optimizer"] == set(OPTIMIZER_STATES) and choices["precision"] == set(PRECISIONS)
    assert choices["recompute"] == set(RECOMPUTE)


def test_precision_and_recompute_reach_the_plan(tmp_path: Path) -> None:
    plans = {}
    for precision in ("fp32", "bf16"):
        path = tmp_path / f"{precision}.json"
        out = cli("plan", f"{MODELS}:mlp", "--gpus", "2", "--precision", precision, "--recompute", "none",
                  "-o", str(path), "-q")
        assert out.returncode == 0, out.stderr
        plans[precision] = json.loads(path.read_text())
    assert plans["fp32"]["options"]["precision"] == "fp32" and plans["bf16"]["options"]["precision"] == "bf16"
    assert plans["bf16"]["options"]["recompute"] == "none"
    static = [sum(st["cost"]["static_bytes"] for st in p["stages"]) for p in (plans["fp32"], plans["bf16"])]
    assert static[1] < static[0]  # bf16 weights, grads and state: fewer bytes


# -- 13: the solver line says what it means ----------------------------------------------------------------

def test_solver_line_separates_lower_bound_and_optimality(plans: Path) -> None:
    text = cli("show", str(plans / "a.json")).stdout
    assert "solver bound" not in text
    assert re.search(r"bottleneck .* per micro-batch \((proved optimal|not proved optimal)\); lower bound ", text)


# -- 14: labels, run --plan, HTML layout, 80 columns ----------------------------------------------------------

def test_cut_in_a_reused_module_names_the_call(tmp_path: Path) -> None:
    out = cli("plan", f"{MODELS}:reuse", "--gpus", "2", "--pin", "fc3", "-o", str(tmp_path / "p.json"))
    assert out.returncode == 0, out.stderr
    assert "act | fc3 [act_1 | fc3]" in out.stdout


def test_run_a_saved_plan(tmp_path: Path) -> None:
    plan = tmp_path / "skip2.json"
    assert cli("plan", f"{MODELS}:skip", "--gpus", "2", "-o", str(plan), "-q").returncode == 0
    out = cli("run", f"{MODELS}:skip", "--plan", str(plan), "--steps", "2")
    assert out.returncode == 0, out.stderr
    assert [ln.split(":")[0] for ln in out.stdout.splitlines()] == ["step 1", "step 2"]


def test_html_diff_columns_cannot_overlap(plans: Path, tmp_path: Path) -> None:
    page = tmp_path / "d.html"
    assert cli("diff", str(plans / "a.json"), str(plans / "b.json"), "--html", str(page)).returncode == 1
    css = page.read_text().split("<style>", 1)[1].split("</style>", 1)[0]
    side = re.search(r"\.side>div\{([^}]*)\}", css)
    assert side and "overflow-x:auto" in side[1] and "flex-wrap:wrap" in css


def test_80_columns_keep_cut_labels_whole(plans: Path) -> None:
    env_cols = {"COLUMNS": "80"}
    done = subprocess.run([sys.executable, "-m", "partitioner.tools.cli", "show", str(plans / "a.json")], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1", **env_cols},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert all(len(line) <= 80 for line in done.stdout.splitlines())
    assert "…" not in done.stdout
    labels = [c for c in json.loads((plans / "a.json").read_text())["boundaries"]]
    for b in labels:
        assert b["label"] in done.stdout


# -- 15: the segmentation picture says why ---------------------------------------------------------------------

def _segments(d: str) -> list[tuple[float, float, float, float]]:
    """Straight pieces of an SVG path (M/L/C only; curves sampled)."""
    tokens = re.findall(r"[MLC]|-?[\d.]+", d)
    out, i, cur = [], 0, (0.0, 0.0)
    while i < len(tokens):
        op = tokens[i]
        if op == "M":
            cur = (float(tokens[i + 1]), float(tokens[i + 2]))
            i += 3
        elif op == "L":
            nxt = (float(tokens[i + 1]), float(tokens[i + 2]))
            out.append((*cur, *nxt))
            cur, i = nxt, i + 3
        else:  # C x1 y1 x2 y2 x y
            p = [cur] + [(float(tokens[i + k]), float(tokens[i + k + 1])) for k in (1, 3, 5)]
            prev = cur
            for t in np.linspace(0, 1, 21)[1:]:
                pt = tuple(sum(c * q[j] for c, q in zip(((1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t ** 2,
                                                        t ** 3), p)) for j in (0, 1))
                out.append((*prev, *pt))
                prev = pt
            cur, i = p[-1], i + 7
    return out


def test_segmentation_picture_explains_the_cuts(tmp_path: Path) -> None:
    svg = tmp_path / "r.svg"
    out = cli("plan", f"{MODELS}:residual", "--gpus", "4", "--device", "cpu", "-o", str(tmp_path / "p.json"),
              "--svg", str(svg), "-q")
    assert out.returncode == 0, out.stderr
    root = ET.parse(svg).getroot()
    texts = [t.text or "" for t in root.iter(f"{SVG}text")]
    assert sum("f+b+c" in t for t in texts) == 4  # each stage's time
    assert sum("weights" in t and "act" in t and "×" in t for t in texts) == 4  # and its memory
    assert any(t.startswith("cut 0: ") and "B" in t for t in texts)  # bytes of each cut
    assert not any(re.fullmatch(r"\d+ values", t) for t in texts)  # values listed, not counted
    assert any(t.startswith("x: ") for t in texts)
    boxes = [(float(r.get("x")), float(r.get("y")), float(r.get("width")), float(r.get("height")))
             for g in root.iter(f"{SVG}g") for r in g.iter(f"{SVG}rect")]
    src_dst_ok = 6  # an edge may touch the boxes it leaves and enters
    for path in root.iter(f"{SVG}path"):
        if path.get("stroke") != "#d62728":
            continue
        segs = _segments(path.get("d", ""))
        start, end = segs[0][:2], segs[-1][2:]
        for x0, y0, x1, y1 in segs:
            for t in np.linspace(0, 1, 11):
                x, y = x0 + (x1 - x0) * t, y0 + (y1 - y0) * t
                if min(abs(x - start[0]) + abs(y - start[1]), abs(x - end[0]) + abs(y - end[1])) < src_dst_ok:
                    continue
                inside = [b for b in boxes if b[0] + 2 < x < b[0] + b[2] - 2 and b[1] + 2 < y < b[1] + b[3] - 2]
                assert not inside, f"cut edge {path.get('d')} runs under a box at ({x:.0f}, {y:.0f})"


def test_pictures_are_byte_identical_on_re_runs(plans: Path, tmp_path: Path) -> None:
    for suffix in ("svg", "png"):
        a, b = tmp_path / f"a.{suffix}", tmp_path / f"b.{suffix}"
        for path in (a, b):
            assert cli("show", str(plans / "a.json"), "--timeline", str(path)).returncode == 0
        assert a.read_bytes() == b.read_bytes()


def test_run_prints_each_loss_as_the_step_ends(tmp_path: Path) -> None:
    out = cli("run", f"{MODELS}:fails_in_step_2", "--gpus", "2", "--microbatches", "2", "--steps", "3",
              "--leaf-module", "1")
    one_error_line(out, "the data loader ran dry")
    assert out.stdout.startswith("step 1: loss ")  # printed before step 2 failed, not lost with it
    assert "step 2" not in out.stdout


# -- issue 13 item 8: optional features name the extra that installs them -------------------------------------

def test_optional_features_name_their_extra(plans: Path, tmp_path: Path) -> None:
    import tomllib

    from partitioner.tools.commands import EXTRAS

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra, modules in EXTRAS.items():
        declared = {re.split(r"[<>=\[; ]", req)[0] for req in extras[extra]}
        assert declared == set(modules), (extra, declared)
    # a fresh process where the extras' modules cannot be imported: each command says what to install
    code = ("import sys; [sys.modules.__setitem__(m, None) for m in ('matplotlib', 'onnx', 'onnxruntime', "
            "'onnxscript')]; import importlib.util as u; real = u.find_spec; "
            "u.find_spec = lambda name, *a: None if name.split('.')[0] in ('matplotlib', 'onnx', 'onnxruntime', "
            "'onnxscript') else real(name, *a); from partitioner.tools.cli import main; sys.exit(main(sys.argv[1:]))")
    show = subprocess.run([sys.executable, "-c", code, "show", str(plans / "a.json"), "--timeline",
                           str(tmp_path / "t.svg")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    one_error_line(show, "pip install 'pipeline-partitioner[viz]'")
    assert not (tmp_path / "t.svg").exists()
    export = subprocess.run([sys.executable, "-c", code, "export", str(plans / "a.json"), "--model", f"{MODELS}:mlp",
                             "--out", str(tmp_path / "out"), "--onnx"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    one_error_line(export, "pip install 'pipeline-partitioner[onnx]'")
    assert not (tmp_path / "out").exists()


def test_recompute_is_shown_in_the_table_and_the_diff(tmp_path: Path) -> None:
    """A stage's recompute choice is in `plan`'s table and `diff` says when it changes."""
    paths = {}
    for mode in ("none", "full"):
        paths[mode] = tmp_path / f"{mode}.json"
        out = cli("plan", "partitioner.examples:quickstart", "--gpus", "2", "--device", "cpu", "--recompute", mode,
                  "-o", str(paths[mode]))
        assert out.returncode == 0, out.stderr
        assert ("┃ recompute" in out.stdout) == (mode == "full"), out.stdout  # the column only when used
    assert "│ full" in out.stdout
    d = cli("diff", str(paths["none"]), str(paths["full"]))
    assert d.returncode == 1, d.stderr
    assert "stage 0 recompute: none → full" in d.stdout and "stage 1 recompute: none → full" in d.stdout
