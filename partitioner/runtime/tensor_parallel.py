"""Tensor parallelism inside a pipeline stage, run by DTensor.

A plan whose ``mesh.tp`` is T > 1 runs every pipeline rank as T processes (``tp``
innermost: the T ranks of one pipeline rank are consecutive, i.e. inside one node). Each
stage module (an ``fx.GraphModule`` from ``passes/split.py``) is analysed once
(``shard_plan``): the Megatron patterns are recognised from the graph's dataflow, not from
module names, by the analysis in ``passes/tp_dataflow.py`` (``split_linears``), restricted to
the regions the planner prices (``passes.tensor_parallel.agreed_split``, the one function both
call: a linear the planner's finder would not price split stays whole here, with the reason in
``TensorParallelPlan.replicated``; a fused q/k/v or gate/up projection stacked by output
feature, split on that dimension after the linear, stays whole in both; GPT-NeoX's, per head,
splits) --

- a linear whose output flows, through elementwise ops, views / reshapes / transposes /
  permutes / expands, slices off the sharded dimension, concatenations and attention
  (``scaled_dot_product_attention``, or matmul + softmax), only into the *input* of other
  linears is **column-parallel**: weight (and bias) ``Shard(0)``;
- the linears it reaches are **row-parallel**: weight ``Shard(1)``, bias ``Replicate``;
- the vocabulary (``passes.tensor_parallel.find_vocab``, the planner's own finder): a token
  embedding's table ``Shard(0)`` (``embedding_on_shards``: a masked lookup of the rank's rows,
  one all-reduce), and on the last stage an output layer ``Shard(0)`` whose logits stay
  split on the classes into an in-graph cross-entropy and out of the stage; the rank's
  runner then steps under ``loss_parallel`` (the cross-entropy on the shards, forward and
  backward), wraps ``loss_fn`` (``_LossOnShards``: a loss that cannot take split logits
  gets them gathered) and gathers ``eval_step``'s outputs;
- every other parameter (norms, other embeddings, a linear whose output reaches the stage's
  output or an op that needs the whole feature dimension) stays ``Replicate``: each TP rank
  computes it whole, which is correct, and ``TensorParallelPlan.replicated`` says why (also
  logged at INFO).

The sharded dimension is followed node by node with the shapes shape-prop recorded
(``node.meta["val"]``): a view that splits the features into heads carries the shard to
the head dimension and needs the head count divisible by T (GQA: the key/value head count
too). A recognised pattern that T does not divide is refused (``PipelineRuntimeError``
naming the node and the sizes), not silently replicated: that would be a different
parallelism than the one asked for.

Execution (``parallelize``): the stage's parameters become ``DTensor``s over the 1-D TP
mesh with those placements; a small rewrite of the graph makes every tensor that enters
it -- the stage's inputs, buffers, and tensors made inside it (``arange``, masks) -- a
``Replicate`` DTensor, and turns every output back into a plain, whole tensor
(``redistribute(Replicate()).to_local()``). DTensor's sharding propagation does the rest:
the graph keeps global shapes (``view(x, [B, S, -1, 8])``), which DTensor interprets on the
global tensor, so head counts need no rewriting. Two identities pin the collectives to
Megatron's: each row-parallel linear's output (``Partial``) is made ``Replicate`` right there
(``reduce_row``: one all-reduce in forward), and each column group's input all-reduces its
gradient in backward (``reduce_grad``); left to itself DTensor sometimes reduce-scatters where a
partial sum meets the residual stream and all-gathers later (the same bytes, more collectives,
norms run on shards). Per transformer layer and micro-batch: 2 all-reduces forward, 2 backward
(``tests/runtime/test_tensor_parallel.py`` counts them with ``CommDebugMode``). The stage's
inputs' gradients leave ``Replicate``, so each TP rank sends the whole gradient upstream.

Messages between stages: the pipeline group of a rank holds the ranks with the same TP
index (``mesh.rank(d, p, t)`` for every p), so TP rank t of stage s sends to TP rank t of
stage s+1 -- pairs. Every TP rank holds the boundary tensor replicated, so each pair carries
1/T of it and the receiving TP ranks all-gather the chunks (``runtime.dist``; the builder
gives the runner's transport ``tp_mesh``'s group; ``PARTITIONER_TP_SCATTER=0``
sends whole tensors instead).

Sequence parallelism (``plan.options["sequence_parallel"]``, ``with_tensor_parallel(...,
sequence_parallel=True)``; Megatron-LM's, torchtitan's ``SequenceParallel``): each row linear's
output is reduce-scattered onto the sequence dimension (``scatter_sequence``: ``Partial`` ->
``Shard(s)``; backward an all-gather) instead of all-reduced, and each column group's input is
all-gathered (``gather_sequence``: ``Shard(s)`` -> ``Replicate``; backward the reduce-scatter of
its partial gradient). Between the two, the norms, residual adds and dropout run on DTensors
``Shard(s)``: each TP rank computes and keeps S/T tokens, by DTensor's own rules. torch's
``SequenceParallel`` / ``parallelize_module`` cannot be used as they are: they hook module
boundaries (``nn.LayerNorm`` / ``RMSNorm`` inputs and outputs), and a stage here is one flat
GraphModule (the export route inlines the norms into aten ops), so the same redistributions
are placed at the region boundaries of the graph, where ``shard_plan`` found them. The
sequence dimension of each row output is the one shape-prop sized by ``S``
(``passes.tensor_parallel.sequence_dim``, the planner's rule); a row output without one is
refused naming the node, and a sequence that does not divide by T is refused at run time
(``scatter_sequence``).

Boundary messages under sequence parallelism travel as sequence shards (``boundary_sequence``:
every floating-point boundary tensor with a dimension sized by ``S``, read from the plan, so
both ends decide alike): a stage's such output leaves as this TP rank's local shard
(``to_sequence_local``: ``Shard(s)`` already for the residual stream, no communication; a
replicated value is sliced), TP rank t sends its shard to TP rank t of the next stage, and the
receiver wraps it as a ``Shard(s)`` DTensor (``from_sequence_shard``). The residual stream
(added to a row output, ``_residual_inputs``) stays a shard there, so the stage's first norm
runs on S/T tokens and nothing is gathered at the cut, either way; another such input
(rotary tables) is all-gathered inside the stage where it enters. Gradients go back the same
way: the receiver's input gradient is its shard of the whole. The runner lays the messages out
so (``shard_boundaries``: the interpreter's wires at S/T, the transport told which tensors are
a rank's own); the other values (integer ids, masks, scalars) go as without sequence
parallelism, 1/T per pair and all-gathered at the receiver (``runtime.dist``). A model input
of the residual stream entering the first stage whole is cut to this rank's shard where it
enters (``to_sequence_shard``, no communication).

Gradients are DTensor shards on the parameters (an optimizer over ``stage.parameters()``
steps the shards); ``stage.grad_norm`` takes each DTensor's norm over the whole tensor
(``full_tensor`` of the per-tensor norm: shards all-reduced, replicas counted once).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import operator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Collection, Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import fx, nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import loss_parallel

from partitioner import poly
from partitioner.cost_models.cost import SEQ
from partitioner.passes.meta import DESC, TENSOR_PARALLEL
from partitioner.passes.tensor_parallel import agreed_split, find_vocab, sequence_dim
from partitioner.passes.tp_dataflow import (
    _DROPPED,
    _ELEMENTWISE,
    _ELEMENTWISE_METHODS,
    _ELEMENTWISE_MODULES,
    _SDPA,
    IndivisibleError,
    _dim_arg,
    _maybe_tensor,
    _shape,
)
from partitioner.plan import Plan
from partitioner.runtime.errors import PipelineRuntimeError
from partitioner.runtime.values import Wire

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from partitioner.pipe import Pipe
    from partitioner.runtime.spec import PipelineSpec
    from partitioner.runtime.stage import RankStage  # noqa: PLC0415 - a cycle: stage.py calls this module's build hook

__all__ = ["TensorParallelPlan", "shard_plan", "parallelize", "with_tensor_parallel", "build_tensor_parallel",
           "full_state", "model_inputs"]

log = logging.getLogger("partitioner.runtime")

aten = torch.ops.aten

#: the stage attribute the rewritten graph reads the TP mesh from (``parallelize``)
MESH_ANCHOR = "_pp_tp_mesh_anchor"


@dataclass
class TensorParallelPlan:
    """How one stage is sharded over T ranks.

    ``column``/``row``: parameter FQN of each column- / row-parallel linear's weight -> the
    node using it; ``placements``: FQN -> ``"Shard(0)"``, ``"Shard(1)"`` or ``"Replicate"`` for
    every parameter of the stage; ``replicated``: linear weight FQN -> why it is not sharded."""

    tp: int
    column: dict[str, str] = field(default_factory=dict)
    row: dict[str, str] = field(default_factory=dict)
    placements: dict[str, str] = field(default_factory=dict)
    replicated: dict[str, str] = field(default_factory=dict)
    #: vocabulary-parallel parts (``passes.tensor_parallel.find_vocab``): the token
    #: embeddings' and output layers' weight FQN -> node, the cross-entropy nodes that run on
    #: split logits, and the output values that leave the stage split on the classes
    embeddings: dict[str, str] = field(default_factory=dict)
    heads: dict[str, str] = field(default_factory=dict)
    losses: tuple[str, ...] = ()
    split_outputs: tuple[str, ...] = ()
    #: sequence parallelism: each row linear's node -> the dimension its output is
    #: reduce-scattered on (empty: off)
    sequence: dict[str, int] = field(default_factory=dict)
    #: sequence parallelism: the stage inputs that are the residual stream (added to a row
    #: output), taken as their sequence shard where they enter -> that dimension
    sequence_inputs: dict[str, int] = field(default_factory=dict)
    #: sequence parallelism: the stage inputs (by the plan's value name) that arrive as this
    #: rank's sequence shard -> its dimension, and the positions of the stage outputs that
    #: leave as it (``boundary_sequence``; set by ``build_tensor_parallel``)
    boundary_inputs: dict[str, int] = field(default_factory=dict)
    boundary_outputs: dict[int, int] = field(default_factory=dict)

    @property
    def n_allreduce_forward(self) -> int:
        """All-reduces DTensor should issue per forward: one per row-parallel linear."""
        return len(self.row)


def shard_plan(gm: fx.GraphModule, tp: int, *, replicate: tuple[str, ...] = (), last: bool = True,
               sequence_parallel: bool = False, model_inputs: Collection[str] | None = None) -> TensorParallelPlan:
    """Recognise the column-/row-parallel linears of stage ``gm`` over ``tp`` ranks and its
    vocabulary-parallel embedding and output layer (see the module docstring). ``replicate``:
    weight FQNs to keep whole (a hint overriding the analysis). ``last``: ``gm`` is the last
    stage (its outputs are the model's; only there may logits leave split). ``model_inputs``:
    the placeholders that are model inputs (only a lookup of those is a token embedding, as the
    planner sees it on the captured graph); None: every placeholder.
    ``sequence_parallel``: record each row output's sequence dimension (``plan.sequence``).
    Raises ``PipelineRuntimeError`` naming the node where a recognised pattern's sizes do not
    divide by ``tp``, or (sequence parallelism) where a row output has no sequence dimension
    (the sequence length is checked on each call, ``scatter_sequence``)."""
    nodes = list(gm.graph.nodes)
    found = find_vocab(gm, model_outputs=last, model_inputs=model_inputs)
    vocab = found.at(tp)
    asked = {p for p in vocab.params if p in replicate}
    heads = {n for n in vocab.heads if vocab.owner[n] not in asked}
    try:
        found_split = agreed_split(gm, tp, vocab=vocab, heads=heads, replicate=replicate)
    except IndivisibleError as e:
        raise PipelineRuntimeError(str(e)) from None
    split = found_split.split
    linears, column, row, excluded = split.linears, split.column, split.row, split.excluded
    bare = [n.name for n in linears if DESC not in n.meta]
    if bare:  # the planner's finder reads shape-prop's TensorDesc: without it every linear would stay whole
        raise PipelineRuntimeError(
            f"tensor parallelism: the linears {bare[:5]} of this stage graph carry no shape metadata "
            f"(node.meta[{DESC!r}]), which deciding the split needs: build the stages with partition(...) or "
            "plan.apply(model), which propagate shapes, rather than from a graph traced again")
    plan = TensorParallelPlan(tp)
    for n in column:
        plan.column[linears[n][0]] = n.name
    for n in row:
        plan.row[linears[n][0]] = n.name
    for n, why in excluded.items():
        if n not in column and n not in row:
            plan.replicated[linears[n][0]] = why
    for n in linears:
        if n not in column and n not in row and n not in excluded:
            plan.replicated[linears[n][0]] = "its output reaches no row-parallel linear"
    for name, _ in gm.named_parameters():
        plan.placements[name] = "Replicate"
    for n in column:
        w, b, _ = linears[n]
        plan.placements[w] = "Shard(0)"
        if b is not None:
            plan.placements[b] = "Shard(0)"
    for n in row:
        plan.placements[linears[n][0]] = "Shard(1)"
    for p in asked:
        plan.replicated[p] = "kept whole by request (replicate=...)"
    for p, why in found.whole.items():
        plan.replicated[p] = f"not split by vocabulary: {why}"
    for p, why in vocab.whole.items():
        plan.replicated.setdefault(p, f"not split by vocabulary: {why}")
    for n in vocab.embeddings:
        if vocab.owner[n] not in asked:
            plan.embeddings[vocab.owner[n]] = n.name
    for n in heads:
        plan.heads[vocab.owner[n]] = n.name
        plan.replicated.pop(vocab.owner[n], None)
    for w in (*plan.embeddings, *plan.heads):
        plan.placements[w] = "Shard(0)"
    if sequence_parallel and tp > 1:
        for n in sorted(row, key=nodes.index):
            d = sequence_dim(n)
            if d is None:
                raise PipelineRuntimeError(
                    f"sequence parallelism over {tp} ranks: the output of the row-parallel linear {n.name} "
                    f"({linears[n][0]}, shape {_shape(n)}) has no dimension sized by the sequence S, so it cannot be "
                    "split on the sequence; name the inputs' sequence dimension when partitioning "
                    "(partition(seq_dims=...)) or run without sequence parallelism")
            plan.sequence[n.name] = d  # sized by S: whether T divides it is checked on each call
        plan.sequence_inputs = _residual_inputs(gm, row, plan.sequence)
    kept = set(heads)
    plan.losses = tuple(n.name for n in vocab.losses if vocab.follows[n] & kept)
    plan.split_outputs = tuple(n.name for n in vocab.outputs if vocab.follows[n] & kept)
    return plan


def _residual_inputs(gm: fx.GraphModule, rows: Any, dims: Mapping[str, int]) -> dict[str, int]:
    """The stage's inputs that are the residual stream: an input that reaches, through
    element-wise ops (casts, additions), an addition whose other operand comes from a row
    linear's output (through element-wise ops too: a dropout, a bias, earlier residual adds),
    on the same sequence dimension. They enter as their sequence shard, so the stage's first
    norm and residual add run on S/T tokens, as in the stage that produced them (and as the
    planner prices them); other inputs (rotary tables, masks) enter whole."""
    adds = {operator.add, torch.add, aten.add.Tensor}
    reach: dict[fx.Node, int] = {n: dims[n.name] for n in rows if n.name in dims}  # row-derived -> sequence dim
    origin: dict[fx.Node, set[fx.Node]] = {n: {n} for n in gm.graph.nodes
                                           if n.op == "placeholder" and sequence_dim(n) is not None}
    out: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op not in ("call_function", "call_method", "call_module") or n in reach:
            continue
        elementwise = (n.op == "call_function" and n.target in _ELEMENTWISE) or (
            n.op == "call_method" and n.target in _ELEMENTWISE_METHODS) or (
            n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), _ELEMENTWISE_MODULES))
        if not elementwise:
            continue
        from_row = [reach[a] for a in n.all_input_nodes if a in reach]
        inputs = set().union(*(origin.get(a, set()) for a in n.all_input_nodes))
        if from_row and (n.target in adds or (n.op == "call_method" and n.target == "add")):
            for p in inputs:
                if sequence_dim(p) == from_row[0]:
                    out[p.name] = from_row[0]
        if from_row and sequence_dim(n) == from_row[0]:
            reach[n] = from_row[0]
        elif inputs and sequence_dim(n) is not None:
            origin[n] = inputs
    return out


# -- execution ---------------------------------------------------------------------------

def to_sequence_shard(x: Any, like: Any, dim: int) -> Any:
    """A stage input of the residual stream as this TP rank's sequence shard (``Shard(dim)``
    of the whole tensor every TP rank holds: a local slice, no communication; its gradient is
    all-gathered whole in backward, as the previous stage sends it back replicated)."""

    d = to_replicate(x, like)
    if isinstance(d, DTensor) and d.shape[dim] % d.device_mesh.size() == 0:
        return d.redistribute(d.device_mesh, [Shard(dim)])
    return d  # scatter_sequence refuses the length, naming the row linear

def to_replicate(x: Any, like: Any) -> Any:
    """A plain tensor entering the stage (input, buffer, a tensor made inside the graph) as a
    ``Replicate`` DTensor on ``like``'s mesh (``like``: a DTensor parameter of the stage);
    anything else unchanged. Every TP rank holds the same value."""

    if isinstance(x, torch.Tensor) and not isinstance(x, DTensor):
        return DTensor.from_local(x, like.device_mesh, [Replicate()], run_check=False)
    return x


def reduce_row(x: Any) -> Any:
    """A row-parallel linear's output (``Partial``) made ``Replicate`` right there: one
    all-reduce, Megatron's. Left alone, DTensor may instead reduce-scatter it where it meets
    the residual stream and all-gather before the next linear (the same bytes, two
    collectives and sharded norms in between)."""

    if isinstance(x, DTensor) and not all(isinstance(p, Replicate) for p in x.placements):
        return x.redistribute(x.device_mesh, [Replicate()])
    return x


def scatter_sequence(x: Any, dim: int, node: str) -> Any:
    """A row-parallel linear's output (``Partial``) reduce-scattered onto the sequence
    dimension ``dim`` (``Shard(dim)``; backward: the gradient all-gathered), sequence
    parallelism's replacement of ``reduce_row``. Refuses a sequence T does not divide: DTensor
    would shard it unevenly, which the transport and the pricing do not expect."""

    if not isinstance(x, DTensor):
        return x
    t = x.device_mesh.size()
    if x.shape[dim] % t:
        raise PipelineRuntimeError(f"sequence parallelism over {t} ranks: the output of {node} has a sequence of "
                                   f"{x.shape[dim]} tokens (dimension {dim}), which does not divide by {t}; pad the "
                                   f"sequence to a multiple of {t} or run without sequence parallelism")
    return x.redistribute(x.device_mesh, [Shard(dim)])


def gather_sequence(x: Any) -> Any:
    """The input of column-parallel linears under sequence parallelism: a value split on the
    sequence (``Shard``) all-gathered whole (``Replicate``), whose gradient, a partial sum
    over the shards, DTensor reduce-scatters back onto the sequence in backward (the reverse
    redistribution). A value that is already whole (before a stage's first row linear) takes
    ``reduce_grad``'s all-reduced gradient instead."""

    if isinstance(x, DTensor) and any(isinstance(p, Shard) for p in x.placements):
        return x.redistribute(x.device_mesh, [Replicate()])
    return reduce_grad(x)


class _ReduceGradient(torch.autograd.Function):
    """Identity forward; in backward the gradient made ``Replicate`` (from ``Partial``: one
    all-reduce), Megatron's "f" before column-parallel linears."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        return reduce_row(g)


def reduce_grad(x: Any) -> Any:
    """The input of column-parallel linears: its gradient (a sum of partial products over the
    shards) is all-reduced right there, once per input however many linears read it. Left
    alone, DTensor may reduce-scatter it and all-gather it later (the same bytes, more
    collectives)."""

    if isinstance(x, DTensor) and x.requires_grad:
        return _ReduceGradient.apply(x)
    return x


def to_whole(x: Any) -> Any:
    """A DTensor leaving the stage as the whole plain tensor (Partial: all-reduce; Shard:
    all-gather; Replicate: nothing); the gradient coming back is taken as replicated."""

    if isinstance(x, DTensor):
        return x.redistribute(x.device_mesh, [Replicate()]).to_local()
    return x


def to_sequence_local(x: Any, dim: int) -> Any:
    """A boundary value leaving the stage as this TP rank's sequence shard, a plain tensor
    (``Shard(dim)``: nothing to do; ``Replicate``: a local slice; ``Partial``: a
    reduce-scatter); its gradient comes back as the same shard of the whole gradient."""

    if isinstance(x, DTensor):
        return x.redistribute(x.device_mesh, [Shard(dim)]).to_local()
    return x


def from_sequence_shard(x: Any, like: Any, dim: int, keep: bool) -> Any:
    """A boundary value arriving as this TP rank's sequence shard (a plain tensor of S/T
    tokens), as the ``Shard(dim)`` DTensor on ``like``'s mesh it is; ``keep`` False (an input
    the stage needs whole: a rotary table) all-gathered to ``Replicate`` here. In backward
    the gradient leaves as this rank's shard of it."""

    if not isinstance(x, torch.Tensor) or isinstance(x, DTensor):
        return x
    d = DTensor.from_local(x, like.device_mesh, [Shard(dim)], run_check=False)
    return d if keep else d.redistribute(like.device_mesh, [Replicate()])


def attention_on_shards(q: Any, k: Any, v: Any, attn_mask: Any = None, *args: Any, **kwargs: Any) -> Any:
    """``scaled_dot_product_attention`` of DTensors, run on each rank's local heads.

    Attention is independent per head, so with query, key and value sharded alike on the
    heads (or all replicated) each rank attends over its own heads and the output keeps
    their placement; the mask is broadcast over the heads or sliced to the local ones. Written
    out (as ``local_map`` would, but with the placements read at run time) because DTensor's
    own rule on CPU propagates through the decomposition of the CPU attention kernel, which
    takes minutes per call."""

    if not isinstance(q, DTensor):
        return F.scaled_dot_product_attention(q, k, v, attn_mask, *args, **kwargs)
    placements = q.placements
    heads = q.dim() - 3
    # per-head attention only when the shards are heads; any other split (the sequence, under
    # sequence parallelism, where a replicated projection feeds it) is gathered whole first
    on_heads = all(isinstance(p, Replicate) or (isinstance(p, Shard) and p.dim % q.dim() == heads) for p in placements)
    if not on_heads or any(not isinstance(t, DTensor) or t.placements != placements for t in (k, v)):
        k, v = (t if isinstance(t, DTensor) else DTensor.from_local(t, q.device_mesh, [Replicate()], run_check=False)
                for t in (k, v))
        placements = (Replicate(),)
        q, k, v = (t.redistribute(q.device_mesh, placements) for t in (q, k, v))
    if isinstance(attn_mask, DTensor):
        if attn_mask.dim() == q.dim() and attn_mask.shape[heads] != 1:
            attn_mask = attn_mask.redistribute(q.device_mesh, placements)
        else:
            attn_mask = attn_mask.redistribute(q.device_mesh, [Replicate()])
        attn_mask = attn_mask.to_local()
    out = F.scaled_dot_product_attention(q.to_local(), k.to_local(), v.to_local(), attn_mask, *args, **kwargs)
    return DTensor.from_local(out, q.device_mesh, placements, run_check=False)


def _placement(text: str) -> Any:

    return Replicate() if text == "Replicate" else Shard(int(text[6:-1]))


def embedding_on_shards(weight: Any, ids: Any, padding_idx: int = -1) -> Any:
    """A token lookup in a table split by rows (``Shard(0)``, T equal parts): each rank looks up
    the ids in its range, zeros the others' rows, and one all-reduce sums the parts (Megatron's
    vocabulary-parallel embedding; the result is ``Replicate``). The table's gradient stays
    on its own rank's rows: no collective in backward. Written out rather than left to
    DTensor's embedding rule because that rule's backward has no row-split weight gradient:
    it makes a whole-table gradient on every rank and reduce-scatters it."""

    if not isinstance(weight, DTensor) or tuple(weight.placements) != (Shard(0),):
        return aten.embedding.default(weight, ids, padding_idx)
    mesh = weight.device_mesh
    local = weight.to_local()
    ids = ids.to_local() if isinstance(ids, DTensor) else ids
    n = local.shape[0]
    lo = mesh.get_local_rank() * n
    outside = (ids < lo) | (ids >= lo + n)
    pad = padding_idx - lo if padding_idx is not None and lo <= padding_idx < lo + n else -1
    out = aten.embedding.default(local, (ids - lo).masked_fill(outside, 0), pad)
    out = out.masked_fill(outside.unsqueeze(-1), 0)
    return DTensor.from_local(out, mesh, [Partial()], run_check=False).redistribute(mesh, [Replicate()])


def _vocab_lookups(gm: fx.GraphModule, plan: TensorParallelPlan) -> None:
    """The plan's token embeddings as ``embedding_on_shards`` calls (``aten.embedding``,
    ``F.embedding`` and ``nn.Embedding`` alike)."""
    graph = gm.graph
    by_name = {n.name: n for n in graph.nodes}
    for weight, name in plan.embeddings.items():
        n = by_name[name]
        pad: Any
        if n.op == "call_module":
            ids, pad = n.args[0], getattr(gm.get_submodule(str(n.target)), "padding_idx", None)
            with graph.inserting_before(n):
                w = graph.get_attr(weight)
        elif n.target is F.embedding:  # F.embedding counts a negative padding_idx from the end
            ids, w, pad = n.args[0], n.args[1], _dim_arg(n, 2, "padding_idx", None)
            pad = pad + gm.get_parameter(weight).shape[0] if isinstance(pad, int) and pad < 0 else pad
        else:
            w, ids, pad = n.args[0], n.args[1], _dim_arg(n, 2, "padding_idx", -1)
        with graph.inserting_before(n):
            new = graph.call_function(embedding_on_shards, (w, ids, -1 if pad is None else pad))
        new.meta = dict(n.meta)
        n.replace_all_uses_with(new)
        graph.erase_node(n)


def parallelize(gm: fx.GraphModule, mesh: DeviceMesh, plan: TensorParallelPlan,
                made: dict[int, nn.Parameter] | None = None) -> fx.GraphModule:
    """In place: ``gm``'s parameters become DTensors over ``mesh`` as ``plan`` places them
    (each rank keeping its shard; the values are the rank's full tensors, equal on every TP
    rank), its buffers ``Replicate`` DTensors, and its graph converts plain tensors to
    ``Replicate`` DTensors where they enter and DTensors to whole plain tensors at the
    output. Parameter names are unchanged. ``made`` (id of a plain parameter -> its DTensor
    parameter), shared by the calls for one rank's stages, keeps a tensor those stages share
    one parameter (its placement must be the same in each plan). Returns ``gm``."""

    with torch.no_grad():
        # a weight tied under several names (or shared with another stage's module) stays one parameter
        made = {} if made is None else made
        for name, p in list(gm.named_parameters(remove_duplicate=False)):
            owner, _, leaf = name.rpartition(".")
            mod = gm.get_submodule(owner) if owner else gm
            if id(p) not in made:
                d = distribute_tensor(p.detach(), mesh, [_placement(plan.placements.get(name, "Replicate"))])
                made[id(p)] = nn.Parameter(d, requires_grad=p.requires_grad)
            setattr(mod, leaf, made[id(p)])
        for name, b in list(gm.named_buffers()):
            owner, _, leaf = name.rpartition(".")
            mod = gm.get_submodule(owner) if owner else gm
            mod._buffers[leaf] = distribute_tensor(b, mesh, [Replicate()])
    graph = gm.graph
    derived: set[fx.Node] = set()  # nodes computed from DTensors: already DTensors
    params = {n for n, _ in gm.named_parameters(remove_duplicate=False)}
    _vocab_lookups(gm, plan)
    if not params:
        return gm  # nothing sharded: the stage runs on plain tensors, every TP rank alike
    # The conversions take the mesh from an empty ``Replicate`` DTensor on it (a graph argument must
    # be a node or plain data), a plain attribute of the stage: no parameter, buffer or state-dict
    # entry. Not a parameter's: read at the stage's start, a block's parameter would tie the block
    # to the whole stage when FSDP outlines its blocks (``runtime.outline``), and once sharded over
    # the replicas it would carry their 2-D mesh, not the TP mesh.
    object.__setattr__(gm, MESH_ANCHOR, DTensor.from_local(torch.empty(0, device=next(gm.parameters()).device), mesh,
                                                           [Replicate()], run_check=False))
    with graph.inserting_before(next(n for n in graph.nodes if n.op != "placeholder")):
        anchor = graph.get_attr(MESH_ANCHOR)
    rows, columns = set(plan.row.values()), set(plan.column.values()) | set(plan.heads.values())
    split_out = set(plan.split_outputs)
    reduced: dict[fx.Node, fx.Node] = {}  # a column linear's input -> its gradient-reducing identity
    # sequence parallelism: the column inputs all-gathered, the row outputs reduce-scattered
    enter = gather_sequence if plan.sequence else reduce_grad
    for n in list(graph.nodes):
        if n.name in columns:
            x = n.args[0]
            assert isinstance(x, fx.Node)
            if x not in reduced:
                with graph.inserting_after(x):
                    reduced[x] = graph.call_function(enter, (x,))
            n.replace_input_with(x, reduced[x])
        if n.name in rows:
            with graph.inserting_after(n):
                red = graph.call_function(reduce_row, (n,)) if n.name not in plan.sequence else \
                    graph.call_function(scatter_sequence, (n, plan.sequence[n.name], n.name))
            n.replace_all_uses_with(red, delete_user_cb=lambda u, red=red: u is not red)
        if n.op == "call_function" and n.target in _DROPPED:
            graph.erase_node(n)
            continue
        if n.op == "call_function" and n.target in _SDPA:
            n.target = attention_on_shards
        if n.op == "output":
            def wrap_out(v: Any, at: int | None = None) -> Any:
                if isinstance(v, fx.Node) and _maybe_tensor(v) and v.name not in split_out:
                    with graph.inserting_before(n):
                        if at in plan.boundary_outputs:  # sent on as this rank's sequence shard
                            return graph.call_function(to_sequence_local, (v, plan.boundary_outputs[at]))
                        return graph.call_function(to_whole, (v,))
                return v
            sent = n.args[0]
            if plan.boundary_outputs and isinstance(sent, (tuple, list)):
                n.args = (type(sent)(wrap_out(v, i) for i, v in enumerate(sent)),)
            else:
                n.args = (fx.node.map_arg(sent, lambda v: wrap_out(v, 0 if isinstance(sent, fx.Node) else None)),)
            continue
        if n is anchor or (n.op == "get_attr" and str(n.target) in params):
            derived.add(n)
            continue
        if not _maybe_tensor(n) or not n.users:
            continue  # sizes computed from a DTensor are the global tensor's, plain ints
        if n.op.startswith("call_") and any(a in derived for a in n.all_input_nodes):
            derived.add(n)  # an op on a DTensor returns a DTensor
            continue
        # an entering tensor: a placeholder, a buffer, a tensor made from nothing sharded, a leaf module's output
        with graph.inserting_after(anchor if n.op == "placeholder" else n):
            if n.op == "placeholder" and str(n.target) in plan.boundary_inputs:  # arrives as its shard
                dim = plan.boundary_inputs[str(n.target)]
                keep = plan.sequence_inputs.get(n.name) == dim  # the residual stream stays a shard
                conv = graph.call_function(from_sequence_shard, (n, anchor, dim, keep))
            elif n.op == "placeholder" and n.name in plan.sequence_inputs:
                conv = graph.call_function(to_sequence_shard, (n, anchor, plan.sequence_inputs[n.name]))
            else:
                conv = graph.call_function(to_replicate, (n, anchor))
        n.replace_all_uses_with(conv, delete_user_cb=lambda u: u is not conv)
        derived.add(conv)
    graph.lint()
    gm.recompile()
    gm.meta[TENSOR_PARALLEL] = plan
    return gm


class _LossOnShards:
    """The user's ``loss_fn`` on the last stage's outputs, some of which are logits split on
    the classes (DTensor ``Shard(-1)``): called as it is, so ``F.cross_entropy`` on them runs
    under ``loss_parallel`` (set around the whole step, whose backward needs it too). A loss
    that cannot take the split logits (it mixes them with plain tensors, or uses an op
    ``loss_parallel`` does not cover) gets them gathered whole instead, with one warning:
    correct, only without the saving. A DTensor loss comes back as a plain tensor."""

    def __init__(self, fn: Callable[[Any, Any], torch.Tensor]) -> None:
        self.fn, self.warned = fn, False

    def __call__(self, out: Any, target: Any) -> torch.Tensor:
        leaves = torch.utils._pytree.tree_leaves(out)
        if not any(isinstance(x, DTensor) for x in leaves):
            return self.fn(out, target)
        try:
            loss = self.fn(out, target)
        except (RuntimeError, NotImplementedError, ValueError, TypeError, AssertionError) as e:
            if not self.warned:
                log.warning("tensor parallelism: loss_fn cannot take logits split by vocabulary (%s: %s); they are "
                            "gathered whole for it (compute F.cross_entropy on them to keep them split)",
                            type(e).__name__, " ".join(str(e).split())[:200])
                self.warned = True
            loss = self.fn(torch.utils._pytree.tree_map(to_whole, out), target)
        return to_whole(loss)


def _vocab_runner(stage: Any, runner: Callable[..., Any]) -> Callable[..., Any]:
    """``stage.runner`` for a rank whose last stage keeps logits split by vocabulary: the
    ``loss_fn`` wrapped in ``_LossOnShards``; ``step`` and ``eval_step`` under
    ``loss_parallel`` (forward and backward of the cross-entropy on the shards); the outputs
    ``eval_step(return_outputs=True)`` gives back gathered whole."""

    def make(*args: Any, **kwargs: Any) -> Any:
        if len(args) >= 3 and args[2] is not None:
            args = (*args[:2], _LossOnShards(args[2]), *args[3:])
        elif kwargs.get("loss_fn") is not None:
            kwargs["loss_fn"] = _LossOnShards(kwargs["loss_fn"])
        r = runner(*args, **kwargs)
        step, evaluate = r.step, r.eval_step

        def parallel_step(*a: Any, **k: Any) -> Any:
            with loss_parallel():
                return to_whole(step(*a, **k))

        def parallel_eval(*a: Any, **k: Any) -> Any:
            with loss_parallel():
                got = evaluate(*a, **k)
                if not k.get("return_outputs"):
                    return to_whole(got)
                loss, outputs = got
                return to_whole(loss), torch.utils._pytree.tree_map(to_whole, outputs)

        # instance attributes: the Runner class (runtime/stage.py) is shared with every other plan
        r.step, r.eval_step = parallel_step, parallel_eval
        return r

    return make


def full_state(named: Any) -> dict[str, torch.Tensor]:
    """FQN -> whole plain tensor (a DTensor's ``full_tensor()``: collective over its mesh)."""

    return {n: (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone() for n, t in named}


# -- plan and build ----------------------------------------------------------------------

def with_tensor_parallel(pipe: Pipe, tp: int, *, sequence_parallel: bool = False) -> Pipe:
    """A shallow copy of ``pipe`` (the same stage modules) whose plan's mesh has ``tp`` = ``tp``:
    ``build_stage`` then runs each pipeline rank as ``tp`` tensor-parallel ranks (with
    ``sequence_parallel``, the activations between the regions split on the sequence,
    ``options.sequence_parallel``). The planner prices a plan with
    ``partition(tensor_parallel=T, sequence_parallel=...)``; this sets them on a plan made without."""

    if not isinstance(tp, int) or tp < 1:
        raise PipelineRuntimeError(f"with_tensor_parallel(tp={tp!r}): expected a positive integer")
    if sequence_parallel and tp < 2:
        raise PipelineRuntimeError("with_tensor_parallel(sequence_parallel=True) needs tp > 1: the sequence is split "
                                   "over the tensor-parallel group")
    new = copy.copy(pipe)
    plan = pipe.plan
    options = dict(plan.options)  # the GPUs grow with the groups: n_gpus = data_parallel x pipeline ranks x tp
    if isinstance(options.get("n_gpus"), int):
        options["n_gpus"] = options["n_gpus"] // plan.mesh.tp * tp
    options.pop("tensor_parallel", None)
    options.pop("sequence_parallel", None)
    if tp > 1:
        options["tensor_parallel"] = tp
    if sequence_parallel:
        options["sequence_parallel"] = True
    new.plan = dataclasses.replace(plan, options=options, mesh=dataclasses.replace(plan.mesh, tp=tp))
    return new


def model_inputs(plan: Plan) -> set[str]:
    """The names of the model's flat inputs (the stage graphs' placeholders that are not values
    made by an earlier stage): from the plan's routes, or for a version-3 plan (no routes)
    stage 0's inputs, which take every model input."""
    return {r.name for r in plan.routes if r.producer == "input"} if plan.routes else set(plan.stages[0].inputs)


def build_tensor_parallel(spec: PipelineSpec, rank: int, dev: torch.device, group: dist.ProcessGroup | None, *,
                          init_fn: Callable[[nn.Module], Any] | None, seed: int, compile: Any = False,
                          replicate: tuple[str, ...] = ()) -> RankStage:
    """``build_stage`` for a plan with ``mesh.tp`` > 1: the world as the ``(*mesh.dims, "tp")``
    device mesh (``tp`` innermost, ``plan.mesh.rank``), this rank's stages built over its
    pipeline group (the pipeline ranks of its TP index and replica) and then sharded over its TP
    group (``shard_plan`` + ``parallelize``). With replicas (``mesh.dp`` > 1) the stage's reducer
    is made after that (``RankStage.reducer``): FSDP over the ``dp`` dimension (``zero=3``) or
    ``GradSync`` over the DTensors' local shards (``zero=0``). The stage's ``tp_mesh`` /
    ``tp_rank`` / ``tp_plans`` say what was done."""

    from partitioner.runtime.stage import RankStage, job_mesh  # noqa: PLC0415 - a cycle: stage.py calls this module's build hook

    plan = spec.plan
    mesh = plan.mesh
    total = mesh.dp * plan.pp_ranks * mesh.tp
    world = dist.get_world_size()
    problems = []
    if group is not None:
        problems.append("a tensor-parallel plan builds its own device mesh over the default process group: "
                        "call build_stage without group=")
    if compile:
        problems.append("compile=True with tensor parallelism is not supported yet")
    if mesh.dp > 1 and mesh.zero == 1:
        problems.append("zero=1 with tensor parallelism is not supported (ZeroRedundancyOptimizer broadcasts the "
                        "parameters it steps, which DTensor has no rule for): re-partition with zero=3 (FSDP over the "
                        "replicas) or zero=0")
    if world != total:
        problems.append((f"the plan runs {mesh.dp} replicas x " if mesh.dp > 1 else "the plan runs ")
                        + f"{plan.pp_ranks} pipeline ranks x tp={mesh.tp} = {total} ranks, the process "
                        f"group has {world}: launch {total} processes")
    if rank != dist.get_rank():
        problems.append(f"build_stage(rank={rank}) but this process is global rank {dist.get_rank()}: a "
                        "tensor-parallel plan takes the global rank")
    if problems:
        raise PipelineRuntimeError("; ".join(problems))
    # one mesh for the job, laid out as plan.mesh.rank says (runtime.stage.job_mesh; hybrid
    # sharding's dp as (dp_replicate, dp_shard)): FSDP's mesh and the TP mesh from one parent
    dm, fsdp_mesh, dp = job_mesh(dev, mesh, plan.pp_ranks)
    dp_rank, pp_rank, tp_rank = dp.get_local_rank(), dm.get_local_rank("pp"), dm.get_local_rank("tp")
    assert rank == mesh.rank(dp_rank, pp_rank, tp_rank), "init_device_mesh laid the ranks out unlike plan.mesh"
    replicas = mesh.dp > 1
    # with replicas RankStage broadcasts replica 0's values over dp and leaves the reducer for below
    stage = RankStage(spec, pp_rank, dev, dm.get_group("pp"), init_fn=init_fn, seed=seed,
                      dp_group=dp.get_group() if replicas else None, dp_rank=dp_rank)
    tp_mesh = dm["tp"]
    stage.tp_mesh, stage.tp_rank = tp_mesh, tp_rank  # type: ignore[attr-defined]
    # the stage's boundary values are replicated over the TP group: its runner's transport sends
    # each message once per TP group (1/T per rank) and all-gathers at the receiver
    plans = {}
    # the tie sums' parameters by name: sharding replaces them with DTensors (``_retie``)
    names_of: dict[int, list[str]] = {}  # every name this rank's stages know a tensor by
    for n, p in stage.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(n)
    tied = [(pg, [n for p in params for n in names_of[id(p)]]) for pg, params in stage._tied]
    sequence = boundary_sequence(plan)  # sequence parallelism: what crosses the cuts as shards
    inputs = model_inputs(plan)

    def decide(s: int, mod: fx.GraphModule, keep: tuple[str, ...]) -> TensorParallelPlan:
        found = shard_plan(mod, mesh.tp, replicate=keep, last=s == plan.n_stages - 1,
                           sequence_parallel=bool(plan.options.get("sequence_parallel")), model_inputs=inputs)
        st = plan.stages[s]
        found.boundary_inputs = {n: sequence[n] for n in st.inputs if n in sequence} if s > 0 else {}
        found.boundary_outputs = {i: sequence[n] for i, n in enumerate(st.outputs) if n in sequence} \
            if s < plan.n_stages - 1 else {}
        if (found.boundary_inputs or found.boundary_outputs) and not any(True for _ in mod.parameters()):
            raise PipelineRuntimeError(
                f"sequence parallelism: stage {s} has no parameters, so it runs unsharded on every TP rank and "
                f"cannot take or send its boundary values {sorted(set(st.inputs + st.outputs) & set(sequence))} as "
                "sequence shards; move a cut so that every stage holds parameters, or run without sequence "
                "parallelism")
        return found

    graphs: dict[int, fx.GraphModule] = {}
    for s, mod in stage.modules.items():
        if not isinstance(mod, fx.GraphModule):
            raise PipelineRuntimeError(f"stage {s} is a {type(mod).__name__}, not an fx.GraphModule: tensor "
                                       "parallelism rewrites the stage graphs")
        graphs[s] = mod
        plans[s] = decide(s, mod, replicate)
    # a weight tied across pipeline ranks splits on all of them or on none (the planner's rule
    # on the whole graph, ``find_vocab``): where one rank keeps its copy whole, all do
    keep = _tie_consensus(tied, plans) | _shared_split_unlike(stage, plans)
    if keep:
        for s, mod in graphs.items():
            if keep & set(dict(mod.named_parameters(remove_duplicate=False))):
                plans[s] = decide(s, mod, (*replicate, *sorted(keep)))
    made: dict[int, nn.Parameter] = {}  # a tensor two stages of this rank share stays one DTensor parameter
    for s, mod in graphs.items():
        for name, why in plans[s].replicated.items():
            log.info("tensor parallelism: stage %d keeps %s whole on every TP rank: %s", s, name, why)
        parallelize(mod, tp_mesh, plans[s], made)
    _retie(stage, plans, tied)
    stage.tp_plans = plans  # type: ignore[attr-defined]
    stage.tp_sequence = sequence  # type: ignore[attr-defined]  # read by the runner (shard_boundaries)
    if replicas:  # zero=3: FSDP shards the DTensors over dp (2-D parameters); else GradSync averages their shards
        stage.dp_mesh = fsdp_mesh
        stage.grad_sync = stage.reducer()
    if any(p.split_outputs or p.losses for p in plans.values()):  # logits split by vocabulary reach the loss
        stage.runner = _vocab_runner(stage, stage.runner)  # type: ignore[method-assign]
    return stage


def _tie_consensus(tied: list[tuple[Any, list[str]]], plans: Mapping[int, TensorParallelPlan]) -> set[str]:
    """Collective over each tie's group (``tied``: ``RankStage._tied`` by name): the names of the tied
    weights that some pipeline rank keeps whole while another would split its copy -- to be kept
    whole everywhere, as the planner prices a tie (split under all its names or none)."""
    keep: set[str] = set()
    for pg, names in tied:
        split = any(p.placements.get(n, "Replicate") != "Replicate" for p in plans.values() for n in names)
        every: list[Any] = [None] * dist.get_world_size(pg)
        dist.all_gather_object(every, split, group=pg)
        if any(every) and not all(every):
            log.info("tensor parallelism: %s tied across pipeline ranks is kept whole on one of them: whole on all",
                     names)
            keep |= set(names)
    return keep


def _shared_split_unlike(stage: Any, plans: Mapping[int, TensorParallelPlan]) -> set[str]:
    """The names of tensors that several stages of this rank share (a weight tied between the
    first and the last stage, which a V schedule puts on one rank) and that their plans would
    place differently: to be kept whole in all of them, so the tensor stays one parameter (its
    one gradient is the tie's sum, as in one process). Not collective."""
    by_tensor: dict[int, list[tuple[int, str]]] = {}
    for s, mod in stage.modules.items():
        for n, p in mod.named_parameters(remove_duplicate=False):
            by_tensor.setdefault(id(p), []).append((s, n))
    keep: set[str] = set()
    for uses in by_tensor.values():
        if len({s for s, _ in uses}) > 1 and len({plans[s].placements.get(n, "Replicate") for s, n in uses}) > 1:
            log.info("tensor parallelism: %s shared by stages %s of one rank is kept whole in all of them",
                     sorted({n for _, n in uses}), sorted({s for s, _ in uses}))
            keep |= {n for _, n in uses}
    return keep


def _retie(stage: Any, plans: Mapping[int, TensorParallelPlan], tied: list[tuple[Any, list[str]]]) -> None:
    """Weights tied across pipeline ranks (an embedding on the first, the output layer on the
    last), after the stages were sharded: each tie's sum of gradients (``RankStage._tied``, one
    group per replica and TP index: the same TP rank of each pipeline rank) then runs on the
    local shards, which is the whole tie's sum only when every copy is sharded alike (both split
    by vocabulary, rows ``t V / T`` to ``(t + 1) V / T`` on TP rank ``t``; or both whole). That
    is checked here, collectively over each tie's group, and a mismatch refused naming both
    placements (hand-written: DTensor has no notion of one tensor held on two pipeline ranks)."""
    named = dict(stage.named_parameters(remove_duplicate=False))
    ties = []
    for pg, names in tied:
        params = list({id(named[n]): named[n] for n in names if n in named}.values())
        mine = [(n, _tie_placement(p), tuple(_tie_local(p).shape)) for n in names if n in named for p in (named[n],)]
        every: list[Any] = [None] * dist.get_world_size(pg)
        dist.all_gather_object(every, mine[0] if mine else None, group=pg)
        if len({(w[1], w[2]) for w in every if w is not None}) > 1:
            raise PipelineRuntimeError(
                "tensor parallelism: a weight tied across pipeline ranks is sharded differently on them ("
                + "; ".join(f"{w[0]}: {w[1]}, local shape {w[2]}" for w in every if w is not None)
                + "), so its copies' gradients cannot be summed shard by shard: "
                + "; ".join(f"stage {s} keeps {n} whole: {why}" for s, p in plans.items()
                            for n, why in p.replicated.items() if n in names)
                + " -- untie the weights (e.g. tie_word_embeddings=False) or cut so that both uses share a stage")
        ties.append((pg, params))
    stage._tied = ties


def _tie_placement(p: Any) -> str:
    return repr(tuple(p.placements)) if isinstance(p, DTensor) else "whole"


def _tie_local(p: Any) -> torch.Tensor:
    return p.to_local() if isinstance(p, DTensor) else p


def boundary_sequence(plan: Plan) -> dict[str, int]:
    """Under sequence parallelism (``options.sequence_parallel``, ``mesh.tp`` > 1), each
    boundary value that travels as its TP ranks' sequence shards -> the dimension: every
    floating-point tensor with one dimension, not its last, sized by the sequence ``S`` (the
    planner's ``sequence_dim`` rule, read from the plan's value records so that the sending
    and the receiving rank decide alike from the plan alone). Empty otherwise."""
    if plan.mesh.tp <= 1 or not plan.options.get("sequence_parallel"):
        return {}
    out: dict[str, int] = {}
    for b in plan.boundaries:
        for v in b.values:
            dtype = getattr(torch, v.dtype, None) if v.kind == "tensor" else None
            if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or v.name in out:
                continue
            dims = [d for d, n in enumerate(v.shape[:-1])
                    if isinstance(n, str) and SEQ in poly.from_text(n).free_symbols]
            if len(dims) == 1:
                out[v.name] = dims[0]
    return out


def _shard_wire(sequence: Mapping[str, int], tp: int, w: Wire) -> Wire:
    """``w`` as it travels on one TP rank: its sequence shard when ``sequence`` names it."""
    d = sequence.get(w.name)
    if d is None:
        return w
    if w.shape[d] % tp:
        raise PipelineRuntimeError(f"sequence parallelism over {tp} ranks: the boundary value {w.name!r} has a "
                                   f"sequence of {w.shape[d]} tokens (dimension {d}), which does not divide by {tp}; "
                                   f"pad the sequence to a multiple of {tp} or run without sequence parallelism")
    return dataclasses.replace(w, shape=(*w.shape[:d], w.shape[d] // tp, *w.shape[d + 1:]))


def shard_boundaries(stage: Any, transport: Any, interpreters: Any) -> None:
    """Lay a runner's messages out as sequence shards (``boundary_sequence``, the module
    docstring): each interpreter's boundary wires at S/T tokens on the sequence dimension, and
    the transport told which tensors of a message are the rank's own shard. Nothing for a
    stage without sequence parallelism."""
    sequence = getattr(stage, "tp_sequence", None)
    if not sequence:
        return
    tp = stage.plan.mesh.tp
    for it in interpreters:
        it.wire_map = functools.partial(_shard_wire, sequence, tp)
    first = interpreters[0]
    transport.own = lambda key: tuple(n in sequence for n in first.message_values(key))


def describe(plans: Mapping[int, TensorParallelPlan]) -> str:
    """One line per stage: which weights are column-, row-parallel, and replicated."""
    return "\n".join(f"stage {s}: column {sorted(p.column)}; row {sorted(p.row)}; "
                     f"replicated linears {sorted(p.replicated)}" for s, p in plans.items())

