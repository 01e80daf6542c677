"""The model's segmentation as a picture: graph nodes (or modules) coloured by stage.

``segmentation(graph, plan)`` groups the annotated graph's compute nodes: one box per
node, or, for big graphs, per module path cut to ``depth`` (``transformer.h.3``), split
where a cut falls inside a module. Edges that cross a cut carry the tensor shapes the
plan says are sent there. ``to_dot`` writes Graphviz text; ``to_svg`` uses the ``dot``
binary when it is installed and otherwise lays the picture out itself (stages as
columns, nodes in graph order), so nothing here needs Graphviz.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Any
from xml.sax.saxutils import escape

from partitioner.passes.meta import MODULE, STAGE
from partitioner.tools.fmt import human_bytes, human_seconds

__all__ = ["Segmentation", "segmentation", "to_dot", "to_svg", "STAGE_COLOURS"]

#: Light fills that stay distinct side by side and keep black text readable.
STAGE_COLOURS = ("#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5",
                 "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5", "#d9d9d9")
_MODULE, _STAGE = MODULE, STAGE  # tools read node.meta, never write it


@dataclass
class Group:
    key: str  # unique id in the picture
    label: str  # module path (or node name) shown in the box
    stage: int  # -1 for the model's inputs
    nodes: list[str] = field(default_factory=list)


@dataclass
class Segmentation:
    groups: list[Group]
    edges: dict[tuple[str, str], list[str]]  # (from group, to group) → value names carried
    labels: dict[tuple[str, str], str]  # cross-stage edges only: what is sent
    n_stages: int
    title: str
    stage_notes: list[str] = field(default_factory=list)  # per stage: time, weights, activations × in flight
    cut_notes: list[str] = field(default_factory=list)  # per cut: bytes and value count


def _value_text(v: Any) -> str:
    shape = "×".join(str(s) for s in v.shape) if v.shape else "scalar"
    return f"{shape} {v.dtype}".strip() if v.kind == "tensor" else f"{v.kind}"


def segmentation(graph: Any, plan: Any, depth: int | None = None, max_boxes: int = 60) -> Segmentation:
    """Group ``graph``'s nodes for drawing: at most ``max_boxes`` boxes, always.

    ``depth=None`` picks the finest module depth that fits. Nodes outside any module (a
    residual ``add``) join the box before them; runs of repeated blocks in one stage
    become one box ("layers.0–49 ×50"); if that is still too many, neighbouring boxes of
    a stage are merged until the promise holds.
    """
    nodes = [n for n in graph.graph.nodes if n.op not in ("get_attr", "output")]
    if depth is None:  # the finest depth whose boxes, repeated blocks folded, fit
        depth = 0 if len(nodes) <= max_boxes else next(
            (d for d in range(8, 0, -1) if len(_fold(_grouping(nodes, d)[0])) <= max_boxes), 1)
    groups, of = _grouping(nodes, depth)
    if len(groups) > max_boxes:
        groups, of = _fit(groups, max_boxes)
    edges: dict[tuple[str, str], list[str]] = {}
    for n in nodes:
        for v in n.all_input_nodes:
            if v.name in of and of[v.name] != of[n.name]:
                edges.setdefault((of[v.name], of[n.name]), [])
                if v.name not in edges[(of[v.name], of[n.name])]:
                    edges[(of[v.name], of[n.name])].append(v.name)
    specs = {v.name: (v, b.bytes) for b in plan.boundaries for v in b.values}
    by_key = {g.key: g for g in groups}
    labels = {}
    for (src, dst), values in edges.items():
        if by_key[src].stage != by_key[dst].stage:
            sent = [specs[v][0] for v in values if v in specs]
            if sent:  # every value by name, one per line: "6 values" says nothing
                labels[(src, dst)] = "\n".join(f"{v.name}: {_value_text(v)}" for v in sent)
    boundary = ", ".join(human_bytes(b.bytes) for b in plan.boundaries) or "no cuts"
    title = f"{plan.model}: {plan.n_stages} stages (bytes per micro-batch at each cut: {boundary})"
    return Segmentation(groups, edges, labels, plan.n_stages, title, _stage_notes(plan), _cut_notes(plan))


def _stage_notes(plan: Any) -> list[str]:
    """Per stage: time per micro-batch, weights, activations × micro-batches in flight."""
    saved = plan.cost_at(plan.prediction.microbatch_size)
    inflight = list(plan.prediction.peak_inflight) or [1] * plan.n_stages
    out = []
    for st, c, k in zip(plan.stages, saved, inflight):
        cost = st.cost
        time = cost.fwd_time_s + cost.bwd_time_s + cost.comm_time_s
        out.append(f"{human_seconds(time)} f+b+c · weights {human_bytes(cost.param_bytes + cost.buffer_bytes)} · "
                   f"act {human_bytes(c['saved_bytes'])} × {k} · total {human_bytes(cost.memory_bytes)}")
    return out


def _cut_notes(plan: Any) -> list[str]:
    return [f"cut {b.index}: {human_bytes(b.bytes)} ({len(b.values)} value{'s' if len(b.values) != 1 else ''})"
            for b in plan.boundaries]


def _grouping(nodes: list[Any], depth: int) -> tuple[list[Group], dict[str, str]]:
    groups: dict[str, Group] = {}
    of: dict[str, str] = {}
    prev: dict[int, str] = {}  # per stage: the last box a node joined
    for n in nodes:
        if n.op == "placeholder":
            stage, label = -1, n.name
        else:
            stage = int(n.meta.get(_STAGE, 0))
            module = str(n.meta.get(_MODULE, ""))
            if depth and not module and stage in prev:
                # An op outside every module (a residual add) belongs with the block before it.
                key = prev[stage]
                groups[key].nodes.append(n.name)
                of[n.name] = key
                continue
            label = ".".join(module.split(".")[:depth]) if depth and module else n.name
        key = f"s{stage}:{label}"
        groups.setdefault(key, Group(key, label, stage)).nodes.append(n.name)
        of[n.name] = key
        prev[stage] = key
    return list(groups.values()), of


_INDEX = re.compile(r"(?<=\.)(\d+)(?=\.|$)")


def _fold(groups: list[Group]) -> list[list[Group]]:
    """Runs of repeated blocks (layers.3, layers.4, ...) in one stage."""
    merged: list[list[Group]] = []
    for g in groups:
        last = merged[-1][-1] if merged else None
        if last is not None and last.stage == g.stage and g.stage >= 0 and _next_index(last.label, g.label):
            merged[-1].append(g)
        else:
            merged.append([g])
    return merged


def _fit(groups: list[Group], max_boxes: int) -> tuple[list[Group], dict[str, str]]:
    """Fewer boxes: fold runs of repeated blocks, then merge neighbours within a stage."""
    merged = _fold(groups)
    if len(merged) > max_boxes:  # still too many: even chunks per stage
        stages = sorted({run[0].stage for run in merged})
        quota = max(1, (max_boxes - sum(1 for r in merged if r[0].stage < 0)) // max(1, len([s for s in stages if s >= 0])))
        chunked: list[list[Group]] = []
        for s in stages:
            runs = [r for r in merged if r[0].stage == s]
            if s < 0:
                chunked += runs
                continue
            size = -(-len(runs) // quota)
            for i in range(0, len(runs), size):
                chunked.append([g for r in runs[i:i + size] for g in r])
        merged = chunked
    out, new_of = [], {}
    for run in merged:
        if len(run) == 1:
            g = run[0]
        else:
            g = Group(run[0].key, _run_label(run), run[0].stage, [n for x in run for n in x.nodes])
        out.append(g)
        for n in g.nodes:
            new_of[n] = g.key
    return out, new_of


def _next_index(a: str, b: str) -> bool:
    """'layers.3' then 'layers.4' (or a run 'layers.0–3' then 'layers.4'): one repeated block."""
    ma, mb = list(_INDEX.finditer(a)), list(_INDEX.finditer(b))
    if not ma or not mb:
        return False
    x, y = ma[-1], mb[-1]
    return a[:x.start()] == b[:y.start()] and a[x.end():] == b[y.end():] and int(y[1]) == int(x[1]) + 1


def _run_label(run: list[Group]) -> str:
    first, last = run[0].label, run[-1].label
    if all(_next_index(a.label, b.label) for a, b in zip(run, run[1:])):
        m = list(_INDEX.finditer(last))[-1]
        return f"{first}–{m[1]}{last[m.end():]} ×{len(run)}"
    return f"{first} … {last} ({len(run)} groups)"


def _colour(stage: int) -> str:
    return "#ffffff" if stage < 0 else STAGE_COLOURS[stage % len(STAGE_COLOURS)]


def _box_text(g: Group) -> str:
    return g.label if len(g.nodes) == 1 else f"{g.label} ({len(g.nodes)} nodes)"


def to_dot(seg: Segmentation) -> str:
    """Graphviz text: one cluster per stage, cross-stage edges bold and labelled."""
    ids = {g.key: f"n{i}" for i, g in enumerate(seg.groups)}
    out = ["digraph segmentation {", f"  label={_q(seg.title)}; labelloc=t; rankdir=TB;",
           '  node [shape=box, style="filled,rounded", fontname="Helvetica", fontsize=10];']
    for stage in range(-1, seg.n_stages):
        members = [g for g in seg.groups if g.stage == stage]
        if not members:
            continue
        indent = "  "
        if stage >= 0:
            out += [f"  subgraph cluster_stage{stage} {{",
                    f"    label={_q(f'stage {stage}' + (chr(10) + seg.stage_notes[stage] if stage < len(seg.stage_notes) else ''))};",
                    f"    style=filled; fillcolor={_q(_colour(stage) + '55')};"]
            indent = "    "
        for g in members:
            shape = ", shape=ellipse" if stage < 0 else ""
            out.append(f"{indent}{ids[g.key]} [label={_q(_box_text(g))}, fillcolor={_q(_colour(g.stage))}{shape}];")
        if stage >= 0:
            out.append("  }")
    for (src, dst) in seg.edges:
        label = seg.labels.get((src, dst))
        attrs = f' [label={_q(label)}, penwidth=2, color="#d62728", fontsize=9]' if label else ""
        out.append(f"  {ids[src]} -> {ids[dst]}{attrs};")
    out.append("}")
    return "\n".join(out) + "\n"


def _q(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def to_svg(seg: Segmentation, engine: str = "auto") -> str:
    """SVG text; ``engine`` is "auto" (dot if installed), "dot" or "builtin"."""
    if engine == "dot" or (engine == "auto" and shutil.which("dot")):
        done = subprocess.run(["dot", "-Tsvg"], input=to_dot(seg), capture_output=True, text=True, check=False)
        if done.returncode == 0:
            return done.stdout
        if engine == "dot":
            raise RuntimeError(f"dot failed: {done.stderr.strip()}")
    return _builtin_svg(seg)


_BOX_W, _BOX_H, _ROW, _GAP, _TOP = 230, 24, 36, 190, 92


def _builtin_svg(seg: Segmentation) -> str:
    """Stages as columns (model inputs first), boxes in graph order, edges as curves.

    Under each stage's name: its time per micro-batch and its memory (weights, activations
    × micro-batches in flight). Edges that skip a stage run below the columns, never under
    the boxes of the stages they pass.
    """
    columns = [s for s in range(-1, seg.n_stages) if any(g.stage == s for g in seg.groups)]
    col_of = {stage: c for c, stage in enumerate(columns)}
    pos: dict[str, tuple[float, float]] = {}
    for c, stage in enumerate(columns):
        for r, g in enumerate(g for g in seg.groups if g.stage == stage):
            pos[g.key] = (20 + c * (_BOX_W + _GAP), _TOP + r * _ROW)
    width = 40 + len(columns) * (_BOX_W + _GAP) - _GAP
    bottom = max((y for _, y in pos.values()), default=_TOP) + _BOX_H
    by_key = {g.key: g for g in seg.groups}
    skips = [(src, dst) for (src, dst) in seg.edges
             if abs(col_of[by_key[dst].stage] - col_of[by_key[src].stage]) > 1]
    label_lines = sum(len(seg.labels.get(e, "").splitlines()) for e in skips)
    height = bottom + 24 + 14 * len(skips) + 13 * label_lines + 14 * (len(seg.cut_notes) + 1)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
           f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="Helvetica, Arial, sans-serif" font-size="11">',
           '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="6" markerHeight="6" '
           'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="#555"/></marker></defs>',
           '<rect width="100%" height="100%" fill="white"/>',
           f'<text x="20" y="22" font-size="14" font-weight="bold">{escape(seg.title)}</text>']
    for c, stage in enumerate(columns):
        x = 20.0 + c * (_BOX_W + _GAP)
        name = "inputs" if stage < 0 else f"stage {stage}"
        out.append(f'<text x="{x + _BOX_W / 2:.0f}" y="{_TOP - 44}" text-anchor="middle" font-weight="bold">{name}</text>')
        if 0 <= stage < len(seg.stage_notes):  # why the cut is here: time and memory per stage
            time, rest = seg.stage_notes[stage].split(" · ", 1)
            for k, line in enumerate((time, rest)):
                out.append(f'<text x="{x + _BOX_W / 2:.0f}" y="{_TOP - 30 + 12 * k}" text-anchor="middle" '
                           f'font-size="9" fill="#333">{escape(line)}</text>')
    cross = []
    for (src, dst) in seg.edges:
        (x1, y1), (x2, y2) = pos[src], pos[dst]
        if x1 == x2:  # same column: straight down to the next box, else an arc on the left
            if y2 - y1 == _ROW:
                d = f"M {x1 + _BOX_W / 2:.0f} {y1 + _BOX_H:.0f} L {x2 + _BOX_W / 2:.0f} {y2:.0f}"
            else:
                bulge = min(60, 12 + abs(y2 - y1) / _ROW * 4)
                d = (f"M {x1:.0f} {y1 + _BOX_H / 2:.0f} C {x1 - bulge:.0f} {y1 + _BOX_H / 2:.0f} "
                     f"{x2 - bulge:.0f} {y2 + _BOX_H / 2:.0f} {x2:.0f} {y2 + _BOX_H / 2:.0f}")
            out.append(f'<path d="{d}" fill="none" stroke="#888" marker-end="url(#arrow)"/>')
        else:
            cross.append((src, dst))
    placed: list[tuple[float, float]] = []
    lane: float = bottom + 24
    for src, dst in cross:  # drawn last so they sit on top of the columns' arcs
        (x1, y1), (x2, y2) = pos[src], pos[dst]
        sx, sy, ex, ey = x1 + _BOX_W, y1 + _BOX_H / 2, x2, y2 + _BOX_H / 2
        cut = by_key[src].stage >= 0  # edges from the model's inputs are not sends between stages
        stroke = 'stroke="#d62728" stroke-width="2"' if cut else 'stroke="#888"'
        label = seg.labels.get((src, dst))
        lines = label.splitlines() if label else []
        if (src, dst) in skips:
            # Out into the gap, down below every column, across, and up the gap before the target.
            gx1, gx2 = sx + _GAP * 0.25, ex - _GAP * 0.25
            d = (f"M {sx:.0f} {sy:.0f} L {gx1:.0f} {sy:.0f} L {gx1:.0f} {lane:.0f} L {gx2:.0f} {lane:.0f} "
                 f"L {gx2:.0f} {ey:.0f} L {ex:.0f} {ey:.0f}")
            lx, ly = (gx1 + gx2) / 2, lane + 12
            lane += 14 + 13 * len(lines)
        else:
            mid = (sx + ex) / 2
            d = f"M {sx:.0f} {sy:.0f} C {mid:.0f} {sy:.0f} {mid:.0f} {ey:.0f} {ex:.0f} {ey:.0f}"
            lx, ly = mid, (sy + ey) / 2 - 6 - 6 * (len(lines) - 1)  # above a level edge, beside a slanted one
            while any(abs(lx - px) < 80 and abs(ly - py) < 12 * len(lines) for px, py in placed):
                ly += 13  # labels of one cut stack instead of printing over each other
            placed.append((lx, ly))
        out.append(f'<path d="{d}" fill="none" {stroke} marker-end="url(#arrow)"/>')
        for k, line in enumerate(lines):
            out.append(f'<text x="{lx:.0f}" y="{ly + 12 * k:.0f}" text-anchor="middle" fill="#d62728" font-size="10" '
                       f'stroke="white" stroke-width="3" paint-order="stroke">{escape(line)}</text>')
    for g in seg.groups:
        x, y = pos[g.key]
        text = _box_text(g)
        shown = text if len(text) <= 36 else text[:35] + "…"
        rx = 12 if g.stage < 0 else 5
        out.append(f'<g><title>{escape(", ".join(g.nodes))}</title>'
                   f'<rect x="{x:.0f}" y="{y:.0f}" width="{_BOX_W}" height="{_BOX_H}" rx="{rx}" '
                   f'fill="{_colour(g.stage)}" stroke="#444"/>'
                   f'<text x="{x + _BOX_W / 2:.0f}" y="{y + 16:.0f}" text-anchor="middle">{escape(shown)}</text></g>')
    for k, note in enumerate(seg.cut_notes):
        out.append(f'<text x="20" y="{lane + 10 + 14 * k:.0f}" font-size="10" fill="#d62728">{escape(note)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
