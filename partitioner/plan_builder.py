"""Assembles a ``Plan`` from the solved, split graph: pure bookkeeping, no decisions."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import sympy
import torch
from torch import fx, nn

from partitioner import poly
from partitioner.cost_models.cost import NodeCost
from partitioner.cost_models.devices import DeviceSpec, LinkSpec
from partitioner.data_parallel import boundary_time
from partitioner.memory import _sum as grouped
from partitioner.passes.base import InputSpec, TensorDesc
from partitioner.passes.meta import COST, DESC, MODULE
from partitioner.passes.split import SplitResult
from partitioner.passes.tensor_parallel import param_divisor
from partitioner.plan import Boundary, Plan, Prediction, SolverReport, StageCost, StagePlan, ValueRoute, ValueSpec
from partitioner.pricing import Priced, module_instance, wire_kind
from partitioner.schedule import Schedule
from partitioner.simulator import boundary_bytes, predict_step, simulate
from partitioner.solver import Solution

__all__ = ["StageMemory", "PlanSource", "Hardware", "SolvedSplit", "build_plan", "param_bytes_by_first_use",
           "value_routes"]


@dataclass(frozen=True)
class StageMemory:
    """What the planner decided a stage holds (``partitioner.memory``)."""

    recompute: str  # "none", "selective", "selective-op", "full"
    static_bytes: int  # weights + grads + optimizer state + buffers, each tensor once
    saved: Any  # sympy: bytes kept per micro-batch in flight
    transient: Any  # sympy: held once while a region is recomputed


@dataclass(frozen=True)
class PlanSource:
    """What was partitioned and how it was asked for (the plan's header)."""

    model: str  # the model's class name
    fingerprint: str  # passes' graph fingerprint (api.fingerprint)
    capture: str  # the capture route taken: "fx" or "export"
    specs: Sequence[InputSpec]  # one per flat graph input
    symbols: Mapping[str, int]  # {"B": batch, "S": seq} of the example inputs
    options: Mapping[str, Any]  # api.Options.to_dict()
    notes: Sequence[str] = ()
    static_shapes: bool = False  # symbolic shape propagation failed: costs hold for the example sizes only
    rankings: Mapping[str, Any] = field(default_factory=dict)  # the automatic choices' candidates


@dataclass(frozen=True)
class Hardware:
    """The profiles the plan was priced on."""

    device: DeviceSpec
    link: LinkSpec


@dataclass(frozen=True)
class SolvedSplit:
    """The solver's answer and the split graph it was applied to."""

    gm: fx.GraphModule  # the annotated graph (node.meta carries pp.cost, pp.desc, pp.module)
    priced: Priced  # pricing at ``micro``
    bounds: Sequence[int]  # 0, cut positions..., n: stage s runs priced.order[bounds[s]:bounds[s + 1]]
    split: SplitResult
    schedule: Schedule
    micro: int  # micro-batch size
    solution: Solution
    comm_units: Sequence[int]  # per cut position, transfer time in ``time_unit``s (both directions)
    memory: Sequence[StageMemory]  # per stage
    time_unit: float  # seconds per solver time unit (pricing.TIME_UNIT)


def param_bytes_by_first_use(gm: fx.GraphModule, order: Sequence[fx.Node]) -> None:
    """Without example inputs, price each node by the parameter bytes it first touches."""
    seen: set[int] = set()

    def tensors_of(node: fx.Node) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        if node.op == "call_module":
            mod = gm.get_submodule(str(node.target))
            out += list(mod.parameters()) + list(mod.buffers())
        for a in node.all_input_nodes:
            if a.op == "get_attr":
                t = _fetch(gm, str(a.target))
                if isinstance(t, torch.Tensor):
                    out.append(t)
        return out

    for node in order:
        pb = bb = 0
        for t in tensors_of(node):
            if id(t) in seen:
                continue
            seen.add(id(t))
            size = t.numel() * t.element_size()
            if isinstance(t, nn.Parameter):
                pb += size
            else:
                bb += size
        node.meta[COST] = NodeCost(param_bytes=sympy.Integer(pb), buffer_bytes=sympy.Integer(bb))


def _fetch(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _label(priced: Priced, k: int, cut_at: str | None) -> str:
    def side(node: fx.Node) -> str:
        path = str(node.meta.get(MODULE, ""))
        inst = module_instance(path, cut_at)
        return inst or path or node.name

    left, right = priced.order[k - 1], priced.order[k]
    a, b = side(left), side(right)
    if a == b:  # a cut inside one module: name the nodes either side too
        return f"{a} [{left.name} | {right.name}]"
    return f"{a} | {b}"


def _value_spec(node: fx.Node, at: Mapping[str, int]) -> ValueSpec:
    desc = node.meta.get(DESC)
    if isinstance(desc, TensorDesc):
        shape = tuple(int(d) if sympy.sympify(d).is_Integer else poly.to_text(d, at) for d in desc.shape)
        return ValueSpec(node.name, "tensor", shape, str(desc.dtype).removeprefix("torch."),
                         poly.to_text(desc.nbytes(), at), bool(desc.requires_grad))
    kind = wire_kind(desc) or "unknown"
    return ValueSpec(node.name, kind if kind != "unknown" else "none", (), "", "8" if kind != "none" else "0")


def value_routes(gm: fx.GraphModule, split: SplitResult, at: Mapping[str, int]) -> tuple[ValueRoute, ...]:
    """Where each value the stages name (``split.io``'s inputs and outputs) is made and used,
    read from the graph the stages were split from: its producer's stage ("input" for a graph
    input), and the stages holding its users (the graph's output: the last stage; a stage that
    rebuilds from sizes a tensor made elsewhere uses the sizes it reads, ``StageIO.rebuilt``).
    Listed in the order the stages name them: stage 0's inputs, then each stage's outputs."""
    stage_of = {name: s for s, io in enumerate(split.io) for name in io.nodes}
    again: dict[str, list[int]] = {}  # a rebuilt node -> the stages running it again
    for s, io in enumerate(split.io):
        for name in io.rebuilt:
            again.setdefault(name, []).append(s)
    last = len(split.io) - 1
    by_name = {n.name: n for n in gm.graph.nodes}
    names = dict.fromkeys(split.io[0].inputs)
    for io in split.io:
        names.update(dict.fromkeys(io.outputs))
    out = []
    for name in names:
        node = by_name[name]
        # a model output that no stage computes (an attribute) is the last stage's
        producer: int | str = "input" if node.op == "placeholder" else stage_of.get(name, last)
        users = {last if u.op == "output" else stage_of[u.name] for u in node.users
                 if u.op == "output" or u.name in stage_of}
        users.update(s for u in node.users for s in again.get(u.name, ()))
        users.discard(producer if isinstance(producer, int) else -1)
        spec = _value_spec(node, at)
        out.append(ValueRoute(name, producer, tuple(sorted(users)), name in split.io[last].outputs,
                              spec.kind, spec.shape, spec.dtype))
    return tuple(out)


def build_plan(source: PlanSource, hardware: Hardware, solved: SolvedSplit) -> Plan:
    """The ``Plan`` for a solved split: per-stage costs and memory, boundaries, the simulated
    step (``simulator.predict_step``, the same call ``partitioner timeline`` makes on the plan)."""
    specs, symbols, options, notes = source.specs, dict(source.symbols), dict(source.options), source.notes
    device, link = hardware.device, hardware.link
    gm, priced, bounds, split, schedule = solved.gm, solved.priced, solved.bounds, solved.split, solved.schedule
    micro, solution, comm_units, time_unit, memory = (solved.micro, solved.solution, solved.comm_units,
                                                       solved.time_unit, solved.memory)
    at = {"B": micro, "S": symbols.get("S", 1)}
    by_name = {n.name: n for n in gm.graph.nodes}
    n_stages = len(split.stages)
    stage_plans = []
    owners: dict[int, dict[str, set[Any]]] = {}
    unit_sim = simulate(schedule, [1.0] * n_stages, [2.0] * n_stages)
    for s, (stage, io) in enumerate(zip(split.stages, split.io)):
        a, b = bounds[s], bounds[s + 1]
        costs = [priced.order[i].meta.get(COST, NodeCost()) for i in range(a, b)]
        total = NodeCost(fwd_flops=_sum(c.fwd_flops for c in costs), bwd_flops=_sum(c.bwd_flops for c in costs))
        params = list(stage.named_parameters(remove_duplicate=False))
        buffers = list(stage.named_buffers(remove_duplicate=False))
        for name, t in params:
            entry = owners.setdefault(id(t), {"names": set(), "stages": set()})
            entry["names"].add(name)
            entry["stages"].add(s)
        # one tensor-parallel rank's share of its sharded weights (partitioner.tensor_parallel.view)
        divisor = param_divisor(gm)
        pbytes = sum(t.numel() * t.element_size() // divisor.get(n, 1) for n, t in {id(t): (n, t) for n, t in params}.values())
        bbytes = sum(t.numel() * t.element_size() for t in {id(t): t for _, t in buffers}.values())
        modules: list[str] = []
        for i in range(a, b):
            path = str(priced.order[i].meta.get(MODULE, ""))
            if path and path not in modules:
                modules.append(path)
        mem = memory[s]
        # a stage that recomputes pays its checkpointed regions' forward again in backward
        redo = solution.stage_times[s] * time_unit - (comm_units[a] + comm_units[b]) * time_unit \
            - sum(priced.fwd_s[a:b]) - sum(priced.bwd_s[a:b])
        cost = StageCost(
            fwd_flops=poly.to_text(total.fwd_flops, at), bwd_flops=poly.to_text(total.bwd_flops, at),
            saved_bytes=poly.to_text(mem.saved, at), param_bytes=pbytes, buffer_bytes=bbytes,
            fwd_time_s=sum(priced.fwd_s[a:b]), bwd_time_s=sum(priced.bwd_s[a:b]) + max(redo, 0.0),
            comm_time_s=(comm_units[a] + comm_units[b]) * time_unit,
            memory_bytes=solution.stage_mem[s], static_bytes=mem.static_bytes,
            recompute_bytes=poly.to_text(mem.transient, at),
        )
        stage_plans.append(StagePlan(
            index=s, rank=schedule.rank_of(s), nodes=io.nodes, modules=tuple(modules),
            parameters=tuple(n for n, _ in params), buffers=tuple(n for n, _ in buffers),
            inputs=io.inputs, outputs=io.outputs, cost=cost, recompute=mem.recompute))
    boundaries = []
    for i in range(n_stages - 1):
        k = bounds[i + 1]
        values = tuple(_value_spec(by_name[name], at) for name in split.io[i].outputs)
        boundaries.append(Boundary(i, _label(priced, k, options.get("cut_at")), values, priced.cut_bytes[k]))
    tied = sorted(tuple(sorted(e["names"])) for e in owners.values() if len(e["stages"]) > 1)
    # the plan's own records, the way ``partitioner timeline`` re-simulates a loaded plan
    sim = predict_step(schedule, [st.cost.fwd_time_s for st in stage_plans], [st.cost.bwd_time_s for st in stage_plans],
                       boundary_time(link, int(source.options.get("tensor_parallel") or 1),
                                     sequence_parallel=bool(source.options.get("sequence_parallel"))),
                       *boundary_bytes(boundaries, micro, at["S"]))
    prediction = Prediction(schedule.name, schedule.n_microbatches, micro, sim.step_time,
                            min(1.0, max(0.0, sim.bubble_fraction)), solution.bottleneck * time_unit,
                            tuple(unit_sim.peak_inflight))
    report = SolverReport(solution.bottleneck * time_unit, solution.lower_bound * time_unit,
                          bool(solution.optimal), int(solution.total_cut_bytes))
    return Plan(
        model=source.model, fingerprint=source.fingerprint, capture=source.capture,
        inputs=tuple(_input_dict(s) for s in specs), symbols=dict(symbols), options=dict(options),
        device=device.to_dict(), link=link.to_dict(), stages=tuple(stage_plans),
        boundaries=tuple(boundaries), tied_parameters=tuple(tied), prediction=prediction,
        solver=report, notes=tuple(notes), static_shapes=source.static_shapes,
        rankings={k: list(v) for k, v in source.rankings.items()}, routes=value_routes(gm, split, at),
    )


def _sum(terms: Any) -> Any:
    """One sympy Add (adding one by one is quadratic in the number of nodes)."""
    return grouped(list(terms))


def _input_dict(s: InputSpec) -> dict[str, Any]:
    return {"name": s.name, "kind": s.kind, "shape": list(s.shape), "dtype": s.dtype,
            "dims": [[d, sym] for d, sym in s.dims], "value": s.value}
