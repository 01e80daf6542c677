"""Where the joint layout search's time goes: one ``layout_bench`` planner run under cProfile,
split into phases (capture, annotation, TP analysis, per-candidate pricing, cut solver,
simulator, recompute, ...).

    PYTHONPATH=. .venv/bin/python benchmarks/joint_profile.py --model 70b --gpus 64 [--layers 8]
        [--batch 128] [--cprofile prof.pstats] [--limit SECONDS] [--published] [--json rows.json]

``--layers`` builds the shape with fewer decoder layers (everything else as ``layout_bench``'s
config) to profile a smaller instance first. A phase is charged the cumulative time of the
outermost call of one of its functions (so nested phases are not counted twice: a phase
entered inside another is charged to the inner one and subtracted from the outer).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import signal
import sys
import tempfile
import time
from typing import Any

if __package__ in (None, ""):  # run as a script: the repository root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import benchmarks.layout_bench as lb  # noqa: E402
from partitioner.tools.hf_model import load_hf  # noqa: E402

#: phase -> the functions (module, name) whose time it holds. A function runs charged to the
#: phase of the innermost of these on the call stack (exclusive time, no double counting).
PHASES: list[tuple[str, list[tuple[str, str]]]] = [
    ("capture (torch.export / fx)", [("partitioner.passes.trace", "capture")]),
    ("annotation (shape-prop, AnnotateCosts, order)", [("partitioner.problem", "annotate")]),
    ("TP analysis (find_regions, rank views)", [("partitioner.tensor_parallel", "view"),
                                                ("partitioner.passes.tensor_parallel", "find_regions")]),
    ("pricing: node times, cut bytes (price)", [("partitioner.pricing", "price")]),
    ("memory models (Static, Activations)", [("partitioner.memory", "Static"),
                                             ("partitioner.memory", "Activations")]),
    ("recompute arrays (Activations.arrays)", []),
    ("exact memory check (Problem.exact)", []),
    ("cut solver (solve, refine, min_cost_at, step_search)", [("partitioner.solver", "solve"),
                                                               ("partitioner.refine", "refine"),
                                                               ("partitioner.solver", "min_cost_at"),
                                                               ("partitioner.objective", "step_search")]),
    ("schedule simulator (simulate, predict_step)", [("partitioner.simulator", "simulate"),
                                                     ("partitioner.simulator", "predict_step")]),
    ("schedule building", [("partitioner.schedule", "build_schedule")]),
    ("replica pricing (replicated)", [("partitioner.layout", "replicated")]),
    ("fewer-stages note", [("partitioner.search", "note_fewer_stages")]),
    ("build_problem (rest)", [("partitioner.problem", "build_problem")]),
    ("search (rest)", [("partitioner.search", "search")]),
    ("joint (rest: bounds, candidates)", [("partitioner.layout", "joint")]),
]
#: methods: phase -> (module, class, method)
METHODS = {"recompute arrays (Activations.arrays)": [("partitioner.memory", "Activations", "arrays"),
                                                     ("partitioner.memory", "Activations", "stage_saved")],
           "exact memory check (Problem.exact)": [("partitioner.problem", "Problem", "exact")]}

_acc: dict[str, float] = {}
_calls: dict[str, int] = {}
_stack: list[list[Any]] = []  # [phase, start, child time]


def _wrap(fn: Any, phase: str) -> Any:
    def timed(*a: Any, **k: Any) -> Any:
        _stack.append([phase, time.process_time(), 0.0])
        try:
            return fn(*a, **k)
        finally:
            ph, t0, child = _stack.pop()
            dt = time.process_time() - t0
            _acc[ph] = _acc.get(ph, 0.0) + dt - child
            _calls[ph] = _calls.get(ph, 0) + 1
            if _stack:
                _stack[-1][2] += dt
    timed.__wrapped__ = fn  # type: ignore[attr-defined]
    return timed


def instrument() -> None:
    """Replace each phase's functions by timed wrappers, in every module that bound them."""
    import importlib  # noqa: PLC0415

    for phase, fns in PHASES:
        for mod, name in fns:
            real = getattr(importlib.import_module(mod), name)
            if isinstance(real, type):  # a class: time its construction
                real.__init__ = _wrap(real.__init__, phase)
                continue
            w = _wrap(real, phase)
            for m in list(sys.modules.values()):
                if getattr(m, "__name__", "").startswith(("partitioner", "benchmarks")):
                    for attr, val in list(vars(m).items()):
                        if val is real:
                            setattr(m, attr, w)
    for phase, ms in METHODS.items():
        for mod, cls, name in ms:
            c = getattr(importlib.import_module(mod), cls)
            setattr(c, name, _wrap(getattr(c, name), phase))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="70b", choices=list(lb.CONFIGS))
    ap.add_argument("--gpus", type=int, default=64)
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the model's)")
    ap.add_argument("--batch", type=int, default=None, help="global batch (default: layout_bench's)")
    ap.add_argument("--cprofile", default=None, metavar="FILE", help="also run under cProfile, pstats here")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--limit", type=float, default=None, metavar="SECONDS",
                    help="stop the search after this much wall time and print the phases so far")
    ap.add_argument("--published", action="store_true",
                    help="also price layout_bench's published layouts at this model and GPU count (same capture)")
    ap.add_argument("--json", default=None, help="append the rows (planner, published) to this JSON list")
    args = ap.parse_args()
    cfg = dict(lb.CONFIGS[args.model])
    if args.layers:
        cfg["num_hidden_layers"] = args.layers
    batch = args.batch or lb.batch_for(args.model, args.gpus)
    folder = tempfile.mkdtemp()
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    lb.CONFIGS[args.model] = cfg  # the row's FLOPs count these layers
    instrument()
    lb.install()
    lb.shared_key[0] = (args.model, batch, args.layers)
    model, inputs = load_hf(f"hf:{folder}", lb.SEQ, batch)
    prof = cProfile.Profile() if args.cprofile else None
    t, c = time.perf_counter(), time.process_time()
    if args.limit:  # a search past the limit stops here, and its phases so far are printed
        signal.signal(signal.SIGALRM, _stop)
        signal.setitimer(signal.ITIMER_REAL, args.limit)
    if prof:
        prof.enable()
    try:
        row, err = lb._plan(args.model, args.gpus, model, inputs, **lb.PLANNER)
    except _Stopped:
        row, err = None, f"stopped after {args.limit:.0f} s of wall time (--limit), unfinished"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    if prof:
        prof.disable()
        prof.dump_stats(args.cprofile)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    print(f"{args.model} ({cfg['num_hidden_layers']} layers) on {args.gpus} GPUs, batch {batch}: "
          f"{wall:.1f} s wall, {cpu:.1f} CPU-s{' (under cProfile)' if prof else ''}", flush=True)
    print(lb._fmt(row) if row else f"refused: {err}")
    rows = []
    if row:
        print({k: row[k] for k in ("search_s", "search_cpu_s", "solved", "pruned", "floor", "free_splits")})
        rows.append(dict(model=args.model, gpus=args.gpus, batch=batch, who="planner", **row))
    else:
        rows.append(dict(model=args.model, gpus=args.gpus, batch=batch, who="planner", refused=err,
                         wall_s=wall, cpu_s=cpu))
    print("| phase | CPU-s | share | calls |\n|---|---|---|---|")
    for phase, _ in PHASES:
        s = _acc.get(phase, 0.0)
        print(f"| {phase} | {s:.1f} | {s / max(cpu, 1e-9):.1%} | {_calls.get(phase, 0)} |")
    rest = cpu - sum(_acc.values())
    print(f"| outside these (model build excluded; partition() checks, emit stub) | {rest:.1f} | "
          f"{rest / max(cpu, 1e-9):.1%} | |", flush=True)
    rows[0]["phases"] = dict(_acc)
    if args.published:
        _stack.clear()
        for m, g, who, kw, tps, note, b in lb.PUBLISHED:
            if m != args.model or g != args.gpus or (b or lb.batch_for(m, g)) != batch:
                continue
            prow, perr = lb._plan(args.model, args.gpus, model, inputs, **kw)
            over = ""
            if prow is None:  # price it anyway, its memory marked as over the device
                prow, _ = lb._plan(args.model, args.gpus, model, inputs, memory_limit=2**50, **kw)
                over = " (over the device: does not fit on our memory model)"
            print(f"{who}: {lb._fmt(prow) if prow else perr}{over} | published {tps} ({note})", flush=True)
            rows.append(dict(model=m, gpus=g, batch=batch, who=who, cited=f"{tps} ({note})", over=perr if over else "",
                             **(prow or {})))
    if args.json:
        old = json.load(open(args.json)) if os.path.exists(args.json) else []
        with open(args.json, "w") as f:
            json.dump(old + rows, f, indent=1)
    if prof:
        stats = pstats.Stats(prof)
        stats.sort_stats("cumulative").print_stats(args.top)
        stats.sort_stats("tottime").print_stats(args.top)


class _Stopped(BaseException):  # not an Exception: no handler in the planner swallows it
    pass


def _stop(*_: Any) -> None:
    raise _Stopped


if __name__ == "__main__":
    main()
