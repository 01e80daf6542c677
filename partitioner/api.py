"""``partition()``: capture → shape-prop → annotate → solve → split → plan, in one call."""

from __future__ import annotations

import hashlib
import inspect
import warnings
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

import torch
from torch import fx, nn

from cost_models.devices import DeviceSpec, LinkSpec, get_device, get_link
from cost_models.errors import PartitionError
from partitioner import plan_builder, poly
from partitioner.pipe import Pipe
from partitioner.plan import Plan, PlanError
from partitioner.pricing import TIME_UNIT, price, to_units
from partitioner.schedule import SCHEDULE_NAMES, build_schedule
from partitioner.simulator import simulate
from partitioner.refine import refine, score
from partitioner.solver import SolverInput, solve
from passes.annotate import AnnotateCosts
from passes.base import InputSpec
from passes.manager import PassManager, Snapshot, graph_text, node_summary
from passes.meta import MODULE, STAGE
from passes.shape_prop import ShapeProp, default_specs, module_of
from passes.split import compute_nodes, split_graph
from passes.trace import Captured, capture

__all__ = ["partition", "apply_plan", "OPTIMIZER_STATES"]

#: Optimizer state kept per parameter, in parameter-sized copies (Adam: two moments).
OPTIMIZER_STATES = {"none": 0, "sgd": 0, "momentum": 1, "adam": 2, "adamw": 2}


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

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


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


def _check_counts(n_gpus: Any, virtual_stages: Any, schedule: str, n_microbatches: Any) -> None:
    if not isinstance(n_gpus, int) or isinstance(n_gpus, bool) or n_gpus < 1:
        raise PartitionError(f"n_gpus must be an int >= 1, got {n_gpus!r}")
    if not isinstance(virtual_stages, int) or virtual_stages < 1:
        raise PartitionError(f"virtual_stages must be an int >= 1, got {virtual_stages!r}")
    if schedule not in SCHEDULE_NAMES:
        raise PartitionError(f"unknown schedule {schedule!r}; use one of {', '.join(SCHEDULE_NAMES)}")
    if virtual_stages > 1 and schedule != "interleaved-1f1b":
        raise PartitionError(f"virtual_stages={virtual_stages} needs schedule='interleaved-1f1b', got {schedule!r}")
    if n_microbatches is not None and (not isinstance(n_microbatches, int) or n_microbatches < 1):
        raise PartitionError(f"n_microbatches must be an int >= 1, got {n_microbatches!r}")


def _batch_size(specs: Sequence[InputSpec]) -> int | None:
    sizes = {s.shape[d] for s in specs for d, sym in s.dims if sym == "B"}
    if len(sizes) > 1:
        raise PartitionError(f"example inputs disagree on the batch size (dim 0): {sorted(sizes)}; "
                             "pass batch-first inputs of one batch size")
    return sizes.pop() if sizes else None


def _default_microbatches(batch: int | None, n_gpus: int, schedule: str) -> int:
    if schedule == "naive" or batch is None:
        return 1
    want = 2 * n_gpus
    divisors = [d for d in range(1, batch + 1) if batch % d == 0 and d <= want]
    if schedule == "interleaved-1f1b":
        divisors = [d for d in divisors if d % n_gpus == 0] or [n_gpus]
    return max(divisors)


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
    """A pin names a node (cut before it) or a module path (cut before its first node)."""
    out = []
    for pin in pins:
        hit = next((i for i, n in enumerate(order) if n.name == pin), None)
        if hit is None:
            hit = next((i for i, n in enumerate(order)
                        if str(n.meta.get(MODULE, "")) == pin or str(n.meta.get(MODULE, "")).startswith(pin + ".")), None)
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


def partition(
    model: nn.Module,
    n_gpus: int,
    example_inputs: Any = None,
    *,
    example_kwargs: Mapping[str, Any] | None = None,
    schedule: str = "1f1b",
    n_microbatches: int | None = None,
    virtual_stages: int = 1,
    device: str | DeviceSpec = "h100-sxm",
    link: str | LinkSpec = "nvlink4",
    cut_at: str | None = None,
    pinned_cuts: Sequence[str] = (),
    optimizer: str = "adam",
    memory_limit: int | None = None,
    capture_route: str = "auto",
    leaf_modules: Sequence[str | type] = (),
    concrete_args: dict[str, Any] | None = None,
    seq_dims: Mapping[str, int] | None = None,
    keep_snapshots: bool = False,
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
    """
    if not isinstance(model, nn.Module):
        raise PartitionError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _check_counts(n_gpus, virtual_stages, schedule, n_microbatches)
    if optimizer not in OPTIMIZER_STATES:
        raise PartitionError(f"unknown optimizer {optimizer!r}; use one of {', '.join(OPTIMIZER_STATES)}")
    dev, lnk = get_device(device), get_link(link)
    inputs = _split_inputs(example_inputs, example_kwargs)
    dynamic = None
    if inputs is not None:
        sig = inspect.signature(model.forward)
        try:
            bound = sig.bind(*inputs[0], **inputs[1])
        except TypeError as e:
            raise PartitionError(f"example inputs do not match {type(model).__name__}.forward{sig}: {e}") from None
        specs0 = default_specs(list(bound.arguments.values()), list(bound.arguments))
        dynamic = {s.name: {d: sym for d, sym in s.dims} for s in specs0}
    cap = capture(model, *(inputs or (None, None)), route=capture_route, leaf_modules=leaf_modules,
                  concrete_args=concrete_args, dynamic=dynamic)
    n_stages = n_gpus * virtual_stages
    opts = Options(n_gpus, n_stages, schedule, 0, cut_at, tuple(pinned_cuts), optimizer,
                   cap.route, tuple(str(m) for m in leaf_modules), memory_limit)
    specs: tuple[InputSpec, ...] = ()
    if inputs is not None:
        flat = cap.flatten(*inputs)
        specs = default_specs(flat, list(cap.input_names))
        if seq_dims:
            specs = tuple(s._replace(dims=tuple(sorted({**dict(s.dims), seq_dims[s.name]: "S"}.items())))
                          if s.name in seq_dims else s for s in specs)
    return _compile(model, cap, specs, opts, n_microbatches, dev, lnk, keep_snapshots)


def _compile(model: nn.Module, cap: Captured, specs: tuple[InputSpec, ...], opts: Options,
             n_microbatches: int | None, dev: DeviceSpec, lnk: LinkSpec, keep_snapshots: bool,
             forced: Mapping[str, int] | None = None) -> Pipe:
    notes: list[str] = []
    if cap.route == "export" and cap.fallback_reason:
        notes.append(f"captured with torch.export because torch.fx failed: {cap.fallback_reason}")
    gm = cap.gm
    fp = fingerprint(gm)
    costs_known = bool(specs)
    if costs_known:
        pm = PassManager([ShapeProp(specs), AnnotateCosts()], keep_snapshots=keep_snapshots)
        gm = pm.run(gm)
        if not gm.meta.get("pp.symbolic", True):
            notes.append("costs are exact for the example sizes only: symbolic shape propagation failed")
    else:
        msg = ("no example inputs: balancing parameter bytes only; FLOP and activation costs "
               "need example_inputs=(...)")
        warnings.warn(msg, stacklevel=3)
        notes.append(msg)
        pm = PassManager([], keep_snapshots=keep_snapshots)
        gm = pm.run(gm)
        for n in gm.graph.nodes:
            n.meta.setdefault(MODULE, module_of(n))
    batch = _batch_size(specs) if specs else None
    m = n_microbatches if n_microbatches is not None else _default_microbatches(batch, opts.n_gpus, opts.schedule)
    if opts.schedule == "naive":
        m = 1
    if batch is not None and batch % m:
        raise PartitionError(f"the batch of {batch} samples does not split into {m} micro-batches; "
                             f"choose n_microbatches among {[d for d in range(1, batch + 1) if batch % d == 0]}")
    opts = Options(**{**opts.__dict__, "n_microbatches": m})
    micro = batch // m if batch else 1
    symbols = {"B": batch or 1}
    seq = next((s.shape[d] for s in specs for d, sym in s.dims if sym == "S"), None)
    if seq is not None:
        symbols["S"] = seq
    dtype = next((getattr(torch, s.dtype) for s in specs if s.kind == "tensor" and s.dtype.startswith(("float", "bfloat"))), None)
    param_dtype = next((p.dtype for p in model.parameters()), torch.float32)
    compute_dtype = dtype or param_dtype

    def node_time(cost: Any, values: Mapping[str, int]) -> tuple[float, float]:
        if not costs_known:  # parameter bytes stand in for time: read once forward, twice backward
            pb = float(poly.evaluate(cost.param_bytes, values["B"], values["S"]))
            return pb / dev.mem_bandwidth, 2 * pb / dev.mem_bandwidth
        return dev.node_time(cost, values, compute_dtype)

    if not costs_known:
        plan_builder.param_bytes_by_first_use(gm, compute_nodes(gm))
    priced = price(gm, batch=micro, seq=symbols.get("S", 1), node_time=node_time,
                   state_multiplier=2 + OPTIMIZER_STATES[opts.optimizer], cut_at=opts.cut_at,
                   costs_known=costs_known)
    sched = build_schedule(opts.schedule, opts.n_gpus, m, opts.n_stages)
    unit = simulate(sched, [1.0] * opts.n_stages, [2.0] * opts.n_stages)
    inflight = list(unit.peak_inflight)
    capacity = opts.memory_limit if opts.memory_limit is not None else dev.memory_bytes
    comm = [to_units([lnk.transfer_time(b) + lnk.transfer_time(g)])[0] if (b or g) else 0
            for b, g in zip(priced.cut_bytes, priced.cut_grad_bytes)]
    n = len(priced.order)
    comm[0] = comm[n] = 0
    sin = SolverInput(
        compute=to_units([f + b for f, b in zip(priced.fwd_s, priced.bwd_s)]),
        cut_cost=comm, cut_bytes=list(priced.cut_bytes), allowed=list(priced.allowed),
        static_mem=list(priced.static_mem), act_mem=list(priced.act_mem),
        inflight=inflight, capacity=[capacity] * opts.n_stages, pinned=[])
    if forced is not None:  # re-applying a plan: its cuts, priced the same way, no search
        stage_of = [forced[n.name] for n in priced.order]
        cuts = tuple(stage_of.index(s) for s in range(1, opts.n_stages))
        solution = score(sin, cuts)
    else:
        pins = _resolve_pins(priced.order, opts.pinned_cuts, priced.allowed, priced.blocked_by)
        _check_enough_cuts(priced, opts.n_stages)
        sin = replace(sin, pinned=pins)
        solution = refine(sin, opts.n_stages, solve(sin, opts.n_stages))
    assignment: dict[str, int] = {}
    bounds = [0, *solution.cuts, n]
    for s in range(opts.n_stages):
        for node in priced.order[bounds[s]:bounds[s + 1]]:
            assignment[node.name] = s
            node.meta[STAGE] = s
    split = split_graph(gm, assignment, opts.n_stages)
    if keep_snapshots:  # the solver is not a graph pass, but its answer is node meta (pp.stage)
        pm.snapshots.append(Snapshot("solve", graph_text(gm), node_summary(gm)))
    plan = plan_builder.build_plan(
        model=model, cap=cap, gm=gm, fingerprint=fp, specs=specs, symbols=symbols, options=opts.to_dict(),
        device=dev, link=lnk, priced=priced, bounds=bounds, split=split, schedule=sched,
        micro=micro, solution=solution, comm_units=comm, notes=notes, time_unit=TIME_UNIT,
    )
    return Pipe(cap, split.stages, plan, graph=gm, snapshots=pm.snapshots, model=model)


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
    if plan.capture == "export":  # export needs inputs: zeros of the recorded shapes, by name
        example = {s.name: s.zeros() for s in specs}
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
    order = compute_nodes(cap.gm)
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
    fields: dict[str, Any] = {k: (tuple(v) if isinstance(v, list) else v) for k, v in opts.items()}
    o = Options(**fields)
    return _compile(model, cap, specs, o, o.n_microbatches, get_device(DeviceSpec.from_dict(plan.device)),
                    get_link(LinkSpec.from_dict(plan.link)), False, forced=forced)


#: Re-applying an exported plan builds zeros of its recorded input shapes; a hostile file
#: must not make that allocate gigabytes.
_MAX_INPUT_NUMEL = 2**28

