"""The dicts of ``partitioner.tools.diff`` as coloured terminal text (rich) or one self-contained HTML page."""

from __future__ import annotations

import html
from typing import Any, Callable

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from partitioner.tools.fmt import human_bytes, human_flops, human_seconds, signed

__all__ = ["print_diff", "html_diff"]

_UNITS: dict[str, Callable[[float], str]] = {
    "nodes": lambda v: f"{int(v)}", "param_bytes": human_bytes, "flops": human_flops,
    "memory_bytes": human_bytes, "time_s": human_seconds, "boundary_bytes": human_bytes,
}
_SHOW_NODES = 6  # node names listed per move in text; --json has them all


def print_diff(d: dict[str, Any], console: Console) -> None:
    {"plans": _print_plans, "passes": _print_passes, "stages": _print_stages}[d["kind"]](d, console)


def _cell(m: dict[str, Any], key: str) -> str:
    f = _UNITS[key]
    a, b = m["a"], m["b"]
    if a is None or b is None:
        return f"{'-' if a is None else f(a)} → {'-' if b is None else f(b)}"
    if m["delta"] == 0:
        return f(a)
    colour = "red" if m["delta"] > 0 else "green"  # more cost is worse; fewer bytes is better
    # The delta on its own line keeps columns narrow enough for an 80-column terminal.
    return f"{f(a)} → {f(b)}\n[{colour}]{signed(m['delta'], f)}[/{colour}]"


def _print_plans(d: dict[str, Any], console: Console) -> None:
    a, b = d["a"], d["b"]
    console.print(f"[bold]--- a[/bold] {escape(a['model'])}: {a['n_stages']} stages on {a['n_gpus']} GPUs ({a['device']})")
    console.print(f"[bold]+++ b[/bold] {escape(b['model'])}: {b['n_stages']} stages on {b['n_gpus']} GPUs ({b['device']})")
    if not d["different"]:
        console.print("plans are identical")
        return
    if not d["same_model"]:
        console.print("[yellow]the plans are for different graphs (fingerprints differ)[/yellow]")
    table = Table(title="per stage (per micro-batch)", title_justify="left")
    table.add_column("stage", justify="right")
    for key in _UNITS:
        table.add_column(key.removesuffix("_s").removesuffix("_bytes").replace("_", " "), justify="right")
    for row in d["stages"]:
        table.add_row(str(row["index"]), *(_cell(row[k], k) for k in _UNITS))
    console.print(table)
    for mv in d["moved"]:
        names = ", ".join(mv["nodes"][:_SHOW_NODES]) + (f", … ({mv['count']} in all)" if mv["count"] > _SHOW_NODES else "")
        console.print(f"moved stage {mv['from']} → {mv['to']}: {escape(names)}", soft_wrap=True)
    for key, colour in (("only_a", "red"), ("only_b", "green")):
        if d[key]:
            console.print(f"[{colour}]nodes only in {key[-1]}: {escape(', '.join(d[key][:_SHOW_NODES]))}[/{colour}]")
    cuts = d["cuts"]
    for c in cuts["moved"]:
        console.print(f"cut {c['index']} moved: [red]{escape(c['a'])}[/red] → [green]{escape(c['b'])}[/green]")
    if not cuts["moved"]:
        for c in cuts["removed"]:
            console.print(f"[red]- cut {escape(c)}[/red]")
        for c in cuts["added"]:
            console.print(f"[green]+ cut {escape(c)}[/green]")
    for row in d["stages"]:
        rc = row.get("recompute", {})
        if rc.get("a") and rc.get("b") and rc["a"] != rc["b"]:
            console.print(f"stage {row['index']} recompute: [red]{rc['a']}[/red] → [green]{rc['b']}[/green]")
    t = d["traffic"]["total"]
    console.print(f"cross-stage traffic {human_bytes(t['a'])} → {human_bytes(t['b'])} ({signed(t['delta'], human_bytes)})")
    p = d["prediction"]
    console.print(f"step time {human_seconds(p['step_time_s']['a'])} → {human_seconds(p['step_time_s']['b'])}, "
                  f"bubble {p['bubble_fraction']['a']:.1%} → {p['bubble_fraction']['b']:.1%}, "
                  f"schedule {p['schedule']['a']} → {p['schedule']['b']}, "
                  f"micro-batches {p['n_microbatches']['a']} → {p['n_microbatches']['b']}")


def _print_passes(d: dict[str, Any], console: Console) -> None:
    console.print(f"[bold]passes:[/bold] {' → '.join(d['passes'])}")
    for step in d["steps"]:
        c = step["counts"]
        console.rule(f"{step['before']} → {step['after']}")
        console.print(f"nodes {c['nodes_before']} → {c['nodes_after']}: [green]+{c['added']}[/green] "
                      f"[red]-{c['removed']}[/red], {c['retargeted']} retargeted, meta changed on {c['meta_changed']}")
        for key, count in step["meta_keys"].items():
            console.print(f"  {escape(key)}: {count} nodes")
        for r in step["retargeted"]:
            console.print(f"  retargeted {escape(r['node'])}: {escape(r['before'])} → {escape(r['after'])}")
        for line in step["unified_diff"]:
            style = ("bold" if line.startswith(("---", "+++")) else "cyan" if line.startswith("@@")
                     else "green" if line.startswith("+") else "red" if line.startswith("-") else "")
            console.print(f"[{style}]{escape(line)}[/{style}]" if style else escape(line), soft_wrap=True)


def _print_stages(d: dict[str, Any], console: Console) -> None:
    console.print(f"[bold]original graph:[/bold] {d['original_nodes']} compute nodes → {d['n_stages']} stages")
    for row in d["stages"]:
        console.print(f"stage {row['index']}: {row['nodes']} nodes; receives {escape(', '.join(row['inputs']) or '-')}; "
                      f"sends {escape(', '.join(row['outputs']) or '-')}")
        if row["passed_through"]:
            console.print(f"  [yellow]passed through unchanged:[/yellow] {escape(', '.join(row['passed_through']))}")
    if d["violations"]:
        for v in d["violations"]:
            console.print(f"[red]violation:[/red] {escape(v['node'])} {escape(v['problem'])}")
    else:
        console.print("[green]every original compute node is in exactly one stage[/green]")


# -- HTML -------------------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.3em} h2{font-size:1.1em;margin-top:1.5em}
table{border-collapse:collapse;margin:.5em 0} td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}
th{background:#f0f0f0} td.l,th.l{text-align:left}
/* side by side while both fit, stacked when not; a wide table scrolls inside its own column */
.side{display:flex;flex-wrap:wrap;gap:2em} .side>div{flex:1 1 40em;min-width:0;overflow-x:auto}
.add{background:#e6ffec;color:#116329} .del{background:#ffebe9;color:#82071e} .hunk{color:#0550ae}
pre{background:#fafafa;border:1px solid #ddd;padding:.5em;overflow-x:auto;font-size:12px}
.bad{color:#b00} .ok{color:#070}
"""


def html_diff(d: dict[str, Any], title: str) -> str:
    body = {"plans": _html_plans, "passes": _html_passes, "stages": _html_stages}[d["kind"]](d)
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n")


def _e(x: Any) -> str:
    return html.escape(str(x))


def _plan_column(side: str, d: dict[str, Any]) -> str:
    h = d[side]
    rows = "".join(
        f"<tr><td>{r['index']}</td>" + "".join(
            f"<td>{_e(_UNITS[k](r[k][side])) if r[k][side] is not None else '-'}</td>" for k in _UNITS)
        + f"<td class=l>{_e(r['cut'][side] or '')}</td></tr>"
        for r in d["stages"] if r["nodes"][side] is not None)
    heads = "".join(f"<th>{_e(k)}</th>" for k in _UNITS)
    p = d["prediction"]
    return (f"<div><h2>{'a' if side == 'a' else 'b'}: {_e(h['model'])}, {h['n_stages']} stages on {h['n_gpus']} GPUs "
            f"({_e(h['device'])})</h2><table><tr><th>stage</th>{heads}<th class=l>cut after</th></tr>{rows}</table>"
            f"<p>step {_e(human_seconds(p['step_time_s'][side]))}, bubble {p['bubble_fraction'][side]:.1%}, "
            f"traffic {_e(human_bytes(d['traffic']['total'][side]))}</p>"
            f"<p>cuts:</p><ul>{''.join(f'<li>{_e(c)}</li>' for c in h['cuts'])}</ul></div>")


def _html_plans(d: dict[str, Any]) -> str:
    moves = "".join(f"<li>stage {m['from']} → {m['to']}: {_e(', '.join(m['nodes']))}</li>" for m in d["moved"])
    cuts = d["cuts"]
    cut_items = ("".join(f"<li class=del>- {_e(c)}</li>" for c in cuts["removed"])
                 + "".join(f"<li class=add>+ {_e(c)}</li>" for c in cuts["added"]))
    verdict = "identical" if not d["different"] else "different"
    return (f"<p>The plans are <b>{verdict}</b>.</p><div class=side>{_plan_column('a', d)}{_plan_column('b', d)}</div>"
            f"<h2>Cuts</h2><ul>{cut_items or '<li>none changed</li>'}</ul>"
            f"<h2>Nodes that moved</h2><ul>{moves or '<li>none</li>'}</ul>")


def _html_passes(d: dict[str, Any]) -> str:
    parts = [f"<p>passes: {_e(' → '.join(d['passes']))}</p>"]
    for step in d["steps"]:
        c = step["counts"]
        keys = "".join(f"<li>{_e(k)}: {v} nodes</li>" for k, v in step["meta_keys"].items())
        lines = []
        for line in step["unified_diff"]:
            cls = "hunk" if line.startswith("@@") else "add" if line.startswith("+") else "del" if line.startswith("-") else ""
            lines.append(f"<span class={cls}>{_e(line)}</span>" if cls else _e(line))
        parts.append(
            f"<h2>{_e(step['before'])} → {_e(step['after'])}</h2><p>nodes {c['nodes_before']} → {c['nodes_after']}, "
            f"+{c['added']} −{c['removed']}, {c['retargeted']} retargeted, meta changed on {c['meta_changed']}</p>"
            f"<ul>{keys}</ul><pre>{chr(10).join(lines) or '(graph text unchanged)'}</pre>")
    return "\n".join(parts)


def _html_stages(d: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><td>{r['index']}</td><td>{r['nodes']}</td><td class=l>{_e(', '.join(r['inputs']))}</td>"
        f"<td class=l>{_e(', '.join(r['outputs']))}</td><td class=l>{_e(', '.join(r['passed_through']))}</td></tr>"
        for r in d["stages"])
    bad = "".join(f"<li class=bad>{_e(v['node'])}: {_e(v['problem'])}</li>" for v in d["violations"])
    return (f"<p>{d['original_nodes']} original compute nodes in {d['n_stages']} stages.</p>"
            f"<table><tr><th>stage</th><th>nodes</th><th class=l>receives</th><th class=l>sends</th>"
            f"<th class=l>passed through</th></tr>{rows}</table>"
            + (f"<ul>{bad}</ul>" if bad else "<p class=ok>every original compute node is in exactly one stage</p>"))
