"""Outlining repeated blocks of a ``torch.export`` stage graph into calls, for FSDP units.

A stage captured with ``torch.export`` (every Hugging Face model) reads each parameter by
``get_attr`` (``model.layers.3.self_attn.q_proj.weight``) and never calls a module. FSDP2's
units work by module hooks (gather before the module's forward, free after it, gather again
before its backward, reduce-scatter after it), which fire only when a module is *called*;
without calls the whole stage is one unit, gathered at once.

``outline_blocks(stage)`` rewrites the stage graph so that each block with a span
(``partitioner.memory.fsdp_spans``, the rule the planner prices with) runs as one
``call_module`` of a small ``fx.GraphModule`` installed at the block's own path
(``model.layers.3``), whose graph is the span's nodes with ``get_attr`` targets relative to
the block. Its parameters are the same ``Parameter`` objects under the same fully qualified
names, so state dicts, DCP checkpoints, tied-weight names and optimizers see the model's
names; ``fully_shard`` on the installed module then gives FSDP2's own hooks, and with them
both of ``runtime.fsdp``'s modes, mixed precision, and the split backward's hand-made weight
gradients (autograd sees the same operations on the same gathered tensors). The token
embeddings and the output head that are units of their own (``memory.fsdp_role_spans``: an
``aten.embedding`` / the last ``aten.linear`` and their get_attr weights) are outlined the same
way, each into a call of the module holding its weights (``model.embed_tokens``, ``lm_head``).

Why a graph transform rather than driving ``FSDPModule.unshard()`` / ``reshard()`` from the
interpreter at a block's first and last ``get_attr``: FSDP's hooks also register the
pre-backward gather on the block's outputs, the post-backward reduce-scatter on its inputs'
gradients, backward prefetching and the root's final callback; re-creating those by hand
would be a second FSDP. Outlining hands FSDP an ordinary module call and changes nothing
else. The graph's node sequence is the same (the span's nodes run inside the call, in
order), so results are bitwise those of the flat graph.

Recomputation (``partitioner.passes.recompute``): a checkpointed region that covers the
block's span marks the call (the call is recomputed, FSDP gathering for it in backward as for
any checkpointed FSDP module); regions inside the span are checkpointed inside the block (it
becomes a ``RecomputeStage``). A region that only partly overlaps the span leaves the block in
the stage's own unit (logged), which is correct but gathers more than priced.
"""

from __future__ import annotations

import logging
import operator

from torch import fx, nn

from partitioner.memory import fsdp_role_spans, fsdp_spans
from partitioner.passes.recompute import REGION, RecomputeStage, with_recompute
from partitioner.passes.split import copy_persistence

__all__ = ["outline_blocks"]

log = logging.getLogger("partitioner.runtime")


def outline_blocks(gm: nn.Module) -> list[str]:
    """Outline every block of ``gm``'s graph that has a span (``memory.fsdp_spans``) into a
    call of that block, and each embedding and the output head that is a unit of its own
    (``memory.fsdp_role_spans``: the operation and its get_attr weights) into a call of the
    module holding the weights, in place; returns the module paths outlined, in graph order
    (none for a graph that calls its leaves, as the ``torch.fx`` route's do, or that is
    already outlined)."""
    if not isinstance(gm, fx.GraphModule):
        return []
    pos = {n: i for i, n in enumerate(gm.graph.nodes)}
    # the blocks' spans and the embeddings' and head's, found on the graph before any is moved
    spans = sorted({**fsdp_spans(gm), **fsdp_role_spans(gm)}.items(), key=lambda kv: pos[kv[1][0]])
    done = [block for block, nodes in spans if _outline(gm, block, nodes)]
    if done:
        gm.graph.lint()
        gm.recompile()
    return done


def _regions(gm: fx.GraphModule, nodes: list[fx.Node]) -> tuple[bool, object, bool]:
    """(can outline, the region marking the call or None, whether regions lie inside)."""
    compute = [n for n in nodes if n.op != "get_attr"]
    labels = {n.meta[REGION] for n in compute if REGION in n.meta}
    if not labels:
        return True, None, False
    members: dict[object, set[fx.Node]] = {}
    for n in gm.graph.nodes:
        if REGION in n.meta:
            members.setdefault(n.meta[REGION], set()).add(n)
    span = set(compute)
    if len(labels) == 1 and all(REGION in n.meta for n in compute):
        (label,) = labels
        if span <= members[label] and not members[label] <= span:
            return True, label, False  # the region covers the block: the call is recomputed
    if all(members[r] <= span for r in labels):
        return True, None, True  # regions inside the block: checkpointed inside its call
    return False, None, False


def _outline(gm: fx.GraphModule, block: str, nodes: list[fx.Node]) -> bool:
    ok, label, nested = _regions(gm, nodes)
    if not ok:
        log.warning("FSDP: block %s is not outlined: a recomputed region overlaps it only in part; it stays "
                    "in the stage's unit (gathered with the whole stage)", block)
        return False
    inside = set(nodes)
    ins: list[fx.Node] = []
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in inside and a not in ins:
                ins.append(a)
    outs = [n for n in nodes if any(u not in inside for u in n.users)]
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for a in ins:  # the values the span takes from the stage, other attributes read inside it included
        env[a] = graph.placeholder(a.name)
        env[a].meta = dict(a.meta)
    for n in nodes:
        env[n] = graph.node_copy(n, env.__getitem__)
        if n.op in ("get_attr", "call_module"):
            env[n].target = str(n.target)[len(block) + 1:]
        if not nested:
            env[n].meta.pop(REGION, None)
    graph.output(tuple(env[n] for n in outs))
    old = gm.get_submodule(block)
    sub = fx.GraphModule(old, graph, class_name="Block")
    copy_persistence(old, sub)
    if nested:
        regions: dict[object, list[str]] = {}
        for n in graph.nodes:
            if REGION in n.meta:
                regions.setdefault(n.meta[REGION], []).append(n.name)
        mode = gm.recompute_mode if isinstance(gm, RecomputeStage) else "selective"
        sub = with_recompute(sub, list(regions.values()), mode)
    parent, _, leaf = block.rpartition(".")
    setattr(gm.get_submodule(parent), leaf, sub)
    g = gm.graph
    with g.inserting_after(nodes[-1]):
        call = g.call_module(block, tuple(ins))
    items: list[fx.Node] = []
    for i, n in enumerate(outs):  # the call's results, in order, where the span's values were
        with g.inserting_after(items[-1] if items else call):
            items.append(g.call_function(operator.getitem, (call, i)))
        items[-1].meta = {k: v for k, v in n.meta.items() if k != REGION}
    for item, n in zip(items, outs):
        n.replace_all_uses_with(item, delete_user_cb=lambda u: u not in inside)
    if label is not None:
        for m in (call, *items):
            m.meta[REGION] = label
    for n in reversed(nodes):
        g.erase_node(n)
    return True
