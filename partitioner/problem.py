"""Problem assembly: a captured graph annotated and priced at one micro-batch size, as the search needs it.

``Options`` is what the plan records of the user's choices; ``Request`` adds what one
``partition()`` call asked for beyond it (the automatic counts, the hardware); ``Context``
carries one compilation (the model, its capture, the request) and the annotated graph every
candidate of the automatic choices shares. ``build_problem`` prices one candidate: node
times, the link price of each cut, static and activation memory, the schedule, the solver's
input. ``Problem.exact`` checks a split stage by stage with the exact memory (``StageFit``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, NamedTuple, Sequence

import torch
from torch import fx, nn

from partitioner import plan_builder, poly, tensor_parallel
from partitioner.cost_models.cost import NodeCost
from partitioner.cost_models.devices import DeviceSpec, LinkSpec
from partitioner.cost_models.errors import PartitionError
from partitioner.data_parallel import ZeroShard, splits_backward
from partitioner.memory import (
    PRECISIONS,
    RECOMPUTE,
    Activations,
    Static,
    bytes_per_param,
    compute_dtype,
    default_precision,
    fsdp_unit_at,
    fsdp_unit_of,
)
from partitioner.passes.annotate import AnnotateCosts, fallback_note
from partitioner.passes.base import InputSpec
from partitioner.passes.manager import PassManager
from partitioner.passes.markers import cut_constraints
from partitioner.passes.meta import MODULE, SYMBOLIC, SYMBOLS
from partitioner.passes.order import OrderForCuts
from partitioner.passes.shape_prop import ShapeProp, module_of
from partitioner.passes.split import compute_nodes
from partitioner.passes.trace import Captured
from partitioner.plan import STATIC_SHAPES_NOTE, Mesh
from partitioner.pricing import Evaluator, Priced, price, to_units
from partitioner.schedule import Schedule, build_schedule, default_microbatches, split_problem
from partitioner.simulator import simulate
from partitioner.solver import Option, SolverInput

__all__ = ["Options", "Request", "Context", "Annotated", "StageFit", "Problem", "build_problem", "batch_size",
           "cut_link_units", "node_timer"]


@dataclass(frozen=True)
class Options:
    """The user's choices as the plan records them (``plan.options``)."""

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
    #: tensor-parallel ranks per pipeline rank: n_gpus = data_parallel x pipeline ranks x tensor_parallel
    tensor_parallel: int = 1
    #: zero=3: None, the schedule's FSDP mode ("step" for a split backward, else "unit"); "unit"
    #: or "step" forced ("step" runs any schedule; a split backward is "step" whatever is asked);
    #: "auto": both solved, the faster that fits kept (``layout``). The plan records the mode run
    #: in ``mesh.fsdp``, not here.
    fsdp_reshard: str | None = None
    #: with tensor_parallel > 1: activations between the TP regions sharded on the sequence
    #: (``passes.tensor_parallel`` prices it, ``runtime.tensor_parallel`` runs it); the plan's
    #: options record it only when on
    sequence_parallel: bool = False
    #: zero=3 hybrid sharding (HSDP): replicas per shard group (the rest replicate the shards);
    #: None: sharded over all the replicas. The plan records it in ``mesh.shard``, not here.
    fsdp_shard: int | None = None

    @property
    def pp(self) -> int:
        """Ranks of one pipeline."""
        return self.n_gpus // (self.data_parallel * self.tensor_parallel)

    def to_dict(self) -> dict[str, Any]:
        out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()
               if k not in ("custom", "inter_link", "fsdp_reshard", "fsdp_shard") and not (k == "tensor_parallel" and v == 1)
               and not (k == "sequence_parallel" and (not v or self.tensor_parallel == 1))}
        if self.custom is not None:  # a hand-written schedule travels as its action lists (data, not code)
            out["schedule_text"] = self.custom.to_text()
        return out


@dataclass(frozen=True)
class Request:
    """One ``partition()`` call's checked choices: the plan's ``Options`` (with
    ``n_microbatches`` still 0 and ``data_parallel`` the degree to start from), and what it
    asked beyond them."""

    opts: Options
    n_microbatches: int | str | None  # as given: None (the schedule's default), a count, or "auto"
    data_parallel: int | str  # as given: a degree, or "auto" (every divisor of n_gpus is tried)
    dev: DeviceSpec
    lnk: LinkSpec
    keep_snapshots: bool = False
    tensor_parallel: int | str = 1  # as given: a degree, or "auto" (each degree that fits a node is tried)
    zero: int | str = 0  # as given: a ZeRO level, or "auto" (0, 1 and 3 are tried where there are replicas)


class Annotated(NamedTuple):
    """A graph after shape-prop and cost annotation, with the plan notes that produced."""

    gm: fx.GraphModule
    pm: PassManager
    notes: list[str]


@dataclass
class Context:
    """One compilation: the model, its capture and example input specs, the request, and the
    annotated graph (made once, on first use, and shared by every candidate solved for it)."""

    model: nn.Module
    cap: Captured
    specs: tuple[InputSpec, ...]
    request: Request
    annotated: Annotated | None = field(default=None, repr=False)
    #: per (tensor-parallel degree, sequence parallel): the annotated graph as one rank of the group prices it
    views: dict[tuple[int, bool], fx.GraphModule] = field(default_factory=dict, repr=False)
    #: what ``build_problem`` priced, shared by the candidates that price it the same way
    #: (``memo``: key -> value; every key names all the value depends on)
    priced_memo: dict[Any, Any] = field(default_factory=dict, repr=False)

    def memo(self, key: Any, make: Any) -> Any:
        """``make()``, made once per ``key`` for this compilation. The automatic choices
        (``layout``) build a problem per candidate; the candidates at one tensor-parallel
        degree and micro-batch size share the graph's node times, cut bytes and memory
        models, which are the same objects (immutable, or caches of pure functions)."""
        if key not in self.priced_memo:
            self.priced_memo[key] = make()
        return self.priced_memo[key]

    def annotation(self) -> Annotated:
        """The annotated graph, annotating on the first call; the notes are a fresh list each time."""
        if self.annotated is None:
            made = annotate(self, self.request.opts)
            self.annotated = made._replace(notes=list(made.notes))
            return made
        return self.annotated._replace(notes=list(self.annotated.notes))

    def rank_view(self, degree: int) -> fx.GraphModule:
        """The annotated graph as one rank of a ``degree``-way tensor-parallel group prices it
        (``partitioner.tensor_parallel.view``), made once per degree."""
        key = (degree, self.request.opts.sequence_parallel)
        seq = next((s.shape[d] for s in self.specs for d, sym in s.dims if sym == "S"), None)
        if key[1] and isinstance(seq, int) and seq % degree:
            raise PartitionError(f"sequence_parallel=True with tensor_parallel={degree}: the sequence length {seq} "
                                 f"does not divide by {degree} (each TP rank holds S/T tokens between the regions); "
                                 "pad the sequence, choose a degree that divides it, or sequence_parallel=False")
        if key not in self.views:
            self.views[key] = tensor_parallel.view(self.annotation().gm, degree, sequence_parallel=key[1])[0]
        return self.views[key]


class RankLoad(NamedTuple):
    """The stages one rank holds and the in-flight micro-batch counts they reach together."""

    stages: tuple[int, ...]
    #: per point of the rank's order worth keeping: micro-batches in flight per stage, then
    #: micro-batches between I and W per stage
    counts: tuple[tuple[int, ...], ...]


def rank_loads(sched: Schedule) -> list[RankLoad]:
    """Per rank, its stages and the counts they reach together in its order: a micro-batch is
    in flight on a stage from its forward to its last backward piece (``B``, or ``W`` when the
    backward is split: the weight gradient needs the stage's inputs), as the simulator counts
    ``peak_inflight``, and pending from its ``I`` to its ``W`` (holding the gradients its
    weights' gradients are made from). ``counts`` are per point (in flight per stage, then
    pending per stage); only the points no other point dominates are kept (the worst one
    depends on each stage's bytes)."""
    out = []
    for acts in sched.actions:
        stages = tuple(sorted({a.stage for a in acts if a.is_compute}))
        pos = {s: i for i, s in enumerate(stages)}
        k = len(stages)
        cur = [0] * (2 * k)
        seen: list[tuple[int, ...]] = []
        for a in acts:
            if a.kind == "F":
                cur[pos[a.stage]] += 1
            elif a.kind == "I":
                cur[k + pos[a.stage]] += 1
            elif a.kind in ("B", "W"):
                cur[pos[a.stage]] -= 1
                if a.kind == "W":
                    cur[k + pos[a.stage]] -= 1
                continue
            else:
                continue
            seen.append(tuple(cur))
        out.append(RankLoad(stages, tuple(sorted(undominated(set(seen)))) or (tuple(cur),)))
    return out


def undominated(points: set[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """The points no other point dominates (>= in every coordinate). A point's dominators have
    a larger sum, so in order of falling sum each point is checked against the ones kept so far
    only (a dominated dominator's own dominator is kept, and dominates it too): linear in the
    points times the kept ones, not quadratic in the points (a rank's order has one point per
    F and I, thousands with hundreds of micro-batches)."""
    kept: list[tuple[int, ...]] = []
    for c in sorted(points, key=sum, reverse=True):
        if not any(all(x >= y for x, y in zip(o, c)) for o in kept):
            kept.append(c)
    return kept


class StageFit(NamedTuple):
    """One stage under the exact memory check: its recompute mode and bytes (one rank)."""

    mode: str  # recompute mode
    static: int  # weights, gradients and optimizer state
    kept: int  # activations kept per micro-batch in flight
    extra: int  # working set: one micro-batch's temporaries, gradients and recompute on top of the kept bytes
    #: under a split backward: what one micro-batch holds from its I to its W on top of ``kept``
    #: (the gradients at its weights' nodes); 0 for a whole backward
    pending: int = 0


@dataclass
class Problem:
    """An annotated graph priced at one micro-batch size: everything the search needs."""

    gm: fx.GraphModule
    pm: PassManager
    notes: list[str]
    opts: Options
    micro: int
    symbols: dict[str, int]
    priced: Priced
    sched: Schedule
    comm: list[int]  # per cut: the link price of what crosses it, both ways (time units)
    sin: SolverInput
    modes: tuple[str, ...]  # recompute mode of each solver option
    acts: Activations | None
    static: Static
    ev: Evaluator
    capacity: int
    dev: DeviceSpec
    lnk: LinkSpec
    shard: ZeroShard  # trainable elements per position: gradient bytes, ZeRO-1's saving
    layout: Mesh  # where the ranks sit (data parallelism, nodes); prices filled in by layout.replicated
    pins: list[int]  # positions the user (or pipe_split markers) pinned a cut before
    #: the automatic choices' candidates (``Plan.rankings``), filled by ``layout``
    rankings: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    #: a note ``search(defer_notes=True)`` left for ``search.finish_notes``: (index in
    #: ``notes``, the solver input, the solution)
    pending: tuple[int, SolverInput, Any] | None = field(default=None, repr=False)
    #: the compilation's ``Context.priced_memo``, shared by its problems (``cached``)
    memo: dict[Any, Any] = field(default_factory=dict, repr=False)
    _loads: list[RankLoad] | None = field(default=None, repr=False)
    _split: bool | None = field(default=None, repr=False)

    def cached(self, key: Any, make: Any) -> Any:
        """``make()``, once per ``key`` in the compilation (``Context.memo``); ``key`` must name
        everything the value depends on (contents, not identities)."""
        if key not in self.memo:
            self.memo[key] = make()
        return self.memo[key]

    def static_at(self, a: int, b: int) -> int:
        """Static bytes of positions [a, b) on one rank (ZeRO-1: 1/dp of the optimizer state)."""
        saved = self.shard.saving(a, b, self.opts.data_parallel) if self.opts.zero else 0
        return self.static.stage(a, b) - saved

    def exact(self, cuts: Sequence[int], modes: Sequence[str] | None = None) -> list[StageFit]:
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
                entry = StageFit(mode, static, self.ev(kept), self.ev(extra), self._pending(i, a, b))
                if self.need(i, entry) <= self.capacity:
                    best = entry
                    break
                if best is None or self.need(i, entry) < self.need(i, best):
                    best = entry
            assert best is not None
            out.append(best)
        if modes is None and len(self.modes) > 1:
            out = self._fit_ranks(bounds, out)
        return out

    def _pending(self, i: int, a: int, b: int) -> int:
        """Stage ``i``'s bytes held from I to W per micro-batch (``StageFit.pending``): none for
        a whole backward, nor for the first stage, whose inputs (the model's) need no gradient,
        so its I does nothing and its W runs the whole backward (``runtime.splitgrad``)."""
        if self._split is None:  # asked per stage and mode on the exact check's path: once per problem
            self._split = splits_backward(self.sched)
        if i == 0 or self.acts is None or not self._split:
            return 0
        return self.ev(self.acts.pending_weight_grads(a, b))

    def _fit_ranks(self, bounds: Sequence[int], out: list[StageFit]) -> list[StageFit]:
        """Where a rank's stages fit one by one but not together, raise every stage of that
        rank to at least the next recompute mode (the modes in ``self.modes``' order, less
        memory each) until the rank fits, or to the last mode."""
        for load in self.rank_loads():
            if self.rank_need(load, out) <= self.capacity:
                continue
            for k in range(1, len(self.modes)):
                trial = list(out)
                for s in load.stages:
                    if self.modes.index(out[s].mode) < k:
                        a, b = bounds[s], bounds[s + 1]
                        kept, extra = self.acts.stage_saved(a, b, self.modes[k], self.ev) if self.acts else (0, 0)
                        trial[s] = StageFit(self.modes[k], out[s].static, self.ev(kept), self.ev(extra),
                                            out[s].pending)
                if self.rank_need(load, trial) <= self.capacity or k == len(self.modes) - 1:
                    out = trial
                    break
        return out

    def need(self, i: int, fit: StageFit) -> int:
        """Peak bytes of stage ``i``: static, its micro-batches in flight x kept, transient."""
        return fit.static + self.sin.inflight[i] * fit.kept + fit.extra

    def rank_loads(self) -> list[RankLoad]:
        """Per rank holding several stages (interleaved, zbv) or running a split backward, its
        stages and the counts they reach together (``rank_loads``); the other ranks are left
        out (``need`` is their peak)."""
        if self._loads is None:
            self._loads = [r for r in rank_loads(self.sched)
                           if len(r.stages) > 1 or any(any(c[len(r.stages):]) for c in r.counts)]
        return self._loads

    def rank_need(self, load: RankLoad, fits: Sequence[StageFit]) -> int:
        """Peak bytes of a rank holding several stages: every stage's static bytes, the most
        activations its stages keep at once (the schedule's in-flight counts weighted by each
        stage's kept bytes, at the worst point of the rank's order) and the largest working
        set (one stage computes at a time)."""
        k = len(load.stages)
        kept = max(sum(c * fits[s].kept + w * fits[s].pending for s, c, w in zip(load.stages, counts, counts[k:]))
                   for counts in load.counts)
        return sum(fits[s].static for s in load.stages) + kept + max(fits[s].extra for s in load.stages)

    def over(self, fits: Sequence[StageFit]) -> list[int]:
        """Per stage, bytes over the device (<= 0: fits). A stage sharing its rank with others
        carries the rank's excess in proportion to its own need (rounded up), so that lowering
        every stage's capacity by its share brings the rank within the device."""
        out = [self.need(i, x) - self.capacity for i, x in enumerate(fits)]
        for load in self.rank_loads():
            excess = self.rank_need(load, fits) - self.capacity
            needs = [max(self.need(s, fits[s]), 1) for s in load.stages]
            for s, n in zip(load.stages, needs):
                out[s] = max(out[s], -(-excess * n // sum(needs)))
        return out

    def rank_peaks(self, fits: Sequence[StageFit]) -> list[int]:
        """Peak bytes of each pipeline rank: its stages together (``rank_need``) where it holds
        several or splits its backward, else its one stage's (``need``). A rank's ``rank_need``
        is at least each of its stages' ``need`` (the worst point of its order reaches every
        stage's in-flight peak), so this is every stage and every rank checked."""
        loads = {self.sched.rank_of(ld.stages[0]): ld for ld in self.rank_loads()}
        own: dict[int, int] = {}
        for i, x in enumerate(fits):
            r = self.sched.rank_of(i)
            own[r] = max(own.get(r, 0), self.need(i, x))
        return [self.rank_need(loads[r], fits) if r in loads else own[r] for r in range(self.sched.n_ranks)]

    def peak(self, fits: Sequence[StageFit]) -> int:
        """Peak bytes of the fullest GPU (``rank_peaks``)."""
        return max(self.rank_peaks(fits))

    def fits(self, fits: Sequence[StageFit]) -> bool:
        """Does every rank fit the device (each stage alone, and the stages a rank holds together)?"""
        return self.peak(fits) <= self.capacity


def cut_link_units(lnk: LinkSpec, *per_cut_bytes: Sequence[int], tp: int = 1,
                   sequence_parallel: bool = False) -> list[int]:
    """The link price of each cut (time units): the transfers of each of ``per_cut_bytes``
    (e.g. the values forward and their gradients back), each priced on ``lnk``; 0 where
    nothing crosses and at the two ends (nothing leaves the pipeline there). ``tp`` > 1:
    each message goes once per tensor-parallel group (``data_parallel.boundary_time``; with
    ``sequence_parallel`` as the ranks' sequence shards)."""
    transfer = tensor_parallel.boundary_time(lnk, tp, sequence_parallel=sequence_parallel)
    out = [to_units([sum(transfer(b) for b in col)])[0] if any(col) else 0
           for col in zip(*per_cut_bytes)]
    out[0] = out[-1] = 0
    return out


def batch_size(specs: Sequence[InputSpec]) -> int | None:
    """The example inputs' batch size (the size of their ``B`` dims), None without one."""
    sizes = {s.shape[d] for s in specs for d, sym in s.dims if sym == "B"}
    if len(sizes) > 1:
        raise PartitionError(f"example inputs disagree on the batch size (dim 0): {sorted(sizes)}; "
                             "pass batch-first inputs of one batch size")
    return sizes.pop() if sizes else None


def annotate(ctx: Context, opts: Options) -> Annotated:
    """Shape-prop and cost annotation (or parameter bytes only, without example inputs)."""
    model, cap, specs, dev = ctx.model, ctx.cap, ctx.specs, ctx.request.dev
    keep_snapshots = ctx.request.keep_snapshots
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
        if not gm.meta.get(SYMBOLIC, True):
            kept = sorted(str(v) for v in gm.meta.get(SYMBOLS, {}).values())
            notes.append(f"{STATIC_SHAPES_NOTE}: symbolic shape propagation failed"
                         + (f" ({', '.join(kept)} stays symbolic)" if kept else ""))
        fallback = fallback_note(gm)  # nodes whose cost torch's kernels could not give symbolically
        if fallback:
            notes.append(fallback)
        return Annotated(gm, pm, notes)
    msg = ("no example inputs: balancing parameter bytes only; FLOP and activation costs "
           "need example_inputs=(...)")
    warnings.warn(msg, stacklevel=4)
    notes.append(msg)
    pm = PassManager([], keep_snapshots=keep_snapshots)
    gm = pm.run(gm)
    for n in gm.graph.nodes:
        n.meta.setdefault(MODULE, module_of(n))
    plan_builder.param_bytes_by_first_use(gm, compute_nodes(gm))
    return Annotated(gm, pm, notes)


def resolve_pins(order: Sequence[fx.Node], pins: Sequence[str], allowed: Sequence[bool],
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


def node_timer(ctx: Context, gm: fx.GraphModule, precision: str) -> tensor_parallel.NodeTime:
    """(cost, {"B", "S"}) -> one rank's forward and backward seconds of a node of ``gm``: the
    device's time at ``precision``'s compute dtype (without example inputs, the parameter
    bytes read: once forward, twice backward), plus the tensor-parallel group's all-reduces
    on the in-node link where ``gm`` is a rank view (``Context.rank_view``)."""
    dev, costs_known = ctx.request.dev, bool(ctx.specs)
    compute = getattr(torch, compute_dtype(precision))

    def base_time(cost: NodeCost, values: Mapping[str, int]) -> tuple[float, float]:
        if not costs_known:  # parameter bytes stand in for time: read once forward, twice backward
            pb = float(poly.evaluate(cost.param_bytes, values["B"], values["S"]))
            return pb / dev.mem_bandwidth, 2 * pb / dev.mem_bandwidth
        return dev.node_time(cost, values, compute)

    return tensor_parallel.node_time(base_time, gm, ctx.request.lnk)


def unit_schedule(name: str, n_ranks: int, n_microbatches: int, n_stages: int) -> tuple[Schedule, tuple[int, ...]]:
    """A built schedule and its micro-batches in flight per stage (simulated with unit times:
    the peak depends on the action lists only)."""
    sched = build_schedule(name, n_ranks, n_microbatches, n_stages)
    return sched, simulate(sched, [1.0] * n_stages, [2.0] * n_stages).peak_inflight


def build_problem(ctx: Context, opts: Options, n_microbatches: int | None,
                  dims: tuple[str, ...] = ("dp", "pp")) -> Problem:
    """``opts`` priced on the context's annotated graph at ``n_microbatches`` (None: the
    schedule's default for the batch); ``dims``: the mesh order (a re-applied plan's)."""
    specs, dev, lnk = ctx.specs, ctx.request.dev, ctx.request.lnk
    gm, pm, notes = ctx.annotation()
    if opts.tensor_parallel > 1:  # one rank of the group: its share of each sharded region
        gm = ctx.rank_view(opts.tensor_parallel)
    costs_known = bool(specs)
    batch = batch_size(specs) if specs else None
    if batch is not None:
        problem = split_problem(batch, opts.data_parallel, "replicas (data_parallel)", "data_parallel")
        if problem:
            raise PartitionError(problem.replace("the batch", "the global batch", 1))
        batch //= opts.data_parallel  # each replica's share: the pipeline's batch
    m = n_microbatches if n_microbatches is not None else default_microbatches(opts.schedule, batch, opts.pp)
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
    marks = cut_constraints(gm, opts.cut_at, opts.n_stages, opts.pinned_cuts)  # pipe_split() markers, cut_at check
    notes.extend(marks.notes)
    # the same for every candidate at this degree and micro-batch size (ctx.memo): node
    # times, cut bytes, the memory models (Activations caches each stage it resolves)
    tp, seq1 = opts.tensor_parallel, symbols.get("S", 1)
    priced = marks.apply(ctx.memo(("price", tp, micro, seq1, marks.glob, opts.precision), lambda: price(
        gm, batch=micro, seq=seq1, node_time=node_timer(ctx, gm, opts.precision), cut_at=marks.glob,
        costs_known=costs_known)))
    priced = tensor_parallel.region_cuts(gm, priced)  # no cut between a sharded region's columns and rows
    ev = ctx.memo(("ev", micro, seq1), lambda: Evaluator(micro, seq1))
    width, _, _ = PRECISIONS[opts.precision]
    per_param = bytes_per_param(opts.precision, opts.optimizer)
    order_key = tuple(n.name for n in priced.order)
    static = ctx.memo(("static", tp, order_key, per_param, width), lambda: Static(gm, priced.order, per_param, width))
    divisor = tensor_parallel.param_divisor(gm)  # one tensor-parallel rank's share of sharded weights
    trainable = {id(t): t.numel() // divisor.get(name, 1)
                 for name, t in gm.named_parameters(remove_duplicate=False) if t.requires_grad}
    # zero=3: FSDP's units, and whether they are gathered once per step (a split backward, or asked)
    shard = ZeroShard(static.uses, trainable, width, per_param - 2 * width, opts.zero, fsdp_unit_of(gm),
                      splits_backward(opts.custom or opts.schedule) or opts.fsdp_reshard == "step",
                      ctx.memo(("fsdp_unit_at", tp, order_key), lambda: fsdp_unit_at(gm, priced.order))
                      if opts.zero == 3 else (), opts.fsdp_shard or 0)
    static_mem = static.first_use
    if opts.zero and opts.data_parallel > 1:  # the solver's additive view of ZeRO's saving
        static_mem = shard.additive(static_mem, opts.data_parallel)
    blocks = (marks.glob,) if marks.glob else None
    acts = ctx.memo(("acts", tp, order_key, dev.kind, blocks), lambda: Activations(
        gm, priced.order, target=dev.kind, blocks=blocks)) if costs_known else None
    if opts.custom is not None:
        sched = opts.custom
        inflight = simulate(sched, [1.0] * opts.n_stages, [2.0] * opts.n_stages).peak_inflight
    else:  # a built schedule is immutable data: one object per counts (the simulator caches its lowering by it)
        sched, inflight = ctx.memo(("schedule", opts.schedule, opts.pp, m, opts.n_stages),
                                   lambda: unit_schedule(opts.schedule, opts.pp, m, opts.n_stages))
    capacity = opts.memory_limit if opts.memory_limit is not None else dev.memory_bytes
    comm = ctx.memo(("comm", tp, micro, seq1, marks.glob, opts.precision, lnk),
                    lambda: cut_link_units(lnk, priced.cut_bytes, priced.cut_grad_bytes, tp=tp,
                                           sequence_parallel=opts.sequence_parallel))
    n = len(priced.order)
    fwd, bwd = to_units(priced.fwd_s), to_units(priced.bwd_s)
    modes = RECOMPUTE[opts.recompute]
    if "selective-op" in modes and splits_backward(opts.custom or opts.schedule):
        # W is a second backward through the stage's graph, and a region under a selective
        # checkpoint policy may be backwarded only once (torch.utils.checkpoint refuses the
        # second: "Trying to backward an extra time"); whole-region checkpointing recomputes again
        if opts.recompute == "selective-op":
            raise PartitionError(
                f"recompute='selective-op' cannot run schedule {getattr(opts.custom, 'name', opts.schedule)!r}: "
                "its split backward runs a second backward (W) through each stage, which a selective "
                "checkpoint policy refuses; use recompute='full', 'selective' or 'auto', or a schedule "
                "with a whole backward (1f1b, interleaved-1f1b)")
        modes = tuple(m for m in modes if m != "selective-op")
    options = []
    for mode in modes:
        act, redo, reserve = ctx.memo(("arrays", tp, order_key, dev.kind, blocks, micro, seq1, mode),
                                      lambda: acts.arrays(mode, ev)) if acts else ([0] * n, [False] * n, 0)
        options.append(Option([f + b + (f if r else 0) for f, b, r in zip(fwd, bwd, redo)], act, reserve))
    sin = SolverInput(
        compute=options[0].compute, cut_cost=comm, cut_bytes=list(priced.cut_bytes), allowed=list(priced.allowed),
        static_mem=static_mem, act_mem=options[0].act_mem, inflight=list(inflight),
        capacity=[capacity] * opts.n_stages, pinned=[], options=options if len(options) > 1 or options[0].reserve else [])
    layout = Mesh(opts.data_parallel, opts.pp, dims, opts.gpus_per_node or 0, tp=opts.tensor_parallel,
                  shard=opts.fsdp_shard or 0)
    pins = resolve_pins(priced.order, (*opts.pinned_cuts, *marks.pins), priced.allowed, priced.blocked_by)
    return Problem(gm, pm, notes, opts, micro, symbols, priced, sched, comm, sin, modes, acts, static, ev,
                   capacity, dev, lnk, shard, layout, pins, memo=ctx.priced_memo)
