"""Where each boundary value really goes: its producer and the stages that use it.

A plan records this (``Plan.routes``, written from the split that made the stages):
``from_plan`` reads it, and ``check_stage`` holds it against each stage graph the runtime is
given. A version-3 plan has no routes; ``routes`` then derives them from every stage's graph.

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


def from_plan(plan: Plan) -> dict[str, Route]:
    """The table ``routes`` would read from the stage graphs, from the plan's records: every
    value that crosses a cut, in plan order (boundary, then position), made in its producer's
    stage (a model input: stage 0, which holds the inputs) and sent to its later consumers."""
    records = {r.name: r for r in plan.routes}
    out: dict[str, Route] = {}
    for b in plan.boundaries:
        for v in b.values:
            if v.name in out:
                continue
            r = records.get(v.name)
            if r is None:  # load_plan refuses such a plan; a Plan built in code may still lack one
                raise PipelineRuntimeError(f"the plan's routes do not list {v.name!r}, which crosses cut {b.index}: "
                                           "the plan is inconsistent (re-save it from partition() or Plan.apply)")
            producer = 0 if r.producer == "input" else int(r.producer)
            out[v.name] = Route(v.name, producer, tuple(c for c in r.consumers if c > producer))
    return out


def _value_name(node: fx.Node) -> str:
    """The plan's name for a stage graph value: a placeholder's target (fx may rename the node
    itself, e.g. ``input`` to ``input_1``), any other node's name."""
    return str(node.target) if node.op == "placeholder" else node.name


def check_stage(plan: Plan, stage: int, graph: fx.Graph) -> None:
    """Refuse a stage graph that does not fit the plan's routes: its placeholders must be the
    stage's inputs and its returned values its outputs, by name and in order, and the inputs
    its nodes use exactly those the routes send it (a stage the routes skip would be called
    with ``None`` in that slot; one they send to but that never reads it means the plan and
    the stage files come from different models or splits). Raises ``PipelineRuntimeError``
    naming the value and the stages."""
    st = plan.stages[stage]
    last = stage == plan.n_stages - 1
    hint = ("the plan and the stage modules come from different models or splits: load the stage files "
            "saved with this plan, or re-apply the plan (Plan.apply)")
    placeholders = tuple(_value_name(n) for n in graph.nodes if n.op == "placeholder")
    out_node = next((n for n in reversed(graph.nodes) if n.op == "output"), None)
    if out_node is None:
        returned: tuple[str, ...] = ()
    elif last:  # the model's flat outputs, as the split lists them
        returned = tuple(_value_name(a) for a in out_node.all_input_nodes)
    else:  # the tuple of values sent on
        sent = out_node.args[0]
        returned = tuple(_value_name(a) if isinstance(a, fx.Node) else repr(a)
                         for a in (sent if isinstance(sent, (tuple, list)) else (sent,)))
    for what, got, want in (("takes", placeholders, st.inputs), ("returns", returned, st.outputs)):
        if got != want:
            extra = [v for v in got if v not in want] or [v for v in want if v not in got] or list(got)
            raise PipelineRuntimeError(f"stage {stage}'s graph {what} {list(got)}, but the plan says {list(want)} "
                                       f"(first differing value {extra[0]!r}): {hint}")
    records = {r.name: r for r in plan.routes}
    uses = consumed(graph, st.inputs, last)
    for name in st.inputs:
        r = records.get(name)
        if r is None:  # load_plan refuses such a plan; a Plan built in code may still lack one
            raise PipelineRuntimeError(f"stage {stage} takes {name!r}, but the plan's routes do not list it: "
                                       "the plan is inconsistent (re-save it from partition() or Plan.apply)")
        routed = stage in r.consumers
        if routed != (name in uses):
            made = "the model's inputs" if r.producer == "input" else f"stage {r.producer}"
            to = list(r.consumers)
            raise PipelineRuntimeError(
                f"the plan routes {name!r} (made by {made}) to stages {to}, but stage {stage}'s graph "
                f"{'does not use' if routed else 'uses'} it: {hint}")


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
