"""Stages written out: Python source a person can read, ONNX that onnxruntime runs the same."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from partitioner import PartitionError, partition
from partitioner.export import stage_inputs, write_sources
from tests.fixtures.models import FIXTURES


def test_onnx_stages_match_torch_in_onnxruntime(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    f = FIXTURES["gpt"]
    model = f.build().eval()
    args = f.inputs()
    pipe = partition(model, n_gpus=2, example_inputs=args, device="cpu", cut_at="transformer.h.*")
    paths = pipe.export_onnx(tmp_path, *args)
    assert [Path(p).name for p in paths] == ["stage0.onnx", "stage1.onnx"]
    assert not [p for p in tmp_path.iterdir() if p.suffix != ".onnx"]  # no temp files left
    for i, (path, inputs) in enumerate(zip(paths, stage_inputs(pipe, *args))):
        sess = ort.InferenceSession(path)
        feed = {n.name: v.numpy() for n, v in zip(sess.get_inputs(), inputs)}
        got = sess.run(None, feed)
        with torch.no_grad():
            expected = pipe.stages[i](*inputs)
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            np.testing.assert_allclose(g, e.numpy(), rtol=1e-4, atol=1e-5)


def test_stage_sources_are_readable_python(tmp_path: Path) -> None:
    f = FIXTURES["resnet"]
    model = f.build()
    pipe = partition(model, n_gpus=3, example_inputs=f.inputs(), device="cpu")
    paths = write_sources(pipe, tmp_path)
    assert len(paths) == 3
    for i, path in enumerate(paths):
        text = Path(path).read_text()
        compile(text, path, "exec")  # valid Python
        assert "def forward(self" in text
        for name in pipe.plan.stages[i].inputs:
            assert name in text


def test_meta_model_cannot_be_exported(tmp_path: Path) -> None:
    with torch.device("meta"):
        model = FIXTURES["mlp"].build()
        x = torch.randn(8, 32)
    pipe = partition(model, n_gpus=2, example_inputs=(x,), device="cpu")
    with pytest.raises(PartitionError, match="meta device"):
        pipe.export_onnx(tmp_path)
