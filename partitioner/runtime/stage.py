"""This rank's share of a pipeline: its stage modules on its device, and a runner::

    stage = pipe.build_stage(rank, "cpu")          # or build_stage(spec, rank, "cpu") from a PipelineSpec
    runner = stage.runner(loss_fn=loss_fn)         # the plan's schedule and micro-batch count
    loss = runner.step(x, target=y)   # x on the first rank, y on the last; None elsewhere
    opt.step()                        # opt over stage.parameters()

The modules are copies (the user's model is untouched), so weights tied across ranks
(``plan.tied_parameters``) are separate tensors here: every step all-reduces their
gradients over the ranks that hold them, which keeps the copies equal under any
optimizer that is a function of the gradient.

With data parallelism (``plan.mesh.dp`` > 1) the ranks form a ``("dp", "pp")`` device mesh
(``torch.distributed.device_mesh.init_device_mesh``; ``plan.mesh.dims`` gives the order):
each replica runs the pipeline on its share of the batch, and the replicas of a pipeline
rank average their gradients with ``runtime.grad_sync.GradSync`` (no DDP: its reducer would
wait for the reduction at the end of the backward that launched it, delaying the input
gradient the upstream rank waits for). Gradients accumulate locally over the step's
micro-batches; each bucket's all-reduce is launched, asynchronously, during or right after
its stage's final backward on the rank, and the step waits for them all once the rank has
run its last action (``RankStage.sync_replicas``). At build, replica 0's parameters and
buffers are broadcast so the replicas start equal. ``plan.mesh.zero`` = 1 makes
``stage.optimizer(...)`` a ``ZeroRedundancyOptimizer`` over the replicas.

Precision: the plan's (``plan.options["precision"]``) is what the rank holds and computes
in (``runtime.precision``): parameters and buffers cast to its compute dtype at build, the
stage graphs retyped as pricing retyped them, and for ``"bf16-mixed"`` / ``"fp16-mixed"``
an fp32 master copy of each trainable parameter, which ``stage.optimizer(...)`` steps
(with dynamic loss scaling agreed by every rank for fp16). Build the optimizer with
``stage.optimizer(...)``: one over ``stage.parameters()`` would step the low-precision
copies and never see the masters.
"""

from __future__ import annotations

import contextlib
import copy
import os
import warnings
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, NamedTuple, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.utils import _pytree as pytree

from partitioner.runtime import collectives, loop, tensor_parallel
from partitioner.runtime.checkpoint import load_checkpoint, save_checkpoint
from partitioner.runtime.compile import CompileOption, check_schedule, compile_kwargs, compiled_modules
from partitioner.runtime.dist import DistTransport, backend_for
from partitioner.runtime.driver import StepDriver
from partitioner.runtime.errors import PipelineRuntimeError
from partitioner.runtime.fsdp import is_sharded, local_grads, shard_stage
from partitioner.runtime.grad_sync import GradSync, broadcast_from_first
from partitioner.runtime.interop import pipelining_stage
from partitioner.runtime.interpreter import TraceEvent
from partitioner.runtime.materialize import materialize
from partitioner.runtime.microbatch import batch_size, split
from partitioner.runtime.precision import (
    LossScaler,
    MixedPrecisionOptimizer,
    cast_inputs,
    cast_tensors_,
    recipe,
    retype_graph,
    zero_mixed,
)
from partitioner.runtime.precision import (
    _local as local_shard,
)
from partitioner.runtime.spec import ModelNames, PipelineSpec, as_spec, resolve_schedule, seq_len, static_shapes
from partitioner.runtime.trace import write_trace
from partitioner.schedule import Schedule, split_problem
from partitioner.simulator import predict_plan

if TYPE_CHECKING:
    from partitioner.plan import Mesh
    from partitioner.simulator import SimResult

__all__ = ["build_stage", "RankStage", "Runner", "IncompatibleKeys", "job_mesh"]


class IncompatibleKeys(NamedTuple):
    missing_keys: list[str]
    unexpected_keys: list[str]


class RankStage:
    """The stages ``rank`` runs (stage s lives on rank s % n_ranks), built from a ``PipelineSpec``
    (``runtime.spec``) that holds at least them."""

    #: the runners' default for ``compile=`` (``build_stage(..., compile=...)``): False, True
    #: or ``torch.compile`` keyword arguments (``runtime.compile``)
    compile: CompileOption = False

    def __init__(self, spec: PipelineSpec, rank: int, device: torch.device, group: dist.ProcessGroup | None, *,
                 init_fn: Callable[[nn.Module], Any] | None = None, seed: int = 0,
                 dp_group: dist.ProcessGroup | None = None, dp_rank: int = 0,
                 dp_mesh: DeviceMesh | None = None) -> None:
        plan = spec.plan
        #: the record this rank was built from (``runtime.spec.PipelineSpec``)
        self.spec, self.plan, self.rank, self.device, self.group = spec, plan, rank, device, group
        #: this rank's place in the mesh: pipeline rank (``rank``) and replica
        self.pp_rank, self.dp_rank, self.dp_group = rank, dp_rank, dp_group
        #: the replicas' device mesh when it was cut from the job's mesh (tensor parallelism:
        #: FSDP needs its mesh and the TP mesh from one parent; hybrid sharding, ``mesh.shard``:
        #: the 2-D ``(dp_replicate, dp_shard)`` mesh); None: made from ``dp_group``
        self.dp_mesh: DeviceMesh | None = dp_mesh
        self.n_ranks = plan.pp_ranks
        mine = [st.index for st in plan.stages if st.rank == rank]
        if not mine:
            raise PipelineRuntimeError(f"rank {rank} runs no stage of this plan (ranks 0..{self.n_ranks - 1})", rank)
        #: FQN -> every FQN of the same tensor in the model (tied weights), itself included
        self.aliases: dict[str, tuple[str, ...]] = _alias_groups(spec.names, plan.tied_parameters)
        self._non_persistent = set(spec.names.non_persistent) if spec.names is not None else set()
        originals = spec.modules(mine, f"rank {rank}")
        made = materialize(originals, device, spec.model, init_fn=init_fn, seed=seed,
                           tied=tuple(g for g in set(self.aliases.values()) if len(g) > 1))
        # Deep copies made together, so a tensor shared by two stages of this rank stays one.
        self.modules: dict[int, nn.Module] = dict(zip(mine, copy.deepcopy(originals, made.memo)))
        if made.initialized_on_device:
            for mod in self.modules.values():
                _retarget_meta_devices(mod, device)
        #: FQNs whose values nobody has written yet (a meta model's tensors without an
        #: initialiser): the runner refuses to run until a checkpoint or state dict fills them
        self.uninitialized: set[str] = made.uninitialized
        self._tied = self._tie_groups()
        #: the plan's precision as this rank runs it (``runtime.precision.Recipe``)
        self.recipe = recipe(plan, spec.param_dtype)
        self._graphs_cast = False
        #: the gradient reducer over this rank's replicas (``runtime.grad_sync``), or None
        self.grad_sync = self._replicate()
        #: (low-precision parameter, its fp32 master) for each trainable parameter (mixed precision)
        self._pairs = self._apply_precision()
        self._master_of: dict[int, torch.Tensor] = {id(p): m for p, m in self._pairs}
        #: every rank of the job: the pipeline's group, or with replicas the whole mesh (default group)
        # (with tensor parallelism the world: the other TP ranks are outside the pipeline's group)
        self.job_group = self.group if dp_group is None and plan.mesh.tp == 1 else None
        #: fp16-mixed: the dynamic loss scale, one for every rank of the job (``runtime.precision``)
        self.loss_scaler = LossScaler(device, self.job_group) if self.recipe.loss_scaling else None
        self._master_optimizers = 0  # built by optimizer(): the runner warns when a mixed run has none
        #: ZeRO-1 with mixed precision: id(parameter) -> the replica holding its master
        self._master_owner: dict[int, int] = {}

    @property
    def is_first(self) -> bool:
        """Runs stage 0: ``runner.step`` takes the model's inputs here."""
        return 0 in self.modules

    @property
    def is_last(self) -> bool:
        """Runs the last stage: ``runner.step`` takes ``target=`` here and returns the loss."""
        return self.plan.n_stages - 1 in self.modules

    @property
    def global_rank(self) -> int:
        return self.plan.mesh.rank(self.dp_rank, self.pp_rank, getattr(self, "tp_rank", 0)) if self.dp_group is not None else (
            self.rank if self.group is None else dist.get_global_rank(self.group, self.rank))

    def _replicate(self) -> GradSync | None:
        """The replicas start equal: replica 0's parameters and buffers are broadcast over
        the replicas of this pipeline rank. Returns the ``GradSync`` that averages the
        gradients over them each step (None without data parallelism, or when this rank
        has nothing to train); the ``Runner`` tells it when each stage's final backward
        runs, so it reduces during it."""
        if self.dp_group is None or dist.get_world_size(self.dp_group) == 1:
            return None
        broadcast_from_first([*self.parameters(), *self.buffers()], self.dp_group)
        if self.plan.mesh.tp > 1:  # the parameters become DTensors first: runtime.tensor_parallel calls reducer()
            return None
        return self.reducer()

    def reducer(self) -> GradSync | None:
        """The gradient reducer over this rank's replicas for its parameters as they are now:
        ``runtime.fsdp.shard_stage`` (``zero=3``, sharding them in place over ``dp_mesh``, or
        the ``dp`` group's own mesh) or a ``GradSync``; None when nothing trains."""
        if not any(p.requires_grad for p in self.parameters()):
            return None
        if self.plan.mesh.zero == 3:  # FSDP2 inside the stages: shards instead of replicas (runtime.fsdp)
            self._cast_graphs()  # before fully_shard: a graph recompiled under FSDP's class would recurse
            return shard_stage(self)  # type: ignore[return-value]
        return GradSync(self.modules, cast(dist.ProcessGroup, self.dp_group))

    def _apply_precision(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """Masters from the values before the cast, then cast and retype as pricing did."""
        r = self.recipe
        if self.plan.mesh.tp > 1:  # once the parameters are DTensors: tensor_parallel_precision
            return []
        # zero=3: FSDP's sharded fp32 parameters are the masters and its MixedPrecisionPolicy
        # casts them as it gathers them (runtime.fsdp); only the buffers and graphs change here
        fsdp = is_sharded(self)
        pairs = [(p, p.detach().to(torch.float32, copy=True)) for p in self.parameters()
                 if r.master and not fsdp and p.requires_grad and p.is_floating_point()]
        if r.cast and not fsdp:
            cast_tensors_(self.parameters(), r.compute)
        self._cast_graphs()
        pairs = [(p, m) for p, m in pairs if p.dtype != torch.float32]  # a parameter left in fp32 is its own master
        return pairs

    def tensor_parallel_precision(self) -> None:
        """The plan's precision for a tensor-parallel stage, once ``runtime.tensor_parallel``
        has made its parameters DTensors (and the replicas' reducer). Under ``zero=3`` FSDP's
        ``MixedPrecisionPolicy`` casts the fp32 2-D shards, its masters, as it gathers them
        (``runtime.fsdp.policy``): nothing to do here. Otherwise as ``_apply_precision``: each
        trainable DTensor's fp32 master is a DTensor with the same placements (its shard cast),
        the parameters are cast in place (``cast_tensors_``), and ``stage.optimizer`` steps
        the masters; the replicas' ``GradSync`` is remade over the cast parameters (the cast
        drops the hooks it had registered)."""
        r = self.recipe
        if is_sharded(self):
            return
        self._cast_graphs()
        pairs = [(p, p.detach().to(torch.float32, copy=True)) for p in self.parameters()
                 if r.master and p.requires_grad and p.is_floating_point()]
        if r.cast:
            cast_tensors_(self.parameters(), r.compute)
            if isinstance(self.grad_sync, GradSync):
                self.grad_sync = self.reducer()
        self._pairs = [(p, m) for p, m in pairs if p.dtype != torch.float32]
        self._master_of = {id(p): m for p, m in self._pairs}

    def _cast_graphs(self) -> None:
        """Once: buffers cast to the compute dtype, graphs retyped and stage 0's floating
        inputs cast on entry, as pricing did."""
        r = self.recipe
        if not r.cast or self._graphs_cast:
            return
        self._graphs_cast = True
        cast_tensors_(self.buffers(), r.compute)
        for mod in self.modules.values():
            if r.retype is not None:
                retype_graph(mod, *r.retype)
        if 0 in self.modules:  # the model's floating inputs, cast on entry as pricing made them
            floating = [i for i, d in enumerate(self.plan.inputs) if d.get("kind") == "tensor"
                        and getattr(torch, str(d.get("dtype") or "-"), torch.int64).is_floating_point]
            cast_inputs(self.modules[0], r.compute, floating)

    @property
    def masters(self) -> dict[str, torch.Tensor]:
        """FQN -> the fp32 master of each trainable parameter (mixed precision; else empty),
        under each of its names here."""
        return {n: self._master_of[id(p)] for n, p in self.named_parameters(remove_duplicate=False)
                if id(p) in self._master_of}

    def check_masters(self) -> None:
        """Collective over every rank of the job: refuse when a low-precision parameter is not
        its fp32 master cast, i.e. it was changed outside ``stage.optimizer()`` (an optimizer
        over ``stage.parameters()``, a direct write): the masters, which checkpoints save,
        would be stale. Called by ``save_checkpoint``."""
        if not self.recipe.master:
            return
        # each rank its own shards (a DTensor's torch.equal is a collective of its own): the
        # flag's all-reduce below gives every rank the verdict
        bad = [n for n, p in self.named_parameters() if id(p) in self._master_of and n not in self.uninitialized
               and not torch.equal(local_shard(p), local_shard(self._master_of[id(p)]).to(p.dtype))]
        flag = torch.tensor([float(bool(bad))], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.job_group)
        if flag.item():
            raise PipelineRuntimeError(
                (f"rank {self.global_rank}: parameters {bad[:3]}{' …' if len(bad) > 3 else ''} are not their fp32 "
                 "masters" if bad else f"rank {self.global_rank}: another rank's parameters are not their fp32 masters")
                + f" ({self.recipe.name}): they were changed outside stage.optimizer(...) (which steps the masters "
                "and copies them back), so the masters a checkpoint saves are stale. Build the optimizer with "
                "stage.optimizer(cls, ...), and write weights with stage.load_state_dict(...)")

    @contextlib.contextmanager
    def full_masters(self) -> Iterator[None]:
        """Collective over the replicas under ZeRO-1 with mixed precision (else nothing): for
        the duration, replica 0 holds every master of this pipeline rank, each broadcast by
        the replica whose shard holds it, so a checkpoint saves fp32 values for all."""
        added: list[int] = []
        if self._master_owner and self.dp_group is not None:
            with torch.no_grad():
                for p in self.parameters():
                    owner = self._master_owner.get(id(p))
                    if owner is None:
                        continue
                    mine = id(p) in self._master_of
                    buf = self._master_of[id(p)] if mine else torch.empty(p.shape, dtype=torch.float32,
                                                                            device=p.device)
                    dist.broadcast(buf, src=dist.get_global_rank(self.dp_group, owner), group=self.dp_group)
                    if not mine and self.dp_rank == 0:
                        self._master_of[id(p)] = buf
                        added.append(id(p))
        try:
            yield
        finally:
            for k in added:
                del self._master_of[k]

    def sync_masters(self) -> None:
        """Copy the fp32 masters into the low-precision parameters (after loading masters)."""
        with torch.no_grad():
            for p, m in self._pairs:
                p.copy_(m)

    def sync_replicas(self) -> None:
        """Finish averaging the step's gradients over the replicas: launch the buckets not
        launched yet (those of stages with no final backward this step), wait for every
        all-reduce, and set each ``.grad`` to its average (``GradSync.finish``). A parameter
        no replica gave a gradient this step (its average is all zeros) gets none, as in one
        process; one that only some replicas used gets the average, counting the others'
        as zero. Called by ``Runner.step`` after the rank's last action; outside a step it
        reduces whatever has accumulated."""
        if self.grad_sync is not None:
            self.grad_sync.finish()

    def optimizer(self, optimizer_class: type[torch.optim.Optimizer] = torch.optim.AdamW,
                  **kwargs: Any) -> torch.optim.Optimizer:
        """An optimizer over this rank's parameters: ``optimizer_class(params, **kwargs)``,
        or, with ``plan.mesh.zero`` = 1 and replicas, PyTorch's ``ZeroRedundancyOptimizer``
        wrapping it over the replicas (each keeps 1/dp of the optimizer state).

        Under a mixed precision (``"bf16-mixed"``, ``"fp16-mixed"``) a
        ``runtime.precision.MixedPrecisionOptimizer``: ``optimizer_class`` over the fp32
        masters, stepping them from the low-precision gradients and copying them back; for
        fp16 its ``step()`` unscales, skips the step on every rank when any rank's gradients
        are not finite, and updates the loss scale (``.scale``, ``.skipped``). With ZeRO-1 it
        wraps a ``ZeroRedundancyOptimizer`` whose shards step the masters, and this rank keeps
        only its shard's masters from then on, as the plan prices them."""
        params = self.parameters()
        if self.recipe.master and is_sharded(self):  # FSDP: the fp32 shards are the masters (runtime.fsdp)
            self._master_optimizers += 1
            if self.loss_scaler is None:
                return optimizer_class(params, **kwargs)
            trainable = [p for p in params if p.requires_grad]
            return MixedPrecisionOptimizer(optimizer_class(trainable, **kwargs) if trainable else None, [],
                                           self.loss_scaler, trainable, own_masters=True)
        if self.recipe.master:
            self._master_optimizers += 1
            trainable = [p for p in params if p.requires_grad]
            if self.plan.mesh.zero and self.grad_sync is not None:
                # The plan shards the masters with the optimizer state: each replica keeps those of
                # the parameters its shard steps, and drops the others' (in place: the shard's
                # optimizer reads the same table).
                zero = zero_mixed(params, optimizer_class, self._master_of, cast(dist.ProcessGroup, self.dp_group),
                                  **kwargs)
                owner = {id(p): r for p, r in zero._param_to_rank.items()}
                self._master_owner.update({k: owner[k] for k in self._master_of if k in owner})
                for k in [k for k in self._master_of if self._master_owner.get(k, zero.rank) != zero.rank]:
                    del self._master_of[k]
                self._pairs[:] = [(p, m) for p, m in self._pairs if id(p) in self._master_of]
                return MixedPrecisionOptimizer(zero, self._pairs, self.loss_scaler, trainable, sharded=True)
            targets = [self._master_of.get(id(p), p) for p in trainable]
            inner = optimizer_class(targets, **kwargs) if targets else None
            return MixedPrecisionOptimizer(inner, self._pairs, self.loss_scaler, trainable)
        if self.plan.mesh.zero == 1 and self.grad_sync is not None:

            return ZeroRedundancyOptimizer(params, optimizer_class=optimizer_class, process_group=self.dp_group,
                                           **kwargs)
        return optimizer_class(params, **kwargs)

    def _tie_groups(self) -> list[tuple[dist.ProcessGroup, list[nn.Parameter]]]:
        """One subgroup per tied set spanning several ranks. ``new_group`` is collective:
        every rank creates every subgroup, in plan order, member or not."""
        out = []
        named = dict(self.named_parameters(remove_duplicate=False))
        for names in self.plan.tied_parameters:
            ranks = sorted({st.rank for st in self.plan.stages if set(st.parameters) & set(names)})
            if len(ranks) < 2:
                continue  # one rank holds every use: a single tensor after _copy_to
            mesh = self.plan.mesh
            if self.dp_group is not None or mesh.tp > 1:  # one group per replica and TP index, made by every rank
                groups = [dist.new_group([mesh.rank(d, r, t) for r in ranks]) for d in range(mesh.dp)
                          for t in range(mesh.tp)]
                pg = groups[self.dp_rank * mesh.tp + dist.get_rank() % mesh.tp]  # tp innermost (Mesh.rank)
            else:
                global_ranks = ranks if self.group is None else [dist.get_global_rank(self.group, r) for r in ranks]
                pg = dist.new_group(global_ranks)
            if self.rank in ranks:
                params = list({id(named[n]): named[n] for n in names if n in named}.values())
                out.append((pg, params))
        return out

    # nn.Module conventions, over every stage of this rank, with the model's FQNs.
    def _named_tensors(self, kind: str) -> Iterator[tuple[str, torch.Tensor]]:
        seen: set[str] = set()
        for mod in self.modules.values():
            items = (mod.named_parameters(remove_duplicate=False) if kind == "p"
                     else mod.named_buffers(remove_duplicate=False))
            for n, t in items:
                if n not in seen:  # a name used by two stages of this rank is one tensor
                    seen.add(n)
                    yield n, t

    def named_parameters(self, prefix: str = "", recurse: bool = True,
                         remove_duplicate: bool = True) -> Iterator[tuple[str, nn.Parameter]]:
        """``(FQN, parameter)`` pairs, the model's names. As ``nn.Module``: a tensor tied
        under several names is yielded once unless ``remove_duplicate=False``."""
        del recurse  # always the whole of this rank's stages
        ids: set[int] = set()
        for n, p in self._named_tensors("p"):
            if remove_duplicate and id(p) in ids:
                continue
            ids.add(id(p))
            yield prefix + n, p  # type: ignore[misc]

    def parameters(self) -> list[nn.Parameter]:
        """This rank's parameters, each once (a list, so ``if stage.parameters():`` works)."""
        return [p for _, p in self.named_parameters()]

    def named_buffers(self, prefix: str = "", recurse: bool = True,
                      remove_duplicate: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        del recurse
        ids: set[int] = set()
        for n, b in self._named_tensors("b"):
            if remove_duplicate and id(b) in ids:
                continue
            ids.add(id(b))
            yield prefix + n, b

    def buffers(self) -> list[torch.Tensor]:
        return [b for _, b in self.named_buffers()]

    def is_persistent(self, name: str) -> bool:
        return name not in self._non_persistent

    def state_dict(self) -> dict[str, torch.Tensor]:
        """FQN -> tensor (detached, sharing storage) for this rank's parameters and
        persistent buffers, tied tensors under each of their names here; the keys are a
        subset of ``model.state_dict()``'s. Under mixed precision a trainable parameter is
        given as its fp32 master (the model's state at full precision); under ZeRO-1, once
        ``optimizer()`` has sharded the masters, only those this replica holds (the others
        as their low-precision weights: ``save_checkpoint`` gathers them)."""
        out = {n: self._master_of.get(id(p), p).detach() for n, p in self.named_parameters(remove_duplicate=False)}
        out.update({n: b.detach() for n, b in self.named_buffers(remove_duplicate=False) if self.is_persistent(n)})
        return out

    def unique_tensors(self) -> list[tuple[list[str], torch.Tensor]]:
        """Each of this rank's parameters and persistent buffers once, with its names here;
        a parameter with an fp32 master (mixed precision) as its master, which checkpoints
        save and load (then ``sync_masters``)."""
        by_id: dict[int, tuple[list[str], torch.Tensor]] = {}
        pairs = [*self.named_parameters(remove_duplicate=False),
                 *((n, b) for n, b in self.named_buffers(remove_duplicate=False) if self.is_persistent(n))]
        for n, t in pairs:
            by_id.setdefault(id(t), ([], self._master_of.get(id(t), t).detach()))[0].append(n)
        return list(by_id.values())

    def candidates(self, names: list[str]) -> list[str]:
        """Names a checkpoint may hold one tensor under: its names here, then its other
        tied names in the model (a Hugging Face checkpoint stores a tied weight once)."""
        out = list(names)
        for n in names:
            out += [a for a in self.aliases.get(n, ()) if a not in out]
        return out

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True) -> IncompatibleKeys:
        """Copy values into this rank's tensors. ``state_dict`` may be the whole model's:
        keys of other ranks are ignored; a tied tensor is loaded from whichever of its names
        is present. ``strict``: every tensor of this rank must be found, and keys that are
        not the model's raise. Returns (missing_keys, unexpected_keys) like ``nn.Module``."""
        own = self.state_dict()
        missing = []
        with torch.no_grad():
            for names, t in self.unique_tensors():
                src_name = next((a for a in self.candidates(names) if a in state_dict), None)
                if src_name is None:
                    missing.extend(names)
                    continue
                src = state_dict[src_name]
                if tuple(src.shape) != tuple(t.shape):
                    raise PipelineRuntimeError(
                        f"rank {self.rank}: {src_name!r} has shape {tuple(src.shape)} in the state dict, "
                        f"the model's is {tuple(t.shape)}: the state dict is from another model or configuration")
                t.copy_(src)
                self.uninitialized.difference_update(names)
        self.sync_masters()
        known = set(own) | {a for n in own for a in self.aliases.get(n, (n,))}
        model_names = self.spec.names
        if model_names is not None:
            known |= {*model_names.parameters, *model_names.buffers}
        unexpected = sorted(k for k in state_dict if k not in known) if model_names is not None else []
        if strict and (missing or unexpected):
            raise PipelineRuntimeError(
                f"rank {self.rank}: load_state_dict(strict=True): "
                + (f"missing {missing[:5]}{' …' if len(missing) > 5 else ''} " if missing else "")
                + (f"unexpected (not the model's) {unexpected[:5]}" if unexpected else "")
                + "; pass strict=False to load what matches")
        return IncompatibleKeys(missing, unexpected)

    def check_initialized(self) -> None:
        if not self.uninitialized:
            return
        names = sorted(self.uninitialized)
        np_ = [n for n in names if not self.is_persistent(n)]
        hint = (f" {np_[:3]} are non-persistent buffers (in no checkpoint): build the model with "
                "partitioner.runtime.meta_params() (parameters on meta, buffers computed) or pass "
                "build_stage(..., init_fn=...) that computes them" if np_ else "")
        raise PipelineRuntimeError(
            f"rank {self.rank}: {len(names)} tensors of this rank were never initialised "
            f"({names[:5]}{' …' if len(names) > 5 else ''}): the model was on the meta device and no "
            f"initialiser wrote them; call stage.load_checkpoint(path) or pass build_stage(..., init_fn=fn)." + hint)

    def train(self, mode: bool = True) -> RankStage:
        for mod in self.modules.values():
            mod.train(mode)
        return self

    def eval(self) -> RankStage:
        return self.train(False)

    @property
    def training(self) -> bool:
        return all(mod.training for mod in self.modules.values())

    def zero_grad(self, set_to_none: bool = True) -> None:
        for mod in self.modules.values():
            mod.zero_grad(set_to_none=set_to_none)

    def _norm_grads(self) -> list[torch.Tensor]:
        """The gradients this rank counts in the global norm: each parameter once, a weight
        tied across pipeline ranks only on the first of them (every copy holds the summed
        gradient after the step)."""
        named = dict(self.named_parameters(remove_duplicate=False))
        others: set[int] = set()
        for names in self.plan.tied_parameters:
            ranks = sorted({st.rank for st in self.plan.stages if set(st.parameters) & set(names)})
            if len(ranks) > 1 and ranks[0] != self.rank:
                others |= {id(named[n]) for n in names if n in named}
        return [p.grad for p in self.parameters() if p.grad is not None and id(p) not in others]

    def grad_norm(self, norm_type: float = 2.0) -> torch.Tensor:
        """Collective over the pipeline's ranks (every rank of the job calls it, after
        ``runner.step``): the ``norm_type``-norm of the whole model's gradient, as
        ``torch.nn.utils.get_total_norm`` gives it in one process; a tensor on this rank's
        device, the same on every rank. Tied weights count once. With data parallelism the
        step has averaged the gradients over the replicas (under ZeRO-1 too: only the
        optimizer state is sharded), so every replica holds the global gradient and the norm
        is taken over its own pipeline. Under fp16-mixed the gradients carry the loss scale:
        the norm returned is of the unscaled gradients (non-finite when they overflowed)."""
        # zero=3: each rank's FSDP shard, summed over every rank of the job; otherwise (tensor
        # parallelism's DTensor shards included, and FSDP's over (dp, tp), whose local shards
        # repeat over the TP ranks a weight is replicated on) each gradient whole, over the pipeline
        # (hybrid sharding's shards repeat over the replicate dimension: each DTensor's whole norm too)
        sharded = is_sharded(self) and self.plan.mesh.tp == 1 and not self.plan.mesh.shard
        grads = self._norm_grads()
        norm = loop.global_grad_norm(local_grads(grads) if sharded else grads, float(norm_type), self.device,
                                     self.job_group if sharded else self.group)
        if self.loss_scaler is not None:
            norm = norm / self.loss_scaler.scale.to(norm.device, torch.float32)
        return norm

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                        foreach: bool | None = None) -> torch.Tensor:
        """Collective: ``torch.nn.utils.clip_grad_norm_`` over the whole pipelined model.
        The global norm (``grad_norm``) is computed over every pipeline rank (tied weights
        once, data-parallel replicas already averaged), then this rank's gradients (each
        tied copy alike) are scaled by ``max_norm / (norm + 1e-6)`` where that is below 1,
        by ``torch.nn.utils.clip_grads_with_norm_``. Returns the norm before clipping.

        Call it between ``runner.step`` and the optimizer's step. Under fp16-mixed the norm
        is of the unscaled gradients and the scaled gradients get the same factor, so the
        optimizer's unscaling gives the clipped gradient (non-finite gradients stay
        non-finite and the optimizer skips the step, as with ``GradScaler``)."""
        norm = self.grad_norm(norm_type)
        if error_if_nonfinite and not torch.isfinite(norm):
            raise PipelineRuntimeError(f"rank {self.global_rank}: the total norm of order {norm_type} of the gradients "
                                       "is non-finite, so it cannot be clipped (error_if_nonfinite=True)")
        params = [p for p in self.parameters() if p.grad is not None]
        if params:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm.to(params[0].grad.device),  # type: ignore[union-attr]
                                                 foreach=foreach)
        return norm

    def load_checkpoint(self, path: str, optimizer: torch.optim.Optimizer | None = None) -> list[str]:
        """Read this rank's tensors (and optionally ``optimizer``'s state) from ``path``: a
        ``.safetensors`` file, a Hugging Face directory (``model.safetensors`` or
        ``model.safetensors.index.json`` + shards: only the shards holding this rank's keys
        are opened) or a ``torch.distributed.checkpoint`` directory (``save_checkpoint``'s).
        Returns the files read. Not collective: each rank reads its own keys."""

        return load_checkpoint(self, path, optimizer)

    def save_checkpoint(self, path: str, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Collective (every rank calls it): write the model's state (and ``optimizer``'s,
        keyed by parameter FQN) with ``torch.distributed.checkpoint`` to directory
        ``path``, atomically, so any plan (another rank count) can load it."""

        save_checkpoint(self, path, optimizer)

    def runner(self, schedule: str | Schedule | None = None, n_microbatches: int | None = None,
               loss_fn: Callable[[Any, Any], torch.Tensor] | None = None, *, batch_size: int | None = None,
               p2p: str = "auto", compile: CompileOption = None, normalize: loop.Normalize = "mean") -> Runner:
        """A ``Runner`` whose ``step(x, target=y)`` trains one step on this rank's stages.

        Args:
            schedule: a schedule name (``partitioner.schedule.SCHEDULES``) or a ``Schedule``;
                every rank must pass the same (default: the plan's, the one it was priced
                for: ``plan.prediction.schedule``).
            n_microbatches: micro-batches per step (default: the plan's).
            loss_fn: ``loss_fn(output, target) -> scalar``, called on the last stage per
                micro-batch (the step's loss is their mean).
            batch_size: the global batch each step gets (default: the plan's); ranks size
                their receive buffers from it. With data parallelism each replica runs
                ``batch_size / plan.mesh.dp`` of it: the first stage takes either the
                global batch (and keeps its replica's share) or its share alone.
            p2p: ``"auto"``: on gloo every receive of a step is posted at its start and
                matched by tag; on NCCL messages are matched in issue order, as
                ``partitioner.comms`` lowers them. ``"ordered"``: the NCCL way on any backend
                (every tag 0, receives in their batches), to run NCCL's message order on CPU.
            compile: run this rank's stages through ``torch.compile``: True, False, or a dict
                of ``torch.compile`` arguments (default: ``build_stage``'s ``compile=``). Each
                stage is compiled once per ``RankStage`` (at its first forward) and reused
                by later steps and runners; see ``partitioner.runtime.compile``.
            normalize: how each micro-batch's loss is scaled (``runtime.loop``). ``"mean"``:
                ``loss_fn(out_mb, target_mb) / m``, the full-batch loss when ``loss_fn`` is a
                mean over equal micro-batches, not for a token mean with ignored labels
                spread unevenly. ``"tokens"``: ``loss_fn`` returns a sum
                (``reduction="sum"``) and is divided by the step's count of target elements
                that are not -100, over every micro-batch and replica: the full batch's
                token mean, loss and gradients. A function ``count(target_mb)``: the same
                with its count.

        Returns:
            The ``Runner``.

        Raises:
            PipelineRuntimeError: no ``loss_fn``; ``compile`` with a schedule that splits the
                backward (zb-h1, zbv).
        """
        if loss_fn is None:
            raise PipelineRuntimeError("runner() needs loss_fn=...: the last stage computes the loss")
        if p2p not in ("auto", "ordered"):
            raise PipelineRuntimeError(f"p2p={p2p!r}: expected 'auto' or 'ordered'")
        loop.check_normalize(normalize)
        return Runner(self, resolve_schedule(self.spec, schedule, n_microbatches), loss_fn, batch_size,
                      ordered=p2p == "ordered", compile=self.compile if compile is None else compile,
                      normalize=normalize)

    def as_pipelining_stage(self, stage_index: int, n_microbatches: int | None = None, batch: int | None = None) -> Any:
        """This rank's stage ``stage_index`` as a ``torch.distributed.pipelining.PipelineStage``."""

        return pipelining_stage(self, stage_index, n_microbatches, batch)

    def reduce_tied_grads(self, saved: list[list[torch.Tensor | None]] | None = None) -> None:
        """Sum the gradients of tied tensors over their ranks (call it yourself after a
        step of a torch.distributed.pipelining schedule). ``saved`` holds gradients from
        before this step, which each rank already has in full, so they are not summed."""
        for i, (pg, params) in enumerate(self._tied):
            before = saved[i] if saved is not None else [None] * len(params)
            for p, old in zip(params, before):
                g = p.grad if p.grad is not None else torch.zeros_like(p)
                # a tensor-parallel shard: its local values (the tie's copies are sharded alike)
                dist.all_reduce(local_shard(g), group=pg)
                p.grad = g if old is None else old + g

    def take_tied_grads(self) -> list[list[torch.Tensor | None]]:
        saved = []
        for _, params in self._tied:
            saved.append([p.grad for p in params])
            for p in params:
                p.grad = None
        return saved


class Runner:
    """Runs one training step of this rank's action list per ``step`` call."""

    def __init__(self, stage: RankStage, schedule: Schedule, loss_fn: Callable[[Any, Any], torch.Tensor],
                 batch: int | None, *, ordered: bool = False, compile: CompileOption = False,
                 normalize: loop.Normalize = "mean") -> None:
        plan = stage.plan
        if schedule.n_ranks != stage.n_ranks:
            raise PipelineRuntimeError(f"schedule is for {schedule.n_ranks} ranks, the plan for {stage.n_ranks}")
        if compile_kwargs(compile) is not None:
            check_schedule(schedule)
        self.stage, self.schedule = stage, schedule
        self.replicas = plan.mesh.dp if stage.dp_group is not None else 1
        #: each replica's batch (the plan's global batch / data_parallel)
        self.batch = (batch if batch is not None else int(plan.symbols.get("B", 0))) // self.replicas
        m = schedule.n_microbatches
        problem = split_problem(self.batch, m)
        if problem:
            raise PipelineRuntimeError(problem + " (or pass batch_size=...)")
        tp_mesh = getattr(stage, "tp_mesh", None)  # set by runtime.tensor_parallel when plan.mesh.tp > 1
        self.transport = DistTransport(plan.n_stages, stage.group, tagless=ordered,
                                       tp_group=tp_mesh.get_group() if tp_mesh is not None else None)
        #: the modules the interpreter calls: ``stage.modules``, or their compiled wrappers
        self.modules = compiled_modules(stage, stage.modules, compile)
        #: the step driver (``runtime.driver``) over this rank's one interpreter
        self.driver = StepDriver(stage.spec, self.modules, schedule, self.transport, loss_fn, stage.device,
                                 grad_sync=stage.grad_sync)
        self.interpreter = self.driver.interpreters[0]
        # sequence parallelism: boundary values travel as each TP rank's sequence shard
        tensor_parallel.shard_boundaries(stage, self.transport, self.driver.interpreters)
        # fp16-mixed: the last stage's loss is scaled before backward (the step returns it unscaled)
        self.interpreter.loss_scale = stage.loss_scaler.scale if stage.loss_scaler is not None else None
        self._warned = False
        self.events: list[TraceEvent] = []
        self.normalize = normalize
        self._eval: StepDriver | None = None  # the forward-only driver, made by the first eval_step
        self._recording = False  # PARTITIONER_CHECK_COLLECTIVES: inside the step being recorded

    def _prepare(self, inputs: tuple[Any, ...], kwargs: dict[str, Any], target: Any, seq: int | None,
                 global_batch: int | None, what: str, need_target: bool = True) -> tuple[Any, Any, int, int, Any]:
        """This step's micro-batched inputs (first rank) and targets (last rank), the
        micro-batch size, the sequence length and the loss divisor."""
        stage, m, dev = self.stage, self.schedule.n_microbatches, self.stage.device
        stage.check_initialized()
        plan = stage.plan
        batch = self.batch if global_batch is None else global_batch // self.replicas
        problem = split_problem(batch, m) if global_batch is None or global_batch % self.replicas == 0 else (
            f"batch_size={global_batch} does not divide into {self.replicas} replicas")
        if problem:
            raise PipelineRuntimeError(f"rank {stage.global_rank}: {problem}")
        planned = seq_len(plan)
        if seq is not None and "S" not in plan.symbols:
            raise PipelineRuntimeError(f"rank {stage.global_rank}: {what}(seq_len={seq}), but this plan's inputs have "
                                       "no sequence dimension (no S in plan.symbols): leave seq_len out")
        if seq is not None and seq != planned and static_shapes(plan):
            raise PipelineRuntimeError(
                f"rank {stage.global_rank}: {what}(seq_len={seq}) on a plan whose shapes are static (fixed to its "
                f"example's sequence length {planned}: symbolic shape propagation failed when planning, see plan.notes):"
                f" re-partition with example inputs of length {seq}, or make the model's shapes follow its inputs")
        it = self.interpreter
        mb_inputs = mb_targets = None
        if 0 in it.modules:
            flat = pytree.tree_map(lambda v: v.to(dev) if isinstance(v, torch.Tensor) else v,
                                   stage.spec.flatten_inputs(inputs, kwargs))
            got = batch_size(flat)
            if self.replicas > 1 and got == batch * self.replicas:  # the global batch: take this replica's share
                flat, got = split(flat, self.replicas, got)[stage.dp_rank], batch
            if got != batch:
                raise PipelineRuntimeError(
                    f"rank {stage.rank}: the inputs have batch {got}, the runner expects {batch} (the other ranks "
                    f"size their buffers from it): pass {what}(..., batch_size={got * self.replicas}) on every rank, "
                    f"or runner(..., batch_size={got * self.replicas})")
            seen = seq_len(plan, flat)
            if seen != (planned if seq is None else seq):
                raise PipelineRuntimeError(
                    f"rank {stage.rank}: the inputs have sequence length {seen}, " + (
                        f"{what}(seq_len={seq}) says {seq}" if seq is not None else
                        f"the plan's is {planned}: pass {what}(..., seq_len={seen}) on every rank (the other "
                        "ranks do not see the inputs and size their buffers from it)"))
            mb_inputs = split(flat, m, batch)
        divisor = None
        if it.last in it.modules and (target is not None or need_target):
            if target is None:
                raise PipelineRuntimeError(f"rank {stage.rank} runs the last stage: {what}() needs target=...")
            target = pytree.tree_map(lambda v: v.to(dev) if isinstance(v, torch.Tensor) else v, target)
            if self.replicas > 1 and batch_size(pytree.tree_leaves(target)) == batch * self.replicas:
                target = split(target, self.replicas, batch * self.replicas)[stage.dp_rank]
            mb_targets = split(target, m, batch)
            count = loop.count_targets(self.normalize, mb_targets)
            if count is not None:  # known before any gradient: every micro-batch divides by the same
                divisor = loop.global_count(count, dev, stage.dp_group) / self.replicas
        return mb_inputs, mb_targets, batch // m, planned if seq is None else seq, divisor

    def _share_loss(self, loss: torch.Tensor | None) -> torch.Tensor:
        """Collective over every rank of the job: the step's loss, averaged over the replicas."""
        t = (loss.detach().float().reshape(()).clone() if loss is not None
             else torch.zeros((), dtype=torch.float32, device=self.stage.device))
        dist.all_reduce(t, group=self.stage.job_group)
        # with replicas the job group is the world, whose TP ranks each hold the loss too
        copies = self.replicas * (self.stage.plan.mesh.tp if self.stage.job_group is None else 1)
        return t / copies

    def step(self, *inputs: Any, target: Any = None, trace: str | None = None, seq_len: int | None = None,
             batch_size: int | None = None, loss_on_every_rank: bool = False, profile: str | None = None,
             **kwargs: Any) -> torch.Tensor | None:
        """One forward+backward over every micro-batch. The first rank passes the model's
        inputs, the last rank ``target``; returns the loss on the last rank, else None.
        With ``trace``, every rank must pass it (it gathers events); rank 0 writes the file.

        ``seq_len`` / ``batch_size``: this step's sequence length and global batch, when they
        differ from the plan's (default) / the runner's: every rank passes the same (the
        ranks after the first do not see the inputs); message shapes follow from the plan's
        shapes symbolic in ``B`` and ``S``, with no re-partition. ``loss_on_every_rank``
        (collective): every rank returns the step's loss, averaged over the replicas
        (with data parallelism: the global batch's loss, also on the last stage).
        With ``profile`` (every rank passes the same path), the step runs under
        ``torch.profiler`` (``profile_step``).

        With ``PARTITIONER_CHECK_COLLECTIVES=1`` in the environment, the step's collectives are
        recorded and, after it, checked across every rank of the job (``runtime.collectives``):
        a process group whose members issued different sequences raises ``PipelineRuntimeError``
        on every rank (one more collective over the job per step; for gloo dry runs)."""
        if collectives.check_enabled() and not self._recording:
            self._recording = True
            try:
                with collectives.CollectiveRecorder() as rec:
                    loss = Runner.step(self, *inputs, target=target, trace=trace, seq_len=seq_len,
                                       batch_size=batch_size, loss_on_every_rank=loss_on_every_rank, profile=profile,
                                       **kwargs)
            finally:
                self._recording = False
            collectives.verify_across_ranks(rec, self.stage.global_rank)
            return loss
        if profile is not None:
            return self.profile_step(profile, *inputs, target=target, trace=trace, seq_len=seq_len,
                                     batch_size=batch_size, loss_on_every_rank=loss_on_every_rank, **kwargs)
        if self.stage.recipe.master and not self.stage._master_optimizers and not self._warned:
            self._warned = True
            warnings.warn(f"this plan trains {self.stage.recipe.name}: build the optimizer with stage.optimizer(cls, "
                          "...), which steps the fp32 master weights; an optimizer over stage.parameters() would step "
                          "the low-precision copies (and checkpoints save the masters)", stacklevel=2)
        mb_inputs, mb_targets, mb_size, seq, divisor = self._prepare(inputs, kwargs, target, seq_len, batch_size,
                                                                     "step")
        saved = self.stage.take_tied_grads()
        try:  # the driver logs a failing action with the grid around it
            loss = self.driver.step(mb_size, seq, mb_inputs, mb_targets, loss_divisor=divisor)
        except PipelineRuntimeError as e:
            if self.replicas > 1:  # say which replica, and the rank torchrun knows
                raise PipelineRuntimeError(f"replica {self.stage.dp_rank} of {self.replicas} (global rank "
                                           f"{self.stage.global_rank}): {e}", e.rank, e.action, e.secondary) from e
            raise
        try:  # the buckets' all-reduces were launched during the final backwards: wait, average
            self.stage.sync_replicas()
        except Exception as e:  # a replica died or hung: the all-reduce breaks or times out
            ties = "; FSDP sums the tied weights' copies over the pipeline ranks here too" \
                if getattr(self.stage.grad_sync, "tied", None) else ""
            raise PipelineRuntimeError(
                f"replica {self.stage.dp_rank} of {self.replicas} (global rank {self.stage.global_rank}, pipeline rank "
                f"{self.stage.rank}): averaging gradients over the replicas failed (a replica failed or timed out"
                f"{ties}): {e}",
                self.stage.rank, "gradient all-reduce over replicas", secondary=True) from e
        # Then tied copies sum over this replica's pipeline ranks: a sum of replica averages
        # is the average of the replicas' sums, and the reduced .grad must not change under
        # an all-reduce still in flight, so this comes after.
        self.stage.reduce_tied_grads(saved)
        self.events = self.driver.events
        if trace is not None:
            self.write_trace(trace)
        return self._share_loss(loss) if loss_on_every_rank else loss

    def eval_step(self, *inputs: Any, target: Any = None, return_outputs: bool = False, seq_len: int | None = None,
                  batch_size: int | None = None, loss_on_every_rank: bool = False,
                  **kwargs: Any) -> torch.Tensor | None | tuple[torch.Tensor | None, Any]:
        """Forward only, under ``torch.no_grad``: the schedule's forwards and their messages
        (``loop.forward_schedule``, lowered as every schedule is), every rank calling it.
        Returns the loss on the last rank (None elsewhere, or without ``target``), normalised
        as ``step``'s; with ``return_outputs``, ``(loss, outputs)`` where the last rank's
        outputs are the model's for this rank's batch (micro-batches concatenated along
        dim 0; None on other ranks). Gradients are untouched and no activation is kept.
        The modules' train/eval mode is left as it is: call ``stage.eval()`` for dropout
        off, as with a model. ``seq_len``, ``batch_size``, ``loss_on_every_rank``: as ``step``."""
        stage = self.stage
        mb_inputs, mb_targets, mb_size, seq, divisor = self._prepare(inputs, kwargs, target, seq_len, batch_size,
                                                                     "eval_step", need_target=False)
        if self._eval is None:
            self._eval = StepDriver(stage.spec, stage.modules, loop.forward_schedule(self.schedule), self.transport,
                                    self.interpreter.loss_fn, stage.device)
            tensor_parallel.shard_boundaries(stage, self.transport, self._eval.interpreters)
        driver = self._eval
        with torch.no_grad():
            loss = driver.step(mb_size, seq, mb_inputs, mb_targets, loss_divisor=divisor, keep_outputs=return_outputs)
        if loss_on_every_rank:
            loss = self._share_loss(loss)
        if not return_outputs:
            return loss
        last = driver.last
        return loss, (loop.concat_outputs(last.outputs) if last is not None else None)

    def profile_step(self, path: str, *inputs: Any, target: Any = None, trace: str | None = None,
                     **kwargs: Any) -> torch.Tensor | None:
        """``step(...)`` under ``torch.profiler`` (CPU activity, plus CUDA on a CUDA device;
        ``with_stack=True`` for flame graphs). Collective: every rank passes the same
        ``path``. Writes, for ``path`` = ``"trace.json"``:

        - ``trace.rank{r}.json`` on each rank (``r`` its global rank): the profiler's Chrome
          trace of the step, where each action the interpreter ran is a ``record_function``
          range named by its text (``1F0``, ``1SEND_F0``, ``0W3``) around the operators it
          ran, and each gradient all-reduce over replicas one named by its bucket;
        - ``trace.json`` on pipeline rank 0 (of replica 0 with data parallelism): the
          pipeline's own timeline, every rank's actions as measured in this step beside the
          plan's predicted step (``simulator.predict_plan`` for this runner's schedule), as
          ``trace=`` writes it but with the plan's prediction.

        A step with ``trace=`` as well writes that file too, after these."""


        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.stage.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities, with_stack=True) as prof:
            loss = self.step(*inputs, target=target, **kwargs)
        root, ext = os.path.splitext(path)
        mine = f"{root}.rank{self.stage.global_rank}{ext or '.json'}"
        tmp = f"{mine}.{os.getpid()}.tmp"  # renamed when whole: no half-written trace
        try:
            prof.export_chrome_trace(tmp)
            os.replace(tmp, mine)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        if self.stage.dp_rank == 0:  # a pipeline group's members share their replica: all or none gather
            self.write_trace(path, predicted=predict_plan(self.stage.plan, self.schedule))
        if trace is not None:
            self.write_trace(trace)
        return loss

    def write_trace(self, path: str, predicted: SimResult | None = None) -> None:
        """Collective: gathers the last step's events to rank 0, which writes ``path``
        (``runtime.trace.write_trace``: beside them ``predicted``, default the simulator
        on the stage times measured in this step)."""

        gathered: list[Any] = [None] * dist.get_world_size(self.stage.group) if self.stage.rank == 0 else []
        dst = 0 if self.stage.group is None else dist.get_global_rank(self.stage.group, 0)
        dist.gather_object(self.events, gathered if self.stage.rank == 0 else None, dst=dst, group=self.stage.group)
        if self.stage.rank == 0:
            write_trace(path, [TraceEvent(*e) for evs in gathered for e in evs], self.schedule, predicted)


def build_stage(spec: PipelineSpec, rank: int, device: torch.device | str | None = None, *,
                init_process_group: bool | str = "auto", group: dist.ProcessGroup | None = None,
                timeout_s: float = 300.0, init_fn: Callable[[nn.Module], Any] | None = None,
                seed: int = 0, compile: CompileOption = False) -> RankStage:
    """This rank's stages, copied onto ``device`` (default: the current CUDA device if any, else cpu).

    Tensors on the meta device are allocated on ``device`` for this rank only and
    initialised by their modules (``init_fn(module)`` if given, else ``reset_parameters()``
    and the model's ``_init_weights``), seeded by ``seed`` and each module's path; see
    ``partitioner.runtime.materialize``. Then ``stage.load_checkpoint(path)``.

    ``init_process_group="auto"`` joins the default group from the environment (torchrun,
    ``spawn``) unless one exists; NCCL on CUDA devices, gloo on CPU.

    Args:
        spec: the ``PipelineSpec`` (``runtime.spec``), the same plan on every rank, holding at
            least this rank's stages: ``pipe.pipeline_spec()`` (``pipe.build_stage`` passes
            it), or ``PipelineSpec.build(plan, stages)`` (``.for_rank(rank)`` to drop the
            others'). A ``Pipe`` is accepted and asked for its record.
        rank: this process's rank in ``group``; it runs stages ``s`` with ``plan.stages[s].rank == rank``.
            With data parallelism (``plan.mesh.dp`` > 1): the global rank; the stage's
            ``pp_rank`` and ``dp_rank`` follow from ``plan.mesh``.
        device: where this rank's copies live.
        init_process_group: ``"auto"``/True: join the default group if none exists; False: one must.
        group: the pipeline's process group (default: the default group); its size must be
            the plan's rank count.
        timeout_s: the process group's timeout when this call creates it.
        init_fn: called on each module that owns a meta tensor of this rank, instead of its
            own initialisation.
        seed: seeds that initialisation (with each module's path), equal on every rank.
        compile: the runners' default ``compile=`` (``RankStage.runner``): True runs each
            stage through ``torch.compile``; a dict gives ``torch.compile``'s arguments.

    Returns:
        ``RankStage``: this rank's stage modules (``.modules``), ``runner(...)``,
        ``load_checkpoint`` / ``save_checkpoint`` and ``parameters()`` for the optimizer.

    Raises:
        PipelineRuntimeError: torch.distributed is not initialised, the group's size is not
            the plan's rank count, or this rank runs no stage.
    """
    if device is None:
        device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)  # NCCL binds each rank's communicators to its current device
    if init_process_group and not dist.is_initialized():
        dist.init_process_group(backend_for(dev), init_method="env://", timeout=timedelta(seconds=timeout_s))
    if not dist.is_initialized():
        raise PipelineRuntimeError("build_stage needs torch.distributed initialised (init_process_group=True)")
    spec = as_spec(spec)
    plan = spec.plan
    world = dist.get_world_size(group)
    compile_kwargs(compile)  # a wrong value fails here, not at the first runner
    if plan.mesh.tp > 1:  # tensor parallelism inside each pipeline rank (runtime.tensor_parallel)
        stage = tensor_parallel.build_tensor_parallel(spec, rank, dev, group, init_fn=init_fn, seed=seed,
                                                      compile=compile)
        stage.tensor_parallel_precision()
    elif plan.mesh.dp > 1:
        stage = _build_replica(spec, rank, dev, group, world, init_fn=init_fn, seed=seed)
    else:
        n_ranks = plan.pp_ranks
        if world != n_ranks:
            raise PipelineRuntimeError(f"the plan runs on {n_ranks} ranks, the process group has {world}: "
                                       f"launch {n_ranks} processes or re-partition with n_gpus={world}")
        stage = RankStage(spec, rank, dev, group, init_fn=init_fn, seed=seed)
    stage.compile = compile
    return stage


def _build_replica(spec: PipelineSpec, rank: int, dev: torch.device, group: dist.ProcessGroup | None, world: int, *,
                   init_fn: Callable[[nn.Module], Any] | None, seed: int) -> RankStage:
    """Data parallelism: the world as the plan's ``(dp, pp)`` device mesh; this rank's
    pipeline rank and replica from it."""

    mesh = spec.plan.mesh
    total = mesh.dp * spec.plan.pp_ranks
    if group is not None:
        raise PipelineRuntimeError("a data-parallel plan builds its own device mesh over the default process group: "
                                   "call build_stage without group=")
    if world != total:
        raise PipelineRuntimeError(f"the plan runs {mesh.dp} replicas x {spec.plan.pp_ranks} pipeline ranks = {total} "
                                   f"ranks, the process group has {world}: launch {total} processes or re-partition "
                                   f"with n_gpus={world}")
    if rank != dist.get_rank():
        raise PipelineRuntimeError(f"build_stage(rank={rank}) but this process is global rank {dist.get_rank()}: "
                                   "a data-parallel plan takes the global rank")
    sizes = {"dp": mesh.dp, "pp": spec.plan.pp_ranks}
    if mesh.shard:  # hybrid sharding: the replicas as (replicate, shard), shard innermost (plan.Mesh.shard)
        dm, hsdp, dp = job_mesh(dev, mesh, spec.plan.pp_ranks)
        dp_rank, pp_rank = dp.get_local_rank(), dm.get_local_rank("pp")
        assert (dp_rank, pp_rank) == mesh.coords(rank), "init_device_mesh laid the ranks out unlike plan.mesh"
        return RankStage(spec, pp_rank, dev, dm.get_group("pp"), init_fn=init_fn, seed=seed,
                         dp_group=dp.get_group(), dp_rank=dp_rank, dp_mesh=hsdp)
    dm = init_device_mesh(dev.type, tuple(sizes[d] for d in mesh.dims), mesh_dim_names=tuple(mesh.dims))
    dp_rank, pp_rank = dm.get_local_rank("dp"), dm.get_local_rank("pp")
    assert (dp_rank, pp_rank) == mesh.coords(rank), "init_device_mesh laid the ranks out unlike plan.mesh"
    return RankStage(spec, pp_rank, dev, dm.get_group("pp"), init_fn=init_fn, seed=seed,
                     dp_group=dm.get_group("dp"), dp_rank=dp_rank)


def job_mesh(dev: torch.device, mesh: Mesh, pp_ranks: int) -> tuple[DeviceMesh, DeviceMesh, DeviceMesh]:
    """The job's device mesh as ``plan.mesh`` lays the ranks out (``Mesh.rank``): its ``dims``
    outermost first, ``tp`` innermost where ``mesh.tp`` > 1, and under hybrid sharding
    (``mesh.shard``) ``dp`` as ``(dp_replicate, dp_shard)``, shard innermost (torchtitan's
    ``(dp_replicate, dp_shard, tp)``). Returns (the whole mesh; the mesh ``fully_shard`` takes:
    ``dp``, or HSDP's 2-D ``(dp_replicate, dp_shard)`` (``Replicate`` x ``Shard`` parameters);
    every replica of this rank as one 1-D ``dp`` mesh: broadcasts, loss counts). FSDP over TP
    DTensors needs its mesh and the TP mesh cut from this one parent."""
    names = tuple(n for d in (*mesh.dims, *(("tp",) if mesh.tp > 1 else ()))
                  for n in (("dp_replicate", "dp_shard") if d == "dp" and mesh.shard else (d,)))
    sizes = {"dp": mesh.dp, "pp": pp_ranks, "tp": mesh.tp, "dp_shard": mesh.shard,
             "dp_replicate": mesh.dp // mesh.shard if mesh.shard else 1}
    dm = init_device_mesh(dev.type, tuple(sizes[n] for n in names), mesh_dim_names=names)
    if not mesh.shard:
        return dm, dm["dp"], dm["dp"]
    hsdp = dm["dp_replicate", "dp_shard"]
    return dm, hsdp, hsdp._flatten("dp")  # as torchtitan flattens its data-parallel dimensions


def _alias_groups(names: ModelNames | None, tied: Any) -> dict[str, tuple[str, ...]]:
    """FQN -> all names of the same tensor, from the model's names when known (complete),
    else from the plan's ``tied_parameters``."""
    groups = [tuple(g) for g in (names.tied if names is not None else tied)]
    return {n: g for g in groups for n in g}


def _retarget_meta_devices(gm: nn.Module, device: torch.device) -> None:
    """A graph captured from a meta model holds ``device=meta`` constants (torch.export bakes
    ``arange(..., device=x.device)`` and ``_assert_tensor_metadata(device=...)`` in): they
    name the rank's device instead, as ``torch.export.passes.move_to_device_pass`` does."""
    graph = getattr(gm, "graph", None)
    if graph is None:
        return
    swap = lambda v: device if isinstance(v, torch.device) and v.type == "meta" else v  # noqa: E731
    changed = False
    for node in graph.nodes:
        args, kwargs = pytree.tree_map(swap, node.args), pytree.tree_map(swap, node.kwargs)
        if args != node.args or kwargs != node.kwargs:
            node.args, node.kwargs = args, kwargs
            changed = True
    if changed:
        gm.recompile()  # type: ignore[operator]
