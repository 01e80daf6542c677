"""Codegen: one ``fx.GraphModule`` per stage, owning only the parameters and buffers it uses.

Stages form a chain: stage ``i`` takes, as positional inputs, every value live across the
cut before it (in graph order) and returns every value live across the cut after it, so
a value that skips stages is passed along explicitly. The last stage returns the model's
flat outputs. A tensor made from sizes alone (``liveness.rebuilt_values``: a causal mask) is
not among them: a stage that uses it made elsewhere copies the nodes that make it from the
integer sizes (``StageIO.rebuilt``), which cross instead. Each stage is built with ``fx.GraphModule(gm, graph)``, which copies the
referenced submodules and tensors under their original dotted names: stage state_dict
keys are a subset of the model's, so an existing checkpoint loads into stages directly.
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from partitioner.passes.attention import size_only_values
from partitioner.passes.errors import GraphError
from partitioner.passes.liveness import Liveness

__all__ = ["StageIO", "SplitResult", "compute_nodes", "live_values", "split_graph", "copy_persistence", "writes_into",
           "is_view_of", "aliases"]

_NOT_COMPUTE = ("placeholder", "get_attr", "output")


@dataclass(frozen=True)
class StageIO:
    inputs: tuple[str, ...]  # names of values received (graph node names), in order
    outputs: tuple[str, ...]  # names of values sent to the next stage, in order
    nodes: tuple[str, ...]  # the compute nodes this stage runs
    #: nodes of earlier stages this stage runs again, to rebuild from sizes a tensor it uses
    #: instead of receiving it (in the stage's graph order; not in ``nodes``)
    rebuilt: tuple[str, ...] = ()


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
    """For each cut position (index into compute_nodes), the names of values crossing it
    (``partitioner.passes.liveness``: graph inputs first, then in graph order)."""
    return [tuple(v.name for v in vals) for vals in Liveness(gm, compute_nodes(gm)).crossing(cuts)]


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
    made = size_only_values(gm)  # what a stage may run again from sizes, rather than receive
    stages, ios = [], []
    per_stage: list[list[fx.Node]] = [[] for _ in range(n_stages)]
    for n, s in zip(order, stages_seen):
        per_stage[s].append(n)
    for s in range(n_stages):
        nodes = per_stage[s]
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        rebuilt: list[str] = []
        for name in ins[s]:
            ph = graph.placeholder(name)
            ph.meta = dict(by_name[name].meta)
            env[by_name[name]] = ph

        def lookup(n: fx.Node) -> fx.Node:
            if n not in env:
                if n in made:  # made from sizes in an earlier stage: made again here (inputs first)
                    env[n] = graph.node_copy(n, lookup)
                    rebuilt.append(n.name)
                elif n.op != "get_attr":
                    raise GraphError(f"stage {s} uses {n.name!r}, which reaches it from no earlier stage")
                else:
                    env[n] = graph.node_copy(n)  # each stage gets its own handle on the parameter
            return env[n]

        for n in nodes:
            env[n] = graph.node_copy(n, lookup)
        # what is rebuilt goes right after the inputs (it reads only them): made once before any
        # layer, as the model made it, not inside the first layer that reads it (which would split
        # that layer's nodes for recompute regions and FSDP's outlining)
        at = next((n for n in reversed(graph.nodes) if n.op == "placeholder"), None)
        for name in rebuilt:
            node = env[by_name[name]]
            if at is None:  # no inputs (a constant made from no size at all): first
                next(iter(graph.nodes)).prepend(node)
            elif at is not node:
                at.append(node)
            at = node
        out_names = outs[s]
        if out_names is None:
            out_node = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
            graph.output(fx.map_arg(out_node.args[0], lookup))
            out_names = tuple(a.name for a in out_node.all_input_nodes)
        else:
            graph.output(tuple(lookup(by_name[name]) for name in out_names))
        _clone_mutated_inputs(gm, graph, [ph for ph in graph.nodes if ph.op == "placeholder"
                                          and by_name[ph.name].op != "placeholder"])
        graph.lint()
        stage = fx.GraphModule(gm, graph, class_name=f"Stage{s}")
        copy_persistence(gm, stage)
        stages.append(stage)
        ios.append(StageIO(tuple(ins[s]), tuple(out_names), tuple(n.name for n in nodes), tuple(rebuilt)))
    return SplitResult(tuple(stages), tuple(ios))


#: Methods and functions (by name) whose result shares storage with their first argument.
_VIEWS = frozenset({
    "view", "view_as", "reshape", "reshape_as", "transpose", "permute", "unsqueeze", "squeeze", "expand",
    "expand_as", "narrow", "select", "flatten", "unflatten", "t", "chunk", "split", "unbind", "contiguous",
    "detach", "as_strided", "diagonal", "movedim", "moveaxis", "swapaxes", "unfold", "getitem", "tensor_split",
    "split_with_sizes", "view_as_real", "view_as_complex", "real", "imag", "alias",
})
_SETS = frozenset({"setitem", "__setitem__", "iadd", "isub", "imul", "itruediv", "ior", "iand"})


def writes_into(root: nn.Module, node: fx.Node, value: fx.Node) -> bool:
    """Whether ``node`` writes into ``value`` (an in-place op, ``x[i] = ...``, ``inplace=True``)."""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        for i, arg in enumerate(target._schema.arguments):
            if arg.alias_info is not None and arg.alias_info.is_write:
                if (node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)) is value:
                    return True
        return False
    if not node.args or node.args[0] is not value:
        return False
    if node.op == "call_module":
        return bool(getattr(root.get_submodule(str(target)), "inplace", False))
    name = str(target) if node.op == "call_method" else getattr(target, "__name__", "")
    return (name.endswith("_") and not name.endswith("__")) or name in _SETS or node.kwargs.get("inplace") is True


def is_view_of(node: fx.Node, value: fx.Node) -> bool:
    """Whether ``node``'s result may share storage with ``value`` (one of its inputs)."""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        args = target._schema.arguments
        return bool(args) and args[0].alias_info is not None and not args[0].alias_info.is_write \
            and bool(node.args) and node.args[0] is value
    if node.op == "call_method" or (node.op == "call_function" and target is not operator.getitem):
        name = str(target) if node.op == "call_method" else getattr(target, "__name__", "")
        return name in _VIEWS and bool(node.args) and node.args[0] is value
    return target is operator.getitem and bool(node.args) and node.args[0] is value


def aliases(value: fx.Node) -> set[fx.Node]:
    """The values that may share ``value``'s storage: its base (followed back through views)
    and every view of it, taken forward."""
    root = value
    while root.op != "placeholder" and root.args and isinstance(root.args[0], fx.Node) \
            and is_view_of(root, root.args[0]):
        root = root.args[0]
    group, todo = {root}, [root]
    while todo:
        v = todo.pop()
        for user in v.users:
            if user not in group and is_view_of(user, v):
                group.add(user)
                todo.append(user)
    return group


def _clone_mutated_inputs(root: nn.Module, graph: fx.Graph, received: list[fx.Node]) -> None:
    """A stage input that the stage writes into, directly or through a view, is cloned first.

    In the model that value is an intermediate; in a stage it arrives as a leaf that
    requires grad, and autograd refuses in-place ops on (views of) such leaves. The sender
    also keeps the tensor for its own backward, so writing into it would corrupt that.
    """
    last = next((n for n in reversed(graph.nodes) if n.op == "placeholder"), None)
    for ph in received:
        seen, todo = {ph}, [ph]
        mutated = False
        while todo and not mutated:
            v = todo.pop()
            for user in v.users:
                if writes_into(root, user, v):
                    mutated = True
                    break
                if user not in seen and is_view_of(user, v):
                    seen.add(user)
                    todo.append(user)
        if not mutated:
            continue
        assert last is not None
        with graph.inserting_after(last):
            copy: Any = graph.call_function(torch.ops.aten.clone.default, (ph,))
        copy.meta = dict(ph.meta)
        ph.replace_all_uses_with(copy, delete_user_cb=functools.partial(operator.is_not, copy))
        last = copy
