"""A plan reduced to the numbers people compare: one dict per stage, plus the prediction.

``show`` prints it, ``show --json`` writes it, ``diff`` subtracts two of them. Keys are
stable: scripts read them.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["plan_summary", "cut_label"]

_CALL_SUFFIX = re.compile(r"_\d+$")


def _cut_label(cut: Any, left: Any, right: Any) -> str:
    return cut_label(cut.label, left.nodes[-1], right.nodes[0])


def cut_label(label: str, last: str, first: str) -> str:
    """The plan's module-path label, with the node names either side added when the label
    alone is ambiguous: a module called more than once (fx names its calls ``act``,
    ``act_1``, ...) appears at several places in the graph."""
    if "[" in label or "|" not in label:
        return label  # already names the nodes
    left, right = (p.strip() for p in label.split("|", 1))
    reused = [(node, path) for node, path in ((last, left), (first, right))
              if _CALL_SUFFIX.search(node) and _CALL_SUFFIX.sub("", node) == path.replace(".", "_")]
    return f"{label} [{last} | {first}]" if reused else label


def plan_summary(plan: Any) -> dict[str, Any]:
    """Per-stage nodes, parameter bytes, FLOPs (fwd+bwd), memory, time, boundary bytes, cut."""
    micro = plan.prediction.microbatch_size
    flops = plan.cost_at(micro)  # polynomials in B/S, evaluated at the plan's micro-batch
    p_inflight = list(plan.prediction.peak_inflight)
    stages = []
    for st, f in zip(plan.stages, flops):
        c = st.cost
        cut = plan.boundaries[st.index] if st.index < len(plan.boundaries) else None
        stages.append({
            "index": st.index,
            "rank": st.rank,
            "nodes": len(st.nodes),
            "first_node": st.nodes[0],
            "last_node": st.nodes[-1],
            "param_bytes": c.param_bytes,
            "fwd_flops": f["fwd_flops"],
            "bwd_flops": f["bwd_flops"],
            "flops": f["fwd_flops"] + f["bwd_flops"],
            "memory_bytes": c.memory_bytes,
            "static_bytes": c.static_bytes,  # weights + grads + optimizer state (precision, optimizer)
            "recompute": st.recompute,
            "weight_bytes": c.param_bytes + c.buffer_bytes,
            "activation_bytes": f["saved_bytes"],  # per micro-batch in flight
            "inflight": p_inflight[st.index] if st.index < len(p_inflight) else 1,
            "fwd_time_s": c.fwd_time_s,
            "bwd_time_s": c.bwd_time_s,
            "comm_time_s": c.comm_time_s,
            "time_s": c.fwd_time_s + c.bwd_time_s + c.comm_time_s,
            "boundary_bytes": cut.bytes if cut else 0,  # sent on to the next stage, one direction
            "cut": _cut_label(cut, st, plan.stages[st.index + 1]) if cut else None,
        })
    p, s = plan.prediction, plan.solver
    return {
        "model": plan.model,
        "fingerprint": plan.fingerprint,
        "n_gpus": plan.options.get("n_gpus"),
        "n_stages": plan.n_stages,
        "device": plan.device.get("name"),
        "link": plan.link.get("name"),
        "cuts": list(plan.cuts),
        "stages": stages,
        "prediction": {
            "schedule": p.schedule,
            "n_microbatches": p.n_microbatches,
            "microbatch_size": p.microbatch_size,
            "step_time_s": p.step_time_s,
            "bubble_fraction": p.bubble_fraction,
            "bottleneck_s": p.bottleneck_s,
            "peak_inflight": list(p.peak_inflight),
            **({"rank_memory_bytes": list(p.rank_memory_bytes)} if p.rank_memory_bytes else {}),
        },
        "solver": {
            "bottleneck_s": s.bottleneck_s,
            "lower_bound_s": s.lower_bound_s,
            "optimal": s.optimal,
            "total_cut_bytes": s.total_cut_bytes,
        },
        "notes": list(plan.notes),
        "mesh": {"dp": plan.mesh.dp, "pp": plan.pp_ranks, "dims": list(plan.mesh.dims),
                 "gpus_per_node": plan.mesh.gpus_per_node, "zero": plan.mesh.zero,
                 "allreduce_exposed_s": plan.mesh.exposed_s,
                 **({"tp": plan.mesh.tp} if plan.mesh.tp > 1 else {}),
                 **({"shard": plan.mesh.shard} if plan.mesh.shard else {})},
    }
