"""The per-stage table ``plan`` and ``show`` print (rich), from ``summary.plan_summary``."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tools.fmt import human_bytes, human_flops, human_seconds

__all__ = ["print_plan"]


def print_plan(summary: dict[str, Any], console: Console) -> None:
    p, s = summary["prediction"], summary["solver"]
    title = escape(f"{summary['model']}: {summary['n_stages']} stages on {summary['n_gpus']} GPUs "
             f"({summary['device']}, {summary['link']})")
    table = Table(title=title, title_justify="left")
    for name, justify in [("stage", "right"), ("rank", "right"), ("nodes", "right"), ("params", "right"),
                          ("FLOPs f+b", "right"), ("memory", "right"), ("time f+b+c", "right"),
                          ("sends", "right"), ("cut after", "left")]:
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    slowest = max(st["time_s"] for st in summary["stages"])
    for st in summary["stages"]:
        time = human_seconds(st["time_s"])
        table.add_row(
            str(st["index"]), str(st["rank"]), str(st["nodes"]), human_bytes(st["param_bytes"]),
            human_flops(st["flops"]), human_bytes(st["memory_bytes"]),
            f"[bold]{time}[/bold]" if st["time_s"] == slowest else time,  # the bottleneck sets throughput
            human_bytes(st["boundary_bytes"]) if st["cut"] else "-",
            escape(st["cut"] or ""),  # labels like "attn [view_18 | transpose_18]" are not markup
        )
    console.print(table)
    optimal = "[green]optimal[/green]" if s["optimal"] else "[yellow]not proved optimal[/yellow]"
    console.print(
        f"schedule {p['schedule']}, {p['n_microbatches']} micro-batches of {p['microbatch_size']}: "
        f"predicted step {human_seconds(p['step_time_s'])}, bubble {p['bubble_fraction']:.1%}"
    )
    console.print(
        f"bottleneck {human_seconds(s['bottleneck_s'])} per micro-batch, solver bound "
        f"{human_seconds(s['lower_bound_s'])} ({optimal}), cross-stage traffic {human_bytes(s['total_cut_bytes'])}"
    )
    for note in summary["notes"]:
        console.print(f"[yellow]note:[/yellow] {escape(note)}")
