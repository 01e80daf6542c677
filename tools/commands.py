"""One function per subcommand: parsed arguments in, exit status out. Heavy imports stay inside.

Every command checks its output paths before any work starts and writes its files all
together at the end (``partitioner.tools.outputs``): a failing command leaves nothing new behind.
``show`` and ``diff`` of plan files never import torch.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Iterator

from partitioner.cost_models.devices import DeviceSpec
from partitioner.tools import diff, timeline
from partitioner.tools.cli import fill_partition_defaults, flag_names, given_partition_flags
from partitioner.tools.fmt import human_bytes, human_seconds, parse_bytes
from partitioner.tools.hf_model import _config, load_hf, model_flops
from partitioner.tools.loading import ToolError, is_plan_file, load_model, read_plan
from partitioner.tools.outputs import Outputs, check_output_dir, check_outputs
from partitioner.tools.pictures import segmentation, to_dot, to_svg
from partitioner.tools.summary import plan_summary

__all__ = ["cmd_plan", "cmd_show", "cmd_diff", "cmd_export", "cmd_run", "cmd_calibrate", "partition_from_args"]

#: The timeline draws every block; past this many micro-batches it is unreadable and slow.
MAX_TIMELINE_MICROBATCHES = 256

#: Optional features → the modules they import; pyproject.toml declares each as an extra.
EXTRAS = {"onnx": ("onnx", "onnxruntime", "onnxscript"), "viz": ("matplotlib",)}


def install_hint(extra: str) -> str:
    return f"pip install 'pipeline-partitioner[{extra}]'"


def _out() -> Any:
    # Not a terminal (a pipe, a test): plain text, 160 columns unless COLUMNS says otherwise.

    from rich.console import Console  # noqa: PLC0415 - CLI start-up (rich loads when a command prints a table)

    width = os.environ.get("COLUMNS", "")
    return Console(width=None if sys.stdout.isatty() else int(width) if width.isdigit() else 160)


@contextlib.contextmanager
def _phase(text: str, quiet: bool = False) -> Iterator[None]:
    """A spinner on stderr while a slow phase runs; silent when stderr is not a terminal."""
    from rich.console import Console  # noqa: PLC0415 - CLI start-up (rich loads when a command prints a table)

    err = Console(stderr=True)
    if quiet or not err.is_terminal:
        yield
        return
    with err.status(text):
        yield


@contextlib.contextmanager
def _library_output(args: argparse.Namespace) -> Iterator[None]:
    """What torch prints while tracing (graph dumps on a failed export) is not ours to show:
    kept out of the terminal unless --debug."""
    if getattr(args, "debug", False):
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def _model_file(spec: str) -> str | None:
    where = spec.rpartition(":")[0]
    return where if where.endswith(".py") else None


def _refuse_partition_flags(args: argparse.Namespace, why: str) -> None:
    given = given_partition_flags(args)
    if given:
        raise ToolError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} not used {why}; drop "
                        f"{'it' if len(given) == 1 else 'them'}")


def check_partition_args(args: argparse.Namespace) -> None:
    """Flag combinations partition() would silently override, refused before any work."""
    if args.schedule == "naive" and args.microbatches not in (None, 1):
        raise ToolError(f"--schedule naive runs the whole batch as one micro-batch; drop --microbatches "
                        f"{args.microbatches} or choose --schedule gpipe or 1f1b")
    fill_partition_defaults(args)
    args.memory_limit_bytes = parse_bytes(args.memory_limit) if args.memory_limit else None


def partition_from_args(args: argparse.Namespace, spec: str, keep_snapshots: bool = False,
                        loaded: tuple[Any, Any] | None = None) -> Any:
    """``partition()`` with the shared options; returns the Pipe. ``loaded``: the factory's result."""
    if not hasattr(args, "memory_limit_bytes"):
        check_partition_args(args)  # a typo costs no start-up time: checked before torch loads
    quiet = getattr(args, "quiet", False) or getattr(args, "json", False)
    with _phase(f"loading {spec}", quiet):
        model, inputs = loaded if loaded is not None else load_model(spec)
    from partitioner import PartitionError, partition  # noqa: PLC0415 - CLI start-up (torch loads only for commands that partition)

    extra = {k: getattr(args, k) for k in ("precision", "recompute", "objective", "gpus_per_node", "inter_link")
             if getattr(args, k, None) is not None}
    if getattr(args, "tp", None) is not None:
        extra["tensor_parallel"] = args.tp
    if getattr(args, "sequence_parallel", None):
        extra["sequence_parallel"] = True
    if getattr(args, "fsdp_shard", None) is not None:
        extra["fsdp_shard"] = args.fsdp_shard
    with _phase("partitioning: trace → shape-prop → costs → solve → split", quiet), _library_output(args):
        try:
            return partition(
                model, args.gpus, inputs, schedule=args.schedule, n_microbatches=args.microbatches,
                virtual_stages=args.virtual_stages, device=args.device, link=args.link, cut_at=args.cut_at,
                pinned_cuts=tuple(args.pin), memory_limit=args.memory_limit_bytes, optimizer=args.optimizer,
                leaf_modules=tuple(args.leaf_module), keep_snapshots=keep_snapshots, data_parallel=args.dp,
                zero=args.zero, **extra)
        except PartitionError as e:  # written for Python callers: name the flags instead
            raise ToolError(flag_names(" ".join(str(e).split()))) from e


def cmd_plan(args: argparse.Namespace) -> int:
    hf = args.model.startswith("hf:")
    if not hf and (getattr(args, "seq", None) is not None or getattr(args, "batch", None) is not None):
        raise ToolError("--seq and --batch size the inputs of hf: models; a model factory returns its own "
                        "example inputs: drop them")
    if hf:  # what the cluster could run: let the planner rank the layouts unless the user fixed them
        for key in ("schedule", "microbatches", "dp"):
            if getattr(args, key, None) is None:
                setattr(args, key, "auto")
    check_partition_args(args)
    check_outputs([("-o", args.output), ("--dot", args.dot), ("--svg", args.svg)], [_model_file(args.model) or ""])
    if args.depth is not None and args.depth < 1:
        raise ToolError(f"--depth must be >= 1, got {args.depth}")
    from partitioner.tools.table import print_plan  # noqa: PLC0415 - CLI start-up (rich loads when a command prints a table)

    loaded = None
    if hf:
        with _phase(f"building {args.model} on the meta device", args.quiet):
            loaded = _hf_inputs(args)
            loaded = load_hf(args.model, *loaded)
    pipe = partition_from_args(args, args.model, loaded=loaded)
    files = Outputs()
    files.add(args.output, pipe.plan.to_json())
    if args.dot or args.svg:
        seg = segmentation(pipe.graph, pipe.plan, depth=args.depth)
        if args.dot:
            files.add(args.dot, to_dot(seg))
        if args.svg:
            files.add(args.svg, to_svg(seg))
    written = files.commit()
    if not args.quiet:
        out = _out()
        print_plan(plan_summary(pipe.plan), out)
        # paths as they are: never wrapped mid-list, never read as rich markup ("[x]" in a name)
        out.print("wrote " + ", ".join(written), soft_wrap=True, markup=False, highlight=False)
    if getattr(args, "explain", False) or (hf and not args.quiet):
        _explain_choice(pipe.plan)
    if args.dp == "auto" and not args.quiet:
        _explain_notes(pipe.plan, "dp", "data parallelism")
    if getattr(args, "tp", None) == "auto" and not args.quiet:
        _explain_notes(pipe.plan, "tp", "tensor parallelism")
    if args.zero == "auto" and not args.quiet:
        _explain_notes(pipe.plan, "layout", "layout (T, D, P, ZeRO, schedule, micro-batches)")
    if hf and not args.quiet:
        _hf_report(pipe.plan, args)
    return 0


def _hf_inputs(args: argparse.Namespace) -> tuple[int, int]:
    """(seq, global batch) for an hf: model: --seq (default 2048, capped at the model's
    maximum when not given) and --batch (default 8 per GPU)."""
    seq = args.seq
    if seq is None:
        seq = 2048
        try:
            limit = getattr(_config(args.model[len("hf:"):]), "max_position_embeddings", None)
            if isinstance(limit, int) and 0 < limit < seq:
                seq = limit
        except ToolError:
            pass  # load_hf reports it
    batch = args.batch if args.batch is not None else 8 * args.gpus
    return seq, batch


def _hf_report(plan: Any, args: argparse.Namespace) -> None:
    """What a cluster budget needs: the step with the optimizer's, tokens/s, MFU, memory per stage."""
    dev = DeviceSpec.from_dict(plan.device)
    p = plan.prediction
    width = 2  # hf: models are built in bf16: parameter bytes / 2 = parameters
    opt = max(dev.optimizer_time(s.cost.param_bytes / width, plan.options.get("optimizer", "adam"),
                                 plan.options.get("precision", "bf16-mixed")) for s in plan.stages)
    step = p.step_time_s + opt
    tokens = plan.symbols.get("B", 1) * plan.symbols.get("S", 1)
    gpus = int(plan.options.get("n_gpus", args.gpus))
    mfu = model_flops(plan) / (step * gpus * dev.peak_flops_lowp)
    print(f"predicted step {human_seconds(step)} (pipeline {human_seconds(p.step_time_s)} + optimizer step "
          f"{human_seconds(opt)}), {tokens / step:,.0f} tokens/s on {gpus} x {dev.name}, MFU {100 * mfu:.1f}%")
    print("memory per stage: " + ", ".join(f"{s.index}: {human_bytes(s.cost.memory_bytes)}" for s in plan.stages)
          + f" (of {human_bytes(dev.memory_bytes)})")




def _explain_notes(plan: Any, kind: str, what: str) -> bool:
    """A layout ranking, ``plan.rankings[kind]``: the pick, every candidate fastest first,
    and those that did not fit. False when the plan has none."""
    rows = plan.rankings.get(kind, [])
    fitting = [r for r in rows if r["refused"] is None]
    if not fitting:
        return False
    why = (f"the fastest predicted step of {len(fitting)} that fit; #2 is "
           f"{fitting[1]['step_s'] / fitting[0]['step_s'] - 1:.1%} slower" if len(fitting) > 1
           else "the only candidate that fits")
    print(f"{what}: picked {fitting[0]['text']}: {why}")
    for i, r in enumerate(fitting):
        print(f"  #{i + 1} {r['text']}")
    for r in rows:
        if r["refused"] is not None:
            print(f"  not possible: {r['text']}")
    return True


def _explain_choice(plan: Any) -> None:
    """The automatic choice's ranking (``plan.rankings["auto"]``)."""
    if not _explain_notes(plan, "auto", "automatic choice"):
        p = plan.prediction
        print(f"schedule {p.schedule} with {p.n_microbatches} micro-batches was given, nothing was ranked; "
              "use --schedule auto and/or --microbatches auto")


def cmd_show(args: argparse.Namespace) -> int:
    if args.trace and not args.timeline:
        raise ToolError("--trace draws a measured trace and needs --timeline FILE")
    if args.timeline and Path(args.timeline).suffix.lower() not in (".svg", ".png", ".pdf"):
        raise ToolError(f"--timeline {args.timeline}: write .svg, .png or .pdf")
    check_outputs([("--timeline", args.timeline)], [args.plan, args.trace or ""])
    if args.timeline:
        if find_spec("matplotlib") is None:
            raise ToolError(f"--timeline draws with matplotlib, which is not installed: {install_hint('viz')}")
    from partitioner.tools.table import print_plan  # noqa: PLC0415 - CLI start-up (rich loads when a command prints a table)

    plan = read_plan(args.plan)
    summary = plan_summary(plan)
    files = Outputs()
    if args.timeline:
        if args.trace:
            blocks = timeline.trace_events(args.trace)
            title = f"{plan.model}: measured ({Path(args.trace).name})"
        else:
            p = plan.prediction
            if p.n_microbatches > MAX_TIMELINE_MICROBATCHES:
                raise ToolError(f"{args.plan} has {p.n_microbatches} micro-batches; --timeline draws at most "
                                f"{MAX_TIMELINE_MICROBATCHES} (re-plan with --microbatches M)")
            blocks, _ = timeline.predicted_events(plan)
            title = (f"{plan.model}: {p.schedule}, {plan.n_stages} stages on {plan.pp_ranks} ranks, "
                     f"{p.n_microbatches} micro-batches (predicted, {plan.device.get('name')})")
        files.add(args.timeline, timeline.render(blocks, args.timeline, title,
                                                 show_stage=plan.n_stages > plan.pp_ranks))
    if args.json:
        print(json.dumps(summary, indent=1, sort_keys=True))
    else:
        print_plan(summary, _out())
        for r in plan.routes:  # values that skip stages (version-4 plans): sent straight to their consumers
            producer = 0 if r.producer == "input" else int(r.producer)
            if any(c > producer + 1 for c in r.consumers):
                to = ", ".join(map(str, r.consumers))
                print(f"route {r.name}: {'model input' if r.producer == 'input' else f'stage {producer}'} -> "
                      f"stage{'s' if len(r.consumers) > 1 else ''} {to}, straight past the stages between")
    if args.timeline:
        files.commit()
        if not args.json:
            print(f"wrote {args.timeline}")
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    check_outputs([("--html", args.html)], list(args.inputs))
    if args.passes or args.stages:
        if len(args.inputs) != 1:
            raise ToolError(f"diff --{'passes' if args.passes else 'stages'} takes one MODEL, got {len(args.inputs)}")
        check_partition_args(args)

        pipe = partition_from_args(args, args.inputs[0], keep_snapshots=args.passes)
        if args.passes:
            d = diff.diff_passes(list(pipe.snapshots))
        else:
            d = diff.diff_stages(pipe.graph, list(pipe.stages), pipe.plan)
        title = f"{'passes' if args.passes else 'graph vs stages'}: {args.inputs[0]}"
    else:
        if len(args.inputs) != 2:
            raise ToolError(f"diff needs two plan files (or --passes/--stages MODEL), got {len(args.inputs)} argument(s)")
        _refuse_partition_flags(args, "when comparing two plan files (they were planned already)")

        a, b = (read_plan(p) for p in args.inputs)
        d = diff.diff_plans(a, b)
        title = f"{args.inputs[0]} vs {args.inputs[1]}"

    from partitioner.tools import diff_render  # noqa: PLC0415 - CLI start-up (rich)

    files = Outputs()
    if args.html:
        files.add(args.html, diff_render.html_diff(d, title))
    if args.json:
        print(json.dumps(d, indent=1, sort_keys=True))
    else:
        diff_render.print_diff(d, _out())
    files.commit()
    return 1 if d["different"] else 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Measure the device's efficiency curves (``partitioner.calibrate.calibrate_curves``) and
    write the profile with ``DeviceSpec.save``, whole or not at all (a temporary file renamed)."""
    check_outputs([("--out", args.out)])
    if args.budget is not None and not (0 < args.budget < float("inf")):
        raise ToolError(f"--budget must be a positive number of seconds, got {args.budget}")
    from partitioner.calibrate import calibrate_curves  # noqa: PLC0415 - CLI start-up (torch loads only for commands that measure)

    with _phase(f"measuring {args.device}", getattr(args, "quiet", False)):
        spec = calibrate_curves(args.device, budget_s=args.budget, base=args.base)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(args.out)}.", suffix=".tmp",
                               dir=os.path.dirname(os.path.abspath(args.out)))
    os.close(fd)
    try:
        spec.save(tmp)
        os.replace(tmp, args.out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    e = spec.efficiency
    assert e is not None  # calibrate_curves always fits one
    rec = dict(e.measured)
    print(f"{spec.name}: {rec['device']} ({rec['backend']}), torch {rec['torch']}, {rec['wall_s']:.0f} s measuring")
    print(f"  matmul    {e.gemm_max * spec.peak(rec['dtypes'].split(',')[0]) / 1e12:.3g} TFLOP/s best "
          f"({rec['dtypes'].split(',')[0]}), half rate at K = {e.gemm_k_half:.0f}")
    print(f"  attention {e.attn_fwd:.3f} / {e.attn_bwd:.3f} of the peak (forward / backward), half rate at "
          f"{e.attn_seq_half:.0f} tokens")
    print(f"  memory    {spec.mem_bandwidth * e.mem / 1e9:.4g} GB/s; launch floor {e.launch_s * 1e6:.2f} us; "
          f"AdamW step predicted / measured {rec['optimizer_predicted_over_measured']}")
    print(f"  fit: predicted / measured per kernel, median {rec['fit_median_ratio']}x, worst {rec['fit_worst_ratio']}x")
    print(f"wrote {args.out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    check_output_dir("--out", args.out)
    from_plan = is_plan_file(args.source)
    if from_plan:
        if not args.model_spec:
            raise ToolError("export of a plan file needs --model MODEL: the plan holds no code or weights")
        _refuse_partition_flags(args, "when exporting a plan file (its stages are fixed); to re-plan, "
                                      "pass MODEL instead of the plan")
        plan = read_plan(args.source)
        if args.onnx:
            _onnx_ready(plan)  # before loading the model: refused up front, nothing written
        model, inputs = load_model(args.model_spec)
        with _library_output(args):
            pipe = plan.apply(model, inputs)
    else:
        if args.model_spec:
            raise ToolError("--model is for exporting a plan file; SOURCE is a model already")
        check_partition_args(args)
        pipe = partition_from_args(args, args.source)
        if args.onnx:
            _onnx_ready(pipe.plan)

    from partitioner.export import write_sources  # noqa: PLC0415 - CLI start-up (torch loads only for commands that export)

    out = Path(args.out)
    created = [p for p in (out, *out.parents) if not p.exists()]  # removed again if the export fails
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=out))
    ok = False
    try:
        names = [Path(p).name for p in write_sources(pipe, staging)]
        if args.onnx:  # an ExportError prints as one line like any PartitionError (cli._one_line)
            with _library_output(args):
                names += [Path(p).name for p in pipe.export_onnx(str(staging))]
        written = []
        for name in names:  # every file made and checked: only now do they appear in DIR
            (staging / name).replace(out / name)
            written.append(str(out / name))
        ok = True
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if not ok:
            for p in created:  # innermost first
                with contextlib.suppress(OSError):
                    p.rmdir()
    print("wrote " + ", ".join(written))
    return 0


def _onnx_ready(plan: Any) -> None:
    from partitioner.export import onnx_blockers  # noqa: PLC0415 - CLI start-up (torch loads only for commands that export)

    missing = [m for m in EXTRAS["onnx"] if find_spec(m) is None]
    if missing:
        raise ToolError(f"--onnx needs {', '.join(missing)}: {install_hint('onnx')}")
    blockers = onnx_blockers(plan)
    if blockers:
        raise ToolError("--onnx: ONNX stages exchange tensors only, but " + "; ".join(blockers)
                        + "; re-plan with cuts between blocks, e.g. --cut-at 'transformer.h.*'")


def cmd_run(args: argparse.Namespace) -> int:
    check_outputs([("--trace", args.trace)], [args.plan or "", _model_file(args.model) or ""])
    from partitioner.tools.run import run  # noqa: PLC0415 - CLI start-up (torch loads only for the run command)

    return run(args)
