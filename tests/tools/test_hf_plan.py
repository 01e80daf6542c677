"""``partitioner plan hf:CONFIG``: Hugging Face models built from local configs on the meta
device (nothing downloaded), planned for a cluster, with the step, tokens/s, MFU, memory per
stage and the ranking of the layouts tried."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.tools.helpers import cli

CONFIGS = {
    "llama": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 256,
              "tie_word_embeddings": False},
    "gpt2": {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 64, "n_layer": 4,
             "n_head": 4, "vocab_size": 256, "n_positions": 128},
    "qwen2": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 64,
              "intermediate_size": 160, "num_hidden_layers": 4, "num_attention_heads": 4,
              "num_key_value_heads": 1, "vocab_size": 300, "max_position_embeddings": 512,
              "tie_word_embeddings": True},
}


def _config(tmp_path: Path, name: str) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIGS[name]))
    return folder


def _report(out: str) -> dict[str, float]:
    m = re.search(r"predicted step ([0-9.]+) (ms|s|µs) \(pipeline .*\), ([0-9,]+) tokens/s on (\d+) x (\S+), "
                  r"MFU ([0-9.]+)%", out)
    assert m, out
    scale = {"s": 1.0, "ms": 1e-3, "µs": 1e-6}[m.group(2)]
    return {"step": float(m.group(1)) * scale, "tokens_s": float(m.group(3).replace(",", "")),
            "gpus": int(m.group(4)), "mfu": float(m.group(6))}


def test_llama_ranks_layouts_and_reports_the_step(tmp_path: Path) -> None:
    folder = _config(tmp_path, "llama")
    out = tmp_path / "plan.json"
    r = cli("plan", f"hf:{folder}", "--gpus", "2", "--seq", "128", "--batch", "8", "--device", "a100-80gb",
            "--link", "nvlink3", "-o", str(out))
    assert r.returncode == 0, r.stderr
    rep = _report(r.stdout)
    assert rep["gpus"] == 2 and 0 < rep["mfu"] < 100
    assert rep["tokens_s"] == pytest.approx(8 * 128 / rep["step"], rel=0.01)  # the printed step, 3 digits
    assert "automatic choice: picked" in r.stdout and "#2 " in r.stdout  # schedules x micro-batches ranked
    assert "data parallelism: picked D=" in r.stdout and "D=2 P=1" in r.stdout  # both meshes tried
    assert re.search(r"memory per stage: 0: [0-9.]+ \w+, 1: ", r.stdout)
    plan = json.loads(out.read_text())
    assert plan["device"]["name"] == "a100-80gb" and plan["device"]["efficiency"]["sms"] == 108
    assert plan["symbols"] == {"B": 8, "S": 128}


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_other_architectures_plan_with_a_fixed_layout(arch: str, tmp_path: Path) -> None:
    folder = _config(tmp_path, arch)
    r = cli("plan", f"hf:{folder / 'config.json'}", "--gpus", "2", "--seq", "64", "--batch", "4",
            "--schedule", "1f1b", "--microbatches", "2", "--dp", "1", "-o", str(tmp_path / "p.json"))
    assert r.returncode == 0, r.stderr
    rep = _report(r.stdout)
    assert rep["tokens_s"] == pytest.approx(4 * 64 / rep["step"], rel=0.01)
    assert "h100-sxm" in r.stdout and "2 stages" in r.stdout
    plan = json.loads((tmp_path / "p.json").read_text())
    assert plan["prediction"]["schedule"] == "1f1b" and plan["prediction"]["n_microbatches"] == 2
    assert len(plan["stages"]) == 2 and all(s["parameters"] for s in plan["stages"])


def test_hf_errors_are_one_line(tmp_path: Path) -> None:
    r = cli("plan", f"hf:{tmp_path / 'nowhere'}", "--gpus", "2")
    assert r.returncode == 2 and r.stderr.startswith("error: hf:") and "config.json" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    folder = _config(tmp_path, "gpt2")
    r = cli("plan", f"hf:{folder}", "--seq", "4096")
    assert r.returncode == 2 and "max_position_embeddings (128)" in r.stderr
    r = cli("plan", "tests/tools/tiny_models.py:mlp", "--seq", "16")
    assert r.returncode == 2 and "--seq and --batch size the inputs of hf: models" in r.stderr
