"""The per-stage table ``plan`` and ``show`` print (rich), from ``summary.plan_summary``."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from partitioner.tools.fmt import human_bytes, human_flops, human_seconds

__all__ = ["print_plan"]


def _table(summary: dict[str, Any], title: str, with_cuts: bool) -> Table:
    table = Table(title=title, title_justify="left")
    # Narrow: the rank column only when some stage's rank is not its index (interleaved).
    ranks = with_cuts or any(st["rank"] != st["index"] for st in summary["stages"])
    for name in ("stage", "rank", "nodes", "params", "FLOPs f+b", "memory", "time f+b+c", "sends"):
        if name != "rank" or ranks:
            table.add_column(name, justify="right", no_wrap=True)
    # recompute only when some stage recomputes (the common plan keeps its narrow table)
    recompute = any(st.get("recompute", "none") != "none" for st in summary["stages"])
    if recompute:
        table.add_column("recompute", justify="left", no_wrap=True)
    if with_cuts:
        table.add_column("cut after", justify="left", no_wrap=True)
    slowest = max(st["time_s"] for st in summary["stages"])
    for st in summary["stages"]:
        time = human_seconds(st["time_s"])
        row = [
            str(st["index"]), *([str(st["rank"])] if ranks else []), str(st["nodes"]), human_bytes(st["param_bytes"]),
            human_flops(st["flops"]), human_bytes(st["memory_bytes"]),
            f"[bold]{time}[/bold]" if st["time_s"] == slowest else time,  # the bottleneck sets throughput
            human_bytes(st["boundary_bytes"]) if st["cut"] else "-",
        ]
        if recompute:
            row.append(st.get("recompute", "none"))
        if with_cuts:
            row.append(escape(st["cut"] or ""))  # labels like "attn [view_18 | transpose_18]" are not markup
        table.add_row(*row)
    return table


def _natural_width(table: Table) -> int:
    """Columns at their widest cell, plus borders and padding: what the table needs unsqueezed."""
    widths = [max([len(Text.from_markup(str(c.header)).plain)]
                  + [len(Text.from_markup(str(cell)).plain) for cell in c._cells]) for c in table.columns]
    return sum(widths) + 3 * len(widths) + 1


def print_plan(summary: dict[str, Any], console: Console) -> None:
    p, s = summary["prediction"], summary["solver"]
    title = escape(f"{summary['model']}: {summary['n_stages']} stages on {summary['n_gpus']} GPUs "
             f"({summary['device']}, {summary['link']})")
    table = _table(summary, title, with_cuts=True)
    # Too narrow for the labels (an 80-column terminal): list the cuts under the table instead
    # of squeezing them to "trans…".
    narrow = _natural_width(table) > console.width
    if narrow:
        table = _table(summary, title, with_cuts=False)
    console.print(table)
    if narrow:
        for st in summary["stages"]:
            if st["cut"]:
                console.print(f"cut after stage {st['index']}: {escape(st['cut'])}", soft_wrap=True)
    # The lower bound holds for any split; "proved optimal" is about the bottleneck, not the bound.
    optimal = ("[green]proved optimal[/green]" if s["optimal"]
               else "[yellow]not proved optimal[/yellow]")
    console.print(
        f"schedule {p['schedule']}, {p['n_microbatches']} micro-batches of {p['microbatch_size']}: "
        f"predicted step {human_seconds(p['step_time_s'])}, bubble {p['bubble_fraction']:.1%}"
    )
    console.print(
        f"bottleneck {human_seconds(s['bottleneck_s'])} per micro-batch ({optimal}); "
        f"lower bound {human_seconds(s['lower_bound_s'])} (no split of this node order is faster); "
        f"cross-stage traffic {human_bytes(s['total_cut_bytes'])}"
    )
    mesh = summary.get("mesh") or {}
    if mesh.get("dp", 1) > 1 or mesh.get("gpus_per_node") or mesh.get("tp", 1) > 1:
        nodes = (f", {-(-summary['n_gpus'] // mesh['gpus_per_node'])} nodes x {mesh['gpus_per_node']} GPUs"
                 if mesh.get("gpus_per_node") else "")
        tp = f" x {mesh['tp']} tensor-parallel ranks" if mesh.get("tp", 1) > 1 else ""
        zero = {1: ", ZeRO-1", 3: ", FSDP (zero=3)"}.get(mesh.get("zero", 0), "")
        if mesh.get("shard"):  # hybrid: D / S groups replicate S-way shards
            zero = f", HSDP (zero=3, {mesh['dp'] // mesh['shard']} x {mesh['shard']}-way shards)"
        console.print(
            f"data parallel: {mesh['dp']} replicas x {mesh['pp']} pipeline ranks{tp}{nodes}, mesh "
            f"({', '.join(mesh['dims'])}){zero}; gradient all-reduce adds "
            f"{human_seconds(mesh['allreduce_exposed_s'])} to the step")
    for note in summary["notes"]:
        if note.startswith(("dp: #", "dp: --", "tp: #", "tp: --")):  # rankings: plan --dp/--tp auto prints them
            continue
        console.print(f"[yellow]note:[/yellow] {escape(note)}")
