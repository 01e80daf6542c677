"""Where each boundary value really goes: its producer and the stages that use it.

The plan's stages form a chain, so a skip connection (U-Net's encoder features) made
in stage p and used in stage p+3 is listed in the inputs and outputs of p+1 and p+2,
whose graphs just return the placeholder. The runtime sends such a value straight from
its producer to each consumer (and its gradient straight back), so pass-through
stages neither receive nor send it: they are called with ``None`` in that slot.

>>> r = Route("enc1", producer=0, consumers=(3,))
>>> r.passes_through(1), r.passes_through(3)
(True, False)
"""

from __future__ import annotations

from collections import defaultdict
from typing import NamedTuple, Sequence

from torch import fx

from partitioner.plan import Plan
from partitioner.runtime.errors import PipelineRuntimeError

__all__: list[str] = []


class Route(NamedTuple):
    name: str
    producer: int  # the stage that computes it (0 for the model's inputs)
    consumers: tuple[int, ...]  # later stages whose graphs use it, ascending

    def passes_through(self, stage: int) -> bool:
        return self.producer < stage <= max(self.consumers, default=-1) and stage not in self.consumers


def _graph(m: fx.GraphModule | fx.Graph) -> fx.Graph:
    return m.graph if isinstance(m, fx.GraphModule) else m


def consumed(graph: fx.Graph, names: Sequence[str], last: bool) -> set[str]:
    """Which of the stage inputs ``names`` (its placeholders, in order) the stage uses:
    in a node other than its output, or (last stage) in any node, since the last
    stage's returned values are the model's outputs and feed the loss."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(names):
        raise PipelineRuntimeError(f"a stage graph has {len(placeholders)} placeholders, its plan lists "
                                   f"{len(names)} inputs {list(names)}: the pipe and the plan disagree")
    return {name for name, ph in zip(names, placeholders)
            if any(last or u.op != "output" for u in ph.users)}


def routes(plan: Plan, graphs: Sequence[fx.GraphModule | fx.Graph]) -> dict[str, Route]:
    """Every value that crosses a cut, in plan order (boundary, then position)."""
    last = plan.n_stages - 1
    uses = [consumed(_graph(g), plan.stages[s].inputs, s == last) for s, g in enumerate(graphs)]
    out: dict[str, Route] = {}
    for b in plan.boundaries:
        for v in b.values:
            if v.name in out:
                continue
            # First cut it crosses: made in stage b (or a model input stage 0 hands on).
            users = tuple(s for s in range(b.index + 1, plan.n_stages)
                          if v.name in plan.stages[s].inputs and v.name in uses[s])
            out[v.name] = Route(v.name, b.index, users)
    return out


class Links:
    """Per stage, which values it sends to / receives from which stage, forward.
    Both ends derive the same lists, in plan order, so a message needs no header."""

    def __init__(self, table: dict[str, Route]) -> None:
        self.routes = table
        self._out: dict[int, dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))
        self._in: dict[int, dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))
        for r in table.values():
            for c in r.consumers:
                self._out[r.producer][c].append(r.name)
                self._in[c][r.producer].append(r.name)

    def sends(self, stage: int) -> list[tuple[int, tuple[str, ...]]]:
        """(consumer stage, values) that ``stage`` produces, ascending consumer."""
        return [(c, tuple(v)) for c, v in sorted(self._out.get(stage, {}).items())]

    def receives(self, stage: int) -> list[tuple[int, tuple[str, ...]]]:
        """(producer stage, values) that ``stage`` uses, ascending producer."""
        return [(p, tuple(v)) for p, v in sorted(self._in.get(stage, {}).items())]
