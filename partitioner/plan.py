"""The plan: plain, versioned, deterministic data; JSON out and in, never code.

A ``Plan`` says which graph nodes each stage runs, which parameters it owns, what
crosses each cut (shape symbolic in B/S, dtype, bytes), what each stage costs, and what
the solver and simulator predicted. ``to_json`` is byte-identical for the same model and
options; ``load_plan`` validates against ``plan.schema.json`` and then checks the plan's
own consistency, naming the JSON path of the first bad field.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from partitioner import poly
from partitioner.cost_models.devices import DeviceSpec, LinkSpec
from partitioner.cost_models.errors import CostModelError, PartitionError
from partitioner.options import RECOMPUTE
from partitioner.schedule import SCHEDULES, Schedule, ScheduleError, rank_of

if TYPE_CHECKING:  # torch-free at import: ``partitioner show``/``diff`` read plans without torch
    from partitioner.passes.base import InputSpec
    from partitioner.pipe import Pipe
    from partitioner.schedule import Schedule

__all__ = [
    "PLAN_VERSION", "READ_VERSIONS", "PlanError", "ValueSpec", "Boundary", "ValueRoute", "StageCost", "StagePlan",
    "Prediction", "SolverReport", "Mesh", "Plan", "load_plan", "write_atomic",
]

#: 4: routes (each stage value's producer and consumers); 3: data parallelism (options
#: data_parallel, zero, gpus_per_node; mesh)
PLAN_VERSION = 4
#: the versions ``load_plan`` reads: a version-3 plan has no ``routes`` (the runtime reads them
#: from the stage graphs, as it did when such plans were written)
READ_VERSIONS = (3, 4)

#: The names ``torch`` gives its dtypes (``getattr(torch, name)`` is a ``torch.dtype``), spelled
#: out so that loading a plan needs no torch; tests/partitioner/test_imports.py keeps it equal.
TORCH_DTYPES = frozenset({
    "bfloat16", "bit", "bits16", "bits1x8", "bits2x4", "bits4x2", "bits8", "bool", "cdouble", "cfloat", "chalf",
    "complex128", "complex32", "complex64", "double", "float", "float16", "float32", "float4_e2m1fn_x2", "float64",
    "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu", "half", "int", "int1",
    "int16", "int2", "int3", "int32", "int4", "int5", "int6", "int64", "int7", "int8", "long", "qint32", "qint8",
    "quint2x4", "quint4x2", "quint8", "short", "uint1", "uint16", "uint2", "uint3", "uint32", "uint4", "uint5",
    "uint6", "uint64", "uint7", "uint8",
})


#: the plan note ``partition()`` writes when symbolic shape propagation failed: the costs and
#: the boundary shapes hold for the example's sizes only (the runtime's errors point at it)
STATIC_SHAPES_NOTE = "costs are exact for the example sizes only"


class PlanError(PartitionError):
    """A plan file is malformed, inconsistent, or does not fit the model it is applied to."""

    def __init__(self, message: str, path: str = "$") -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


@dataclass(frozen=True)
class ValueSpec:
    name: str  # graph node name
    kind: str  # "tensor", "int", "float", "bool", "none"
    shape: tuple[int | str, ...]  # entries are ints or polynomials in B/S as text
    dtype: str  # "float32", ...; "" for non-tensors
    bytes: str  # polynomial in B/S as text
    requires_grad: bool = False  # a gradient flows back across the cut


@dataclass(frozen=True)
class Boundary:
    index: int  # the cut between stage index and index + 1
    label: str  # "transformer.h.1 | transformer.h.2": module paths either side of the cut
    values: tuple[ValueSpec, ...]
    bytes: int  # at the plan's micro-batch size, one direction


@dataclass(frozen=True)
class ValueRoute:
    """Where one value the stages pass each other is made and used.

    Every name in some stage's ``inputs`` or ``outputs`` has one: the model's flat inputs
    (``producer`` "input"), each value crossing a cut, and the model's flat outputs
    (``output``). ``consumers`` are the stages whose own nodes use the value (ascending, the
    producer excluded; the last stage when the value is a model output); a stage between
    the producer and a consumer that does not use it only passes it along in its graph.
    ``kind``, ``shape`` and ``dtype`` are the boundary's ``ValueSpec`` ones (a model input's or
    output's that crosses no cut: as shape propagation found them).
    """

    name: str  # the graph node name: the stage modules' placeholder / output name
    producer: int | str  # the stage that computes it, or "input" for a model input
    consumers: tuple[int, ...]
    output: bool  # one of the model's flat outputs (the last stage returns it)
    kind: str
    shape: tuple[int | str, ...]
    dtype: str


@dataclass(frozen=True)
class StageCost:
    fwd_flops: str  # polynomials in B/S as text, per micro-batch
    bwd_flops: str
    #: storages autograd keeps for this stage's backward, per micro-batch in flight, each
    #: once (under the stage's recompute choice: checkpointed regions keep their inputs)
    saved_bytes: str
    param_bytes: int  # the stage's parameters as the model holds them
    buffer_bytes: int
    fwd_time_s: float  # at the plan's micro-batch size, on the plan's device (recompute included in bwd)
    bwd_time_s: float
    comm_time_s: float  # sends and receives at this stage's cuts, per micro-batch
    memory_bytes: int  # static + in-flight micro-batches x saved + recompute transient
    static_bytes: int = 0  # weights + grads + optimizer state (precision, optimizer) + buffers
    recompute_bytes: str = "0"  # the working set, held once: forward temporaries, gradients alive, recompute


@dataclass(frozen=True)
class StagePlan:
    index: int
    rank: int  # the device (process) that runs it
    nodes: tuple[str, ...]
    modules: tuple[str, ...]  # module paths whose nodes the stage runs, in order
    parameters: tuple[str, ...]  # fully qualified names
    buffers: tuple[str, ...]
    inputs: tuple[str, ...]  # value names received (stage 0: the model's flat inputs)
    outputs: tuple[str, ...]  # value names sent on (last stage: the model's flat outputs)
    cost: StageCost
    recompute: str = "none"  # "none", "selective", "selective-op" or "full": what the stage recomputes in backward


@dataclass(frozen=True)
class Prediction:
    schedule: str
    n_microbatches: int
    microbatch_size: int
    step_time_s: float
    bubble_fraction: float
    bottleneck_s: float  # slowest stage, forward + backward + comm, per micro-batch
    peak_inflight: tuple[int, ...]  # micro-batches in flight per stage, from the simulator
    #: peak bytes per pipeline rank, its stages together (a rank of an interleaved or zbv
    #: schedule holds several); empty, and left out of the JSON, in plans written before it
    rank_memory_bytes: tuple[int, ...] = ()


@dataclass(frozen=True)
class SolverReport:
    bottleneck_s: float
    lower_bound_s: float  # no split of this order can beat it
    optimal: bool  # the solver proved bottleneck_s optimal for the order
    total_cut_bytes: int


@dataclass(frozen=True)
class Mesh:
    """The plan's ranks as a 2-D device mesh: ``dp`` replicas of a ``pp``-rank pipeline.

    ``dims`` lists the mesh dimensions outermost first, as
    ``torch.distributed.device_mesh.init_device_mesh(..., mesh_dim_names=dims)`` builds it:
    ``("dp", "pp")`` puts rank ``d * pp + p`` at replica d, pipeline rank p (a pipeline on
    consecutive ranks, so inside a node where it fits: torchtitan's layout);
    ``("pp", "dp")`` puts rank ``p * dp + d`` there (the replicas of a stage side by side).
    Node ``k`` holds ranks ``k * gpus_per_node ...`` (torchrun's order); ``gpus_per_node`` 0
    means one node. ``allreduce_s`` is each pipeline rank's gradient all-reduce over its
    replicas (ring, plus ZeRO-1's parameter all-gather); ``exposed_s`` is the part of the
    step spent waiting for it after that rank's last action.

    ``tp``: tensor-parallel ranks per pipeline rank (``runtime.tensor_parallel``; 1 in plans
    written before it). They are the innermost dimension: global rank
    ``rank(d, p) * tp + t``, so the ``tp`` ranks of one pipeline rank are consecutive (one
    node). ``partition(tensor_parallel=...)`` chooses it (``with_tensor_parallel`` sets it on a plan).

    ``fsdp`` (``zero=3``): how FSDP gathers inside the stages (``runtime.fsdp.mode``): ``"unit"``
    (gathered and reduce-scattered per micro-batch) or ``"step"`` (gathered once, reduced once
    per step). ``""``, and left out of the JSON: the schedule's default (``"step"`` for a split
    backward, else ``"unit"``). ``partition(fsdp_reshard=...)`` chooses it.

    ``shard`` (``zero=3``): hybrid sharding (HSDP, FSDP2's ``fully_shard`` on a 2-D
    ``(replicate, shard)`` mesh): each parameter is sharded over ``shard`` replicas and the
    ``dp / shard`` groups of them replicate it, all-reducing their gradient shards. The
    replicas' index is ``d = r * shard + s`` (shard innermost, so a shard group is consecutive
    replicas). ``0``, and left out of the JSON: sharded over all ``dp`` replicas.
    ``partition(fsdp_shard=...)`` sets it.
    """

    dp: int = 1
    pp: int = 0  # 0: read options.n_gpus (plans written before data parallelism)
    dims: tuple[str, ...] = ("dp", "pp")
    gpus_per_node: int = 0
    zero: int = 0
    inter_link: dict[str, Any] | None = None
    allreduce_s: tuple[float, ...] = ()
    exposed_s: float = 0.0
    tp: int = 1
    fsdp: str = ""
    shard: int = 0

    @property
    def shard_degree(self) -> int:
        """Replicas one FSDP shard group spans (``shard``, else all ``dp``)."""
        return self.shard or self.dp

    def replicas(self, pp_rank: int) -> list[int]:
        """The global ranks of pipeline rank ``pp_rank``'s replicas (TP rank 0)."""
        return [self.rank(d, pp_rank) for d in range(self.dp)]

    def shard_groups(self, pp_rank: int) -> list[list[int]]:
        """The global ranks of each FSDP shard group of pipeline rank ``pp_rank`` (TP rank 0):
        ``shard_degree`` consecutive replicas each."""
        s = self.shard_degree
        return [[self.rank(r * s + i, pp_rank) for i in range(s)] for r in range(self.dp // s)]

    def replica_groups(self, pp_rank: int) -> list[list[int]]:
        """HSDP: the global ranks holding the same shard (``dp / shard`` replicas each)."""
        s = self.shard_degree
        return [[self.rank(r * s + i, pp_rank) for r in range(self.dp // s)] for i in range(s)]

    def spans_nodes(self, groups: list[list[int]]) -> bool:
        """Does any of ``groups`` (global ranks) hold ranks on more than one node?"""
        return any(len({self.node(r) for r in g}) > 1 for g in groups)

    def shards_cross_nodes(self, pp_rank: int) -> bool:
        """Does a shard group of pipeline rank ``pp_rank`` span more than one node?"""
        return self.spans_nodes(self.shard_groups(pp_rank))

    def replication_crosses_nodes(self, pp_rank: int) -> bool:
        """HSDP: do the replicas holding the same shard (``dp / shard`` of them) span nodes?"""
        return self.spans_nodes(self.replica_groups(pp_rank))

    def rank(self, dp_rank: int, pp_rank: int, tp_rank: int = 0) -> int:
        """The global rank of replica ``dp_rank``'s pipeline rank ``pp_rank`` (TP rank ``tp_rank``)."""
        base = dp_rank * self.pp + pp_rank if self.dims[0] == "dp" else pp_rank * self.dp + dp_rank
        return base * self.tp + tp_rank

    def coords(self, rank: int) -> tuple[int, int]:
        """(dp_rank, pp_rank) of a global rank (its TP rank is ``rank % tp``)."""
        rank //= self.tp
        return divmod(rank, self.pp) if self.dims[0] == "dp" else divmod(rank, self.dp)[::-1]  # type: ignore[return-value]

    def node(self, rank: int) -> int:
        return rank // self.gpus_per_node if self.gpus_per_node else 0

    @property
    def n_nodes(self) -> int:
        return -(-self.dp * self.pp * self.tp // self.gpus_per_node) if self.gpus_per_node else 1

    def replicas_cross_nodes(self, pp_rank: int) -> bool:
        """Do the replicas of pipeline rank ``pp_rank`` span more than one node?"""
        return self.spans_nodes([self.replicas(pp_rank)])

    def boundary_crosses_nodes(self, p: int, q: int) -> bool:
        """Does a message from pipeline rank ``p`` to ``q`` leave the node, in any replica?"""
        return any(self.node(self.rank(d, p)) != self.node(self.rank(d, q)) for d in range(self.dp))

    def describe(self) -> str:
        if self.n_nodes == 1:
            return "one node"
        if self.dp == 1:
            return f"{self.n_nodes} nodes x {self.gpus_per_node} GPUs, one pipeline across them"
        if self.pp == 1:
            return f"{self.n_nodes} nodes x {self.gpus_per_node} GPUs, replicas across them"
        inside = "pipelines inside nodes" if not any(
            self.boundary_crosses_nodes(p, p + 1) for p in range(self.pp - 1)) else (
            "replicas inside nodes" if not any(self.replicas_cross_nodes(p) for p in range(self.pp)) else "mixed")
        return f"{self.n_nodes} nodes x {self.gpus_per_node} GPUs, mesh {self.dims[0]} outer ({inside})"


@dataclass(frozen=True)
class Plan:
    """Which nodes each stage runs and what it costs: everything needed to rebuild the stages.

    Made by ``partition()`` (``pipe.plan``), read by ``load_plan``; plain data, compared and
    stored as ``to_json()``. ``apply(model)`` rebuilds the stages without solving again,
    ``cost_at(batch, seq)`` re-prices them for another micro-batch. docs/ARCHITECTURE.md,
    "The plan", describes the fields.
    """

    model: str  # class name of the model
    fingerprint: str  # hash of the captured graph and parameter shapes
    capture: str  # "fx" or "export"
    inputs: tuple[dict[str, Any], ...]  # InputSpec as plain dicts
    symbols: dict[str, int]  # example values: {"B": global batch, "S": sequence length}
    options: dict[str, Any]  # what partition() was called with (plain JSON values)
    device: dict[str, Any]
    link: dict[str, Any]
    stages: tuple[StagePlan, ...]
    boundaries: tuple[Boundary, ...]
    tied_parameters: tuple[tuple[str, ...], ...]  # FQNs of one tensor used by several stages (1+ names)
    prediction: Prediction
    solver: SolverReport
    version: int = PLAN_VERSION
    notes: tuple[str, ...] = field(default=())  # warnings raised while planning
    mesh: Mesh = field(default_factory=Mesh)  # data-parallel replicas x pipeline ranks, and their nodes
    #: True when symbolic shape propagation failed: shapes and costs hold for the example sizes only
    static_shapes: bool = False
    #: the automatic choices' candidates, by what was chosen ("auto": schedule and micro-batches,
    #: "dp": data-parallel degree, "placement": the mesh order on nodes, "tp": tensor-parallel
    #: degree): each {"label", "step_s", "picked", "refused", "text"} ("text": the line a person
    #: reads, as the notes give it), fastest first, then the refused
    rankings: dict[str, Any] = field(default_factory=dict)
    #: where each stage value is made and used (``ValueRoute``, written by the emitter from the
    #: split that made the stages); empty in a version-3 plan: the runtime then reads the
    #: routes from the stage graphs
    routes: tuple[ValueRoute, ...] = ()

    @property
    def n_stages(self) -> int:
        return len(self.stages)

    @property
    def pp_ranks(self) -> int:
        """Ranks of one pipeline (one data-parallel replica): ``n_gpus / (data_parallel x tp)``."""
        if self.mesh.pp:
            return self.mesh.pp
        n = self.options.get("n_gpus")
        return int(n) // (self.mesh.dp * self.mesh.tp) if isinstance(n, int) else max(st.rank for st in self.stages) + 1

    def stored_schedule(self) -> Schedule | None:
        """The hand-written schedule the plan carries (``options.schedule_text``, written by
        ``partition(schedule=Schedule(...))``), parsed; None for a built-in schedule."""
        text = self.options.get("schedule_text")
        if text is None:
            return None

        try:
            return _parse_schedule(str(text))
        except ScheduleError as e:
            raise PlanError(f"the stored schedule is not valid: {e}", "$.options.schedule_text") from None

    def input_specs(self) -> tuple[InputSpec, ...]:
        """The recorded model inputs as ``InputSpec``s (enough to re-trace without data)."""
        from partitioner.passes.base import InputSpec  # noqa: PLC0415 - torch-free module (plan loading and the CLI must not import torch)

        return tuple(InputSpec(d["name"], d["kind"], tuple(d["shape"]), d["dtype"],
                               tuple((int(a), str(b)) for a, b in d["dims"]), d.get("value"))
                     for d in self.inputs)

    @property
    def cuts(self) -> tuple[str, ...]:
        return tuple(b.label for b in self.boundaries)

    # -- JSON ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = _plain(asdict(self))
        # fields at their defaults are left out: such a plan reads as before the fields existed
        if data["mesh"].get("tp") == 1:
            del data["mesh"]["tp"]
        if not data["mesh"].get("fsdp"):
            del data["mesh"]["fsdp"]
        if not data["mesh"].get("shard"):
            del data["mesh"]["shard"]
        if not data["prediction"].get("rank_memory_bytes"):
            del data["prediction"]["rank_memory_bytes"]
        for name in ("static_shapes", "rankings", "routes"):
            if not data[name]:
                del data[name]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n"

    def save(self, path: str | os.PathLike[str]) -> None:
        write_atomic(path, self.to_json())

    @classmethod
    def from_dict(cls, data: Any) -> Plan:
        _validate_schema(data)
        plan = _build(cls, data, "$")
        _check_consistency(plan)
        _check_values(plan)
        return plan

    # -- re-pricing --------------------------------------------------------------------
    def cost_at(self, batch: int, seq: int | None = None) -> list[dict[str, int]]:
        """Per-stage FLOPs and activation bytes for a micro-batch of ``batch`` samples."""
        if not isinstance(batch, int) or batch < 1:
            raise PlanError(f"batch must be a positive int, got {batch!r}", "batch")
        s = seq if seq is not None else self.symbols.get("S", 1)
        out = []
        for st in self.stages:
            out.append({
                "stage": st.index,
                "fwd_flops": poly.evaluate(poly.from_text(st.cost.fwd_flops), batch, s),
                "bwd_flops": poly.evaluate(poly.from_text(st.cost.bwd_flops), batch, s),
                "saved_bytes": poly.evaluate(poly.from_text(st.cost.saved_bytes), batch, s),
                "recompute_bytes": poly.evaluate(poly.from_text(st.cost.recompute_bytes), batch, s),
                "param_bytes": st.cost.param_bytes,
                "static_bytes": st.cost.static_bytes,
            })
        return out

    def apply(self, model: Any, example_inputs: Any = None) -> Pipe:
        """Rebuild this plan's stages for ``model``, without solving again.

        Args:
            model: the model the plan was made from (checked by the graph's fingerprint), on
                any device, or on the meta device.
            example_inputs: needed only when the plan recorded no input shapes.

        Returns:
            A ``Pipe`` with the plan's stages, cuts and ranks; ``pipe.pipeline_spec()`` is the
            record the runtime is built from (or build one without a ``Pipe``:
            ``partitioner.runtime.spec.PipelineSpec.build(plan, stage_modules)``).

        Raises:
            PlanError: the plan does not fit ``model``.
        """
        from partitioner.api import apply_plan  # noqa: PLC0415 - a cycle: api imports this module

        return apply_plan(self, model, example_inputs)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# -- loading -------------------------------------------------------------------------------

def load_plan(source: str | os.PathLike[str] | Mapping[str, Any]) -> Plan:
    """A Plan from JSON text, a path to a JSON file, or a parsed dict. Never runs code.

    Args:
        source: JSON text (a string starting with ``{``), a path to a JSON file (any other
            string, or a ``PathLike``), or the parsed JSON as a mapping.

    Returns:
        The ``Plan``, validated against ``plan.schema.json`` and checked for consistency.

    Raises:
        PlanError: unreadable, not JSON, another plan version, or a bad field (the message
            starts with the field's JSON path, e.g. ``$.stages[1].nodes[0]``).
    """
    if isinstance(source, Mapping):
        return Plan.from_dict(dict(source))
    if not isinstance(source, (str, os.PathLike)):
        raise PlanError(f"expected JSON text, a path or a dict, got {type(source).__name__}")
    text: str
    if isinstance(source, os.PathLike) or (isinstance(source, str) and not source.lstrip().startswith("{")):
        path = Path(source)
        try:
            text = path.read_text()
        except OSError as e:
            raise PlanError(f"cannot read plan file {str(path)!r}: {e.strerror}") from None
    else:
        text = str(source)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise PlanError(f"not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:  # "[[[[...": json recurses once per level
        raise PlanError("not valid JSON: nested too deeply") from None
    return Plan.from_dict(data)


def _schema() -> dict[str, Any]:
    return json.loads(resources.files("partitioner").joinpath("plan.schema.json").read_text())


def _validate_schema(data: Any) -> None:
    import jsonschema  # noqa: PLC0415 - CLI start-up (jsonschema loads when a plan is validated)

    if isinstance(data, dict) and data.get("version") not in (None, *READ_VERSIONS) and isinstance(data.get("version"), int):
        raise PlanError(f"plan version {data['version']} is not supported (this build reads "
                        f"{', '.join(map(str, READ_VERSIONS))})", "$.version")
    if isinstance(data, dict) and data.get("version") == 3 and "routes" in data:
        raise PlanError("a version-3 plan has no routes (they came with version 4): set version to 4 or drop "
                        "routes", "$.routes")
    bad = _non_finite(data, "$")
    if bad is not None:  # json.loads reads NaN/Infinity; to_json would write invalid JSON back
        raise PlanError("numbers must be finite (NaN and Infinity are not JSON)", bad)
    validator = jsonschema.Draft202012Validator(_schema())
    errors = sorted(validator.iter_errors(data), key=lambda e: (len(e.path), list(map(str, e.path))))
    if errors:
        err = errors[0]
        raise PlanError(err.message, err.json_path)


def _non_finite(value: Any, path: str) -> str | None:
    """JSON path of the first NaN or infinite float in ``value``, if any."""
    if isinstance(value, float) and not math.isfinite(value):
        return path
    if isinstance(value, dict):
        items: Any = ((f"{path}.{k}", v) for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for sub, v in items:
        hit = _non_finite(v, sub)
        if hit is not None:
            return hit
    return None


def _build(cls: Any, data: Any, path: str) -> Any:
    """Dataclass from schema-valid dict (tuples for lists)."""
    kwargs = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        sub = _NESTED.get((cls.__name__, f.name))
        if sub is not None and isinstance(value, list):
            value = tuple(_build(sub, v, f"{path}.{f.name}[{i}]") for i, v in enumerate(value))
        elif sub is not None:
            value = _build(sub, value, f"{path}.{f.name}")
        elif f.name == "tied_parameters":
            value = tuple(tuple(g) for g in value)
        elif f.name == "inputs" and cls is Plan:
            value = tuple(dict(v) for v in value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[f.name] = value
    return cls(**kwargs)


_NESTED: dict[tuple[str, str], Any] = {
    ("Plan", "stages"): StagePlan,
    ("Plan", "boundaries"): Boundary,
    ("Plan", "prediction"): Prediction,
    ("Plan", "solver"): SolverReport,
    ("Plan", "mesh"): Mesh,
    ("StagePlan", "cost"): StageCost,
    ("Boundary", "values"): ValueSpec,
    ("Plan", "routes"): ValueRoute,
}


@functools.lru_cache(maxsize=8)
def _parse_schedule(text: str) -> Schedule:
    """``Schedule.from_text``, once per text: loading checks a stored schedule twice and the
    runners use it again (a Schedule is immutable, so sharing it is safe)."""
    return Schedule.from_text(text)


def _check_schedule_text(plan: Plan, name: str) -> None:
    """A hand-written schedule (``partition(schedule=Schedule(...))``) stored in the plan: it
    must parse, pass the validator, and fit the plan (name, ranks, stages, micro-batches)."""
    where = "$.options.schedule_text"
    if name in SCHEDULES:
        raise PlanError(f"options.schedule_text is only for hand-written schedules, but {name!r} is a built-in "
                        "one: remove it", where)
    sched = plan.stored_schedule()
    assert sched is not None  # the caller saw the text
    try:
        sched.validate()
    except ScheduleError as e:
        raise PlanError(f"the stored schedule is not valid: {e}", where) from None
    want = {"name": name, "ranks": plan.pp_ranks, "stages": len(plan.stages),
            "microbatches": plan.options.get("n_microbatches")}
    got = {"name": sched.name, "ranks": sched.n_ranks, "stages": sched.n_stages, "microbatches": sched.n_microbatches}
    for k, v in want.items():
        if got[k] != v:
            raise PlanError(f"the stored schedule has {k} {got[k]!r} but the plan has {v!r}", where)


def _check_fsdp_mode(plan: Plan) -> None:
    """``mesh.fsdp`` says how ``zero=3`` gathers; a split backward (``I``/``W``) runs ``"step"`` only."""
    if plan.mesh.zero != 3:
        raise PlanError(f"mesh.fsdp is {plan.mesh.fsdp!r} but mesh.zero is {plan.mesh.zero}: the FSDP mode is only for "
                        "zero=3; remove it", "$.mesh.fsdp")
    stored = plan.stored_schedule()
    entry = SCHEDULES.get(plan.prediction.schedule)
    split = any(a.kind == "I" for acts in stored.actions for a in acts) if stored is not None \
        else bool(entry and entry.split_backward)
    if plan.mesh.fsdp == "unit" and split:
        raise PlanError(f"mesh.fsdp is 'unit' but schedule {plan.prediction.schedule!r} splits the backward, whose W "
                        "runs after FSDP's per-unit reduction: use 'step' or remove the field", "$.mesh.fsdp")


def _check_values(plan: Plan) -> None:
    """What the plan's options and profiles must mean, checked on load (the single gate):
    a device or link that prices nothing, an unknown schedule, micro-batches that do not
    divide the batch, a recompute choice the options do not allow."""
    for key, cls in (("device", DeviceSpec), ("link", LinkSpec)):
        try:
            cls.from_dict(getattr(plan, key))
        except CostModelError as e:
            raise PlanError(str(e), f"$.{key}") from None
    schedule = plan.options.get("schedule")
    if plan.options.get("schedule_text") is not None:
        _check_schedule_text(plan, str(schedule))
    elif schedule not in SCHEDULES:
        raise PlanError(f"unknown schedule {schedule!r}; known: {', '.join(sorted(SCHEDULES))} (a hand-written "
                        "schedule is stored as options.schedule_text)", "$.options.schedule")
    if plan.prediction.schedule != schedule:
        raise PlanError(f"prediction is for schedule {plan.prediction.schedule!r} but the options say "
                        f"{schedule!r}", "$.prediction.schedule")
    m, batch = plan.options.get("n_microbatches"), plan.symbols.get("B")
    dp = plan.mesh.dp
    if isinstance(batch, int) and batch % dp:
        raise PlanError(f"the batch of {batch} does not split into data_parallel={dp} replicas", "$.mesh.dp")
    if isinstance(m, int) and isinstance(batch, int) and (batch // dp) % m:
        raise PlanError(f"{m} micro-batches do not divide the batch of {batch // dp}"
                        + (f" (each of {dp} replicas' share of {batch})" if dp > 1 else ""), "$.options.n_microbatches")
    if plan.mesh.inter_link is not None:
        try:
            LinkSpec.from_dict(plan.mesh.inter_link)
        except CostModelError as e:
            raise PlanError(str(e), "$.mesh.inter_link") from None
    allowed = RECOMPUTE.get(str(plan.options.get("recompute", "none")), ())
    for i, st in enumerate(plan.stages):
        if st.recompute not in allowed:
            raise PlanError(f"stage {i} recomputes {st.recompute!r}, which recompute="
                            f"{plan.options.get('recompute')!r} does not allow", f"$.stages[{i}].recompute")


def _check_consistency(plan: Plan) -> None:
    """Rules a schema cannot say: indices in order, nodes once, cuts that chain."""
    n = len(plan.stages)
    if plan.options.get("n_stages", n) != n:
        raise PlanError(f"options say {plan.options['n_stages']} stages but the plan lists {n}", "$.stages")
    if len(plan.boundaries) != n - 1:
        raise PlanError(f"{n} stages need {n - 1} boundaries, found {len(plan.boundaries)}", "$.boundaries")
    seen: dict[str, int] = {}
    for i, st in enumerate(plan.stages):
        p = f"$.stages[{i}]"
        if st.index != i:
            raise PlanError(f"stage index {st.index} out of order (expected {i})", f"{p}.index")
        if not st.nodes:
            raise PlanError("a stage must run at least one node", f"{p}.nodes")
        for j, name in enumerate(st.nodes):
            if name in seen:
                raise PlanError(f"node {name!r} is in stage {seen[name]} and stage {i}", f"{p}.nodes[{j}]")
            seen[name] = i
        if i > 0 and st.inputs != plan.stages[i - 1].outputs:
            raise PlanError(f"stage {i} inputs do not match stage {i - 1} outputs", f"{p}.inputs")
        for key in ("fwd_flops", "bwd_flops", "saved_bytes", "recompute_bytes"):
            try:
                poly.from_text(getattr(st.cost, key))
            except PartitionError as e:
                raise PlanError(str(e), f"{p}.cost.{key}") from None
    for i, b in enumerate(plan.boundaries):
        if b.index != i:
            raise PlanError(f"boundary index {b.index} out of order (expected {i})", f"$.boundaries[{i}].index")
        for j, v in enumerate(b.values):
            texts = [("bytes", v.bytes)] + [(f"shape[{k}]", d) for k, d in enumerate(v.shape) if isinstance(d, str)]
            for key, text in texts:
                try:
                    poly.from_text(text)
                except PartitionError as e:
                    raise PlanError(str(e), f"$.boundaries[{i}].values[{j}].{key}") from None
        names = tuple(v.name for v in b.values)
        if names != plan.stages[i].outputs:
            raise PlanError(f"boundary {i} values do not match stage {i} outputs", f"$.boundaries[{i}].values")
    total = plan.options.get("n_gpus")
    mesh = plan.mesh
    dp = plan.options.get("data_parallel", 1)
    if mesh.dp != dp:
        raise PlanError(f"mesh.dp is {mesh.dp} but options.data_parallel is {dp}", "$.mesh.dp")
    if isinstance(total, int) and total % (mesh.dp * mesh.tp):
        raise PlanError(f"n_gpus={total} does not split into data_parallel={mesh.dp} replicas"
                        + (f" of tp={mesh.tp} tensor-parallel ranks" if mesh.tp > 1 else ""), "$.options.n_gpus")
    n_gpus = total // (mesh.dp * mesh.tp) if isinstance(total, int) else None  # ranks of one pipeline
    if isinstance(n_gpus, int) and n % n_gpus:
        raise PlanError(f"{n} stages do not spread evenly over {n_gpus} pipeline ranks", "$.options.n_gpus")
    if mesh.pp and mesh.pp != n_gpus:
        raise PlanError(f"mesh.pp is {mesh.pp} but n_gpus / (data_parallel x tp) is {n_gpus}", "$.mesh.pp")
    if sorted(mesh.dims) != ["dp", "pp"]:
        raise PlanError(f"mesh.dims must be ['dp', 'pp'] or ['pp', 'dp'], got {list(mesh.dims)}", "$.mesh.dims")
    if mesh.allreduce_s and len(mesh.allreduce_s) != n_gpus:
        raise PlanError(f"mesh.allreduce_s has {len(mesh.allreduce_s)} entries for {n_gpus} pipeline ranks",
                        "$.mesh.allreduce_s")
    ranks = plan.prediction.rank_memory_bytes  # after the mesh checks: a bad mesh is named as such
    if ranks and isinstance(n_gpus, int) and len(ranks) != n_gpus:
        raise PlanError(f"rank_memory_bytes lists {len(ranks)} ranks but the pipeline has {n_gpus}",
                        "$.prediction.rank_memory_bytes")
    if mesh.fsdp:
        _check_fsdp_mode(plan)
    if mesh.shard and (mesh.zero != 3 or mesh.dp % mesh.shard or mesh.shard >= mesh.dp):
        raise PlanError(f"mesh.shard is {mesh.shard} with zero={mesh.zero} and dp={mesh.dp}: hybrid sharding needs "
                        "zero=3 and a shard group that divides dp and is smaller than it; remove it", "$.mesh.shard")

    entry = SCHEDULES.get(plan.prediction.schedule)
    placement = entry.placement if entry is not None and n == 2 * (n_gpus or 0) else "loop"
    stored = plan.stored_schedule()
    if stored is not None:  # a hand-written schedule places its stages itself (checked in full by _check_values)
        placement = stored.placement
    for i, st in enumerate(plan.stages):
        # stage s runs on rank s % n_gpus, or in a V for zbv (partitioner.schedule.rank_of)
        if isinstance(n_gpus, int) and st.rank != rank_of(i, n_gpus, placement):
            raise PlanError(f"stage {i} must run on rank {rank_of(i, n_gpus, placement)} of {n_gpus}, not {st.rank}",
                            f"$.stages[{i}].rank")
    for i, spec in enumerate(plan.inputs):
        p = f"$.inputs[{i}]"
        if spec["kind"] == "tensor" and spec["dtype"] not in TORCH_DTYPES:
            raise PlanError(f"unknown tensor dtype {spec['dtype']!r}; expected e.g. 'float32'", f"{p}.dtype")
        for j, (dim, _) in enumerate(spec["dims"]):
            if isinstance(dim, int) and dim >= len(spec["shape"]):
                raise PlanError(f"dim {dim} does not exist in shape {spec['shape']}", f"{p}.dims[{j}]")
    if plan.routes:
        _check_routes(plan)


def _check_routes(plan: Plan) -> None:
    """``routes`` agree with the stages' inputs and outputs and the boundaries: one record per
    value the stages name; a value made in stage p is one of p's outputs and first crosses
    cut p, a model input is stage 0's; each consumer receives it; shapes as the boundaries say."""
    n = plan.n_stages
    named: dict[str, None] = {}
    for st in plan.stages:
        named.update(dict.fromkeys((*st.inputs, *st.outputs)))
    first: dict[str, ValueSpec] = {}
    crossed: dict[str, int] = {}
    for b in plan.boundaries:
        for v in b.values:
            first.setdefault(v.name, v)
            crossed.setdefault(v.name, b.index)
    seen: set[str] = set()
    for i, r in enumerate(plan.routes):
        p = f"$.routes[{i}]"
        if r.name in seen:
            raise PlanError(f"value {r.name!r} is routed twice", f"{p}.name")
        seen.add(r.name)
        if r.name not in named:
            raise PlanError(f"value {r.name!r} is in no stage's inputs or outputs", f"{p}.name")
        if r.producer == "input":
            if r.name not in plan.stages[0].inputs:
                raise PlanError(f"model input {r.name!r} is not one of stage 0's inputs", f"{p}.producer")
            made = -1
        elif isinstance(r.producer, int) and 0 <= r.producer < n:
            made = r.producer
            if r.name not in plan.stages[made].outputs or r.name in plan.stages[made].inputs:
                raise PlanError(f"stage {made} does not make {r.name!r} (it is not a new value among its outputs)",
                                f"{p}.producer")
            if made < n - 1 and crossed.get(r.name) != made:
                raise PlanError(f"{r.name!r} is made in stage {made} but first crosses cut {crossed.get(r.name)}",
                                f"{p}.producer")
        else:
            raise PlanError(f"producer {r.producer!r} is not a stage of this plan (0..{n - 1}) or 'input'",
                            f"{p}.producer")
        if list(r.consumers) != sorted(set(r.consumers)):
            raise PlanError(f"consumers {list(r.consumers)} must be ascending, each once", f"{p}.consumers")
        for c in r.consumers:
            if not made < c < n or r.name not in plan.stages[c].inputs:
                raise PlanError(f"stage {c} cannot consume {r.name!r}: it is not among its inputs", f"{p}.consumers")
        if r.output != (r.name in plan.stages[-1].outputs):
            raise PlanError(f"output is {r.output} but {r.name!r} is {'not ' if r.output else ''}among the last "
                            "stage's outputs", f"{p}.output")
        spec = first.get(r.name)
        if spec is not None and (r.kind, tuple(r.shape), r.dtype) != (spec.kind, tuple(spec.shape), spec.dtype):
            raise PlanError(f"{r.name!r} is {r.kind} {list(r.shape)} {r.dtype} here but {spec.kind} "
                            f"{list(spec.shape)} {spec.dtype} in boundary {crossed[r.name]}", f"{p}")
    missing = [name for name in named if name not in seen]
    if missing:
        raise PlanError(f"stage values {missing[:5]} have no route", "$.routes")


def write_atomic(path: str | os.PathLike[str], text: str | bytes) -> None:
    """Write to a temporary file beside ``path`` and rename: never a half-written file."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    try:
        if isinstance(text, bytes):
            tmp.write_bytes(text)
        else:
            tmp.write_text(text)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()

