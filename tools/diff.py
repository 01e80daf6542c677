"""What the compiler did, as data: pass by pass, graph vs stages, plan vs plan.

Each ``diff_*`` returns a plain dict with stable keys (``--json`` writes it as is) and a
``different`` flag that sets the exit status the way ``diff`` does. ``diff_render``
turns the same dicts into terminal text and HTML, so the three outputs never disagree.
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from typing import Any, Sequence

from partitioner.passes.meta import COST, DESC
from partitioner.tools.summary import plan_summary

__all__ = ["diff_plans", "diff_passes", "diff_stages", "readable_graph"]

_STAGE_METRICS = ("nodes", "param_bytes", "flops", "memory_bytes", "time_s", "boundary_bytes")
_NOT_COMPUTE = ("placeholder", "get_attr", "output")


# -- plan vs plan -----------------------------------------------------------------------------

def diff_plans(a: Any, b: Any) -> dict[str, Any]:
    """Nodes that changed stage, per-stage metric deltas, cut traffic and cut labels."""
    sa, sb = plan_summary(a), plan_summary(b)
    stage_a = {n: st.index for st in a.stages for n in st.nodes}
    stage_b = {n: st.index for st in b.stages for n in st.nodes}
    flows: dict[tuple[int, int], list[str]] = {}
    for node, s in stage_a.items():  # plan order, so node lists read top to bottom
        t = stage_b.get(node)
        if t is not None and t != s:
            flows.setdefault((s, t), []).append(node)
    stages = []
    for i in range(max(a.n_stages, b.n_stages)):
        x = sa["stages"][i] if i < a.n_stages else None
        y = sb["stages"][i] if i < b.n_stages else None
        row: dict[str, Any] = {"index": i}
        for key in _STAGE_METRICS:
            va, vb = (x or {}).get(key), (y or {}).get(key)
            row[key] = {"a": va, "b": vb, "delta": (vb or 0) - (va or 0) if (x or y) else 0}
        row["cut"] = {"a": x["cut"] if x else None, "b": y["cut"] if y else None}
        row["recompute"] = {"a": x["recompute"] if x else None, "b": y["recompute"] if y else None}
        stages.append(row)
    moved_cuts = []
    if a.n_stages == b.n_stages:  # same count: cut i in one plan is cut i in the other
        moved_cuts = [{"index": i, "a": ca, "b": cb} for i, (ca, cb) in enumerate(zip(a.cuts, b.cuts)) if ca != cb]
    pred = {k: {"a": sa["prediction"][k], "b": sb["prediction"][k]}
            for k in ("schedule", "n_microbatches", "microbatch_size", "step_time_s", "bubble_fraction", "bottleneck_s")}
    out = {
        "kind": "plans",
        "a": _head(sa), "b": _head(sb),
        "same_model": a.fingerprint == b.fingerprint,
        "moved": [{"from": s, "to": t, "count": len(ns), "nodes": ns} for (s, t), ns in sorted(flows.items())],
        "only_a": sorted(set(stage_a) - set(stage_b)),
        "only_b": sorted(set(stage_b) - set(stage_a)),
        "stages": stages,
        "traffic": {
            "a": [bd.bytes for bd in a.boundaries], "b": [bd.bytes for bd in b.boundaries],
            "total": {"a": sa["solver"]["total_cut_bytes"], "b": sb["solver"]["total_cut_bytes"],
                      "delta": sb["solver"]["total_cut_bytes"] - sa["solver"]["total_cut_bytes"]},
        },
        "cuts": {
            "removed": [c for c in a.cuts if c not in b.cuts],
            "added": [c for c in b.cuts if c not in a.cuts],
            "kept": [c for c in a.cuts if c in b.cuts],
            "moved": moved_cuts,
        },
        "prediction": pred,
    }
    out["different"] = a.to_json() != b.to_json()
    return out


def _head(s: dict[str, Any]) -> dict[str, Any]:
    return {k: s[k] for k in ("model", "fingerprint", "n_gpus", "n_stages", "device", "link", "cuts")}


# -- pass by pass -----------------------------------------------------------------------------

def readable_graph(snapshot: Any) -> list[str]:
    """One line per node: fx's own text plus the meta that passes add, so a diff shows them.

    Snapshot code alone never changes in an analysis pass (it only writes ``node.meta``);
    printing the meta next to each node is what makes "print IR after each pass" useful here.
    """
    lines = snapshot.code.splitlines()
    metas = list(snapshot.nodes.values())
    if len(lines) != len(metas):  # a multi-line node: keep the plain text rather than misalign
        return lines
    out = []
    for line, meta in zip(lines, metas):
        notes = [f"{k.removeprefix('pp.')}={_brief(k, v)}" for k, v in meta.items() if k not in ("op", "target")]
        out.append(line + ("  # " + " ".join(notes) if notes else ""))
    return out


_COST_FIELDS = re.compile(r"(fwd_flops|bwd_flops|saved_bytes)=([^,)]*)")


def _brief(key: str, value: str) -> str:
    if key == COST:  # the full NodeCost is 300+ characters; these three carry the story
        found = dict(_COST_FIELDS.findall(value))
        if found:
            return "(" + ", ".join(f"{k}={v}" for k, v in found.items()) + ")"
    if key == DESC:
        m = re.match(r"TensorDesc\(shape=(\([^)]*\)), dtype=torch\.(\w+)", value)
        if m:
            return f"{m[1]}:{m[2]}".replace(" ", "")
    return value.replace(" ", "")


def diff_passes(snapshots: Sequence[Any]) -> dict[str, Any]:
    """Consecutive snapshot pairs: unified text diff + nodes added/removed/retargeted + meta keys."""
    steps = []
    for before, after in zip(snapshots, snapshots[1:]):
        old, new = before.nodes, after.nodes
        added = [n for n in new if n not in old]
        removed = [n for n in old if n not in new]
        retargeted = [{"node": n, "before": f"{old[n]['op']} {old[n]['target']}", "after": f"{new[n]['op']} {new[n]['target']}"}
                      for n in new if n in old and (old[n]["op"], old[n]["target"]) != (new[n]["op"], new[n]["target"])]
        meta: dict[str, dict[str, list[str]]] = {}
        key_counts: Counter[str] = Counter()
        for n in new:
            if n not in old:
                continue
            keys = set(old[n]) | set(new[n])
            change = {
                "added": sorted(k for k in keys if k not in old[n]),
                "removed": sorted(k for k in keys if k not in new[n]),
                "changed": sorted(k for k in keys if k in old[n] and k in new[n] and old[n][k] != new[n][k]
                                  and k not in ("op", "target")),
            }
            if any(change.values()):
                meta[n] = change
                key_counts.update(f"{k} {what}" for what, ks in change.items() for k in ks)
        text = list(difflib.unified_diff(readable_graph(before), readable_graph(after),
                                         f"after {before.after}", f"after {after.after}", lineterm="", n=1))
        steps.append({
            "before": before.after, "after": after.after, "seconds": after.seconds,
            "counts": {"nodes_before": len(old), "nodes_after": len(new), "added": len(added),
                       "removed": len(removed), "retargeted": len(retargeted), "meta_changed": len(meta)},
            "added": added, "removed": removed, "retargeted": retargeted,
            "meta_keys": dict(sorted(key_counts.items())), "meta": meta, "unified_diff": text,
        })
    return {"kind": "passes", "passes": [s.after for s in snapshots], "steps": steps,
            "different": any(s["unified_diff"] for s in steps)}


# -- original graph vs stages ---------------------------------------------------------------------

def diff_stages(graph: Any, stages: Sequence[Any], plan: Any) -> dict[str, Any]:
    """Every original compute node in exactly one stage; what each cut inserted."""
    original = [n.name for n in graph.graph.nodes if n.op not in _NOT_COMPUTE]
    where: dict[str, list[int]] = {}
    rows = []
    for i, gm in enumerate(stages):
        nodes = [n for n in gm.graph.nodes]
        compute = [n.name for n in nodes if n.op not in _NOT_COMPUTE]
        for name in compute:
            where.setdefault(name, []).append(i)
        inputs = [n.name for n in nodes if n.op == "placeholder"]
        outputs = [a.name for a in _flat_args(next(n for n in nodes if n.op == "output").args)]
        rows.append({
            "index": i, "nodes": len(compute), "inputs": inputs, "outputs": outputs,
            # received and sent on untouched: a skip connection riding through this stage
            "passed_through": [v for v in inputs if v in outputs],
            "plan_agrees": list(plan.stages[i].nodes) == compute if i < plan.n_stages else False,
        })
    known = set(original)
    violations = (
        [{"node": n, "problem": "in no stage"} for n in original if n not in where]
        + [{"node": n, "problem": f"in stages {where[n]}"} for n in original if len(where.get(n, [])) > 1]
        + [{"node": n, "problem": f"in stage {where[n][0]} but not in the original graph"}
           for n in where if n not in known]
        + [{"node": f"stage {r['index']}", "problem": "stage nodes differ from the plan's"}
           for r in rows if not r["plan_agrees"]]
    )
    return {"kind": "stages", "original_nodes": len(original), "n_stages": len(stages), "stages": rows,
            "cuts": list(plan.cuts), "violations": violations, "different": bool(violations)}


def _flat_args(args: Any) -> list[Any]:
    if isinstance(args, (tuple, list)):
        return [x for a in args for x in _flat_args(a)]
    return [args] if hasattr(args, "name") and hasattr(args, "op") else []
