"""Codegen: one ``fx.GraphModule`` per stage, owning only the parameters and buffers it uses.

Stages form a chain: stage ``i`` takes, as positional inputs, every value live across the
cut before it (in graph order) and returns every value live across the cut after it, so
a value that skips stages is passed along explicitly. The last stage returns the model's
flat outputs. Each stage is built with ``fx.GraphModule(gm, graph)``, which copies the
referenced submodules and tensors under their original dotted names: stage state_dict
keys are a subset of the model's, so an existing checkpoint loads into stages directly.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from torch import fx, nn

from passes.errors import GraphError

__all__ = ["StageIO", "SplitResult", "compute_nodes", "live_values", "split_graph", "copy_persistence"]

_NOT_COMPUTE = ("placeholder", "get_attr", "output")


@dataclass(frozen=True)
class StageIO:
    inputs: tuple[str, ...]  # names of values received (graph node names), in order
    outputs: tuple[str, ...]  # names of values sent to the next stage, in order
    nodes: tuple[str, ...]  # the compute nodes this stage runs


@dataclass(frozen=True)
class SplitResult:
    stages: tuple[fx.GraphModule, ...]
    io: tuple[StageIO, ...]


def copy_persistence(src: nn.Module, dst: nn.Module) -> None:
    """Mark ``dst``'s buffers non-persistent where ``src``'s are.

    ``GraphModule`` copies a ``get_attr`` buffer with ``register_buffer(name, t)``, which
    makes it persistent: without this, a stage's state_dict would grow keys (rotary
    tables, masks) that the model's checkpoint does not have.
    """
    for fqn, _ in dst.named_buffers(remove_duplicate=False):
        parent, _, leaf = fqn.rpartition(".")
        try:
            owner = src.get_submodule(parent)
        except AttributeError:
            continue
        if leaf in owner._non_persistent_buffers_set:
            dst.get_submodule(parent)._non_persistent_buffers_set.add(leaf)


def compute_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The nodes the solver orders and places: everything but inputs, attributes, output."""
    return [n for n in gm.graph.nodes if n.op not in _NOT_COMPUTE]


def live_values(gm: fx.GraphModule, cuts: list[int]) -> list[tuple[str, ...]]:
    """For each cut position (index into compute_nodes), the names of values crossing it."""
    order = compute_nodes(gm)
    pos = {n: i for i, n in enumerate(order)}
    n_total = len(order)
    crossing: list[list[str]] = [[] for _ in cuts]
    values = [n for n in gm.graph.nodes if n.op == "placeholder"] + order
    by_cut = sorted(range(len(cuts)), key=lambda j: cuts[j])
    at = [cuts[j] for j in by_cut]
    for v in values:  # in graph order, so each cut lists its values in graph order
        produced = pos.get(v, -1)
        last = max((pos.get(u, n_total) for u in v.users), default=produced)
        # the cuts k with produced < k <= last, found by bisection (not every cut per value)
        for j in by_cut[bisect.bisect_right(at, produced):bisect.bisect_right(at, last)]:
            crossing[j].append(v.name)
    return [tuple(c) for c in crossing]


def split_graph(gm: fx.GraphModule, assignment: dict[str, int], n_stages: int) -> SplitResult:
    """Build the stage modules for ``assignment`` (compute node name → stage index)."""
    order = compute_nodes(gm)
    missing = [n.name for n in order if n.name not in assignment]
    if missing:
        raise GraphError(f"{len(missing)} nodes have no stage (first: {missing[0]!r})")
    stages_seen = [assignment[n.name] for n in order]
    for a, b in zip(stages_seen, stages_seen[1:]):
        if b < a:
            raise GraphError("stages must be contiguous in graph order; an assignment went back "
                             f"from stage {a} to stage {b}")
    if sorted(set(stages_seen)) != list(range(n_stages)):
        raise GraphError(f"every stage needs at least one node; stages used: {sorted(set(stages_seen))}")
    cuts = [stages_seen.index(s) for s in range(1, n_stages)]
    crossing = live_values(gm, cuts)
    by_name = {n.name: n for n in gm.graph.nodes}
    placeholders = tuple(n.name for n in gm.graph.nodes if n.op == "placeholder")
    ins = [placeholders, *crossing]
    outs = [*crossing, None]
    stages, ios = [], []
    per_stage: list[list[fx.Node]] = [[] for _ in range(n_stages)]
    for n, s in zip(order, stages_seen):
        per_stage[s].append(n)
    for s in range(n_stages):
        nodes = per_stage[s]
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for name in ins[s]:
            ph = graph.placeholder(name)
            ph.meta = dict(by_name[name].meta)
            env[by_name[name]] = ph

        def lookup(n: fx.Node) -> fx.Node:
            if n not in env:
                if n.op != "get_attr":
                    raise GraphError(f"stage {s} uses {n.name!r}, which reaches it from no earlier stage")
                env[n] = graph.node_copy(n)  # each stage gets its own handle on the parameter
            return env[n]

        for n in nodes:
            env[n] = graph.node_copy(n, lookup)
        out_names = outs[s]
        if out_names is None:
            out_node = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
            graph.output(fx.map_arg(out_node.args[0], lookup))
            out_names = tuple(a.name for a in out_node.all_input_nodes)
        else:
            graph.output(tuple(lookup(by_name[name]) for name in out_names))
        graph.lint()
        stage = fx.GraphModule(gm, graph, class_name=f"Stage{s}")
        copy_persistence(gm, stage)
        stages.append(stage)
        ios.append(StageIO(tuple(ins[s]), tuple(out_names), tuple(n.name for n in nodes)))
    return SplitResult(tuple(stages), tuple(ios))
