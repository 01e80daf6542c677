"""Choose the linear order of a multi-branch graph: fewer bytes crossing each position.

The solver splits one linear order of the compute nodes into contiguous stages, and a cut
before position ``k`` pays for every value produced before ``k`` and used at or after it
(``partitioner/pricing.py``). fx records nodes in the order ``forward`` ran them, which for
a graph with parallel branches is one of many valid orders: two towers written layer by
layer in one loop interleave, so every cut carries both towers' activations; parallel
branches of an Inception block leave the block's input live across all of them. The
solver is exact *over the order it is given*; this pass chooses that order.

``OrderForCuts`` builds the data-flow DAG with networkx and scores three topological
orders by the bytes live across each position (at the example sizes ``B``/``S``):

- the order fx recorded;
- greedy list scheduling: of the ready nodes, take the one that adds the fewest live bytes
  (its output minus the inputs it is the last user of), preferring a user of the node just
  placed (finish a branch before opening another), then the recorded order;
- demand order: a depth-first post-order from the outputs over the reversed DAG
  (``networkx.dfs_postorder_nodes``), visiting an operand's branch before the next operand's,
  so each branch is contiguous.

It keeps the order with the smallest total bytes over all positions (ties: smaller maximum,
then the recorded order), and only if that total is below ``1 - min_gain`` of the recorded
one: a graph with no real branching (a transformer, an MLP) keeps its recorded order
exactly. The graph is reordered in a new ``GraphModule`` sharing the original's modules
and tensors, so the captured graph (and its fingerprint) is untouched; the report
(``gm.meta["pp.order"]``) says what changed. With ``pipe_split()`` markers the user chose
the cuts in the recorded order, and the pass keeps it.

A plan lists each stage's nodes in the order chosen. ``Plan.apply`` takes that order when
it is a valid order of the model's graph (``pin_order``): the pass then keeps it instead of
choosing again, so a plan re-applies with exactly the stages it names.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import networkx as nx
from torch import fx

from partitioner.cost_models.cost import evaluate
from partitioner.passes.base import Pass, TensorDesc
from partitioner.passes.errors import GraphError
from partitioner.passes.liveness import Liveness
from partitioner.passes.meta import DESC, EXAMPLE, MARKERS, ORDER, ORDER_PINNED
from partitioner.passes.split import copy_persistence

__all__ = ["OrderForCuts", "OrderReport", "crossing_bytes", "pin_order", "value_sizes"]

log = logging.getLogger(__name__)

_NOT_COMPUTE = ("placeholder", "get_attr", "output")


@dataclass(frozen=True)
class OrderReport:
    """What ``OrderForCuts`` chose: totals over every position, before and after."""

    chosen: str  # "recorded", "greedy" or "demand"
    moved: int  # compute nodes whose position changed
    total_before: int  # sum over positions of the bytes crossing, recorded order
    total_after: int
    max_before: int  # the largest crossing, recorded order
    max_after: int

    def note(self) -> str:
        return (f"order: {self.chosen} order of the branches ({self.moved} nodes moved): bytes crossing a position "
                f"{self.total_before / max(self.total_after, 1):.2f}x fewer in total, max "
                f"{self.max_before} -> {self.max_after} B")


def _leaves(desc: Any) -> list[Any]:
    if isinstance(desc, TensorDesc):
        return [desc]
    if isinstance(desc, (list, tuple)):
        return [x for d in desc for x in _leaves(d)]
    if isinstance(desc, dict):
        return [x for d in desc.values() for x in _leaves(d)]
    return [desc]


def value_sizes(gm: fx.GraphModule, at: dict[str, int]) -> dict[fx.Node, int]:
    """Bytes of each node's output at ``at`` ({"B": .., "S": ..}): tensors by their
    ``pp.desc``; any other value 8 (what pricing charges a non-tensor crossing a cut)."""
    out: dict[fx.Node, int] = {}
    for n in gm.graph.nodes:
        if n.op == "output":
            continue
        total = 0
        for leaf in _leaves(n.meta.get(DESC)):
            total += evaluate(leaf.nbytes(), at.get("B", 1), at.get("S", 1)) if isinstance(leaf, TensorDesc) else 8
        out[n] = total
    return out


def crossing_bytes(gm: fx.GraphModule, order: Sequence[fx.Node], size: dict[fx.Node, int]) -> list[int]:
    """Bytes live across each position 1..n-1 of ``order`` (a cut before ``order[k]``), the
    way ``pricing.price`` counts them: produced before ``k``, used at or after it."""
    return Liveness(gm, order).totals(lambda v: size.get(v, 0))[1:len(order)]


def _dag(order: Sequence[fx.Node]) -> nx.DiGraph:
    g = nx.DiGraph()
    g.add_nodes_from(order)
    inside = set(order)
    for u in order:
        for a in u.all_input_nodes:
            if a in inside:
                g.add_edge(a, u)
    return g


def _greedy(order: Sequence[fx.Node], g: nx.DiGraph, size: dict[fx.Node, int]) -> list[fx.Node]:
    index = {n: i for i, n in enumerate(order)}
    remaining_users = {n: len(n.users) for n in size}
    indeg = {n: g.in_degree(n) for n in order}

    def delta(u: fx.Node) -> int:
        freed = sum(size.get(a, 0) for a in set(u.all_input_nodes) if remaining_users.get(a) == 1)
        return size.get(u, 0) - freed

    out: list[fx.Node] = []
    ready = [n for n in order if indeg[n] == 0]
    while ready:
        last = out[-1] if out else None
        best = min(ready, key=lambda u: (delta(u), 0 if last is not None and last in u.all_input_nodes else 1,
                                         index[u]))
        ready.remove(best)
        out.append(best)
        for a in set(best.all_input_nodes):
            if a in remaining_users:
                remaining_users[a] -= 1
        for s in g.successors(best):
            indeg[s] -= 1
            if indeg[s] == 0:
                ready.append(s)
    return out


def _demand(order: Sequence[fx.Node], g: nx.DiGraph) -> list[fx.Node]:
    index = {n: i for i, n in enumerate(order)}
    sinks = [n for n in order if g.out_degree(n) == 0]
    rev = g.reverse(copy=False)
    out: list[fx.Node] = []
    seen: set[fx.Node] = set()
    for sink in sorted(sinks, key=index.__getitem__):
        # operands in the order the node names them: each operand's branch is finished before the next's
        for n in nx.dfs_postorder_nodes(rev, sink, sort_neighbors=lambda ns: sorted(ns, key=index.__getitem__)):
            if n not in seen:
                seen.add(n)
                out.append(n)
    return out


def _valid(order: Sequence[fx.Node], g: nx.DiGraph) -> bool:
    pos = {n: i for i, n in enumerate(order)}
    return len(pos) == g.number_of_nodes() and all(pos[a] < pos[b] for a, b in g.edges)


@dataclass(frozen=True)
class OrderForCuts(Pass):
    """Reorder the compute nodes (a valid topological order) to cut fewer bytes; see the module
    docstring. ``min_gain``: the fraction the total crossing bytes must drop by."""

    name = "order-for-cuts"
    requires = (DESC,)
    graph_provides = (ORDER,)

    min_gain: float = 0.05

    def run(self, gm: fx.GraphModule) -> fx.GraphModule:
        order = [n for n in gm.graph.nodes if n.op not in _NOT_COMPUTE]
        at = dict(gm.meta.get(EXAMPLE) or {})
        size = value_sizes(gm, at)
        before = crossing_bytes(gm, order, size)
        top = max(before, default=0)
        keep = OrderReport("recorded", 0, total_before=sum(before), total_after=sum(before), max_before=top, max_after=top)
        pinned = gm.meta.get(ORDER_PINNED)
        if pinned is not None:  # re-applying a plan: its order, checked by pin_order
            by_name = {n.name: n for n in order}
            chosen = [by_name[name] for name in pinned]
            if chosen == order:
                gm.meta[ORDER] = keep
                return gm
            after = crossing_bytes(gm, chosen, size)
            out = _reordered(gm, chosen)
            out.meta[ORDER] = OrderReport("plan", sum(1 for a, b in zip(order, chosen) if a is not b),
                                          total_before=sum(before), total_after=sum(after), max_before=top,
                                          max_after=max(after, default=0))
            return out
        if int(gm.meta.get(MARKERS, 0)) or len(order) < 3:
            gm.meta[ORDER] = keep
            return gm
        g = _dag(order)
        if not nx.is_directed_acyclic_graph(g):  # fx graphs are; a cycle means a broken graph, not ours to fix
            gm.meta[ORDER] = keep
            return gm
        best = ("recorded", order, before)
        for label, cand in (("greedy", _greedy(order, g, size)), ("demand", _demand(order, g))):
            if not _valid(cand, g):
                log.debug("order: %s order is not topological; skipped", label)
                continue
            cross = crossing_bytes(gm, cand, size)
            if (sum(cross), max(cross, default=0)) < (sum(best[2]), max(best[2], default=0)):
                best = (label, cand, cross)
        label, chosen, after = best
        if label == "recorded" or sum(after) > (1 - self.min_gain) * sum(before):
            log.debug("order: recorded order kept (best %s: total %d vs %d)", label, sum(after), sum(before))
            gm.meta[ORDER] = keep
            return gm
        moved = sum(1 for a, b in zip(order, chosen) if a is not b)
        report = OrderReport(label, moved, total_before=sum(before), total_after=sum(after),
                             max_before=max(before), max_after=max(after))
        log.debug("%s", report.note())
        out = _reordered(gm, chosen)
        out.meta[ORDER] = report
        return out


def _reordered(gm: fx.GraphModule, order: Sequence[fx.Node]) -> fx.GraphModule:
    """A new GraphModule (same modules and tensors) whose compute nodes run in ``order``;
    placeholders and attributes first, the output last, every name and node.meta kept."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    head = [n for n in gm.graph.nodes if n.op in ("placeholder", "get_attr")]
    tail = [n for n in gm.graph.nodes if n.op == "output"]
    for n in [*head, *order, *tail]:
        env[n] = graph.node_copy(n, lambda a: env[a])
        env[n].meta = dict(n.meta)
    out = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    copy_persistence(gm, out)  # GraphModule registers get_attr buffers as persistent: keep the model's choice
    out.meta.update(gm.meta)
    names = [n.name for n in out.graph.nodes]
    if names != [n.name for n in [*head, *order, *tail]]:  # fx renamed a node: the plan would not match
        raise GraphError(f"reordering renamed graph nodes (first names {names[:3]}); the plan's node names "
                         "would not match the model's graph: report this with the model")
    return out


def pin_order(gm: fx.GraphModule, names: Sequence[str]) -> list[fx.Node]:
    """The compute nodes of ``gm`` in the order ``names`` gives (a plan's stages, concatenated),
    if that is a valid order of the graph: the same nodes, each after its inputs. Then the
    order is pinned (``gm.meta["pp.order_pinned"]``) so ``OrderForCuts`` keeps it when the plan
    is re-applied. Otherwise the graph's recorded order, unpinned: the caller's checks against
    it say what is wrong with the plan."""
    order = [n for n in gm.graph.nodes if n.op not in _NOT_COMPUTE]
    by_name = {n.name: n for n in order}
    if len(names) != len(order) or set(names) != set(by_name):
        return order
    chosen = [by_name[name] for name in names]
    pos = {n: i for i, n in enumerate(chosen)}
    if any(pos[a] >= pos[n] for n in chosen for a in n.all_input_nodes if a in pos):
        return order
    gm.meta[ORDER_PINNED] = tuple(names)
    return chosen
