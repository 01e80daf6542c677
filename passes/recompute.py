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

Mode ``"selective-op"`` (torchtitan's op-level selective checkpointing) checkpoints the same
block regions as ``"full"``, with PyTorch's ``create_selective_checkpoint_contexts`` and
``sac_policy``: the outputs of the attention kernels and of every other ``aten.mm`` are kept
in forward, everything else in the region is recomputed in backward.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Sequence

import torch
import torch.utils.checkpoint
from torch import fx

from partitioner.passes.meta import RECOMPUTE, RECOMPUTE_MODE
from partitioner.passes.split import compute_nodes, copy_persistence, split_graph

__all__ = ["RecomputeStage", "with_recompute", "REGION", "SAC_SAVE", "sac_policy", "checkpoint"]

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
    keep = sac_policy if self.recompute_mode == "selective-op" else None
    for i, (seg, region) in enumerate(segments):
        if region and torch.is_grad_enabled():
            values = checkpoint(seg, *values, keep=keep)
        else:
            values = seg(*values)
    return values


_aten = torch.ops.aten
#: The ops whose outputs ``sac_policy`` keeps: torchtitan's ``_save_list`` for op-level selective
#: checkpointing (``aten.mm`` and the SDPA kernels), with every SDPA backend this torch has
#: (cuDNN's and the CPU flash kernel besides flash and memory-efficient), less the collectives
#: and Float8's ``max`` that a stage region does not run.
SAC_SAVE = frozenset({
    _aten.mm.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
})

Policy = Callable[..., torch.utils.checkpoint.CheckpointPolicy]


def sac_policy(observe: Callable[[Any], None] | None = None) -> Policy:
    """A fresh policy for one checkpoint call (its mm counter starts at zero), torchtitan's rule:
    keep (``MUST_SAVE``) the output of each op in ``SAC_SAVE`` except every second ``aten.mm``
    (the 2nd, 4th, ... of the region, counted apart in forward and in the recomputation, so both
    agree), recompute everything else (``PREFER_RECOMPUTE``). ``observe`` is called with every
    output kept in forward (``partitioner.memory.measure_saved`` counts them)."""
    counts: dict[bool, int] = defaultdict(int)
    must, redo = torch.utils.checkpoint.CheckpointPolicy.MUST_SAVE, torch.utils.checkpoint.CheckpointPolicy.PREFER_RECOMPUTE

    def policy(ctx: Any, func: Any, *args: Any, **kwargs: Any) -> torch.utils.checkpoint.CheckpointPolicy:
        save = func in SAC_SAVE
        if func is _aten.mm.default:
            counts[ctx.is_recompute] += 1
            save = counts[ctx.is_recompute] % 2 == 1
        if save and observe is not None and not ctx.is_recompute:
            observe(ctx.op_output)
        return must if save else redo

    return policy


def checkpoint(fn: Any, *args: Any, keep: Callable[[], Policy] | None = None) -> Any:
    """The one call that recomputes (tests wrap it to see what a region keeps). ``keep``: makes
    the selective policy of this call (``sac_policy``); None recomputes the whole region."""
    if keep is None:
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    make = keep  # a fresh policy (and counter) per forward, as the context_fn contract asks
    return torch.utils.checkpoint.checkpoint(
        fn, *args, use_reentrant=False,
        context_fn=lambda: torch.utils.checkpoint.create_selective_checkpoint_contexts(make()))
