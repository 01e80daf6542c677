"""Writing stages out: readable Python source, and ONNX (one model per stage)."""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cost_models.errors import PartitionError
from partitioner.plan import write_atomic

if TYPE_CHECKING:
    from partitioner.pipe import Pipe

__all__ = ["ExportError", "stage_inputs", "write_sources", "export_onnx"]


class ExportError(PartitionError):
    """A stage could not be written out in the requested format."""


def stage_inputs(pipe: Pipe, *args: Any, **kwargs: Any) -> list[list[Any]]:
    """The real inputs each stage sees when the pipe runs on ``args``/``kwargs``."""
    return _run_flat(pipe, pipe.flatten_inputs(args, kwargs))


def write_sources(pipe: Pipe, directory: str | os.PathLike[str]) -> list[str]:
    """``stage{i}.py`` per stage: the generated ``forward``, with the plan's I/O as a header."""
    paths = []
    for i, st in enumerate(pipe.plan.stages):
        header = (f"# Stage {i} of {pipe.plan.n_stages} ({pipe.plan.model}), rank {st.rank}\n"
                  f"# inputs:  {', '.join(st.inputs)}\n# outputs: {', '.join(st.outputs)}\n"
                  f"# parameters: {len(st.parameters)}, nodes: {len(st.nodes)}\n")
        path = Path(directory) / f"stage{i}.py"
        write_atomic(path, header + pipe.stage_source(i).lstrip("\n"))
        paths.append(str(path))
    return paths


def export_onnx(pipe: Pipe, directory: str | os.PathLike[str], *args: Any, opset: int = 18, **kwargs: Any) -> list[str]:
    """``stage{i}.onnx`` per stage, traced on ``args`` (default: zeros of the plan's input
    shapes at the micro-batch size). Returns the paths written."""
    if any(isinstance(p, torch.Tensor) and p.device.type == "meta" for p in pipe.parameters()):
        raise ExportError("cannot export stages of a model on the meta device: load real weights first")
    if args or kwargs:
        per_stage = stage_inputs(pipe, *args, **kwargs)
    else:
        micro = pipe.plan.prediction.microbatch_size
        flat = [spec.zeros(micro) for spec in pipe.plan.input_specs()]
        per_stage = _run_flat(pipe, flat)
    out_dir = Path(directory)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (stage, inputs) in enumerate(zip(pipe.stages, per_stage)):
        bad = [f"{name} ({type(v).__name__})" for name, v in zip(pipe.plan.stages[i].inputs, inputs)
               if not isinstance(v, torch.Tensor)]
        if bad:
            raise ExportError(f"stage {i} takes non-tensor inputs {', '.join(bad)}, which ONNX cannot "
                              "express; choose cuts where only tensors cross (cut_at=...)")
        path = out_dir / f"stage{i}.onnx"
        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
            tmp_path = Path(tmp) / path.name
            try:
                with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                    warnings.simplefilter("ignore")
                    torch.onnx.export(stage, tuple(inputs), str(tmp_path), opset_version=opset,
                                      input_names=list(pipe.plan.stages[i].inputs), dynamo=True, verbose=False,
                                      external_data=False)
            except Exception as e:
                raise ExportError(f"ONNX export of stage {i} failed: {type(e).__name__}: {str(e).splitlines()[0]}") from e
            os.replace(tmp_path, path)
        paths.append(str(path))
    return paths


def _run_flat(pipe: Pipe, flat: list[Any]) -> list[list[Any]]:
    seen = []
    values: Any = flat
    with torch.no_grad():
        for stage in pipe.stages:
            seen.append(list(values))
            values = stage(*values)
    return seen
