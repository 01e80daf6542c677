"""Writing stages out: readable Python source, and ONNX (one model per stage).

ONNX files are all-or-nothing: every stage is exported with a dynamic batch dimension,
named after the plan (stage inputs and outputs carry the plan's value names, so stage
``i``'s outputs feed the stages after it by name), loaded back in onnxruntime and run at
a second batch size against the torch stage, and only then moved into place. A plan
whose cuts carry Python values (ints from a cut inside attention) is refused before
anything is traced: ONNX stages can only exchange tensors.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch

from partitioner.cost_models.errors import PartitionError
from partitioner.plan import write_atomic

if TYPE_CHECKING:
    from partitioner.pipe import Pipe

__all__ = ["ExportError", "stage_inputs", "write_sources", "export_onnx", "onnx_blockers"]


class ExportError(PartitionError):
    """A stage could not be written out in the requested format."""


def stage_inputs(pipe: Pipe, *args: Any, **kwargs: Any) -> list[list[Any]]:
    """The real inputs each stage sees when the pipe runs on ``args``/``kwargs``."""
    return _run_flat(pipe, pipe.flatten_inputs(args, kwargs))[0]


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


def onnx_blockers(plan: Any) -> list[str]:
    """Why ``plan``'s stages cannot be ONNX models (empty when they can): non-tensor values
    at the model's inputs or at a cut. Needs nothing but the plan."""
    reasons = []
    for d in plan.inputs:
        if d["kind"] != "tensor":
            reasons.append(f"model input {d['name']!r} is a Python {d['kind']}")
    for b in plan.boundaries:
        bad = [f"{v.name} ({v.kind})" for v in b.values if v.kind != "tensor"]
        if bad:
            reasons.append(f"cut {b.index} ({b.label}) carries Python values {', '.join(bad)}")
    return reasons


def export_onnx(pipe: Pipe, directory: str | os.PathLike[str], *args: Any, opset: int = 18, **kwargs: Any) -> list[str]:
    """``stage{i}.onnx`` per stage, traced on ``args`` (default: the plan's input shapes at
    the micro-batch size, at least 2), batch dimension dynamic, each file checked in
    onnxruntime at another batch size before any is written. Returns the paths written."""
    if any(isinstance(p, torch.Tensor) and p.device.type == "meta" for p in pipe.parameters()):
        raise ExportError("cannot export stages of a model on the meta device: load real weights first")
    blockers = onnx_blockers(pipe.plan)
    if blockers:
        raise ExportError("ONNX stages exchange tensors only: " + "; ".join(blockers)
                          + "; choose cuts where only tensors cross (cut_at=..., e.g. between blocks)")
    _check_chain(pipe.plan)
    try:
        import onnx  # noqa: PLC0415 - optional extra (onnx)
        import onnxruntime  # noqa: PLC0415 - optional extra (onnx)
    except ModuleNotFoundError as e:
        raise ExportError(f"ONNX export needs the onnx, onnxruntime and onnxscript packages ({e}): "
                          "pip install 'pipeline-partitioner[onnx]'") from None
    micro = max(2, pipe.plan.prediction.microbatch_size)
    trace_flat = pipe.flatten_inputs(args, kwargs) if (args or kwargs) else _example(pipe.plan, micro, seed=0)
    trace_batch = _batch_of(pipe.plan, trace_flat, micro)
    check_flat = _example(pipe.plan, trace_batch + 1, seed=1)
    out_dir = Path(directory)
    out_dir.mkdir(parents=True, exist_ok=True)
    modes = [(m, m.training) for m in pipe.stages]
    staging = Path(tempfile.mkdtemp(prefix=".onnx-", dir=out_dir))
    try:
        for stage in pipe.stages:
            stage.eval()  # an inference graph: dropout off, batch norm on running stats
        (trace_in, _), (check_in, check_out) = _run_flat(pipe, trace_flat), _run_flat(pipe, check_flat)
        names = []
        for i, stage in enumerate(pipe.stages):
            st = pipe.plan.stages[i]
            tmp_path = staging / f"stage{i}.onnx"
            _export_one(i, stage, trace_in[i], check_in[i], tmp_path, opset)
            _name_values(onnx, i, tmp_path, list(st.inputs), list(st.outputs))
            _verify(onnxruntime, i, tmp_path, list(st.inputs), check_in[i], check_out[i], trace_batch + 1)
            names.append(tmp_path.name)
        paths = []
        for name in names:  # everything checked: now, and only now, the files appear
            os.replace(staging / name, out_dir / name)
            paths.append(str(out_dir / name))
        return paths
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        for m, training in modes:
            m.train(training)


def _check_chain(plan: Any) -> None:
    """Every stage input is a model input or an earlier stage's output: files chain by name."""
    known = {d["name"] for d in plan.inputs}
    for st in plan.stages:
        missing = [n for n in st.inputs if n not in known]
        if missing:
            raise ExportError(f"stage {st.index} takes {', '.join(missing)}, which no earlier stage outputs")
        known.update(st.outputs)


def _example(plan: Any, batch: int, seed: int) -> list[Any]:
    """Model inputs at ``batch``: random floats (zeros would hide wrong weights), zero ids."""
    gen = torch.Generator().manual_seed(seed)
    flat = []
    for spec in plan.input_specs():
        v = spec.zeros(batch)
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            v = torch.randn(v.shape, generator=gen).to(v.dtype)
        flat.append(v)
    return flat


def _batch_of(plan: Any, flat: list[Any], default: int) -> int:
    for spec, v in zip(plan.input_specs(), flat):
        for dim, sym in spec.dims:
            if sym == "B" and isinstance(v, torch.Tensor):
                return int(v.shape[dim])
    return default


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporter's warnings, progress prints and torch log lines stay out of the user's terminal."""
    loggers = [logging.getLogger(n) for n in ("torch", "onnxscript")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _export_one(i: int, stage: Any, trace_in: list[Any], check_in: list[Any], path: Path, opset: int) -> None:
    # Dimensions that differ between two batch sizes are the dynamic ones (batch, or batch × seq).
    dynamic = tuple({d: torch.export.Dim.AUTO for d in range(t.dim()) if t.shape[d] != c.shape[d]}
                    for t, c in zip(trace_in, check_in))
    try:
        with _quiet():
            # The exporter's own value names; the plan's are put on afterwards (_name_values): asked
            # for up front, they collide with names torch.export gives the stage's inner nodes.
            torch.onnx.export(stage, tuple(trace_in), str(path), opset_version=opset, dynamic_shapes=dynamic,
                              dynamo=True, verbose=False, external_data=False)
    except Exception as e:
        first = " ".join(str(e).split("Next steps")[0].split())
        raise ExportError(f"ONNX export of stage {i} failed: {type(e).__name__}: {_strip_ansi(first)}") from e


def _strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _name_values(onnx: Any, i: int, path: Path, in_names: list[str], out_names: list[str]) -> None:
    """Give the graph's inputs and outputs the plan's value names, so stage files chain by name.

    Inner values that happen to carry one of those names are renamed out of the way; an
    output that is an input passed through unchanged keeps the input's name (no Identity
    that would define the name twice)."""
    model = onnx.load(str(path))
    g = model.graph
    if len(g.input) != len(in_names) or len(g.output) != len(out_names):
        raise ExportError(f"stage {i}: ONNX has {len(g.input)} inputs / {len(g.output)} outputs, the plan "
                          f"{len(in_names)} / {len(out_names)}")
    wanted = set(in_names) | set(out_names)
    rename: dict[str, str] = {}
    for vi, name in zip(g.input, in_names):
        rename[vi.name] = name
    extra_outputs: list[tuple[int, str, str]] = []  # (output index, source value, new name)
    for k, (vi, name) in enumerate(zip(g.output, out_names)):
        if vi.name in rename and rename[vi.name] != name:
            extra_outputs.append((k, vi.name, name))  # one value, two names: needs an Identity
        else:
            rename[vi.name] = name
    every = {n for node in g.node for n in (*node.input, *node.output)} | {t.name for t in g.initializer}
    taken = set(wanted) | every
    for n in sorted(every):
        if n in wanted and n not in rename:  # an inner value wearing a plan name: move it aside
            k = 0
            while f"{n}__{k}" in taken:
                k += 1
            rename[n] = f"{n}__{k}"
            taken.add(rename[n])

    def r(n: str) -> str:
        return rename.get(n, n) if n else n

    for node in g.node:
        node.input[:] = [r(n) for n in node.input]
        node.output[:] = [r(n) for n in node.output]
    for t in g.initializer:
        t.name = r(t.name)
    for vi in (*g.input, *g.value_info):
        vi.name = r(vi.name)
    for k, vi in enumerate(g.output):
        src = next((e for e in extra_outputs if e[0] == k), None)
        if src is None:
            vi.name = r(vi.name)
        else:
            g.node.append(onnx.helper.make_node("Identity", [r(src[1])], [src[2]]))
            vi.name = src[2]
    keep = [n for n in g.node if not (n.op_type == "Identity" and list(n.input) == list(n.output))]
    del g.node[:]
    g.node.extend(keep)
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        raise ExportError(f"stage {i}: the ONNX file is not valid after naming its values: "
                          f"{' '.join(str(e).split())[:300]}") from e
    onnx.save(model, str(path))


def _verify(ort: Any, i: int, path: Path, in_names: list[str], inputs: list[Any], expected: Any, batch: int) -> None:
    """Load the file in onnxruntime and run it at a batch size it was not traced at."""
    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got_names = [x.name for x in sess.get_inputs()]
        if got_names != in_names:
            raise ExportError(f"stage {i}: ONNX inputs are {got_names}, the plan's are {in_names}")
        got = sess.run(None, {n: v.numpy() for n, v in zip(in_names, inputs)})
    except ExportError:
        raise
    except Exception as e:
        raise ExportError(f"stage {i}: onnxruntime cannot run the exported file at batch {batch}: "
                          f"{' '.join(str(e).split())[:300]}") from e
    want = [t for t in (expected if isinstance(expected, (tuple, list)) else (expected,))]
    if len(got) != len(want):
        raise ExportError(f"stage {i}: ONNX returns {len(got)} outputs, the stage {len(want)}")
    for k, (g, w) in enumerate(zip(got, want)):
        w = w.detach().numpy() if isinstance(w, torch.Tensor) else w
        if getattr(g, "shape", None) != getattr(w, "shape", None) or not _close(g, w):
            raise ExportError(f"stage {i}: ONNX output {k} differs from the torch stage at batch {batch}")


def _close(a: Any, b: Any) -> bool:
    try:
        return bool(np.allclose(a, b, rtol=1e-4, atol=1e-5))
    except TypeError:
        return bool(np.array_equal(a, b))


def _run_flat(pipe: Pipe, flat: list[Any]) -> tuple[list[list[Any]], list[Any]]:
    """Each stage's inputs and outputs when the stages run one after another on ``flat``."""
    seen, outs = [], []
    values: Any = flat
    with torch.no_grad():
        for stage in pipe.stages:
            seen.append(list(values))
            values = stage(*values)
            outs.append(values)
    return seen, outs
