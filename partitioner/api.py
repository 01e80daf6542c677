"""The public entry points: ``partition()`` and ``apply_plan()``, their argument checks, and the compiler's steps in order.

``partition()`` checks the arguments (``_check_arguments``), captures the model, and runs
the steps, each in its own module: ``problem`` (annotate and price the graph for one
candidate), ``search`` (cuts and recompute under the exact memory, the objective, why
nothing fits), ``layout`` (automatic schedule / micro-batches, data-parallel degree,
placement on nodes, replica pricing) and ``emit`` (stage modules and the plan).
``apply_plan()`` checks a saved plan against the model and re-applies it (``emit.reapply``).
"""

from __future__ import annotations

import functools
import gc
import inspect
from typing import Any, Mapping, NamedTuple, Sequence

import torch
from torch import nn

from partitioner.cost_models.devices import DeviceSpec, LinkSpec, get_device, get_link
from partitioner.cost_models.errors import PartitionError
from partitioner.data_parallel import divisors
from partitioner.emit import emit, fingerprint, reapply
from partitioner.layout import AUTO_NOTE, DP_NOTE, choose
from partitioner.memory import OPTIMIZER_STATES, PRECISIONS, RECOMPUTE, default_precision
from partitioner.objective import OBJECTIVES
from partitioner.passes.base import InputSpec
from partitioner.passes.order import pin_order
from partitioner.passes.shape_prop import default_specs
from partitioner.passes.trace import capture, check_example_names, with_seq_dims
from partitioner.pipe import Pipe
from partitioner.plan import Plan, PlanError
from partitioner.problem import Context, Options, Request
from partitioner.schedule import SCHEDULE_NAMES, SCHEDULES, Schedule, ScheduleError, build_schedule

__all__ = ["partition", "apply_plan", "OPTIMIZER_STATES", "Options", "AUTO_NOTE", "DP_NOTE", "fingerprint"]


def _split_inputs(example_inputs: Any, example_kwargs: Mapping[str, Any] | None) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    if example_inputs is None and not example_kwargs:
        return None
    kwargs = dict(example_kwargs or {})
    if isinstance(example_inputs, Mapping):
        kwargs.update(example_inputs)
        return (), kwargs
    if isinstance(example_inputs, torch.Tensor) or not isinstance(example_inputs, (tuple, list)):
        return (example_inputs,), kwargs
    return tuple(example_inputs), kwargs


def _check_counts(pp: int, virtual_stages: Any, schedule: Any, n_microbatches: Any) -> None:
    """Counts and the schedule, against the schedule's registry entry (``schedule.SCHEDULES``);
    ``pp``: the pipeline's ranks (``n_gpus / data_parallel``, checked by ``_check_mesh``)."""
    if not isinstance(virtual_stages, int) or virtual_stages < 1:
        raise PartitionError(f"virtual_stages must be an int >= 1, got {virtual_stages!r}")
    if n_microbatches is not None and n_microbatches != "auto" and (
            not isinstance(n_microbatches, int) or isinstance(n_microbatches, bool) or n_microbatches < 1):
        raise PartitionError(f"n_microbatches must be an int >= 1 or 'auto', got {n_microbatches!r}")
    if isinstance(schedule, Schedule):
        if schedule.n_ranks != pp or schedule.n_stages != pp * virtual_stages:
            raise PartitionError(f"schedule {schedule.name!r} is for {schedule.n_ranks} ranks and {schedule.n_stages} "
                                 f"stages, partition() for {pp} pipeline ranks (n_gpus / data_parallel) x "
                                 f"virtual_stages={virtual_stages}")
        if isinstance(n_microbatches, int) and n_microbatches != schedule.n_microbatches:
            raise PartitionError(f"n_microbatches={n_microbatches} but schedule {schedule.name!r} has "
                                 f"{schedule.n_microbatches}")
        schedule.validate()
        return
    if schedule == "auto":
        return
    if schedule not in SCHEDULES:
        raise PartitionError(f"unknown schedule {schedule!r}; use one of {', '.join(SCHEDULE_NAMES)} or 'auto'")
    allowed = SCHEDULES[schedule].stages_per_rank
    if allowed is not None and virtual_stages not in allowed:
        if virtual_stages > 1:
            raise PartitionError(f"virtual_stages={virtual_stages} needs schedule='interleaved-1f1b'"
                                 f"{' or zbv (2)' if virtual_stages == 2 else ''}, got {schedule!r}")
        raise PartitionError(f"schedule {schedule!r} needs virtual_stages={allowed[0]}, got {virtual_stages}")

def _check_tensor_parallel(tensor_parallel: Any, n_gpus: int, dp: int, gpus_per_node: Any, custom: Any) -> None:
    """``tensor_parallel``: "auto", or a degree that divides the GPUs left per replica and
    (given ``gpus_per_node``) a node, so each group stays on its NVLink."""
    if tensor_parallel == "auto":
        if custom is not None:
            raise PartitionError("tensor_parallel='auto' needs a schedule name: a Schedule object fixes the pipeline's "
                                 "rank count; pass tensor_parallel=<degree>")
        return
    if not isinstance(tensor_parallel, int) or isinstance(tensor_parallel, bool) or tensor_parallel < 1:
        raise PartitionError(f"tensor_parallel must be an int >= 1 or 'auto', got {tensor_parallel!r}")
    if n_gpus % (dp * tensor_parallel):
        raise PartitionError(f"n_gpus={n_gpus} does not split into data_parallel={dp} x tensor_parallel="
                             f"{tensor_parallel}; choose tensor_parallel among {divisors(n_gpus // dp)}")
    if isinstance(gpus_per_node, int) and gpus_per_node % tensor_parallel:
        raise PartitionError(f"tensor_parallel={tensor_parallel} does not divide gpus_per_node={gpus_per_node}: a "
                             "tensor-parallel group stays inside one node")


class _Checked(NamedTuple):
    """``partition()``'s arguments after the checks, with their defaults resolved."""

    schedule: str  # a registry name, "auto", or a hand-written Schedule's name
    custom: Schedule | None  # a hand-written Schedule (None: a built-in one, by name)
    n_microbatches: int | str | None
    virtual_stages: int
    data_parallel: int  # the degree to start from ("auto" starts from 1)
    inter_link: LinkSpec | None  # between nodes (None: every rank on one node)
    precision: str


def _check_fsdp_shard(fsdp_shard: Any, zero: Any, data_parallel: Any, gpus_per_node: Any,
                      tensor_parallel: Any) -> int | None:
    """``fsdp_shard`` (HSDP): None, or a shard group size that divides an explicit
    ``data_parallel`` under ``zero=3`` and fits a node with its tensor-parallel ranks; the
    whole ``data_parallel`` is plain FSDP (None)."""
    if fsdp_shard is None:
        return None
    if not isinstance(fsdp_shard, int) or isinstance(fsdp_shard, bool) or fsdp_shard < 1:
        raise PartitionError(f"fsdp_shard must be an int >= 1 (replicas per FSDP shard group) or None, got "
                             f"{fsdp_shard!r}")
    if zero != 3:
        raise PartitionError(f"fsdp_shard={fsdp_shard} is hybrid sharding of zero=3 (FSDP); zero is {zero!r}: pass "
                             "zero=3, or leave fsdp_shard out")
    if not isinstance(data_parallel, int) or isinstance(data_parallel, bool):
        raise PartitionError(f"fsdp_shard={fsdp_shard} needs data_parallel as a count (the replicas it divides), "
                             f"got {data_parallel!r}")
    if data_parallel % fsdp_shard:
        raise PartitionError(f"fsdp_shard={fsdp_shard} does not divide data_parallel={data_parallel}: the replicas "
                             f"split into data_parallel / fsdp_shard groups of fsdp_shard; choose among "
                             f"{divisors(data_parallel)}")
    t = tensor_parallel if isinstance(tensor_parallel, int) else 1  # "auto": checked per degree by the search
    if isinstance(gpus_per_node, int) and fsdp_shard * t > gpus_per_node:
        raise PartitionError(f"fsdp_shard={fsdp_shard}" + (f" x tensor_parallel={t}" if t > 1 else "")
                             + f" exceeds gpus_per_node={gpus_per_node}: a shard group gathers and reduce-scatters "
                             "every unit and must sit inside one node; choose fsdp_shard <= "
                             f"{gpus_per_node // t}")
    return None if fsdp_shard == data_parallel else fsdp_shard


def _check_arguments(model: Any, n_gpus: Any, schedule: Any, n_microbatches: Any, virtual_stages: Any,
                     optimizer: Any, precision: Any, recompute: Any, objective: Any, data_parallel: Any,
                     zero: Any, gpus_per_node: Any, inter_link: Any) -> _Checked:
    """Every check of ``partition()``'s options, in one place, before anything is traced:
    a wrong value raises ``PartitionError`` naming it and what is allowed."""
    if not isinstance(model, nn.Module):
        raise PartitionError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if virtual_stages is None:  # the schedule's own (zbv: 2), else 1
        spr = schedule.n_stages // schedule.n_ranks if isinstance(schedule, Schedule) else \
            SCHEDULES[schedule].stages_per_rank if schedule in SCHEDULES else None
        virtual_stages = spr if isinstance(spr, int) else (spr[0] if spr and 1 not in spr else 1)
    # the mesh: n_gpus = data_parallel x pipeline ranks, ZeRO, nodes
    if not isinstance(n_gpus, int) or isinstance(n_gpus, bool) or n_gpus < 1:
        raise PartitionError(f"n_gpus must be an int >= 1, got {n_gpus!r}")
    if data_parallel == "auto":
        if isinstance(schedule, Schedule):
            raise PartitionError("data_parallel='auto' needs a schedule name: a Schedule object fixes the pipeline's "
                                 f"rank count ({schedule.n_ranks}); pass data_parallel={n_gpus // schedule.n_ranks}")
        dp = 1  # layout.choose tries every divisor
    elif not isinstance(data_parallel, int) or isinstance(data_parallel, bool) or data_parallel < 1:
        raise PartitionError(f"data_parallel must be an int >= 1 or 'auto', got {data_parallel!r}")
    elif n_gpus % data_parallel:
        raise PartitionError(f"n_gpus={n_gpus} does not split into data_parallel={data_parallel} replicas; choose "
                             f"data_parallel among {divisors(n_gpus)} (n_gpus = data_parallel x pipeline ranks)")
    else:
        dp = data_parallel
    if zero not in (0, 1, 3, "auto") or isinstance(zero, bool):
        raise PartitionError(f"zero must be 0 or 1 (ZeRO-1: optimizer state sharded over the replicas) or 3 (FSDP "
                             f"inside the stages: weights, gradients and optimizer state sharded), or 'auto' (the "
                             f"fastest of the three that fits), got {zero!r}")
    if gpus_per_node is not None and (not isinstance(gpus_per_node, int) or isinstance(gpus_per_node, bool)
                                      or gpus_per_node < 1):
        raise PartitionError(f"gpus_per_node must be an int >= 1 or None, got {gpus_per_node!r}")
    if inter_link is not None and gpus_per_node is None:
        raise PartitionError("inter_link= prices messages between nodes: give gpus_per_node= too")
    between = None
    if gpus_per_node is not None and gpus_per_node < n_gpus:
        between = get_link(inter_link if inter_link is not None else "ib-ndr-400")
    # the schedule and the counts
    _check_counts(n_gpus // dp, virtual_stages, schedule, n_microbatches)
    custom = schedule if isinstance(schedule, Schedule) else None
    if custom is not None:
        schedule, n_microbatches = custom.name, custom.n_microbatches
        if custom.name in SCHEDULES:  # a built-in name must mean the built-in lists (a plan stores only the name)
            try:
                builtin: Schedule | None = build_schedule(custom.name, custom.n_ranks, custom.n_microbatches,
                                                          custom.n_stages)
            except ScheduleError:
                builtin = None
            if custom != builtin:
                raise PartitionError(f"this Schedule is named {custom.name!r}, a built-in schedule, but its action "
                                     "lists differ from the builder's: give hand-written lists their own name")
            custom = None
    # memory and the objective
    if optimizer not in OPTIMIZER_STATES:
        raise PartitionError(f"unknown optimizer {optimizer!r}; use one of {', '.join(OPTIMIZER_STATES)}")
    if precision is None:
        precision = default_precision(next((p.dtype for p in model.parameters()), torch.float32))
    if precision not in PRECISIONS:
        raise PartitionError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if recompute not in RECOMPUTE:
        raise PartitionError(f"unknown recompute {recompute!r}; use one of {', '.join(RECOMPUTE)}")
    if objective not in OBJECTIVES:
        raise PartitionError(f"unknown objective {objective!r}; use one of {', '.join(OBJECTIVES)}")
    return _Checked(str(schedule), custom, n_microbatches, virtual_stages, dp, between, precision)


def _few_full_collections(fn: Any) -> Any:
    """Planning makes hundreds of thousands of long-lived objects (graph nodes, fake tensors,
    size expressions), and their growth triggers Python's full garbage collections, each a
    scan of the whole heap that frees next to nothing: three on a 10,000-node graph, a fifth
    of its planning time. While ``fn`` runs the full collections wait (the young generations
    are collected as usual); the first one after it sees everything."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        before = gc.get_threshold()
        deferred = (*before[:2], max(before[2], 1 << 30))
        gc.set_threshold(*deferred)
        try:
            return fn(*args, **kwargs)
        finally:
            if gc.get_threshold() == deferred:  # unless someone else changed them meanwhile
                gc.set_threshold(*before)

    return run


@_few_full_collections
def partition(
    model: nn.Module,
    n_gpus: int,
    example_inputs: Any = None,
    *,
    example_kwargs: Mapping[str, Any] | None = None,
    schedule: str | Schedule = "1f1b",
    n_microbatches: int | str | None = None,
    virtual_stages: int | None = None,
    device: str | DeviceSpec = "h100-sxm",
    link: str | LinkSpec = "nvlink4",
    cut_at: str | None = None,
    pinned_cuts: Sequence[str] = (),
    optimizer: str = "adam",
    precision: str | None = None,
    recompute: str = "auto",
    memory_limit: int | None = None,
    capture_route: str = "auto",
    leaf_modules: Sequence[str | type] = (),
    concrete_args: dict[str, Any] | None = None,
    seq_dims: Mapping[str, int] | None = None,
    keep_snapshots: bool = False,
    objective: str = "auto",
    data_parallel: int | str = 1,
    zero: int | str = 0,
    gpus_per_node: int | None = None,
    inter_link: str | LinkSpec | None = None,
    tensor_parallel: int | str = 1,
    fsdp_reshard: str | None = None,
    sequence_parallel: bool = False,
    fsdp_shard: int | None = None,
) -> Pipe:
    """Split ``model`` into ``n_gpus`` (× ``virtual_stages``) balanced pipeline stages.

    >>> from partitioner.examples import gpt_example
    >>> model, (idx,) = gpt_example()
    >>> pipe = partition(model, n_gpus=2, example_inputs=(idx,))
    >>> torch.equal(pipe(idx), model(idx))
    True

    The model is captured (torch.fx, or torch.export where fx cannot trace it), each node
    priced on ``device`` (time) and ``link`` (the values that would cross a cut), and the cuts
    chosen to minimise the slowest stage (or the simulated step, see ``objective``) while every
    stage fits the device's memory, as a training run holds it (``partitioner.memory``).

    Args:
        model: the module to split.
        n_gpus: GPUs in all: ``data_parallel`` × the pipeline's ranks.
        example_inputs: a tuple of positional inputs, a dict of keyword inputs, or a single
            tensor; dim 0 of every tensor is the (global) batch ``B``, dim 1 of a 2-D integer
            input the sequence ``S``. Without example inputs the split balances parameter
            bytes only (a warning says so, and the plan notes it).
        example_kwargs: keyword inputs, added to those of ``example_inputs``.
        schedule: a registry name ("1f1b", "gpipe", "interleaved-1f1b", "zb-h1", "zbv",
            "naive"), "auto" (every schedule that fits the counts is solved and the fastest
            predicted step that fits memory is kept; the plan's notes rank them), or a
            ``Schedule`` object with hand-written action lists (its rank and stage counts
            must match).
        n_microbatches: micro-batches per step, dividing the pipeline's batch; None: the
            schedule's default (the largest divisor up to 2 per rank); "auto": every divisor
            of the batch is solved and the fastest predicted step that fits is kept.
        virtual_stages: stages per rank (interleaved schedules); None: the schedule's own
            (2 for zbv), else 1.
        device: the device the stages are priced on: a built-in name
            (``partitioner.DEVICES``), "local" (measured on this machine), or a ``DeviceSpec``.
        link: the link between neighbouring pipeline ranks: a built-in name
            (``partitioner.LINKS``) or a ``LinkSpec``.
        cut_at: where cuts may go: a glob of module paths (cut only before those modules,
            e.g. "transformer.h.*"), or "markers" (among the ``pipe_split()`` calls in
            forward); None: before any node whose outputs can cross a cut.
        pinned_cuts: cuts the solver must make: node names (cut before the node) or module
            paths (cut before the module's body); the solver places the others.
        optimizer: the optimizer whose state is priced per parameter (one of
            ``partitioner.memory.OPTIMIZER_STATES``: "adam", "adamw", "momentum", "sgd",
            "none").
        precision: "fp32", "bf16-mixed", "fp16-mixed" or "bf16": the bytes of weights,
            gradients and optimizer state per parameter and the compute dtype; None: from
            the parameters' dtype (bf16/fp16 parameters train mixed).
        recompute: "none", "full", "selective" (attention cores) or "selective-op"
            (torchtitan's op-level policy) activation checkpointing for every stage,
            or "auto": recompute only in the stages that would not fit otherwise.
        memory_limit: bytes one GPU may hold; None: the device's memory.
        capture_route: "auto" (torch.fx, falling back to torch.export), "fx" or "export".
        leaf_modules: modules torch.fx keeps whole (not traced into): classes or module
            paths; a stage boundary never falls inside one.
        concrete_args: arguments torch.fx specialises on (e.g. control-flow flags), as
            ``torch.fx.symbolic_trace`` takes them.
        seq_dims: input name → the dimension that is the sequence ``S`` (for inputs where
            it is not dim 1 of a 2-D integer tensor), so costs stay symbolic in ``S``.
        keep_snapshots: keep the graph's text after capture, after each pass and after the
            solve in ``pipe.snapshots`` (for debugging; costs memory).
        objective: "bottleneck" (minimise the slowest stage, then the bytes cut), "step"
            (minimise the schedule's simulated step time; never predicted slower than the
            bottleneck split, which is one of its candidates), or "auto": the bottleneck for
            1F1B with one stage per rank, whose steady state it is, and the step for the
            other schedules when the pipeline is small enough to simulate in the search's
            budget (the plan notes which).
        data_parallel: replicas of the pipeline: each runs ``1/data_parallel`` of the
            batch and the replicas average gradients once per step (priced as a bucketed ring
            all-reduce overlapped with the last backwards); "auto": the divisor of ``n_gpus``
            with the fastest predicted step that fits (the plan's notes rank them).
        zero: 0, 1 to shard the optimizer state over the replicas (ZeRO-1), or 3 to shard
            weights, gradients and optimizer state inside the stages with FSDP2; "auto": each
            of the three is solved with every other choice left open (with one replica only
            0, which shards nothing) and the fastest predicted step that fits is kept (the
            rankings' labels name each candidate's level).
        gpus_per_node: GPUs per node (ranks are placed in torchrun's order); the planner
            picks the mesh order (pipelines inside nodes, or each stage's replicas inside)
            with the faster predicted step. None: every rank on one node.
        inter_link: the link between nodes (a built-in name or a ``LinkSpec``; needs
            ``gpus_per_node``); None: "ib-ndr-400" when there is more than one node.
        tensor_parallel: tensor-parallel ranks per pipeline rank (Megatron-style: attention
            and MLP regions found in the graph are split over the group, one all-reduce per
            region each way on ``link``), or "auto" to try 1 and every degree that divides a
            node's GPUs and shards a region, keeping the fastest predicted step. ``n_gpus`` =
            ``data_parallel`` × pipeline ranks × ``tensor_parallel``; the plan's
            ``mesh.tp`` records it and ``build_stage`` runs it (``runtime.tensor_parallel``).
        fsdp_reshard: with ``zero=3``, how FSDP gathers inside the stages: None, the
            schedule's mode ("step" for zb-h1 / zbv, else "unit"); "unit": gathered for each
            micro-batch's forward and backward, reduce-scattered after each (least memory);
            "step": gathered once and reduce-scattered once per step (torchtitan's pipelining
            setting; holds the stage's full weights and gradients); "auto": both solved, "step"
            kept where it fits and is strictly faster (``rankings["fsdp"]``). A split backward
            runs "step" only. The plan's ``mesh.fsdp`` records a mode that is not the schedule's.
        sequence_parallel: with ``tensor_parallel`` > 1 (or "auto"), Megatron's sequence
            parallelism: the activations between the attention/MLP regions (norms, residual
            adds, dropout) are split on the sequence over the TP group, each region's input
            all-gathered and its output reduce-scattered instead of all-reduced. The
            sequence length must divide by the degree. ``options.sequence_parallel`` records it.
        fsdp_shard: with ``zero=3``, hybrid sharding (HSDP, torchtitan's
            ``data_parallel_shard_degree``): each parameter is sharded over groups of this many
            replicas, which sit inside one node, and the ``data_parallel / fsdp_shard`` groups
            replicate the shards (FSDP2 on a 2-D ``(replicate, shard)`` mesh), all-reducing the
            gradient shards over the link between nodes. Must divide ``data_parallel`` (an int)
            and, times ``tensor_parallel``, fit a node (``gpus_per_node``); equal to
            ``data_parallel`` (or None) shards over every replica. With tensor parallelism the
            mesh is ``(dp_replicate, dp_shard, tp)``. The plan's ``mesh.shard`` records it;
            ``zero="auto"`` also tries it where the replicas span nodes.

    Returns:
        A ``Pipe``: the stage modules, callable like ``model`` (same outputs), and
        ``pipe.plan``, the ``Plan`` (cuts, per-stage costs and memory, the prediction,
        the notes) that ``pipe.plan.save(path)`` writes and ``load_plan(path).apply(model)``
        re-applies without solving again.

    Raises:
        PartitionError: an argument is wrong (its name, and what is allowed), the example
            inputs do not match ``forward``, the batch does not split into the replicas or
            micro-batches, or too few positions can be cut for the stages.
        CaptureError: the model cannot be captured on the route asked for.
        InfeasibleError: no split fits the memory (the message names the fullest stage
            and what would fit: more GPUs, recompute, fewer micro-batches in flight), or no
            automatic candidate fits.
    """
    checked = _check_arguments(model, n_gpus, schedule, n_microbatches, virtual_stages, optimizer, precision,
                               recompute, objective, data_parallel, zero, gpus_per_node, inter_link)
    _check_tensor_parallel(tensor_parallel, n_gpus, checked.data_parallel if data_parallel != "auto" else 1,
                           gpus_per_node, checked.custom)
    if zero == 1 and isinstance(tensor_parallel, int) and tensor_parallel > 1 and checked.data_parallel > 1:
        # the runtime refuses it at build (runtime.tensor_parallel): ZeroRedundancyOptimizer broadcasts DTensors
        raise PartitionError(f"zero=1 with tensor_parallel={tensor_parallel} and data_parallel="
                             f"{checked.data_parallel} is not supported (ZeRO-1's optimizer broadcasts the parameters "
                             "it steps, which tensor parallelism makes DTensors): use zero=3 (FSDP over the replicas) "
                             "or zero=0, or tensor_parallel=1")
    if not isinstance(sequence_parallel, bool) or (sequence_parallel and tensor_parallel == 1):
        raise PartitionError(f"sequence_parallel={sequence_parallel!r}: expected True or False, and True only with "
                             "tensor_parallel > 1 or 'auto' (it splits the activations over the TP group)")
    if fsdp_reshard not in (None, "auto", "unit", "step"):
        raise PartitionError(f"fsdp_reshard must be None (the schedule's mode), 'unit', 'step' or 'auto', "
                             f"got {fsdp_reshard!r}")
    if fsdp_reshard == "unit" and checked.custom is None and isinstance(schedule, str) \
            and SCHEDULES.get(schedule) is not None and SCHEDULES[schedule].split_backward:
        raise PartitionError(f"fsdp_reshard='unit' cannot run schedule {schedule!r}: its split backward (W) computes "
                             "weight gradients after FSDP's per-unit reduction; use 'step' or None")
    fsdp_shard = _check_fsdp_shard(fsdp_shard, zero, data_parallel, gpus_per_node, tensor_parallel)
    dev, lnk = get_device(device), get_link(link)
    inputs = _split_inputs(example_inputs, example_kwargs)
    dynamic = None
    if inputs is not None:
        sig = inspect.signature(model.forward)
        check_example_names(model, inputs[1])  # a misspelled key: name forward's parameters
        try:
            bound = sig.bind(*inputs[0], **inputs[1])
        except TypeError as e:
            raise PartitionError(f"example inputs do not match {type(model).__name__}.forward{sig}: {e}") from None
        specs0 = with_seq_dims(default_specs(list(bound.arguments.values()), list(bound.arguments)), seq_dims)
        dynamic = {s.name: {d: sym for d, sym in s.dims} for s in specs0}
    cap = capture(model, *(inputs or (None, None)), route=capture_route, leaf_modules=leaf_modules,
                  concrete_args=concrete_args, dynamic=dynamic)
    dp = checked.data_parallel
    opts = Options(n_gpus, n_gpus // dp * checked.virtual_stages, checked.schedule, 0, cut_at, tuple(pinned_cuts),
                   optimizer, cap.route, tuple(str(m) for m in leaf_modules), memory_limit, checked.precision,
                   recompute, checked.custom, dp, 0 if zero == "auto" else int(zero), gpus_per_node, checked.inter_link,
                   objective, fsdp_reshard=fsdp_reshard, sequence_parallel=sequence_parallel, fsdp_shard=fsdp_shard)
    specs: tuple[InputSpec, ...] = ()
    if inputs is not None:
        flat = cap.flatten(*inputs)
        specs = with_seq_dims(default_specs(flat, list(cap.input_names)), seq_dims, strict=False)
    request = Request(opts, checked.n_microbatches, data_parallel, dev, lnk, keep_snapshots, tensor_parallel, zero)
    ctx = Context(model, cap, specs, request)
    return emit(ctx, choose(ctx))


@_few_full_collections
def apply_plan(plan: Plan, model: nn.Module, example_inputs: Any = None, **kw: Any) -> Pipe:
    """Rebuild the stages ``plan`` describes for ``model``, without solving again."""
    specs = plan.input_specs()
    opts = plan.options
    for i, sp in enumerate(specs):
        numel = 1
        for d in sp.shape:
            numel *= d
        if numel > _MAX_INPUT_NUMEL:
            raise PlanError(f"input {sp.name!r} of shape {list(sp.shape)} is too large to rebuild "
                            f"({numel} elements > {_MAX_INPUT_NUMEL})", f"$.inputs[{i}].shape")
    example: dict[str, Any] | None = None
    if specs:  # export needs inputs, fx which arguments were given: zeros of the recorded shapes, by name
        example = {s.name: s.zeros() for s in specs}
        if plan.capture == "fx":  # fx names placeholders after forward's parameters, renaming
            # some (``input`` -> ``input_1``): map them back by position
            params = [n for n, p in inspect.signature(model.forward).parameters.items()
                      if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
            if len(params) >= len(specs) and all(s.name not in params or s.name == params[i]
                                                 for i, s in enumerate(specs)):
                example = {params[i] if s.name not in params else s.name: s.zeros() for i, s in enumerate(specs)}
    route = plan.capture
    try:
        cap = capture(model, None, example, route=route, leaf_modules=tuple(opts.get("leaf_modules", ())),
                      dynamic={s.name: dict(s.dims) for s in specs})
    except PartitionError as e:
        raise PlanError(f"cannot capture {type(model).__name__} the way the plan did ({route}): {e}") from e
    fp = fingerprint(cap.gm)
    if fp != plan.fingerprint:
        raise PlanError(
            f"this plan was made for a different model: its graph fingerprint is {plan.fingerprint[:19]}..., "
            f"{type(model).__name__} gives {fp[:19]}... (plan model: {plan.model}); re-run partition() "
            "for this model", "$.fingerprint")
    forced = {name: st.index for st in plan.stages for name in st.nodes}
    order = pin_order(cap.gm, [name for st in plan.stages for name in st.nodes])  # the plan's order, if valid
    names = {n.name for n in order}
    if set(forced) != names:
        unknown, missing = sorted(set(forced) - names)[:3], sorted(names - set(forced))[:3]
        raise PlanError(f"plan nodes do not match the model's graph (unknown: {unknown}, missing: {missing})",
                        "$.stages")
    seq = [forced[n.name] for n in order]
    for n, a, b in zip(order[1:], seq, seq[1:]):
        if b < a:
            raise PlanError(f"stages are not contiguous in graph order: node {n.name!r} is in stage {b} "
                            f"but comes after nodes of stage {a}", f"$.stages[{b}].nodes")
    for st in plan.stages:  # a stage lists its nodes in graph order (what split and the plan write)
        want = tuple(n.name for n in order if forced[n.name] == st.index)
        if st.nodes != want:
            k = next(i for i, (x, y) in enumerate(zip(st.nodes, want)) if x != y)
            raise PlanError(f"stage {st.index} lists node {st.nodes[k]!r} where the graph has {want[k]!r}: a stage's "
                            "nodes must be in graph order", f"$.stages[{st.index}].nodes[{k}]")
    fields: dict[str, Any] = {k: (tuple(v) if isinstance(v, list) else v) for k, v in opts.items()}
    fields.pop("schedule_text", None)
    fields["custom"] = plan.stored_schedule()  # load_plan checked it validates and matches the plan
    if plan.mesh.inter_link is not None:
        fields["inter_link"] = LinkSpec.from_dict(plan.mesh.inter_link)
    if plan.mesh.fsdp:  # priced in the mode the plan runs
        fields["fsdp_reshard"] = plan.mesh.fsdp
    if plan.mesh.shard:  # hybrid sharding (HSDP)
        fields["fsdp_shard"] = plan.mesh.shard
    o = Options(**fields)
    request = Request(o, o.n_microbatches, o.data_parallel, get_device(DeviceSpec.from_dict(plan.device)),
                      get_link(LinkSpec.from_dict(plan.link)), tensor_parallel=o.tensor_parallel)
    return reapply(Context(model, cap, specs, request), plan)


#: Re-applying an exported plan builds zeros of its recorded input shapes; a hostile file
#: must not make that allocate gigabytes.
_MAX_INPUT_NUMEL = 2**28

