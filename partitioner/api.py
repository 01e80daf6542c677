"""``partition()``: capture → shape-prop → annotate → solve → split → plan, in one call."""

from __future__ import annotations

import functools
import gc
import hashlib
import inspect
import warnings
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

import torch
from torch import fx, nn

from partitioner import plan_builder, poly
from partitioner.cost_models.devices import DeviceSpec, LinkSpec, get_device, get_link
from partitioner.cost_models.errors import PartitionError
from partitioner.data_parallel import ZeroShard, boundary_links, divisors, placements, price_replicas, reduction_windows
from partitioner.memory import (
    OPTIMIZER_STATES,
    PRECISIONS,
    RECOMPUTE,
    Activations,
    Static,
    bytes_per_param,
    compute_dtype,
    default_precision,
)
from partitioner.objective import OBJECTIVES, StepModel, fewer_stages, resolve_objective, step_of, step_search
from partitioner.passes.annotate import AnnotateCosts, fallback_note
from partitioner.passes.base import InputSpec
from partitioner.passes.manager import PassManager, Snapshot, graph_text, node_summary
from partitioner.passes.markers import cut_constraints
from partitioner.passes.meta import MODULE, STAGE
from partitioner.passes.order import OrderForCuts, pin_order
from partitioner.passes.recompute import with_recompute
from partitioner.passes.shape_prop import ShapeProp, default_specs, module_of
from partitioner.passes.split import compute_nodes, split_graph
from partitioner.passes.trace import Captured, capture, check_example_names, with_seq_dims
from partitioner.pipe import Pipe
from partitioner.plan import STATIC_SHAPES_NOTE, Mesh, Plan, PlanError
from partitioner.plan_builder import StageMemory
from partitioner.pricing import TIME_UNIT, Evaluator, price, to_units
from partitioner.refine import refine, score
from partitioner.schedule import (
    SCHEDULE_NAMES,
    SCHEDULES,
    Schedule,
    ScheduleError,
    build_schedule,
    check_counts,
    default_microbatches,
    split_problem,
)
from partitioner.simulator import predict_step, simulate
from partitioner.solver import InfeasibleError, Option, Solution, SolverInput, _fmt_bytes, solve

__all__ = ["partition", "apply_plan", "OPTIMIZER_STATES"]



@dataclass(frozen=True)
class Options:
    n_gpus: int
    n_stages: int
    schedule: str
    n_microbatches: int
    cut_at: str | None
    pinned_cuts: tuple[str, ...]
    optimizer: str
    capture: str
    leaf_modules: tuple[str, ...]
    memory_limit: int | None
    precision: str = "fp32"
    recompute: str = "auto"
    custom: Schedule | None = None  # a Schedule object given to partition(); the plan records its name
    data_parallel: int = 1  # replicas of the pipeline; n_gpus = data_parallel x pipeline ranks
    zero: int = 0  # 1: optimizer state sharded over the replicas (ZeRO stage 1)
    gpus_per_node: int | None = None  # None: every rank on one node
    inter_link: LinkSpec | None = None  # between nodes (the plan records it in mesh.inter_link)
    objective: str = "auto"  # "step": cuts minimise the schedule's simulated step; "auto": step where it differs

    @property
    def pp(self) -> int:
        """Ranks of one pipeline."""
        return self.n_gpus // self.data_parallel

    def to_dict(self) -> dict[str, Any]:
        out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()
               if k not in ("custom", "inter_link")}
        if self.custom is not None:  # a hand-written schedule travels as its action lists (data, not code)
            out["schedule_text"] = self.custom.to_text()
        return out


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


def _batch_size(specs: Sequence[InputSpec]) -> int | None:
    sizes = {s.shape[d] for s in specs for d, sym in s.dims if sym == "B"}
    if len(sizes) > 1:
        raise PartitionError(f"example inputs disagree on the batch size (dim 0): {sorted(sizes)}; "
                             "pass batch-first inputs of one batch size")
    return sizes.pop() if sizes else None


def _default_microbatches(batch: int | None, n_gpus: int, schedule: str) -> int:
    return default_microbatches(schedule, batch, n_gpus)


def fingerprint(gm: fx.GraphModule) -> str:
    """Hash of the graph's structure and its parameters' names, shapes and dtypes."""
    h = hashlib.sha256()
    for n in gm.graph.nodes:
        target = n.target if isinstance(n.target, str) else getattr(n.target, "__qualname__", str(n.target))
        mod = getattr(n.target, "__module__", "") if not isinstance(n.target, str) else ""
        h.update(f"{n.op}|{n.name}|{mod}.{target}|{n.args}|{sorted(n.kwargs.items())}\n".encode())
    for name, t in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}\n".encode())
    return "sha256:" + h.hexdigest()


def _resolve_pins(order: Sequence[fx.Node], pins: Sequence[str], allowed: Sequence[bool],
                  blocked_by: Sequence[str]) -> list[int]:
    """A pin names a node (cut before it) or a module path: cut before the module's body, the
    longest run of its nodes in the order (torch.export hoists small pieces of later layers,
    e.g. rotary ``unsqueeze``s, above the first layer; the first node would cut there)."""
    out = []
    for pin in pins:
        hit = next((i for i, n in enumerate(order) if n.name == pin), None)
        if hit is None:
            inside = [str(n.meta.get(MODULE, "")) == pin or str(n.meta.get(MODULE, "")).startswith(pin + ".")
                      for n in order]
            best: tuple[int, int] = (0, 0)  # (run length, -run start): the longest, then the earliest
            start: int | None = None
            for i, yes in enumerate([*inside, False]):
                if yes and start is None:
                    start = i
                elif not yes and start is not None:
                    best, start = max(best, (i - start, -start)), None
            hit = -best[1] if best[0] else None
        if hit is None or hit == 0:
            raise PartitionError(f"pinned cut {pin!r} names no node or module after the first node; "
                                 "pin a node name or a module path such as 'layers.2'")
        if not allowed[hit]:
            raise PartitionError(f"pinned cut {pin!r} cannot be used: {blocked_by[hit]}; pin a neighbouring "
                                 "node or module instead")
        out.append(hit)
    return sorted(set(out))


def _check_enough_cuts(priced: Any, n_stages: int) -> None:
    n_allowed = sum(priced.allowed[1:-1])
    if n_allowed >= n_stages - 1 or n_stages > len(priced.order):
        return  # enough cuts, or too few nodes: the solver's own error says so
    reasons = sorted({r for r in priced.blocked_by if r})
    shown = "; ".join(reasons[:3]) + (f"; and {len(reasons) - 3} more" if len(reasons) > 3 else "")
    raise PartitionError(
        f"{n_stages} stages need {n_stages - 1} cuts but only {n_allowed} positions can be cut "
        f"({shown}); use fewer GPUs, a coarser/finer cut_at, or make those values tensors")


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
    zero: int = 0,
    gpus_per_node: int | None = None,
    inter_link: str | LinkSpec | None = None,
) -> Pipe:
    """Split ``model`` into ``n_gpus`` (× ``virtual_stages``) balanced pipeline stages.

    >>> from partitioner.examples import gpt_example
    >>> model, (idx,) = gpt_example()
    >>> pipe = partition(model, n_gpus=2, example_inputs=(idx,))
    >>> torch.equal(pipe(idx), model(idx))
    True

    ``example_inputs`` is a tuple of positional inputs, a dict of keyword inputs, or a
    single tensor; dim 0 of every tensor is the batch. Without example inputs the split
    balances parameter bytes only (a warning says so).

    Memory is priced as a training run on ``device`` holds it (``partitioner.memory``):
    ``precision`` ("fp32", "bf16-mixed", "fp16-mixed", "bf16"; default from the parameters'
    dtype: bf16/fp16 parameters train mixed) and ``optimizer`` set the static bytes per
    parameter; activations are the storages autograd keeps, each once per stage, in the
    compute dtype. ``recompute`` ("auto", "none", "full", "selective") lets the solver
    checkpoint stages: "auto" recomputes only the stages that would not fit otherwise.

    ``objective`` ("auto", "bottleneck", "step"): the cuts minimise the slowest stage (then the
    bytes cut), or the schedule's simulated step time (``partitioner.objective``; never predicted
    slower than the bottleneck split, which is one of its candidates). "auto" (the default) uses
    the bottleneck for 1F1B with one stage per rank, whose steady state it is, and the step for
    the other schedules (gpipe, interleaved-1f1b, zb-h1, zbv) when the pipeline is small enough
    to simulate 20 times in the budget (``objective.resolve_objective``; the plan notes which).

    Data parallelism (``partitioner.data_parallel``): ``n_gpus = data_parallel x`` pipeline
    ranks; ``example_inputs`` is the global batch, each replica runs ``1/data_parallel`` of
    it and the replicas average gradients once per step (DDP at run time), priced as a ring
    all-reduce. ``data_parallel="auto"`` picks the degree (a divisor of ``n_gpus``) with the
    fastest predicted step that fits; ``zero=1`` shards optimizer state over the replicas
    (ZeRO-1). ``gpus_per_node`` places ranks on nodes (torchrun's order), ``inter_link``
    (default "ib-ndr-400") joins them, and the planner picks the mesh order (pipelines
    inside nodes, or each stage's replicas inside) with the faster predicted step.
    """
    if not isinstance(model, nn.Module):
        raise PartitionError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if virtual_stages is None:  # the schedule's own (zbv: 2), else 1
        spr = schedule.n_stages // schedule.n_ranks if isinstance(schedule, Schedule) else \
            SCHEDULES[schedule].stages_per_rank if schedule in SCHEDULES else None
        virtual_stages = spr if isinstance(spr, int) else (spr[0] if spr and 1 not in spr else 1)
    dp, lnk_between = _check_mesh(n_gpus, data_parallel, zero, gpus_per_node, inter_link, schedule)
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
    n_stages = n_gpus // dp * virtual_stages
    opts = Options(n_gpus, n_stages, str(schedule), 0, cut_at, tuple(pinned_cuts), optimizer,
                   cap.route, tuple(str(m) for m in leaf_modules), memory_limit, precision, recompute, custom,
                   dp, zero, gpus_per_node, lnk_between, objective)
    specs: tuple[InputSpec, ...] = ()
    if inputs is not None:
        flat = cap.flatten(*inputs)
        specs = with_seq_dims(default_specs(flat, list(cap.input_names)), seq_dims, strict=False)
    return _compile(model, cap, specs, opts, n_microbatches, dev, lnk, keep_snapshots, data_parallel)


def _check_mesh(n_gpus: Any, data_parallel: Any, zero: Any, gpus_per_node: Any, inter_link: Any,
                schedule: Any) -> tuple[int, LinkSpec | None]:
    """The data-parallel arguments; returns (replicas to start from, the link between nodes).
    ``data_parallel="auto"`` starts from 1 (``_compile`` tries every divisor)."""
    if not isinstance(n_gpus, int) or isinstance(n_gpus, bool) or n_gpus < 1:
        raise PartitionError(f"n_gpus must be an int >= 1, got {n_gpus!r}")
    if data_parallel == "auto":
        if isinstance(schedule, Schedule):
            raise PartitionError("data_parallel='auto' needs a schedule name: a Schedule object fixes the pipeline's "
                                 f"rank count ({schedule.n_ranks}); pass data_parallel={n_gpus // schedule.n_ranks}")
        dp = 1
    elif not isinstance(data_parallel, int) or isinstance(data_parallel, bool) or data_parallel < 1:
        raise PartitionError(f"data_parallel must be an int >= 1 or 'auto', got {data_parallel!r}")
    elif n_gpus % data_parallel:
        raise PartitionError(f"n_gpus={n_gpus} does not split into data_parallel={data_parallel} replicas; choose "
                             f"data_parallel among {divisors(n_gpus)} (n_gpus = data_parallel x pipeline ranks)")
    else:
        dp = data_parallel
    if zero not in (0, 1, 3) or isinstance(zero, bool):
        raise PartitionError(f"zero must be 0 or 1 (ZeRO-1: optimizer state sharded over the replicas) or 3 (FSDP "
                             f"inside the stages: weights, gradients and optimizer state sharded), got {zero!r}")
    if gpus_per_node is not None and (not isinstance(gpus_per_node, int) or isinstance(gpus_per_node, bool)
                                      or gpus_per_node < 1):
        raise PartitionError(f"gpus_per_node must be an int >= 1 or None, got {gpus_per_node!r}")
    if inter_link is not None and gpus_per_node is None:
        raise PartitionError("inter_link= prices messages between nodes: give gpus_per_node= too")
    between = None
    if gpus_per_node is not None and gpus_per_node < n_gpus:
        between = get_link(inter_link if inter_link is not None else "ib-ndr-400")
    return dp, between


@dataclass
class _Problem:
    """An annotated graph priced at one micro-batch size: everything the search needs."""

    gm: fx.GraphModule
    pm: PassManager
    notes: list[str]
    opts: Options
    micro: int
    symbols: dict[str, int]
    priced: Any  # pricing.Priced
    sched: Any  # schedule.Schedule
    comm: list[int]
    sin: SolverInput
    modes: tuple[str, ...]  # recompute mode of each solver option
    acts: Activations | None
    static: Static
    ev: Any
    capacity: int
    dev: DeviceSpec
    lnk: LinkSpec
    shard: ZeroShard  # trainable elements per position: gradient bytes, ZeRO-1's saving
    layout: Mesh  # where the ranks sit (data parallelism, nodes); prices filled in by _replicated

    def static_at(self, a: int, b: int) -> int:
        """Static bytes of positions [a, b) on one rank (ZeRO-1: 1/dp of the optimizer state)."""
        saved = self.shard.saving(a, b, self.opts.data_parallel) if self.opts.zero else 0
        return self.static.stage(a, b) - saved

    def exact(self, cuts: Sequence[int], modes: Sequence[str] | None = None) -> list[tuple[str, int, int, int]]:
        """Per stage (mode, static bytes, kept bytes per micro-batch, transient bytes), each
        storage and tensor counted once per stage; ``modes`` forced or the first that fits."""
        bounds = [0, *cuts, len(self.priced.order)]
        out = []
        for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
            static = self.static_at(a, b)
            tries = [modes[i]] if modes is not None else list(self.modes)
            best = None
            for mode in tries:
                kept, extra = self.acts.stage_saved(a, b, mode, self.ev) if self.acts else (0, 0)
                entry = (mode, static, self.ev(kept), self.ev(extra))
                if self.need(i, entry) <= self.capacity:
                    best = entry
                    break
                if best is None or self.need(i, entry) < self.need(i, best):
                    best = entry
            assert best is not None
            out.append(best)
        return out

    def need(self, i: int, entry: tuple[str, int, int, int]) -> int:
        return entry[1] + self.sin.inflight[i] * entry[2] + entry[3]


def _annotate(model: nn.Module, cap: Captured, specs: tuple[InputSpec, ...], opts: Options, dev: DeviceSpec,
              keep_snapshots: bool) -> tuple[fx.GraphModule, PassManager, list[str]]:
    """Shape-prop and cost annotation (or parameter bytes only, without example inputs)."""
    notes: list[str] = []
    if cap.route == "export" and cap.fallback_reason:
        notes.append(f"captured with torch.export because torch.fx failed: {cap.fallback_reason}")
    gm = cap.gm
    if specs:
        param_dtype = next((p.dtype for p in model.parameters()), torch.float32)
        cast = None if opts.precision == default_precision(param_dtype) else compute_dtype(opts.precision)
        pm = PassManager([ShapeProp(specs, dtype=cast), AnnotateCosts(target=dev.kind), OrderForCuts()],
                         keep_snapshots=keep_snapshots)
        gm = pm.run(gm)
        if not gm.meta.get("pp.symbolic", True):
            kept = sorted(str(v) for v in gm.meta.get("pp.symbols", {}).values())
            notes.append(f"{STATIC_SHAPES_NOTE}: symbolic shape propagation failed"
                         + (f" ({', '.join(kept)} stays symbolic)" if kept else ""))
        fallback = fallback_note(gm)  # nodes whose cost torch's kernels could not give symbolically
        if fallback:
            notes.append(fallback)
        return gm, pm, notes
    msg = ("no example inputs: balancing parameter bytes only; FLOP and activation costs "
           "need example_inputs=(...)")
    warnings.warn(msg, stacklevel=4)
    notes.append(msg)
    pm = PassManager([], keep_snapshots=keep_snapshots)
    gm = pm.run(gm)
    for n in gm.graph.nodes:
        n.meta.setdefault(MODULE, module_of(n))
    plan_builder.param_bytes_by_first_use(gm, compute_nodes(gm))
    return gm, pm, notes


def _problem(model: nn.Module, cap: Captured, specs: tuple[InputSpec, ...], opts: Options,
             n_microbatches: int | None, dev: DeviceSpec, lnk: LinkSpec, keep_snapshots: bool,
             annotated: dict[str, Any] | None = None, dims: tuple[str, ...] = ("dp", "pp")) -> _Problem:
    if annotated is not None and "gm" in annotated:  # _auto: one annotation for every candidate
        gm, pm, notes = annotated["gm"]
        notes = list(notes)
    else:
        gm, pm, notes = _annotate(model, cap, specs, opts, dev, keep_snapshots)
        if annotated is not None:
            annotated["gm"] = (gm, pm, list(notes))
    costs_known = bool(specs)
    batch = _batch_size(specs) if specs else None
    if batch is not None:
        problem = split_problem(batch, opts.data_parallel, "replicas (data_parallel)", "data_parallel")
        if problem:
            raise PartitionError(problem.replace("the batch", "the global batch", 1))
        batch //= opts.data_parallel  # each replica's share: the pipeline's batch
    m = n_microbatches if n_microbatches is not None else _default_microbatches(batch, opts.pp, opts.schedule)
    if opts.schedule == "naive":
        m = 1
    problem = split_problem(batch, m) if batch is not None else None
    if problem:
        raise PartitionError(problem + (f" (each of {opts.data_parallel} replicas' share)"
                                        if opts.data_parallel > 1 else ""))
    opts = replace(opts, n_microbatches=m)
    micro = batch // m if batch else 1
    symbols = {"B": batch * opts.data_parallel if batch else 1}  # the global batch, as the user gave it
    seq = next((s.shape[d] for s in specs for d, sym in s.dims if sym == "S"), None)
    if seq is not None:
        symbols["S"] = seq
    compute = getattr(torch, compute_dtype(opts.precision))

    def node_time(cost: Any, values: Mapping[str, int]) -> tuple[float, float]:
        if not costs_known:  # parameter bytes stand in for time: read once forward, twice backward
            pb = float(poly.evaluate(cost.param_bytes, values["B"], values["S"]))
            return pb / dev.mem_bandwidth, 2 * pb / dev.mem_bandwidth
        return dev.node_time(cost, values, compute)

    marks = cut_constraints(gm, opts.cut_at, opts.n_stages, opts.pinned_cuts)  # pipe_split() markers, cut_at check
    notes.extend(marks.notes)
    priced = marks.apply(price(gm, batch=micro, seq=symbols.get("S", 1), node_time=node_time,
                               cut_at=marks.glob, costs_known=costs_known))
    ev = Evaluator(micro, symbols.get("S", 1))
    width, _, _ = PRECISIONS[opts.precision]
    per_param = bytes_per_param(opts.precision, opts.optimizer)
    static = Static(gm, priced.order, per_param, width)
    trainable = {id(t): t.numel() for _, t in gm.named_parameters(remove_duplicate=False) if t.requires_grad}
    from partitioner.data_parallel import splits_backward  # zero=3: FSDP's units, and whether gathered per step
    from partitioner.memory import fsdp_unit_of
    shard = ZeroShard(static.uses, trainable, width, per_param - 2 * width, opts.zero, fsdp_unit_of(gm),
                      splits_backward(opts.custom or opts.schedule))
    static_mem = static.first_use
    if opts.zero and opts.data_parallel > 1:  # the solver's additive view of ZeRO's saving
        static_mem = shard.additive(static_mem, opts.data_parallel)
    acts = Activations(gm, priced.order, target=dev.kind, blocks=(marks.glob,) if marks.glob else None) \
        if costs_known else None
    sched = opts.custom or build_schedule(opts.schedule, opts.pp, m, opts.n_stages)
    unit = simulate(sched, [1.0] * opts.n_stages, [2.0] * opts.n_stages)
    capacity = opts.memory_limit if opts.memory_limit is not None else dev.memory_bytes
    comm = [to_units([lnk.transfer_time(b) + lnk.transfer_time(g)])[0] if (b or g) else 0
            for b, g in zip(priced.cut_bytes, priced.cut_grad_bytes)]
    n = len(priced.order)
    comm[0] = comm[n] = 0
    fwd, bwd = to_units(priced.fwd_s), to_units(priced.bwd_s)
    modes = RECOMPUTE[opts.recompute]
    options = []
    for mode in modes:
        act, redo, reserve = acts.arrays(mode, ev) if acts else ([0] * n, [False] * n, 0)
        options.append(Option([f + b + (f if r else 0) for f, b, r in zip(fwd, bwd, redo)], act, reserve))
    sin = SolverInput(
        compute=options[0].compute, cut_cost=comm, cut_bytes=list(priced.cut_bytes), allowed=list(priced.allowed),
        static_mem=static_mem, act_mem=options[0].act_mem, inflight=list(unit.peak_inflight),
        capacity=[capacity] * opts.n_stages, pinned=[], options=options if len(options) > 1 or options[0].reserve else [])
    layout = Mesh(opts.data_parallel, opts.pp, dims, opts.gpus_per_node or 0)
    prob = _Problem(gm, pm, notes, opts, micro, symbols, priced, sched, comm, sin, modes, acts, static, ev,
                    capacity, dev, lnk, shard, layout)
    prob.pins = _resolve_pins(priced.order, (*opts.pinned_cuts, *marks.pins), priced.allowed,  # type: ignore[attr-defined]
                              priced.blocked_by)
    return prob


def _search(prob: _Problem) -> tuple[Solution, list[tuple[str, int, int, int]]]:
    """Cuts and per-stage recompute minimising the bottleneck under memory.

    The solver works on additive costs; each solution is then checked stage by stage with
    the exact memory (storages and tied weights once per stage). Where a stage is over, its
    capacity is lowered by the excess and the search runs again (at most ``_RETRIES`` times).
    """
    _check_enough_cuts(prob.priced, prob.opts.n_stages)
    sin = replace(prob.sin, pinned=prob.pins, avoid=_non_tensor_cuts(prob),  # type: ignore[attr-defined]
                  has_compute=_computing(prob))
    sol, exact = _search_cuts(prob, sin)
    used, budget, why = resolve_objective(prob.opts.objective, prob.sched)
    if used == "step":
        sol, exact = _step_objective(prob, sin, sol, exact, budget, why)
    _note_fewer_stages(prob, sin, sol)
    return sol, exact


def _computing(prob: _Problem) -> list[bool]:
    """Per position: does it count FLOPs? (A view, a flatten or a sym size does not: the solver
    gives every stage at least one computing node where it can.) Without example inputs: ()."""
    from partitioner.cost_models.cost import NodeCost
    from partitioner.passes.meta import COST

    if prob.acts is None:
        return []
    return [prob.ev(c.fwd_flops) + prob.ev(c.bwd_flops) > 0
            for c in (n.meta.get(COST, NodeCost()) for n in prob.priced.order)]


def _fmt_time(units: float) -> str:
    s = units * TIME_UNIT
    return f"{s * 1e3:.4g} ms" if s >= 1e-3 else f"{s * 1e6:.4g} us"


def _non_tensor_cuts(prob: _Problem) -> list[bool]:
    """Per cut: does a non-tensor value (a Python int such as a sym size) cross it?"""
    from partitioner.passes.meta import DESC
    from partitioner.pricing import wire_kind

    order = prob.priced.order
    n = len(order)
    pos = {node: i for i, node in enumerate(order)}
    diff = [0] * (n + 2)
    for v in [nd for nd in prob.gm.graph.nodes if nd.op == "placeholder"] + list(order):
        produced = pos.get(v, -1)
        last = max((pos.get(u, n) for u in v.users), default=produced)
        if last > produced and wire_kind(v.meta.get(DESC)) not in ("tensor", None):
            diff[produced + 1] += 1
            diff[min(last, n) + 1] -= 1
    out, acc = [], 0
    for k in range(n + 1):
        acc += diff[k]
        out.append(0 < k < n and acc > 0)
    return out


def _step_model(prob: _Problem, sched: Any = None) -> StepModel:
    send = [to_units([prob.lnk.transfer_time(b)])[0] if b else 0 for b in prob.priced.cut_bytes]
    bsend = [to_units([prob.lnk.transfer_time(g)])[0] if g else 0 for g in prob.priced.cut_grad_bytes]
    n = len(prob.priced.order)
    send[0] = send[n] = bsend[0] = bsend[n] = 0
    return StepModel(to_units(prob.priced.fwd_s), send, bsend, sched or prob.sched)


def _step_objective(prob: _Problem, sin: SolverInput, sol: Solution, exact: list[tuple[str, int, int, int]],
                    budget: int, why: str) -> tuple[Solution, list[tuple[str, int, int, int]]]:
    """``objective="step"``: the candidate with the fastest simulated step that fits exactly."""
    model = _step_model(prob)
    cands, rep = step_search(sin, prob.opts.n_stages, model, sol, max_evals=budget)
    for cand in cands:
        ex = exact if cand.cuts == sol.cuts else prob.exact(cand.cuts)
        if all(prob.need(i, x) <= prob.capacity for i, x in enumerate(ex)):
            chosen = _rescore(prob, cand, ex, optimal=cand.optimal)
            gain = 1 - rep.step / rep.bottleneck_step if rep.bottleneck_step else 0.0
            prob.notes.append(f"objective step{why}: predicted step {_fmt_time(rep.step)} vs "
                              f"{_fmt_time(rep.bottleneck_step)} for the min-bottleneck cuts "
                              f"({gain:.1%} faster; {rep.evaluations} simulations"
                              f"{'' if rep.local_optimum else ', search budget reached'})")
            return chosen, ex
    return sol, exact


def _note_fewer_stages(prob: _Problem, sin: SolverInput, sol: Solution) -> None:
    """A plan note when fewer pipeline ranks are predicted faster on the same costs."""
    if prob.opts.custom is not None or prob.opts.n_gpus < 2:
        return
    ranks = prob.sched.n_ranks
    v = prob.opts.n_stages // ranks
    model = _step_model(prob)
    here = step_of(sin, model, sol)
    rows = fewer_stages(sin, model, here, n_gpus=ranks, stages_per_rank=v)
    faster = [(g, t) for g, t in rows if t is not None and t < here]
    if not faster:
        return
    def gpus(g: int) -> str:
        return f"{g} GPU{'s' if g > 1 else ''}"

    table = ", ".join(f"{gpus(g)} {_fmt_time(t)}" if t is not None else f"{gpus(g)} does not fit" for g, t in rows)
    best = min(faster, key=lambda r: (r[1], r[0]))
    prob.notes.append(f"fewer stages would be predicted faster: {gpus(best[0])} per pipeline {_fmt_time(best[1])} "
                      f"vs {_fmt_time(here)} with {ranks} (predicted step per pipeline GPU count, "
                      f"{prob.sched.name} m={prob.sched.n_microbatches}: {table}; {ranks} GPUs {_fmt_time(here)})")


def _search_cuts(prob: _Problem, sin: SolverInput) -> tuple[Solution, list[tuple[str, int, int, int]]]:
    """Min-bottleneck cuts under exact memory (the loop described in ``_search``)."""
    if len(prob.modes) > 1 and prob.modes[0] == "none":
        # Recompute only adds compute: if the best split without it, memory ignored, fits
        # exactly, no split with recompute can beat it (and none is needed). The common case,
        # and one option instead of three for the search.
        base = sin.choices()[0]
        free = replace(sin, options=[], compute=base.compute, act_mem=base.act_mem,
                       capacity=[_UNBOUNDED] * len(sin.capacity))
        sol = refine(free, prob.opts.n_stages, solve(free, prob.opts.n_stages))
        exact = prob.exact(sol.cuts, ["none"] * prob.opts.n_stages)
        if all(prob.need(i, x) <= prob.capacity for i, x in enumerate(exact)):
            return _rescore(prob, sol, exact, optimal=sol.optimal), exact
    caps = list(sin.capacity)
    last: tuple[Solution, list[tuple[str, int, int, int]]] | None = None
    for _ in range(_RETRIES):
        try:
            first = solve(replace(sin, capacity=caps), prob.opts.n_stages)
        except InfeasibleError as e:
            raise _explain(prob, e, last) from None
        sol = refine(replace(sin, capacity=caps), prob.opts.n_stages, first)
        exact = prob.exact(sol.cuts)
        over = [prob.need(i, x) - prob.capacity for i, x in enumerate(exact)]
        last = (sol, exact)
        if max(over) <= 0:
            return _rescore(prob, sol, exact, optimal=sol.optimal), exact
        caps = [c - max(o, 0) for c, o in zip(caps, over)]
    raise _explain(prob, InfeasibleError("the exact memory check kept finding stages over capacity"), last)


def _rescore(prob: _Problem, sol: Solution, exact: list[tuple[str, int, int, int]], *, optimal: bool) -> Solution:
    """``sol`` with the stage times and memory of the recompute modes really chosen."""
    bounds = [0, *sol.cuts, len(prob.priced.order)]
    index = {m: j for j, m in enumerate(prob.modes)}
    opts = prob.sin.choices()
    times, chosen = [], []
    for (a, b), x in zip(zip(bounds, bounds[1:]), exact):
        j = index.get(x[0], 0)
        chosen.append(j)
        times.append(sum(opts[j].compute[a:b]) + prob.comm[a] + prob.comm[b])
    same = tuple(chosen) == tuple(sol.stage_option or (0,) * len(chosen))
    return Solution(sol.cuts, max(times), tuple(times), tuple(prob.need(i, x) for i, x in enumerate(exact)),
                    sol.total_cut_bytes, min(sol.lower_bound, max(times)), optimal and same, tuple(chosen))


def _explain(prob: _Problem, err: InfeasibleError, last: Any) -> InfeasibleError:
    """The solver's refusal, with what would fit: more GPUs, recompute, fewer micro-batches
    in flight, a smaller micro-batch (each tried on the same costs)."""
    hints = []
    S = prob.opts.n_stages
    base = replace(prob.sin, pinned=prob.pins)  # type: ignore[attr-defined]

    def fits(sin: SolverInput, stages: int) -> bool:
        try:
            solve(sin, stages)
            return True
        except PartitionError:
            return False

    if prob.opts.recompute in ("none", "selective") and prob.acts is not None:
        act, redo, reserve = prob.acts.arrays("full", prob.ev)
        full = Option([c + (f if r else 0) for c, f, r in zip(prob.sin.compute, to_units(prob.priced.fwd_s), redo)],
                      act, reserve)
        if fits(replace(base, options=[full]), S):
            hints.append("recompute='full' (or 'auto') fits")
    if max(prob.sin.inflight) > 1 and fits(replace(base, inflight=[1] * S), S):
        hints.append(f"with one micro-batch in flight per stage it fits (today up to {max(prob.sin.inflight)}: "
                     "fewer micro-batches, or schedule='gpipe' with n_microbatches=1)")
    if not prob.pins:  # type: ignore[attr-defined]
        for more in sorted({S + 1, S + 2, 2 * S, 4 * S, 8 * S}):
            if more > len(prob.priced.order):
                break
            sched = build_schedule(prob.opts.schedule if prob.opts.schedule in ("gpipe", "1f1b", "zb-h1") else "1f1b",
                                   more, prob.opts.n_microbatches, more)
            inflight = list(simulate(sched, [1.0] * more, [2.0] * more).peak_inflight)
            if fits(replace(base, inflight=inflight, capacity=[prob.capacity] * more), more):
                hints.append(f"{more} GPUs fit this configuration")
                break
    text = str(err)
    closest = getattr(err, "closest", None)
    if last is None and closest is not None:  # the solver's split closest to fitting, checked exactly
        cuts, choice = closest
        last = (None, prob.exact(cuts, [prob.modes[j] for j in choice]))
    if last is not None:
        _, exact = last
        worst = max(range(len(exact)), key=lambda i: prob.need(i, exact[i]) - prob.capacity)
        mode, static, kept, extra = exact[worst]
        text = (f"stage {worst} needs {_fmt_bytes(prob.need(worst, exact[worst]))} (static {_fmt_bytes(static)} = "
                f"weights, gradients and optimizer state at {bytes_per_param(prob.opts.precision, prob.opts.optimizer)} "
                f"B/param ({prob.opts.precision}, {prob.opts.optimizer}) + {prob.sin.inflight[worst]} micro-batches x "
                f"{_fmt_bytes(kept)} activations" + (f" + {_fmt_bytes(extra)} recomputed in backward" if extra else "")
                + f", recompute {mode!r}) but the device holds {_fmt_bytes(prob.capacity)}")
    advice = "use more GPUs, a device with more memory, fewer micro-batches in flight, recompute or a smaller micro-batch"
    tried = (f" (tried on these costs: {'; '.join(hints)})" if hints else
             " (tried on these costs, none fits: up to 8x the GPUs, recompute='full', one micro-batch in flight)")
    return InfeasibleError(f"{text}; {advice}{tried}")


_RETRIES = 6
_UNBOUNDED = 2**60  # a capacity no stage reaches (the solver clamps it to the model's total)


def _compile(model: nn.Module, cap: Captured, specs: tuple[InputSpec, ...], opts: Options,
             n_microbatches: int | str | None, dev: DeviceSpec, lnk: LinkSpec, keep_snapshots: bool,
             data_parallel: int | str = 1) -> Pipe:
    """Solve: cuts and recompute chosen by the search; the layout on nodes (and with
    ``data_parallel="auto"`` the replica count) chosen by the predicted step."""
    cache: dict[str, Any] = {}
    if data_parallel != "auto":
        prob, sol, exact = _solve(model, cap, specs, opts, n_microbatches, dev, lnk, keep_snapshots, cache)
        ranked = sorted(((_replicated(prob, sol, lay)[0], i, lay) for i, lay in
                         enumerate(placements(opts.data_parallel, opts.pp, opts.gpus_per_node))), key=lambda r: r[:2])
        if len(ranked) > 1:
            prob.notes = list(prob.notes) + [f"{DP_NOTE} placement {lay.describe()}: predicted step {t * 1e3:.4g} ms"
                                             for t, _, lay in ranked]
        return _emit(model, cap, specs, prob, sol, exact, keep_snapshots, ranked[0][2])
    v = opts.n_stages // opts.pp
    batch = _batch_size(specs) if specs else None
    rows: list[tuple[Any, ...]] = []
    refused: list[str] = []
    for d in divisors(opts.n_gpus):
        label = f"D={d} P={opts.n_gpus // d}"
        if batch is not None and batch % d:
            refused.append(f"{label}: the batch of {batch} does not split into {d} replicas")
            continue
        o = replace(opts, data_parallel=d, n_stages=(opts.n_gpus // d) * v)
        try:
            prob, sol, exact = _solve(model, cap, specs, o, n_microbatches, dev, lnk, keep_snapshots, cache)
        except PartitionError as e:  # infeasible, too few cuts, a schedule that does not fit the counts
            refused.append(f"{label}: {' '.join(str(e).split())[:160]}")
            continue
        peak = max(prob.need(i, x) for i, x in enumerate(exact))
        for lay in placements(d, o.pp, o.gpus_per_node):
            step, mesh, sim = _replicated(prob, sol, lay)
            rows.append((step, peak, -d, len(rows), lay, prob, sol, exact, mesh, sim))
    if not rows:
        raise InfeasibleError(f"no data-parallel degree fits {opts.n_gpus} GPUs: " + "; ".join(refused[:6]))
    rows.sort(key=lambda r: r[:4])
    step, peak, _, _, lay, prob, sol, exact, mesh, sim = rows[0]

    def line(r: tuple[Any, ...]) -> str:
        t, pk, _, _, ly, pr, _, _, ms, sm = r
        return (f"D={ly.dp} P={ly.pp} m={pr.opts.n_microbatches} {pr.opts.schedule}"
                + (f" ({ly.describe()})" if ly.n_nodes > 1 else "")
                + f": predicted step {t * 1e3:.4g} ms (all-reduce exposed {ms.exposed_s * 1e3:.3g} ms, "
                f"bubble {sm.bubble_fraction:.1%}), peak memory {_fmt_bytes(pk)}")
    why = (f"the fastest predicted step of {len(rows)} that fit; #2 is {rows[1][0] / step - 1:.1%} slower"
           if len(rows) > 1 else "the only candidate that fits")
    prob.notes = list(prob.notes) + [f"{DP_NOTE} picked {line(rows[0])}: {why}"] + [
        f"{DP_NOTE} #{i + 1} {line(r)}" for i, r in enumerate(rows)] + [f"{DP_NOTE} -- {r}" for r in refused]
    return _emit(model, cap, specs, prob, sol, exact, keep_snapshots, lay)


#: Plan notes that record the data-parallel degree and placement chosen start with this.
DP_NOTE = "dp:"


def _solve(model: nn.Module, cap: Captured, specs: tuple[InputSpec, ...], opts: Options,
           n_microbatches: int | str | None, dev: DeviceSpec, lnk: LinkSpec, keep_snapshots: bool,
           cache: dict[str, Any]) -> tuple[_Problem, Solution, list[tuple[str, int, int, int]]]:
    """One pipeline (``opts.pp`` ranks on each replica's share of the batch), solved."""
    if opts.schedule == "auto" or n_microbatches == "auto":
        return _auto(model, cap, specs, opts, n_microbatches, dev, lnk, keep_snapshots, cache)
    assert not isinstance(n_microbatches, str)
    prob = _problem(model, cap, specs, opts, n_microbatches, dev, lnk, keep_snapshots, annotated=cache)
    solution, exact = _search(prob)
    return prob, solution, exact


#: Plan notes that record the automatic choice start with this (``partitioner plan --explain``).
AUTO_NOTE = "auto:"


def _auto(model: nn.Module, cap: Captured, specs: tuple[InputSpec, ...], opts: Options, n_microbatches: Any,
          dev: DeviceSpec, lnk: LinkSpec, keep_snapshots: bool,
          gm_cache: dict[str, Any]) -> tuple[_Problem, Solution, list[tuple[str, int, int, int]]]:
    """``schedule="auto"`` / ``n_microbatches="auto"``: solve every candidate (each registry
    schedule, at its default stages per rank unless ``virtual_stages`` > 1 was given; each
    divisor of the batch) and keep the predicted-fastest that fits memory. The ranking goes
    into the plan's notes, one line per candidate, best first."""
    whole = _batch_size(specs) if specs else None
    batch = whole // opts.data_parallel if whole is not None else None
    v_given = opts.n_stages // opts.pp
    names = [opts.schedule] if opts.schedule != "auto" else [
        n for n, sp in SCHEDULES.items() if not sp.whole_batch
        and (sp.stages_per_rank is None or (v_given if v_given > 1 else sp.default_stages_per_rank) in sp.stages_per_rank)]
    ms = [d for d in range(1, (batch or 1) + 1) if (batch or 1) % d == 0] if n_microbatches == "auto" else [n_microbatches]
    ranked, refused = [], []
    for name in names:
        spec = SCHEDULES[name]
        v = v_given if v_given > 1 or spec.stages_per_rank is None else spec.default_stages_per_rank
        v = v if spec.stages_per_rank is None or v in spec.stages_per_rank else spec.stages_per_rank[0]
        for m in ms:
            label = f"{name} m={m if m is not None else 'default'}"
            o = replace(opts, schedule=name, n_stages=opts.pp * v)
            try:
                check_counts(name, o.pp, m if isinstance(m, int) else 1, o.n_stages)
                prob = _problem(model, cap, specs, o, m, dev, lnk, keep_snapshots, annotated=gm_cache)
                sol, exact = _search(prob)
            except (ScheduleError, InfeasibleError) as e:
                refused.append(f"{label}: {'does not fit' if isinstance(e, InfeasibleError) else 'not allowed'} "
                               f"({' '.join(str(e).split())[:160]})")
                continue
            ranked.append((_predicted_step(prob, sol), label, prob, sol, exact))
    if not ranked:
        raise InfeasibleError("no candidate schedule / micro-batch count fits: " + "; ".join(refused[:6]))
    ranked.sort(key=lambda r: (r[0], r[1]))
    best_t, best_label, prob, sol, exact = ranked[0]
    prob.notes = list(prob.notes) + [
        f"{AUTO_NOTE} picked {best_label} of {len(ranked)} fitting candidates (predicted step {best_t * 1e3:.4g} ms)"
    ] + [f"{AUTO_NOTE} #{i + 1} {label}: predicted step {t * 1e3:.4g} ms" for i, (t, label, *_r) in enumerate(ranked)] \
      + [f"{AUTO_NOTE} -- {r}" for r in refused]
    return prob, sol, exact


def _predicted_step(prob: _Problem, sol: Solution) -> float:
    """The step time the plan will record: the pipeline's simulated step (plan_builder's
    stage times, the same simulation), with what the replicas' gradient all-reduce adds to it."""
    return _replicated(prob, sol)[0]


def _replicated(prob: _Problem, sol: Solution, layout: Mesh | None = None) -> tuple[float, Mesh, Any]:
    """(step, the plan's ``mesh`` with its prices, the pipeline's SimResult) under ``layout``
    (default: the problem's): each cut priced on the link it crosses, each pipeline rank's
    bucketed all-reduce overlapped with its stages' final backwards (``partitioner.data_parallel``)."""
    layout = layout or prob.layout
    bounds = [0, *sol.cuts, len(prob.priced.order)]
    fwd, bwd = [], []
    for s, (a, b) in enumerate(zip(bounds, bounds[1:])):
        f, bw = sum(prob.priced.fwd_s[a:b]), sum(prob.priced.bwd_s[a:b])
        redo = (sol.stage_times[s] - prob.comm[a] - prob.comm[b]) * TIME_UNIT - f - bw
        fwd.append(f)
        bwd.append(bw + max(redo, 0.0))
    inter = prob.opts.inter_link or prob.lnk
    stage_rank = [prob.sched.rank_of(s) for s in range(prob.opts.n_stages)]
    links = boundary_links(layout, stage_rank, prob.lnk, inter)
    sim = predict_step(prob.sched, fwd, bwd, [lk.transfer_time for lk in links],
                       [prob.priced.cut_bytes[k] for k in bounds[1:-1]], [prob.priced.cut_grad_bytes[k] for k in bounds[1:-1]])
    inter_dict = prob.opts.inter_link.to_dict() if prob.opts.inter_link is not None else None
    if layout.dp == 1:
        return sim.step_time, replace(layout, zero=prob.opts.zero, inter_link=inter_dict), sim
    held: list[set[int]] = [set() for _ in range(layout.pp)]  # each tensor once per rank
    params: list[list[tuple[int, int]]] = []  # per stage: trainable tensors in first-use order, gradient bytes
    for s, (a, b) in enumerate(zip(bounds, bounds[1:])):
        ids = list(dict.fromkeys(i for p in range(a, b) for i in prob.shard.uses[p] if i in prob.shard.numel))
        params.append([(i, prob.shard.numel[i] * prob.shard.grad_width) for i in ids])
        held[stage_rank[s]].update(ids)
    weights = [sum(prob.shard.numel[i] for i in ids) * prob.shard.grad_width for ids in held]  # ZeRO-1's gather
    windows = reduction_windows(sim.events, stage_rank, params, layout.pp)  # overlapped with each final backward
    times, step = price_replicas(layout, prob.opts.zero, prob.lnk, inter, windows, weights, sim.step_time)
    return step, replace(layout, zero=prob.opts.zero, inter_link=inter_dict, allreduce_s=tuple(times),
                         exposed_s=step - sim.step_time), sim


def _reapply(model: nn.Module, cap: Captured, specs: tuple[InputSpec, ...], opts: Options, dev: DeviceSpec,
             lnk: LinkSpec, plan: Plan) -> Pipe:
    """Re-apply ``plan``: its cuts and recompute, priced the same way, no search."""
    prob = _problem(model, cap, specs, opts, opts.n_microbatches, dev, lnk, False, dims=tuple(plan.mesh.dims))
    forced = {name: st.index for st in plan.stages for name in st.nodes}
    stage_of = [forced[n.name] for n in prob.priced.order]
    cuts = tuple(stage_of.index(s) for s in range(1, opts.n_stages))
    exact = prob.exact(cuts, [st.recompute for st in plan.stages])
    first = score(prob.sin, cuts)
    sol = _rescore(prob, first, exact, optimal=plan.solver.optimal)
    sol = replace(sol, lower_bound=to_units([plan.solver.lower_bound_s])[0])
    pipe = _emit(model, cap, specs, prob, sol, exact, False)
    pipe.plan = replace(pipe.plan, notes=plan.notes, solver=plan.solver)
    return pipe


def _emit(model: nn.Module, cap: Captured, specs: tuple[InputSpec, ...], prob: _Problem, solution: Solution,
          exact: list[tuple[str, int, int, int]], keep_snapshots: bool, layout: Mesh | None = None) -> Pipe:
    """Stage modules (with recompute where chosen) and the plan."""
    gm, priced, opts = prob.gm, prob.priced, prob.opts
    n = len(priced.order)
    assignment: dict[str, int] = {}
    bounds = [0, *solution.cuts, n]
    for s in range(opts.n_stages):
        for node in priced.order[bounds[s]:bounds[s + 1]]:
            assignment[node.name] = s
            node.meta[STAGE] = s
    split = split_graph(gm, assignment, opts.n_stages)
    stages = list(split.stages)
    for s, (mode, *_rest) in enumerate(exact):
        if mode != "none" and prob.acts is not None:
            regions = [[priced.order[p].name for p in range(a, b)]
                       for a, b in prob.acts._pieces(bounds[s], bounds[s + 1], mode)]
            stages[s] = with_recompute(stages[s], regions, mode)
    if keep_snapshots:  # the solver is not a graph pass, but its answer is node meta (pp.stage)
        prob.pm.snapshots.append(Snapshot("solve", graph_text(gm), node_summary(gm)))
    memory = [StageMemory(mode, static, kept_expr, extra_expr) for (mode, static, _, _), (kept_expr, extra_expr)
              in zip(exact, _symbolic(prob, bounds, exact))]
    plan = plan_builder.build_plan(
        plan_builder.PlanSource(type(model).__name__, fingerprint(cap.gm), cap.route, specs, prob.symbols,
                                opts.to_dict(), prob.notes),
        plan_builder.Hardware(prob.dev, prob.lnk),
        plan_builder.SolvedSplit(gm, priced, bounds, split, prob.sched, prob.micro, solution, prob.comm, memory,
                                 TIME_UNIT),
    )
    layout = layout or prob.layout
    step, mesh, sim = _replicated(prob, solution, layout)
    plan = replace(plan, mesh=mesh)
    if layout.dp > 1 or layout.n_nodes > 1:  # the replicas' all-reduce; cuts priced on the links they cross
        plan = replace(plan, prediction=replace(plan.prediction, step_time_s=step,
                                                bubble_fraction=sim.bubble_fraction))
    return Pipe(cap, stages, plan, graph=gm, snapshots=prob.pm.snapshots, model=model)


def _symbolic(prob: _Problem, bounds: Sequence[int], exact: Sequence[tuple[str, int, int, int]]) -> list[tuple[Any, Any]]:
    """Kept and transient bytes of each stage as polynomials in B and S (for the plan)."""
    out = []
    for (a, b), x in zip(zip(bounds, bounds[1:]), exact):
        out.append(prob.acts.stage_saved(a, b, x[0], prob.ev) if prob.acts else (0, 0))
    return out


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
    o = Options(**fields)
    return _reapply(model, cap, specs, o, get_device(DeviceSpec.from_dict(plan.device)),
                    get_link(LinkSpec.from_dict(plan.link)), plan)


#: Re-applying an exported plan builds zeros of its recorded input shapes; a hostile file
#: must not make that allocate gigabytes.
_MAX_INPUT_NUMEL = 2**28

