"""The planner's view of one tensor-parallel rank: a graph priced per rank, and node times with the all-reduces.

``view(gm, degree)`` copies the annotated graph (nodes, their ``node.meta``, ``gm.meta``;
the parameters are shared, not copied) with each sharded node's cost replaced by one
rank's share (``passes.tensor_parallel.shard``) and the divisor of each sharded parameter
recorded in ``gm.meta["pp.tp"]``, so pricing, the exact memory model and the solver plan
one rank of the group exactly as they plan a whole GPU. ``node_time`` adds to a node's
forward and backward seconds the ring all-reduces the region makes there, on the link
inside the group (NVLink: tensor parallelism stays inside a node).

With sequence parallelism (``view(gm, T, sequence_parallel=True)``) each region's all-reduce
becomes a ring all-gather of its input before the column linears and a ring reduce-scatter
of its row linears' output (backward: a reduce-scatter and an all-gather), each (T-1) steps
of bytes/T, on the same link: the pair costs what the all-reduce did. The ops between the
regions are priced on S/T tokens with 1/T of their activations (``passes.tensor_parallel``).

Boundary tensors between stages are replicated on every rank of a group, and the runtime
sends each once per group (``runtime.dist``, Megatron's scatter/gather): each of the T ranks
sends 1/T of the message to the rank of the same index in the next stage's group, over its
own link (the T pairs in parallel), and the receiving group all-gathers the chunks on the
link inside the group. ``boundary_time`` prices a cut so: ``link.transfer_time(bytes / T)``
plus a ring all-gather of the whole message on the group's link (a message too small to
split goes whole, as the runtime sends it). Without tensor parallelism it is
``link.transfer_time`` itself, so such plans price as before. With sequence parallelism the
values crossing a cut are split on the sequence already: each rank sends its own 1/T and
nothing is gathered (``boundary_time(..., sequence_parallel=True)``), and a region whose input
no row output has split yet (the first after the embedding) is priced as the gradient
all-reduce the runtime runs there, not as a gather/scatter pair.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Mapping

from torch import fx

from partitioner.cost_models.cost import evaluate
from partitioner.cost_models.devices import LinkSpec
from partitioner.data_parallel import allgather_s, boundary_time, reduce_scatter_s, ring_allreduce_s
from partitioner.passes.errors import GraphError
from partitioner.passes.meta import COST, TP
from partitioner.passes.tensor_parallel import Sharded, param_divisor, shard

__all__ = ["view", "node_time", "param_divisor", "boundary_time", "region_cuts"]

NodeTime = Callable[[Any, Mapping[str, int]], "tuple[float, float]"]


def view(gm: fx.GraphModule, degree: int, *, sequence_parallel: bool = False) -> tuple[fx.GraphModule, Sharded]:
    """``gm`` as one rank of a ``degree``-way tensor-parallel group sees it (module docstring)."""
    sharded = shard(gm, degree, sequence_parallel=sequence_parallel)
    graph = fx.Graph()
    remap: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, remap)
    graph.output(out)
    for old, new in zip(gm.graph.nodes, graph.nodes):
        new.meta = dict(old.meta)
        cost = sharded.costs.get(old.name)
        if cost is not None:
            new.meta[COST] = cost
    copy = fx.GraphModule(gm, graph)
    copy.meta = dict(gm.meta)
    copy.meta[TP] = sharded
    return copy, sharded


def node_time(base: NodeTime, gm: fx.GraphModule, link: LinkSpec) -> NodeTime:
    """``base`` plus, on the nodes of ``gm`` that make them, the ring all-reduces of one
    tensor-parallel group (forward on row linears, backward on the first column linear of
    each region input) or, with sequence parallelism, the all-gather / reduce-scatter pair
    (both ways on both). ``gm`` must come from ``view``; other graphs get ``base`` back.
    Raises ``GraphError`` for a view whose degree the runtime refuses (``Sharded.refused``:
    a head count it does not divide), naming the node."""
    sharded = gm.meta.get(TP)
    if not isinstance(sharded, Sharded) or sharded.degree <= 1:
        return base
    if sharded.refused is not None:  # the runtime would refuse this degree: so does the planner
        raise GraphError(f"tensor_parallel={sharded.degree}: {sharded.refused} (partition(tensor_parallel='auto') "
                         "tries only the degrees that divide every head count)")
    by_cost: dict[int, tuple[Any, Any]] = {}
    for node in gm.graph.nodes:
        n = node.name
        comms = (sharded.fwd_allreduce.get(n), sharded.bwd_allreduce.get(n), sharded.fwd_gather_scatter.get(n),
                 sharded.bwd_gather_scatter.get(n))
        if any(c is not None for c in comms):
            cost = node.meta[COST]
            by_cost[id(cost)] = (cost, comms)
    t = sharded.degree

    def timed(cost: Any, values: Mapping[str, int]) -> tuple[float, float]:
        fwd, bwd = base(cost, values)
        hit = by_cost.get(id(cost))
        if hit is not None and hit[0] is cost:
            f, b, fs, bs = (None if e is None else evaluate(e, values["B"], values.get("S", 1)) for e in hit[1])
            if f is not None:
                fwd += ring_allreduce_s(f, t, link)
            if b is not None:
                bwd += ring_allreduce_s(b, t, link)
            # sequence parallelism: on a region's first column linear an all-gather forward and a
            # reduce-scatter backward; on a row linear the reverse (the same ring steps either way)
            if fs is not None:
                fwd += allgather_s(fs, t, link)
            if bs is not None:
                bwd += reduce_scatter_s(bs, t, link)
        return fwd, bwd

    return timed


def region_cuts(gm: fx.GraphModule, priced: Any) -> Any:
    """``priced`` (``pricing.Priced``) with every cut inside a sharded region of ``gm`` (a
    ``view``) not allowed: a stage boundary between a region's column and row linears would
    send head-split values across it, which the runtime does not do -- it keeps such a region
    whole ("its output leaves the stage"), so pricing it split there would be wrong. The cut
    positions span each region from its first to its last node in the solver's order.
    Unchanged for a graph that is not a tensor-parallel view."""
    sharded = gm.meta.get(TP)
    if not isinstance(sharded, Sharded) or sharded.degree <= 1 or not sharded.regions:
        return priced
    pos = {n.name: i for i, n in enumerate(priced.order)}  # by name: the regions hold the captured graph's nodes
    allowed, why = list(priced.allowed), list(priced.blocked_by)
    for r in sharded.regions:
        at = sorted(pos[n.name] for n in (*r.columns, *r.inner, *r.rows) if n.name in pos)
        if not at:
            continue
        for k in range(at[0] + 1, at[-1] + 1):
            if allowed[k]:
                allowed[k] = False
                why[k] = (f"inside the tensor-parallel region {r.columns[0].name} .. {r.rows[-1].name} (its head- or "
                          f"feature-split values do not cross stages)")
    return replace(priced, allowed=tuple(allowed), blocked_by=tuple(why))
