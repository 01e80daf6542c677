"""Codegen for recomputation: a stage whose chosen regions run under activation checkpointing.

``with_recompute(stage, regions, mode)`` returns a ``RecomputeStage``: the same graph, the
same parameters under the same names (state_dict keys unchanged), whose ``forward`` runs
the graph as a chain of segments (``partitioner.passes.split.split_graph`` over the stage's own graph)
and calls each region segment through ``torch.utils.checkpoint.checkpoint(...,
use_reentrant=False)``: during forward only the region's inputs are kept; backward runs
the region again (with the same RNG state, so dropout masks repeat) to get what its
gradients need. Outside ``torch.is_grad_enabled()`` the segments run plainly.

The regions live in the graph (``node.meta["pp.recompute"]`` = region index, and
``graph`` meta ``pp.recompute_mode``), so a deep copy (``build_stage``) keeps them: the
copy is a ``RecomputeStage`` again. The segments are built lazily and rebuilt whenever
the stage's tensors change identity (``.to()``, ``load_state_dict(assign=True)``).
Pickling a stage (``torch.save`` of the module) keeps only fx's generated code, i.e.
the plain, non-recomputing forward: save ``state_dict()`` instead.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.utils.checkpoint
from torch import fx

from partitioner.passes.meta import RECOMPUTE, RECOMPUTE_MODE
from partitioner.passes.split import compute_nodes, copy_persistence, split_graph

__all__ = ["RecomputeStage", "with_recompute", "REGION"]

#: ``node.meta`` key: index of the checkpointed region the node belongs to (``passes/meta.py``).
REGION = RECOMPUTE


def with_recompute(stage: fx.GraphModule, regions: Sequence[Sequence[str]], mode: str) -> fx.GraphModule:
    """``stage`` with each region (a list of consecutive compute-node names) checkpointed."""
    if not regions:
        return stage
    where = {name: r for r, names in enumerate(regions) for name in names}
    for node in stage.graph.nodes:
        node.meta.pop(REGION, None)
        if node.name in where:
            node.meta[REGION] = where[node.name]
    graph = stage.graph
    out = RecomputeStage(stage, graph, class_name=type(stage).__name__)
    out.meta[RECOMPUTE_MODE] = mode
    copy_persistence(stage, out)
    return out


class RecomputeStage(fx.GraphModule):
    """A stage GraphModule that checkpoints the regions marked in its graph."""

    def recompile(self) -> Any:
        code = super().recompile()
        if any(REGION in n.meta for n in self.graph.nodes):
            type(self).forward = _checkpointed_forward  # the per-instance class fx made
        self.__dict__.pop("_pp_segments", None)
        return code

    @property
    def recompute_mode(self) -> str:
        return str(self.meta.get(RECOMPUTE_MODE, "full"))

    def regions(self) -> list[list[str]]:
        """The checkpointed regions, as node names, in order."""
        out: dict[int, list[str]] = {}
        for n in self.graph.nodes:
            if REGION in n.meta:
                out.setdefault(n.meta[REGION], []).append(n.name)
        return [out[k] for k in sorted(out)]


def _segments(self: RecomputeStage) -> list[tuple[fx.GraphModule, bool]]:
    """The chain of segments (module, checkpointed?), cached while the tensors stay the same."""
    key = tuple(id(t) for t in self.parameters()) + tuple(id(t) for t in self.buffers())
    hit = self.__dict__.get("_pp_segments")
    if hit is not None and hit[0] == key:
        return hit[1]  # type: ignore[no-any-return]
    order = compute_nodes(self)
    labels: list[Any] = []
    for n in order:
        labels.append(("r", n.meta[REGION]) if REGION in n.meta else ("p", None))
    seg_of: dict[str, int] = {}
    kinds: list[bool] = []
    prev: Any = object()
    for n, lab in zip(order, labels):
        if lab != prev:
            kinds.append(lab[0] == "r")
            prev = lab
        seg_of[n.name] = len(kinds) - 1
    split = split_graph(self, seg_of, len(kinds))
    segments = [(m, r) for m, r in zip(split.stages, kinds)]
    self.__dict__["_pp_segments"] = (key, segments)
    return segments


def _checkpointed_forward(self: RecomputeStage, *args: Any) -> Any:
    values: Any = args
    segments = _segments(self)
    for i, (seg, region) in enumerate(segments):
        if region and torch.is_grad_enabled():
            values = checkpoint(seg, *values)
        else:
            values = seg(*values)
    return values


def checkpoint(fn: Any, *args: Any) -> Any:
    """The one call that recomputes (tests wrap it to see what a region keeps)."""
    return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
