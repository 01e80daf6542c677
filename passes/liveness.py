"""What crosses a cut: the one definition every pricing, ordering and splitting step uses.

Positions are the compute nodes of a linear order (``order[0] .. order[n-1]``). Cut ``k``
(``0 <= k <= n``) lies before position ``k``: cut 0 before the first node, cut ``n`` after
the last. A value crosses cut ``k`` when it is produced before position ``k`` and used at or
after it:

- a graph input counts as produced before position 0 (``produced == -1``); so does any
  other node outside the order (an attribute), when asked about with ``Liveness.span``;
- a user outside the order (the graph output) counts as a use at the end (position ``n``);
- a value with no user after its producer crosses nothing.

So value ``v`` crosses the cuts ``produced + 1 .. last`` (``Span.cuts``), and a skip
connection that spans two cuts crosses both.

A tensor made from sizes alone (``rebuilt_values``: the causal mask a ``torch.export`` capture
builds from the input's sizes) crosses no cut: every stage that uses it rebuilds it from the
integer sizes it is made from (``passes.split``), so those sizes cross instead, as far as the
tensor's last use (8 bytes each, as any int).

``Liveness`` computes every span in one sweep over the values (graph inputs first, then the
order), and answers per-cut questions with
difference arrays (``totals``, ``count``), a fill that visits each cut once (``first``) or bisection
(``crossing``): linear in the graph, never nodes × cuts.
"""

from __future__ import annotations

import bisect
import itertools
from typing import Callable, NamedTuple, Sequence

import torch
from torch import fx

from partitioner.passes.attention import size_only_values
from partitioner.passes.meta import VAL

__all__ = ["Span", "Liveness", "rebuilt_values"]


def rebuilt_values(gm: fx.GraphModule | fx.Graph) -> dict[fx.Node, frozenset[fx.Node]]:
    """The tensors of ``gm`` that a stage rebuilds from sizes rather than receives, each with the
    integer values it is made from (``passes.attention.size_only_values``, restricted to
    tensors: an int crosses as 8 bytes anyway)."""
    return {n: leaves for n, leaves in size_only_values(gm).items() if isinstance(n.meta.get(VAL), torch.Tensor)}


class Span(NamedTuple):
    """One value's life in the order: its producer's position and its last consumer's."""

    value: fx.Node  # the producer (the node whose output this is)
    produced: int  # the producer's position; -1 for a graph input (or a node outside the order)
    last: int  # the last consumer's position; n (the order's length) for the graph output

    @property
    def cuts(self) -> range:
        """The cuts this value crosses (empty when it is used by nothing after it)."""
        return range(self.produced + 1, self.last + 1)

    @property
    def consumers(self) -> list[fx.Node]:
        """The nodes that use this value (its graph users)."""
        return list(self.value.users)


class Liveness:
    """Every value live across some cut of ``order``, with where it is produced and last used.

    The values crossing at least one cut (``produced < last``) are held as three parallel
    lists, ``values``, ``produced`` and ``last`` (``spans`` zips them): the graph's inputs
    in graph order, then the order's nodes in ``order`` order. Per-cut answers list values
    in that same order.
    """

    __slots__ = ("order", "n", "pos", "values", "produced", "last", "rebuilt")

    def __init__(self, gm: fx.GraphModule | fx.Graph, order: Sequence[fx.Node], rebuild: bool = True) -> None:
        graph = gm.graph if isinstance(gm, fx.GraphModule) else gm
        self.order = order
        self.n = n = len(order)
        self.pos = pos = {node: i for i, node in enumerate(order)}
        at = pos.get
        #: the tensors rebuilt from sizes (``rebuilt_values``), which cross nothing; ``rebuild=False``
        #: lists every value as sent (what a stage graph received before this existed)
        self.rebuilt = rebuilt = rebuilt_values(graph) if rebuild else {}
        reach: dict[fx.Node, int] = {}  # a size's last use, as far as a tensor made from it is used
        for v, sizes in rebuilt.items():
            if v.users:
                q = max([at(u, n) for u in v.users])
                for size in sizes:
                    if reach.get(size, -1) < q:
                        reach[size] = q
        values: list[fx.Node] = []
        first: list[int] = []
        last: list[int] = []
        # one sweep; plain lists and no per-value objects: this runs for every candidate order
        # of a 10,000-node graph
        for v in [nd for nd in graph.nodes if nd.op == "placeholder"] + list(order):
            users = v.users
            if not users or v in rebuilt:
                continue
            p = at(v, -1)
            q = max([at(u, n) for u in users])
            if v in reach and reach[v] > q:
                q = reach[v]
            if q > p:
                values.append(v)
                first.append(p)
                last.append(q)
        self.values, self.produced, self.last = values, first, last

    @property
    def spans(self) -> list[Span]:
        """The values crossing some cut, as ``Span`` records."""
        return [Span(v, p, q) for v, p, q in zip(self.values, self.produced, self.last)]

    def span(self, v: fx.Node) -> Span:
        """``v``'s span, for any node of the graph (one outside the order counts as produced
        before position 0); ``produced >= last`` when it crosses no cut."""
        produced = self.pos.get(v, -1)
        return Span(v, produced, max((self.pos.get(u, self.n) for u in v.users), default=produced))

    def totals(self, weight: Callable[[fx.Node], int] | Sequence[int]) -> list[int]:
        """Per cut (``n + 1`` entries): the sum of the weights of the values crossing it.
        ``weight``: a function of the value (its producer node), or one weight per entry
        of ``values``."""
        weights = weight if isinstance(weight, Sequence) else [weight(v) for v in self.values]
        diff = [0] * (self.n + 2)
        for w, p, q in zip(weights, self.produced, self.last):
            diff[p + 1] += w
            diff[q + 1] -= w
        return list(itertools.accumulate(diff[:self.n + 1]))

    def count(self, where: Callable[[fx.Node], bool] | None = None) -> list[int]:
        """Per cut (``n + 1`` entries): how many values cross it (those with ``where(value)``
        true, when given)."""
        return self.totals([1 if where is None or where(v) else 0 for v in self.values])

    def first(self, where: Callable[[fx.Node], bool]) -> list[fx.Node | None]:
        """Per cut (``n + 1`` entries): the first value (in ``values`` order) with
        ``where(value)`` true that crosses it, or None. Each cut is filled once (a pointer
        to the next unfilled cut, path-halved), so the work is linear, not values x cuts."""
        out: list[fx.Node | None] = [None] * (self.n + 1)
        nxt = list(range(self.n + 2))

        def find(k: int) -> int:
            while nxt[k] != k:
                nxt[k] = nxt[nxt[k]]
                k = nxt[k]
            return k

        for v, p, q in zip(self.values, self.produced, self.last):
            if not where(v):
                continue
            k = find(p + 1)
            while k <= q:
                out[k] = v
                nxt[k] = k + 1
                k = find(k + 1)
        return out

    def crossing(self, cuts: Sequence[int]) -> list[tuple[fx.Node, ...]]:
        """For each of ``cuts``, the values crossing it (in ``values`` order); each value
        finds its cuts by bisection, so the work is the values plus what is listed."""
        out: list[list[fx.Node]] = [[] for _ in cuts]
        by_cut = sorted(range(len(cuts)), key=lambda j: cuts[j])
        at = [cuts[j] for j in by_cut]
        right = bisect.bisect_right
        for v, p, q in zip(self.values, self.produced, self.last):
            for j in by_cut[right(at, p):right(at, q)]:
                out[j].append(v)
        return [tuple(c) for c in out]
