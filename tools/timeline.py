"""The schedule's timeline: ranks × time, one block per forward/backward, plus communication.

Receives are drawn where a rank waits for data (hatched grey), sends as a thin bar for the
time the message is on the link; what is left blank is idle time: the bubble. A block
too short to see at the chart's scale is widened to a hairline so a tiny model's chart
is never blank.

Events come from the simulator (``predicted_events(plan)`` re-simulates a plan from its
stage times) or from a measured Chrome trace (``trace_events``: ``traceEvents`` with
``pid`` = rank, ``name`` = action text such as "1F0", ``ts``/``dur`` in µs). The same
``draw`` renders both, so a prediction and a measurement can sit side by side.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, NamedTuple

from partitioner.schedule import Action, ScheduleError, build_schedule
from partitioner.simulator import predict_plan

__all__ = ["Block", "predicted_events", "trace_events", "draw"]

# Forward blues, backward oranges, split backward (I / W) in two greens: kinds read at a glance.
_KIND_COLOURS = {"F": ("#4c78a8", "#9ecae9"), "B": ("#e45756", "#ff9d98"),
                 "I": ("#54a24b", "#88d27a"), "W": ("#b79a20", "#f2cf5b")}


_COMM = ("SEND_F", "SEND_B", "RECV_F", "RECV_B")

# The runtime's traces add the simulator's rows at pid 1000 + rank
# (partitioner.runtime.trace.PREDICTED_PID); a measured timeline draws the real rows only.
_PREDICTED_PID = 1000


class Block(NamedTuple):
    rank: int
    text: str  # action text, "1F0": stage 1, forward, micro-batch 0
    kind: str  # F, B, I or W
    microbatch: int
    start: float  # seconds
    end: float


def predicted_events(plan: Any) -> tuple[list[Block], float]:
    """Re-simulate ``plan``'s schedule from its per-stage times; (blocks, step time in s)."""
    p = plan.prediction
    sched = build_schedule(p.schedule, plan.pp_ranks, p.n_microbatches, plan.n_stages)
    result = predict_plan(plan, sched)  # the plan's own prediction, re-run for its events
    blocks = [Block(e.rank, str(e.action), e.action.kind, e.action.microbatch, e.start, e.end)
              for e in result.events if e.end > e.start or e.action.is_compute]
    return blocks, result.step_time


def trace_events(path: str | Path) -> list[Block]:
    """Compute blocks from a Chrome trace JSON; events whose name is not an action are skipped."""
    data = json.loads(Path(path).read_text())
    events = data["traceEvents"] if isinstance(data, dict) else data
    blocks = []
    for ev in events:
        if ev.get("ph", "X") != "X" or "dur" not in ev or int(ev.get("pid", 0)) >= _PREDICTED_PID:
            continue
        try:
            a = Action.parse(str(ev.get("name", "")))
        except ScheduleError:
            continue  # sends, receives and user ranges are not compute blocks
        if a.is_compute or a.kind in _COMM:
            start = float(ev["ts"]) * 1e-6
            blocks.append(Block(int(ev["pid"]), str(a), a.kind, a.microbatch, start, start + float(ev["dur"]) * 1e-6))
    if not any(b.kind not in _COMM for b in blocks):
        raise ValueError(f"{path}: no compute events (names like '1F0') in traceEvents")
    t0 = min(b.start for b in blocks)  # traces start at wall-clock µs: draw from zero
    return [b._replace(start=b.start - t0, end=b.end - t0) for b in blocks]


def draw(blocks: list[Block], out: str | Path, title: str = "", show_stage: bool = False) -> None:
    """Write an SVG or PNG (by suffix) with matplotlib's Agg backend: no display needed."""
    Path(out).write_bytes(render(blocks, out, title, show_stage))


def render(blocks: list[Block], name: str | Path, title: str = "", show_stage: bool = False) -> bytes:
    """The picture's bytes, in the format ``name``'s suffix names (svg, png, pdf)."""
    import matplotlib  # noqa: PLC0415 - optional extra (matplotlib, the viz extra)

    matplotlib.use("Agg")
    matplotlib.rcParams["svg.hashsalt"] = "partitioner"  # fixed ids: the same plan draws the same bytes
    import matplotlib.pyplot as plt  # noqa: PLC0415 - optional extra (matplotlib, the viz extra)

    n_ranks = max(b.rank for b in blocks) + 1
    span = max(b.end for b in blocks)
    scale, unit = next(((s, u) for s, u in ((1.0, "s"), (1e-3, "ms"), (1e-6, "µs")) if span >= s), (1e-9, "ns"))
    compute = [b for b in blocks if b.kind not in _COMM]
    fig_w = min(24.0, max(8.0, len(compute) / n_ranks * 0.45))
    fig, ax = plt.subplots(figsize=(fig_w, 1.6 + 0.6 * n_ranks), dpi=110)
    hairline = span / scale * 0.004  # ~3 px: the narrowest block still seen
    widened = False
    kinds = set()
    for b in blocks:
        x, w = b.start / scale, (b.end - b.start) / scale
        if b.kind.startswith("RECV"):  # the rank sits waiting for this message
            if w > 0:
                ax.broken_barh([(x, w)], (b.rank - 0.4, 0.8), facecolors="#eeeeee", edgecolor="#bbbbbb",
                               hatch="////", linewidth=0.0, zorder=1)
                kinds.add("RECV")
            continue
        if b.kind.startswith("SEND"):  # the message on the link: a thin bar under the row
            if w > 0:
                ax.broken_barh([(x, w)], (b.rank + 0.28, 0.1), facecolors="#7f3c8d", zorder=3)
                kinds.add("SEND")
            continue
        dark, light = _KIND_COLOURS.get(b.kind, ("#777777", "#bbbbbb"))
        colour = dark if b.microbatch % 2 == 0 else light  # neighbours of one kind stay apart
        if w < hairline:
            w, widened = hairline, True
        ax.broken_barh([(x, w)], (b.rank - 0.4, 0.68), facecolors=colour, edgecolor="white", linewidth=0.5, zorder=4)
        kinds.add(b.kind)
        label = b.text if show_stage else f"{b.kind}{b.microbatch}"
        # Only label blocks wide enough to hold the text; a tiny block with a label is noise.
        if w / (span / scale) * fig_w * 72 > 7 * len(label):
            ax.text(x + w / 2, b.rank - 0.06, label, ha="center", va="center", fontsize=8,
                    color="white" if colour == dark else "black", zorder=5)
    ax.set_yticks(range(n_ranks), [f"rank {r}" for r in range(n_ranks)])
    ax.set_ylim(n_ranks - 0.5, -0.5)  # rank 0 on top, as in the schedule grids
    ax.set_xlim(0, span / scale * 1.01)
    note = "; compute blocks shorter than a hairline are widened to one" if widened else ""
    ax.set_xlabel(f"time ({unit}); blank = idle (bubble){note}")
    if title:
        ax.set_title(title, loc="left", fontsize=10, pad=22)  # room for the legend below it
    names = {"F": "forward", "B": "backward", "I": "input grad", "W": "weight grad",
             "RECV": "waiting for data (recv)", "SEND": "transfer on the link (send)"}
    order = [k for k in ("F", "B", "I", "W", "RECV", "SEND") if k in kinds]
    handles = []
    for k in order:
        if k == "RECV":
            handles.append(plt.Rectangle((0, 0), 1, 1, facecolor="#eeeeee", edgecolor="#bbbbbb", hatch="////"))
        elif k == "SEND":
            handles.append(plt.Rectangle((0, 0), 1, 1, color="#7f3c8d"))
        else:
            handles.append(plt.Rectangle((0, 0), 1, 1, color=_KIND_COLOURS[k][0]))
    ax.legend(handles, [names[k] for k in order], loc="lower left",
              bbox_to_anchor=(0.0, 1.0), ncol=6, fontsize=8, frameon=False, borderaxespad=0.2)  # between title and bars
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format=Path(name).suffix.lstrip(".").lower() or "png", metadata=_FIXED_METADATA.get(
        Path(name).suffix.lower()))
    plt.close(fig)
    return buf.getvalue()


# No creation dates in the files: the same plan draws the same bytes.
_FIXED_METADATA = {".svg": {"Date": None}, ".png": {"Software": None}, ".pdf": {"CreationDate": None}}
