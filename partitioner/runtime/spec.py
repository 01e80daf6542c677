"""The record the runtime is built from: a plan, its stage modules, and how calls map to them.

The compiler hands the runtime a ``PipelineSpec`` and nothing else (as PyTorch's
``Pipe.build_stage`` takes a ``PipeInfo``): the ``Plan``, the stage modules a process
needs (every stage for ``train_step`` in one process; a rank's own for ``build_stage``, the
others may be dropped with ``for_rank``), where each boundary value goes (``routes``: the
plan's own records, checked against each stage graph given; for a version-3 plan, read once
from every stage's graph), how the user's call becomes the plan's flat inputs and the
flat outputs the model's result (``IOSpec``: plain data plus the capture's function), the
model's tensor names as plain data (``ModelNames``), and the model itself only where its
weights are on the meta device, which ``build_stage`` initialises through its modules' own
code. The runtime never imports ``partitioner.pipe``: ``Pipe.pipeline_spec()`` builds the
record, and so does ``PipelineSpec.build(load_plan(path), stages)`` without any ``Pipe``::

    spec = PipelineSpec.build(load_plan("plan.json"), stage_modules)
    loss = train_step(spec, x, target=y, loss_fn=F.mse_loss)   # the plan's schedule and m

Runtime defaults come from the plan: with no ``schedule`` / ``n_microbatches``,
``train_step``, ``eval_step`` and ``RankStage.runner`` run the schedule the plan was priced
for (``plan.prediction.schedule``, its hand-written lists when it stores them) with its
micro-batch count (``plan.prediction.n_microbatches``); an explicit argument wins
(``resolve_schedule``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from partitioner.plan import STATIC_SHAPES_NOTE, Plan
from partitioner.runtime.errors import PipelineRuntimeError
from partitioner.runtime.materialize import non_persistent_buffers
from partitioner.runtime.routing import Route, check_stage, from_plan, routes
from partitioner.schedule import Schedule, build_schedule

__all__ = ["IOSpec", "ModelNames", "PipelineSpec", "as_spec", "resolve_schedule", "seq_len", "static_shapes"]

Flatten = Callable[[tuple[Any, ...], dict[str, Any]], list[Any]]


def static_shapes(plan: Plan) -> bool:
    """Whether the plan's shapes hold for its example sizes only (symbolic shape propagation
    failed when planning): ``plan.static_shapes``, or for a plan written before that field,
    the note ``partition()`` wrote then."""
    return plan.static_shapes or any(n.startswith(STATIC_SHAPES_NOTE) for n in plan.notes)


def seq_len(plan: Plan, flat_inputs: Sequence[Any] | None = None) -> int:
    """S for shapes: read from the inputs where the plan marks a sequence dim, else the plan's."""
    for spec, value in zip(plan.inputs, flat_inputs or ()):
        for d, sym in spec.get("dims", ()):
            if sym == "S" and isinstance(value, torch.Tensor):
                return int(value.shape[int(d)])
    return int(plan.symbols.get("S", 1))


def resolve_schedule(source: Any, schedule: str | Schedule | None = None,
                     n_microbatches: int | None = None) -> Schedule:
    """The Schedule to run for ``source``'s plan (a ``Plan``, or anything with ``.plan``).

    ``schedule`` None: the plan's own (``plan.prediction.schedule``: what it was priced for,
    its stored lists when hand-written); a name is built for the plan's ranks and stages; a
    ``Schedule`` is taken as it is. ``n_microbatches`` None: the plan's
    (``plan.prediction.n_microbatches``)."""
    plan: Plan = source if isinstance(source, Plan) else source.plan
    if isinstance(schedule, Schedule):
        return schedule
    name = plan.prediction.schedule if schedule is None else schedule
    sched = plan.stored_schedule()
    if sched is not None and name == sched.name:  # the plan's hand-written lists
        if n_microbatches is not None and n_microbatches != sched.n_microbatches:
            raise PipelineRuntimeError(f"schedule {name!r} is hand-written for {sched.n_microbatches} "
                                       f"micro-batches, not {n_microbatches}: pass a Schedule built for them")
        return sched
    m = n_microbatches if n_microbatches is not None else plan.prediction.n_microbatches
    return build_schedule(name, plan.pp_ranks, m, plan.n_stages)


@dataclass(frozen=True, eq=False)
class IOSpec:
    """How a call becomes the plan's flat inputs, and the flat outputs the model's result.

    Attributes:
        input_names: the flat inputs in order (the plan's ``inputs`` names).
        out_spec: the model's output structure (a pytree ``TreeSpec``); None: one output is
            returned as itself, several as a tuple.
        flatten: ``flatten(args, kwargs) -> flat inputs`` from the capture (it checks the call
            against the captured signature); None: positional arguments in ``input_names``
            order, then keywords by name.
    """

    input_names: tuple[str, ...]
    out_spec: pytree.TreeSpec | None = None
    flatten: Flatten | None = None

    @classmethod
    def from_plan(cls, plan: Plan) -> IOSpec:
        """Inputs by the plan's names; outputs as they come (no capture needed)."""
        return cls(tuple(str(d["name"]) for d in plan.inputs))

    def flatten_inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
        if self.flatten is not None:
            return self.flatten(args, kwargs)
        names = self.input_names
        if len(args) > len(names):
            raise PipelineRuntimeError(f"{len(args)} positional inputs, the plan has {len(names)}: {list(names)}")
        given = dict(zip(names, args))
        for k, v in kwargs.items():
            if k not in names:
                raise PipelineRuntimeError(f"input {k!r} is not one of the plan's inputs {list(names)}")
            if k in given:
                raise PipelineRuntimeError(f"input {k!r} given positionally and by keyword")
            given[k] = v
        missing = [n for n in names if n not in given]
        if missing:
            raise PipelineRuntimeError(f"inputs {missing} not given (the plan's inputs are {list(names)})")
        return [given[n] for n in names]

    def unflatten_outputs(self, flat: Sequence[Any]) -> Any:
        if self.out_spec is not None:
            return pytree.tree_unflatten(list(flat), self.out_spec)
        return flat[0] if len(flat) == 1 else tuple(flat)


@dataclass(frozen=True)
class ModelNames:
    """What the runtime reads of the user's model, as plain data.

    Attributes:
        parameters: every parameter FQN in the model's order, tied names included
            (``named_parameters(remove_duplicate=False)``): checkpoints key optimizer state
            by the first name of each tensor in this order.
        buffers: every buffer FQN, tied names included.
        tied: the names of each tensor the model holds under several names (2+ each).
        non_persistent: buffers ``model.state_dict()`` leaves out.
    """

    parameters: tuple[str, ...]
    buffers: tuple[str, ...]
    tied: tuple[tuple[str, ...], ...]
    non_persistent: frozenset[str]

    @classmethod
    def from_model(cls, model: nn.Module) -> ModelNames:
        params = list(model.named_parameters(remove_duplicate=False))
        bufs = list(model.named_buffers(remove_duplicate=False))
        by_id: dict[int, list[str]] = {}
        for n, t in [*params, *bufs]:
            by_id.setdefault(id(t), []).append(n)
        return cls(tuple(n for n, _ in params), tuple(n for n, _ in bufs),
                   tuple(tuple(v) for v in by_id.values() if len(v) > 1), frozenset(non_persistent_buffers(model)))


def _first_float_dtype(tensors: Any) -> torch.dtype:
    """The dtype pricing takes as the model's (``runtime.precision.model_dtype``)."""
    return next((p.dtype for p in tensors if p.is_floating_point()), torch.float32)


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: caches (compiled stages) key on it
class PipelineSpec:
    """Everything the runtime needs to run a plan; built by ``build`` (or ``Pipe.pipeline_spec()``).

    Attributes:
        plan: the ``Plan``.
        stages: stage index -> module (an ``fx.GraphModule``, or a recomputing stage). Every
            stage for one process; a rank needs only its own (``for_rank``).
        routes: where each boundary value is made and used: the plan's ``routes``
            (``routing.from_plan``), or for a plan without them (version 3) read from every
            stage's graph (``routing.routes``); kept when stages are dropped.
        io: the call's flat inputs and the model's output structure (``IOSpec``).
        param_dtype: the model's dtype as pricing read it (its first floating parameter's):
            ``build_stage`` runs the plan's precision relative to it.
        names: the model's tensor names (``ModelNames``); None without a model (tied names
            then come from ``plan.tied_parameters``, and unknown checkpoint keys are not
            flagged).
        model: the user's model, only when some of its tensors are on the meta device:
            ``build_stage`` initialises them through its modules' own code. None otherwise
            (the stages hold the real tensors).
    """

    plan: Plan
    stages: Mapping[int, nn.Module]
    routes: Mapping[str, Route]
    io: IOSpec
    param_dtype: torch.dtype = torch.float32
    names: ModelNames | None = None
    model: nn.Module | None = None

    @classmethod
    def build(cls, plan: Plan, stages: Sequence[nn.Module] | Mapping[int, nn.Module], *, io: IOSpec | None = None,
              model: nn.Module | None = None, routes_table: Mapping[str, Route] | None = None,
              param_dtype: torch.dtype | None = None) -> PipelineSpec:
        """The record for ``plan`` over ``stages`` (a list in stage order, or {index: module}).

        The routes come from ``routes_table`` when given, else from the plan (``Plan.routes``),
        checked against each stage graph given (``routing.check_stage``: a plan from another
        model or stale stage files is refused), so a rank may pass its own stages only. A plan
        without routes (version 3) needs every stage once, to read which inputs each graph
        uses; drop the others afterwards with ``for_rank``. ``io`` defaults to
        ``IOSpec.from_plan``. ``model`` gives ``names`` and ``param_dtype`` and is kept only
        when it holds meta tensors. Raises ``PipelineRuntimeError`` when the stages do not
        fit the plan."""
        mods = dict(enumerate(stages)) if not isinstance(stages, Mapping) else dict(stages)
        bad = sorted(set(mods) - set(range(plan.n_stages)))
        if bad:
            raise PipelineRuntimeError(f"stage indices {bad} are not stages of this plan (0..{plan.n_stages - 1})")
        if routes_table is None and plan.routes:
            routes_table = from_plan(plan)
            for s, mod in sorted(mods.items()):
                graph = getattr(mod, "graph", None)
                if isinstance(graph, fx.Graph):  # a module without a graph has nothing to check
                    check_stage(plan, s, graph)
        if routes_table is None:
            missing = sorted(set(range(plan.n_stages)) - set(mods))
            if missing:
                raise PipelineRuntimeError(f"the plan has {plan.n_stages} stages, the record got none for {missing}: "
                                           "pass every stage once (for_rank drops the others), or routes_table=")
            graphs = [getattr(mods[s], "graph", None) for s in range(plan.n_stages)]
            bare = [s for s, g in enumerate(graphs) if not isinstance(g, fx.Graph)]
            if bare:
                raise PipelineRuntimeError(f"stages {bare} have no fx graph to read their inputs from: pass "
                                           "routes_table= (routing.routes over the stage graphs)")
            routes_table = routes(plan, [g for g in graphs if isinstance(g, fx.Graph)])
        if param_dtype is None:
            source = model.parameters() if model is not None else (p for s in sorted(mods)
                                                                     for p in mods[s].parameters())
            param_dtype = _first_float_dtype(source)
        names = ModelNames.from_model(model) if model is not None else None
        keep = model if model is not None and any(
            t.device.type == "meta" for t in [*model.parameters(), *model.buffers()]) else None
        return cls(plan, mods, dict(routes_table), io if io is not None else IOSpec.from_plan(plan),
                   param_dtype, names, keep)

    def stages_of(self, rank: int) -> list[int]:
        """The stage indices pipeline rank ``rank`` runs (``plan.stages[s].rank``)."""
        return [st.index for st in self.plan.stages if st.rank == rank]

    def for_rank(self, rank: int) -> PipelineSpec:
        """This record with only the stages pipeline rank ``rank`` runs: the others' modules can
        be freed. With data parallelism pass the pipeline rank (``plan.mesh.coords(global_rank)[1]``)."""
        return dataclasses.replace(self, stages={s: self.stages[s] for s in self.stages_of(rank) if s in self.stages})

    def modules(self, indices: Sequence[int], who: str) -> list[nn.Module]:
        """The stage modules ``indices``; an error naming ``who`` needs them when the record lacks any."""
        missing = [s for s in indices if s not in self.stages]
        if missing:
            raise PipelineRuntimeError(f"{who} needs stages {missing}, but this record holds only stages "
                                       f"{sorted(self.stages)}: build it with them (PipelineSpec.build, or for_rank "
                                       "of the rank that runs them)")
        return [self.stages[s] for s in indices]

    def flatten_inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
        return self.io.flatten_inputs(args, kwargs)

    def unflatten_outputs(self, flat: Sequence[Any]) -> Any:
        return self.io.unflatten_outputs(flat)


def as_spec(source: Any) -> PipelineSpec:
    """``source`` as a ``PipelineSpec``: itself, or what its ``pipeline_spec()`` builds (a
    ``Pipe``, which the runtime does not import)."""
    if isinstance(source, PipelineSpec):
        return source
    build = getattr(source, "pipeline_spec", None)
    if callable(build):
        spec = build()
        if isinstance(spec, PipelineSpec):
            return spec
    raise PipelineRuntimeError(f"expected a PipelineSpec (PipelineSpec.build(plan, stages), or pipe.pipeline_spec()), "
                               f"got {type(source).__name__}")
