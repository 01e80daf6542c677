"""One function per subcommand: parsed arguments in, exit status out. Heavy imports stay inside."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any, Iterator

from rich.console import Console

from tools.loading import ToolError, is_plan_file, load_model, read_plan

__all__ = ["cmd_plan", "cmd_show", "cmd_diff", "cmd_export", "cmd_run", "partition_from_args"]


def _out() -> Console:
    # Not a terminal (a pipe, a test): plain text, wide enough that tables never wrap.
    return Console(width=None if sys.stdout.isatty() else 160)


@contextlib.contextmanager
def _phase(text: str, quiet: bool = False) -> Iterator[None]:
    """A spinner on stderr while a slow phase runs; silent when stderr is not a terminal."""
    err = Console(stderr=True)
    if quiet or not err.is_terminal:
        yield
        return
    with err.status(text):
        yield


def partition_from_args(args: argparse.Namespace, spec: str, keep_snapshots: bool = False,
                        loaded: tuple[Any, Any] | None = None) -> Any:
    """``partition()`` with the shared options; returns the Pipe. ``loaded``: the factory's result."""
    from tools.fmt import parse_bytes

    # Check what the user typed before importing torch: a typo costs no start-up time.
    limit = parse_bytes(args.memory_limit) if args.memory_limit else None
    quiet = getattr(args, "quiet", False) or getattr(args, "json", False)
    with _phase(f"loading {spec}", quiet):
        model, inputs = loaded if loaded is not None else load_model(spec)
    from partitioner import partition

    with _phase("partitioning: trace → shape-prop → costs → solve → split", quiet):
        return partition(
            model, args.gpus, inputs, schedule=args.schedule, n_microbatches=args.microbatches,
            virtual_stages=args.virtual_stages, device=args.device, link=args.link, cut_at=args.cut_at,
            pinned_cuts=tuple(args.pin), memory_limit=limit, keep_snapshots=keep_snapshots)


def cmd_plan(args: argparse.Namespace) -> int:
    from partitioner.plan import write_atomic
    from tools.summary import plan_summary
    from tools.table import print_plan

    pipe = partition_from_args(args, args.model)
    write_atomic(args.output, pipe.plan.to_json())
    if args.dot or args.svg:
        from tools.pictures import segmentation, to_dot, to_svg

        seg = segmentation(pipe.graph, pipe.plan, depth=args.depth)
        if args.dot:
            write_atomic(args.dot, to_dot(seg))
        if args.svg:
            write_atomic(args.svg, to_svg(seg))
    if not args.quiet:
        out = _out()
        print_plan(plan_summary(pipe.plan), out)
        out.print(f"wrote {args.output}" + "".join(f", {p}" for p in (args.dot, args.svg) if p))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from tools.summary import plan_summary
    from tools.table import print_plan

    plan = read_plan(args.plan)
    summary = plan_summary(plan)
    if args.json:
        print(json.dumps(summary, indent=1, sort_keys=True))
    else:
        print_plan(summary, _out())
    if args.timeline:
        from tools import timeline

        if args.trace:
            blocks = timeline.trace_events(args.trace)
            title = f"{plan.model}: measured ({Path(args.trace).name})"
        else:
            blocks, step = timeline.predicted_events(plan)
            p = plan.prediction
            title = (f"{plan.model}: {p.schedule}, {plan.n_stages} stages on {plan.options['n_gpus']} ranks, "
                     f"{p.n_microbatches} micro-batches (predicted, {plan.device.get('name')})")
        timeline.draw(blocks, args.timeline, title, show_stage=plan.n_stages > int(plan.options["n_gpus"]))
        if not args.json:
            print(f"wrote {args.timeline}")
    elif args.trace:
        raise ToolError("--trace draws a measured trace and needs --timeline FILE")
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    from tools import diff, diff_render

    if args.passes or args.stages:
        if len(args.inputs) != 1:
            raise ToolError(f"diff --{'passes' if args.passes else 'stages'} takes one MODEL, got {len(args.inputs)}")
        pipe = partition_from_args(args, args.inputs[0], keep_snapshots=args.passes)
        if args.passes:
            d = diff.diff_passes(list(pipe.snapshots))
        else:
            d = diff.diff_stages(pipe.graph, list(pipe.stages), pipe.plan)
        title = f"{'passes' if args.passes else 'graph vs stages'}: {args.inputs[0]}"
    else:
        if len(args.inputs) != 2:
            raise ToolError(f"diff needs two plan files (or --passes/--stages MODEL), got {len(args.inputs)} argument(s)")
        a, b = (read_plan(p) for p in args.inputs)
        d = diff.diff_plans(a, b)
        title = f"{args.inputs[0]} vs {args.inputs[1]}"
    if args.json:
        print(json.dumps(d, indent=1, sort_keys=True))
    else:
        diff_render.print_diff(d, _out())
    if args.html:
        from partitioner.plan import write_atomic

        write_atomic(args.html, diff_render.html_diff(d, title))
    return 1 if d["different"] else 0


def cmd_export(args: argparse.Namespace) -> int:
    from partitioner.plan import write_atomic

    if is_plan_file(args.source):
        if not args.model_spec:
            raise ToolError("export of a plan file needs --model MODEL: the plan holds no code or weights")
        plan = read_plan(args.source)
        model, inputs = load_model(args.model_spec)
        pipe = plan.apply(model, inputs)  # type: ignore[attr-defined]
    else:
        pipe = partition_from_args(args, args.source)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(len(pipe.stages)):
        write_atomic(out / f"stage{i}.py", f"# stage {i} of {pipe.plan.model}, cut by partitioner\n"
                     + pipe.stage_source(i).strip() + "\n")
        written.append(str(out / f"stage{i}.py"))
    if args.onnx:
        try:
            written += list(pipe.export_onnx(str(out)))
        except ModuleNotFoundError as e:
            if "partitioner.export" in str(e) or "onnx" in str(e):
                raise ToolError(f"ONNX export is not available: {e}") from e
            raise
    print("wrote " + ", ".join(written))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from tools.run import run

    return run(args)
