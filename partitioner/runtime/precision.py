"""Mixed precision as the plan prices it, for a rank's stages (``build_stage``).

``partition(precision=...)`` prices a run (``partitioner.memory.bytes_per_param``,
``partitioner.options.PRECISIONS``); the plan records the choice in
``plan.options["precision"]`` and this module makes the runtime hold and compute exactly that:

- ``"fp32"``: nothing changes.
- ``"bf16"``: pure bf16: parameters and buffers cast, the optimizer steps them directly
  (its state in bf16).
- ``"bf16-mixed"`` / ``"fp16-mixed"``: parameters and buffers in the compute dtype, and an
  fp32 master copy of every trainable parameter, made at build from the values before the
  cast (the original fp32 values of an fp32 model). ``stage.optimizer(cls, ...)`` is a
  ``MixedPrecisionOptimizer``: an optimizer of class ``cls`` over the masters (its state in
  fp32) whose ``step()`` takes the low-precision gradients as fp32, steps the masters and
  copies them back into the low-precision parameters; the fp32 gradient copies live only
  during ``step()`` (a transient of 4 bytes per trainable parameter). A rank then holds
  2 + 2 + 4 + state bytes per parameter, the plan's static bytes.
- ``"fp16-mixed"`` adds dynamic loss scaling (``LossScaler``).
- With FSDP (``plan.mesh.zero`` = 3) the sharded fp32 parameters are the masters and FSDP's
  ``MixedPrecisionPolicy`` casts them as it gathers them (``runtime.fsdp.policy``): no copies
  here; for fp16-mixed ``stage.optimizer`` is a ``MixedPrecisionOptimizer(own_masters=True)``
  that unscales the shards' fp32 gradients in place, agrees on overflow and steps them.
- With ZeRO-1 (``plan.mesh.zero`` = 1 and replicas) the plan shards the masters with the
  optimizer state (2 + 2 + (4 + state) / dp bytes per parameter): ``stage.optimizer`` is a
  ``ZeroRedundancyOptimizer`` over the low-precision parameters whose local optimizer
  (``ShardOptimizer``) steps the masters of the replica's shard; each replica drops the
  other masters, and after a step the replicas broadcast their shards of the low-precision
  weights (ZeRO's own parameter sync). ``RankStage.full_masters`` gathers every master on
  replica 0 while a checkpoint is written.

Pricing casts only when the precision differs from the one the model's parameters imply
(``memory.default_precision``: bf16 parameters train bf16-mixed): then shape propagation
casts floating parameters, buffers and the model's floating inputs to the compute dtype
and, when the parameters' dtype differs from it, swaps every constant of the parameters'
dtype in the graph's calls for the compute dtype (``partitioner.passes.shape_prop.OnDevice``'s
``retype``: an fp32 capture bakes ``float32`` into casts). ``Recipe`` reads the same
conditions off the plan and the model; ``retype_graph`` makes the same swap in a stage's
graph, and ``cast_inputs`` the input cast in stage 0's, so the values crossing each cut
have exactly the plan's dtypes (the interpreter checks every one).
"""

from __future__ import annotations

import functools
from collections.abc import MutableMapping
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import torch
import torch.distributed as dist
from torch import fx, nn

from partitioner.memory import compute_dtype, default_precision
from partitioner.options import PRECISIONS
from partitioner.plan import Plan
from partitioner.runtime.errors import PipelineRuntimeError

__all__ = ["Recipe", "recipe", "retype_graph", "cast_inputs", "cast_tensors_", "LossScaler",
           "MixedPrecisionOptimizer"]


class Recipe(NamedTuple):
    """What a rank does for the plan's precision."""

    name: str  # plan.options["precision"]
    compute: torch.dtype  # the dtype parameters, buffers and activations are held in
    cast: bool  # pricing cast floating parameters, buffers and inputs to ``compute``
    retype: tuple[torch.dtype, torch.dtype] | None  # (src, dst) dtype constants swapped in the graphs
    master: bool  # fp32 master weights updated by the optimizer
    loss_scaling: bool  # dynamic loss scaling (fp16-mixed)


def model_dtype(parameters: Iterable[torch.Tensor]) -> torch.dtype:
    """The dtype pricing takes as the model's: its first floating parameter's (as
    ``partitioner.passes.shape_prop`` reads it off the captured graph), else float32."""
    return next((p.dtype for p in parameters if p.is_floating_point()), torch.float32)


def recipe(plan: Plan, param_dtype: torch.dtype) -> Recipe:
    """The plan's precision, with the casts its pricing applied (``partitioner.api._annotate``).
    A plan without a recorded precision keeps the model's own dtypes."""
    name = str(plan.options.get("precision") or default_precision(param_dtype))
    if name not in PRECISIONS:
        raise PipelineRuntimeError(f"the plan's precision {name!r} is not one this runtime knows "
                                   f"({', '.join(PRECISIONS)}): re-partition with one of them")
    compute = getattr(torch, compute_dtype(name))
    cast = name != default_precision(param_dtype)
    retype = (param_dtype, compute) if cast and param_dtype != compute else None
    _, master, _ = PRECISIONS[name]
    master = master and plan.options.get("optimizer") != "none"  # priced without masters: no update step
    return Recipe(name, compute, cast, retype, master, master and name == "fp16-mixed")


# -- graphs ---------------------------------------------------------------------------------

#: ``x.float()``-style methods: each dispatches a cast to one dtype, which the pricing swaps
_CAST_METHODS = {"float": torch.float32, "double": torch.float64, "half": torch.float16,
                 "bfloat16": torch.bfloat16}
#: Python-level dtype queries, not operators: pricing's dispatch mode never sees their arguments
_NOT_OPS = (torch.finfo, torch.iinfo)


def retype_graph(gm: nn.Module, src: torch.dtype, dst: torch.dtype) -> bool:
    """Swap every ``src`` dtype argument in ``gm``'s graph for ``dst`` (``.to(torch.float32)``,
    ``dtype=torch.float32``, ``x.float()``), as ``partitioner.passes.shape_prop.OnDevice(retype=(src, dst))``
    swaps them in every operator call when pricing: a graph pass, so running the stage costs
    nothing more. Returns whether anything changed (the module is recompiled then)."""
    graph = getattr(gm, "graph", None)
    if graph is None:
        return False
    swap: Callable[[Any], Any] = lambda v: dst if v is src else v  # noqa: E731
    changed = False
    for node in graph.nodes:
        if node.op == "call_method" and _CAST_METHODS.get(str(node.target)) is src:
            node.target, node.args = "to", (node.args[0], dst)
            changed = True
            continue
        if node.op == "call_function" and node.target in _NOT_OPS:
            continue
        if node.op not in ("call_function", "call_method", "call_module"):
            continue
        args, kwargs = fx.node.map_aggregate(node.args, swap), fx.node.map_aggregate(node.kwargs, swap)
        if args != node.args or kwargs != node.kwargs:
            node.args, node.kwargs = args, kwargs
            changed = True
    if changed:
        gm.recompile()  # type: ignore[operator]
    return changed


def cast_inputs(gm: nn.Module, dtype: torch.dtype, which: Sequence[int]) -> None:
    """Cast placeholders ``which`` (the model's floating inputs, in stage 0) to ``dtype`` on
    entry, as pricing made those inputs: the interpreter still checks the inputs the user
    gives against the plan's recorded input dtypes."""
    graph = getattr(gm, "graph", None)
    if graph is None or not which:
        return
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    after = placeholders[-1]
    for i in which:
        ph = placeholders[i]
        with graph.inserting_after(after):
            cast = graph.call_method("to", (ph, dtype))
        ph.replace_all_uses_with(cast, delete_user_cb=lambda user: user is not cast)
        after = cast
    gm.recompile()  # type: ignore[operator]


def cast_tensors_(tensors: Iterable[torch.Tensor], dtype: torch.dtype) -> None:
    """Cast floating ``tensors`` to ``dtype`` in place of their data: each keeps its identity
    (a parameter stays the object optimizers, hooks and tied groups hold).

    A ``DTensor`` (tensor parallelism) is cast with ``torch.utils.swap_tensors``: assigning
    ``.data`` of another dtype to a DTensor changes the wrapper's dtype but not its local
    shard's. The swap keeps the object but gives it a fresh ``__dict__``: hooks registered on
    it before the cast no longer fire (register them after)."""
    with torch.no_grad():
        for t in tensors:
            if t.is_floating_point() and t.dtype != dtype:
                if _is_dtensor(t):
                    low = t.detach().to(dtype)  # the same placements, each shard cast
                    torch.utils.swap_tensors(t, nn.Parameter(low, requires_grad=t.requires_grad)
                                             if isinstance(t, nn.Parameter) else low)
                else:
                    t.data = t.data.to(dtype)


def _is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor  # noqa: PLC0415 - torch.distributed.* loads where it is used

    return isinstance(t, DTensor)


# -- loss scaling ---------------------------------------------------------------------------

class LossScaler:
    """Dynamic loss scaling for fp16-mixed, with one verdict for every rank of the job.

    The arithmetic is ``torch.amp.GradScaler``'s, through its own kernels and defaults
    (``torch._amp_foreach_non_finite_check_and_unscale_``, ``torch._amp_update_scale_``: start
    at 2**16, halve on an overflow, double after 2000 clean steps). GradScaler itself cannot
    be used as is: its found-inf verdict is per process (per optimizer and device), so a
    pipeline rank whose stage overflowed would skip its step while the other ranks stepped
    theirs; the stages, and the copies of tied weights, would no longer be one model's. Here
    each rank unscales its gradients, the verdicts are combined by one ``all_reduce(MAX)``
    over every rank of the job (all pipeline ranks and replicas) before any rank steps, and
    every rank skips or steps and updates its scale alike. ``growth_factor``,
    ``backoff_factor`` and ``growth_interval`` are plain attributes (``stage.loss_scaler``):
    set them alike on every rank.
    """

    def __init__(self, device: torch.device | str, group: dist.ProcessGroup | None, *,
                 init_scale: float = 2.0**16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000) -> None:
        #: the current scale (the Runner multiplies the last stage's loss by it; updated in place)
        self.scale = torch.full((), init_scale, dtype=torch.float32, device=device)
        self._growth_tracker = torch.zeros((), dtype=torch.int32, device=device)
        self.group, self.device = group, torch.device(device)
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval
        #: steps skipped so far, and whether the last one was
        self.skipped, self.last_skipped = 0, False

    def unscale_and_agree(self, grads: Sequence[torch.Tensor]) -> bool:
        """Unscale ``grads`` (fp32) in place; True when every rank's gradients are finite.
        Collective over ``group``: every rank calls it, with or without gradients."""
        found = torch.zeros((), dtype=torch.float32, device=self.device)
        inv = self.scale.double().reciprocal().float()  # as GradScaler.unscale_
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for g in grads:
            by_device.setdefault(g.device, []).append(g)
        for dev, gs in by_device.items():
            f = found if dev == self.device else torch.zeros((), dtype=torch.float32, device=dev)
            torch._amp_foreach_non_finite_check_and_unscale_(gs, f, inv.to(dev))
            if f is not found:
                found = torch.maximum(found, f.to(self.device))
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(found, op=dist.ReduceOp.MAX, group=self.group)
        torch._amp_update_scale_(self.scale, self._growth_tracker, found, self.growth_factor,
                                 self.backoff_factor, self.growth_interval)
        self.last_skipped = bool(found.item())
        self.skipped += self.last_skipped
        return not self.last_skipped

    def state_dict(self) -> dict[str, Any]:
        return {"scale": float(self.scale), "growth_tracker": int(self._growth_tracker), "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale.fill_(state["scale"])
        self._growth_tracker.fill_(state["growth_tracker"])
        self.skipped = int(state.get("skipped", 0))


# -- the optimizer --------------------------------------------------------------------------

def _hook_tables(opt: torch.optim.Optimizer) -> None:
    """The hook tables ``Optimizer.__init__`` makes, for wrappers that share another
    optimizer's parameter groups and state instead of calling it."""
    for kind in ("step_pre", "step_post", "state_dict_pre", "state_dict_post", "load_state_dict_pre",
                 "load_state_dict_post"):
        setattr(opt, f"_optimizer_{kind}_hooks", {})


class MixedPrecisionOptimizer(torch.optim.Optimizer):
    """An optimizer over fp32 master weights for low-precision parameters (``stage.optimizer``).

    ``optimizer`` steps the masters: an ``optimizer_class`` over them, or under ZeRO-1 a
    ``ZeroRedundancyOptimizer`` over the low-precision parameters whose local optimizer
    (``ShardOptimizer``) steps the masters of this replica's shard only. ``pairs`` are
    (low-precision parameter, its master) for the masters this rank holds; ``params`` every
    trainable parameter of the rank. ``step()``: each held master gets its parameter's
    gradient as fp32; with a ``scaler`` (fp16-mixed) those are unscaled and every rank agrees
    whether all are finite, and if any rank's are not, the step is skipped on every rank
    (parameters and optimizer state unchanged) and the scale backs off; otherwise
    ``optimizer`` steps the masters and they are copied back into the parameters (under
    ZeRO-1 each replica then broadcasts its shard of the low-precision parameters). The fp32
    gradient copies are freed when ``step()`` returns. ``param_groups`` and ``state`` are the
    wrapped optimizer's (an LR scheduler works on it as on any optimizer); ``state_dict()`` is
    the wrapped optimizer's, plus ``"loss_scale"`` with a scaler. ``scale`` (the loss scale,
    or None) and ``skipped`` (steps skipped so far) are for logging.
    """

    def __init__(self, optimizer: torch.optim.Optimizer | None, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
                 scaler: LossScaler | None = None, params: Sequence[torch.Tensor] | None = None, *,
                 sharded: bool = False, own_masters: bool = False) -> None:
        # Not Optimizer.__init__: the parameter groups and state are the wrapped optimizer's own
        # objects (an LR scheduler's changes must reach it). No rank may miss the collective
        # verdict, so a rank with nothing to train (``optimizer`` None) still takes part in step().
        self.optimizer, self.pairs, self.scaler = optimizer, list(pairs), scaler
        self.params = list(params) if params is not None else [p for p, _ in self.pairs]
        self.sharded = sharded  # ZeRO-1: the local ShardOptimizer copies back, then the shards are broadcast
        # FSDP (zero=3): ``params`` are fp32 shards, their own masters, with fp32 gradients:
        # unscaled in place (their local shards) and stepped directly, no copies
        self.own_masters = own_masters
        self.defaults = optimizer.defaults if optimizer is not None else {}
        _hook_tables(self)

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups if self.optimizer is not None else []

    @property
    def state(self) -> Any:  # type: ignore[override]
        """The optimizer state this rank holds (under ZeRO-1: its shard's, the local optimizer's)."""
        if self.optimizer is None:
            return {}
        return self.optimizer.optim.state if self.sharded else self.optimizer.state  # type: ignore[attr-defined]

    @property
    def scale(self) -> float | None:
        return float(self.scaler.scale) if self.scaler is not None else None

    @property
    def skipped(self) -> int:
        return self.scaler.skipped if self.scaler is not None else 0

    def __repr__(self) -> str:
        return f"MixedPrecisionOptimizer({self.optimizer!r})"

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise PipelineRuntimeError("MixedPrecisionOptimizer.step takes no closure: runner.step() runs the "
                                       "forward and backward; call optimizer.step() after it")
        for p, m in self.pairs:
            m.grad = None if p.grad is None else p.grad.to(torch.float32, copy=True)
        try:
            grads = [_local(m.grad) for _, m in self.pairs if m.grad is not None]  # a DTensor's shard: unscaled in place
            if self.own_masters:
                grads += [_local(p.grad) for p in self.params if p.grad is not None]
            finite = self.scaler.unscale_and_agree(grads) if self.scaler is not None else True
            if finite and self.optimizer is not None:
                self.optimizer.step()
                if not self.sharded:
                    for p, m in self.pairs:
                        p.copy_(m)
        finally:
            for _, m in self.pairs:
                m.grad = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for _, m in self.pairs:
            m.grad = None
        for p in self.params:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_().zero_()

    def state_dict(self) -> dict[str, Any]:
        out = dict(self.optimizer.state_dict()) if self.optimizer is not None else {"state": {}, "param_groups": []}
        if self.scaler is not None:
            out["loss_scale"] = self.scaler.state_dict()
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        scale = state_dict.pop("loss_scale", None)
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state_dict)
        if scale is not None and self.scaler is not None:
            self.scaler.load_state_dict(scale)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        raise PipelineRuntimeError("MixedPrecisionOptimizer: build it over all of the stage's parameters at once "
                                   "(stage.optimizer(cls, ...)); groups cannot be added to its masters later")


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (a view: unscaling it in place unscales the DTensor), else ``t``."""
    from torch.distributed.tensor import DTensor  # noqa: PLC0415 - torch.distributed.* loads where it is used

    return t.to_local() if isinstance(t, DTensor) else t


class _ByMaster(MutableMapping):  # type: ignore[type-arg]
    """An optimizer's state, keyed by the low-precision parameters a ZeroRedundancyOptimizer
    knows, stored under their masters (the keys the wrapped optimizer reads)."""

    def __init__(self, state: Any, master_of: dict[int, torch.Tensor]) -> None:
        self._state, self._master_of = state, master_of

    def _key(self, k: Any) -> Any:
        return self._master_of.get(id(k), k)

    def __getitem__(self, k: Any) -> Any:
        return self._state[self._key(k)]

    def __setitem__(self, k: Any, v: Any) -> None:
        self._state[self._key(k)] = v

    def __delitem__(self, k: Any) -> None:
        del self._state[self._key(k)]

    def __iter__(self) -> Any:
        return iter(self._state)

    def __len__(self) -> int:
        return len(self._state)


class ShardOptimizer(torch.optim.Optimizer):
    """ZeRO-1's local optimizer under mixed precision: ``optimizer_class`` over the fp32 masters
    of this replica's shard (``param_groups`` hold its low-precision parameters, as
    ``ZeroRedundancyOptimizer`` hands them out); ``step()`` steps them and copies them into
    their parameters, which the ZeroRedundancyOptimizer then broadcasts to the other replicas.
    Its state is the wrapped optimizer's, reachable by the low-precision parameters too
    (``ZeroRedundancyOptimizer.load_state_dict`` keys it so)."""

    def __init__(self, param_groups: Any, *, optimizer_class: type[torch.optim.Optimizer],
                 master_of: dict[int, torch.Tensor], **defaults: Any) -> None:
        param_groups = list(param_groups)
        groups = ([dict(g) for g in param_groups] if param_groups and isinstance(param_groups[0], dict)
                  else [{"params": param_groups}])
        self.pairs = [(p, master_of.get(id(p), p)) for g in groups for p in g["params"]]
        masters = [{**g, "params": [master_of.get(id(p), p) for p in g["params"]]} for g in groups]
        self.optimizer = optimizer_class(masters, **defaults)
        self.defaults = self.optimizer.defaults
        self._by_master = _ByMaster(self.optimizer.state, master_of)
        _hook_tables(self)

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self._by_master

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> None:  # type: ignore[override]
        self.optimizer.step()
        for p, m in self.pairs:
            if p is not m:
                p.copy_(m)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)


@functools.cache
def _zero_class() -> type:
    """``ZeroRedundancyOptimizer`` whose ``load_state_dict`` then drops its own copy of the
    state: ``Optimizer.load_state_dict`` casts it to the low-precision parameters' dtype, a
    copy nothing reads (the local optimizer holds the fp32 state)."""
    from torch.distributed.optim import ZeroRedundancyOptimizer  # noqa: PLC0415 - torch.distributed.* loads where it is used (a torch build may lack distributed)

    class MixedZeroRedundancyOptimizer(ZeroRedundancyOptimizer):
        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            super().load_state_dict(state_dict)
            self.state.clear()

    return MixedZeroRedundancyOptimizer


def zero_mixed(params: Sequence[torch.Tensor], optimizer_class: type[torch.optim.Optimizer],
               master_of: dict[int, torch.Tensor], group: dist.ProcessGroup, **kwargs: Any) -> Any:
    """A ZeroRedundancyOptimizer over the low-precision ``params`` whose local optimizer steps
    the fp32 masters of this replica's shard (``ShardOptimizer``)."""
    local = functools.partial(ShardOptimizer, optimizer_class=optimizer_class, master_of=master_of)
    return _zero_class()(params, optimizer_class=local, process_group=group, **kwargs)
