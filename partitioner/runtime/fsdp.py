"""FSDP2 inside pipeline stages: ``plan.mesh.zero == 3`` with replicas (``plan.mesh.dp`` > 1).

Instead of whole replicas averaging their gradients (``runtime.grad_sync.GradSync``), each
pipeline rank's stage modules are sharded over the replicas of that pipeline rank with
PyTorch's ``torch.distributed.fsdp.fully_shard`` (FSDP2): between steps every replica
holds 1/dp of each parameter (a ``DTensor`` sharded on dim 0), its gradient and so the
optimizer state over it.

Units. A stage graph keeps the model's module names. On the ``torch.fx`` route each leaf the
graph calls (``call_module``, e.g. ``transformer.h.0.attn.c_attn``) is a submodule at that path,
and the leaves with parameters under one repeated block (the shortest path prefix ending in a
list index, e.g. ``transformer.h.0``) are sharded together as one unit (``fully_shard([leaves])``):
FSDP gathers a unit when the first of its leaves runs. The block module itself is never called
by the flat graph, so it cannot carry FSDP's hooks; its called leaves do. On the
``torch.export`` route (every Hugging Face model) the graph calls nothing and reads every weight
by ``get_attr``: ``runtime.outline.outline_blocks`` first moves each block's span of the graph
(``partitioner.memory.fsdp_spans``) into one call of a small ``GraphModule`` installed at the
block's own path, owning the same parameters under the same names, and that module is the unit
(its inputs are not cast on entry under mixed precision: the graph's own dtypes rule, as in the
flat graph). The token embeddings and the output head are units of their own too, as torchtitan
shards ``tok_embeddings`` and ``output`` (on Llama 3 8B each is 128k x 4096, which the stage's
own unit would keep gathered through the whole stage): the embeddings the graph calls
(``nn.Embedding`` leaves) or reads by ``aten.embedding`` form one unit, and the last linear
after every block (the head producing the logits) another, each outlined on the export route
into a call of the module holding its weights (``memory.fsdp_units`` has the rule). A weight
the embedding and the head share on one rank (tied, both stages there, or one stage) keeps
them in the stage's unit; tied across pipeline ranks, each rank's copy is its own unit and the
tie sums below still line up (the copies are sharded alike). Everything else (parameters read
by ``get_attr`` outside blocks, leaves outside blocks, weights shared between modules, a block
whose span overlaps another's or that a recomputed region cuts in part) belongs to the stage
module's own unit (``fully_shard(stage)``, applied last). A block of leaves one of whose parameters the graph also reads by ``get_attr``
outside its span stays in the stage's unit too (its hooks would not fire there).

Two modes, chosen when the stage is built (``mode``: the plan's ``mesh.fsdp``, else the
plan's schedule), each priced as it runs (``partitioner.data_parallel.fsdp_static`` / ``fsdp_comm_s``):

- ``"unit"`` (schedules with a whole backward ``B``: 1f1b, gpipe, interleaved-1f1b):
  ZeRO-3 proper, FSDP's own defaults. A unit is gathered before its forward and freed
  after it (``reshard_after_forward=True``), gathered again for its backward, and its
  gradient is reduce-scattered (averaged over the replicas) into the sharded gradient by
  FSDP's post-backward hook at each micro-batch's backward. Memory: the shards plus the
  gathered units in flight; traffic per step: m x (2 all-gathers + 1 reduce-scatter).
- ``"step"`` (schedules that split the backward, zb-h1 and zbv, whose ``W`` accumulates the
  weights' gradients by hand after FSDP's post-backward hook has fired in ``I``; any other
  schedule whose plan says ``mesh.fsdp == "step"``, its ``B`` accumulating the same way): one
  gather and one reduce-scatter per step, as ``torch.distributed.pipelining`` runs FSDP
  (``PipelineStage.backward_maybe_with_nosync`` / ``perform_reduce_grad``) and torchtitan
  configures it with pipelining. Units stay gathered from the first forward
  (``reshard_after_forward=False``); every backward of the step runs with gradient sync
  and resharding off, accumulating full gradients; after the rank's last action
  (``Runner.step`` → ``RankStage.sync_replicas`` → ``FsdpSync.finish``) each unit's
  ``post_backward`` reduce-scatters and reshards, then FSDP's root callback waits for the
  reductions. Memory: the shards plus the stage's gathered weights and full gradients.

A runner whose schedule splits the backward on a stage built in ``"unit"`` mode (a zb-h1
runner on a 1f1b plan) would leave ``W``'s gradients unreduced: ``finish`` finds them and
refuses (re-partition with that schedule).

Tied weights across pipeline ranks: each copy is sharded the same way (dim 0 over the same
replica count), so the copies' shards on one replica line up and summing them over the
tie's ranks of that replica gives every copy the summed, replica-averaged gradient. In
``"step"`` mode the full gradients are summed before the reduce-scatter; in ``"unit"``
mode the step's new sharded gradients after it (a gradient kept from before the step is
added back afterwards, not summed). This module does it in ``finish`` and takes the tie
groups over from ``RankStage``. A tensor shared by two stage
modules of one rank (``zbv`` puts the first and last stage on one rank) cannot be owned by
two FSDP roots: refused.

Precision (``policy``): fp32, or ``"bf16-mixed"`` / ``"fp16-mixed"`` as FSDP's
``MixedPrecisionPolicy``: the sharded fp32 parameters are the masters, each unit is
gathered in bf16 and its gradient
reduce-scattered in fp32 into the fp32 sharded gradient; ``stage.optimizer`` is the plain
optimizer over the shards, and ``runtime.precision`` only casts the buffers and retypes the
graphs (before ``fully_shard``). ``"fp16-mixed"`` the same in fp16, with
``runtime.precision``'s loss scaling (one verdict for the job) on the shards' gradients, which
``stage.optimizer`` (``MixedPrecisionOptimizer(own_masters=True)``) unscales in place. Pure
``"bf16"`` is refused.

Hybrid sharding (HSDP, ``plan.mesh.shard`` = S): ``stage.dp_mesh`` is the 2-D
``(dp_replicate, dp_shard)`` mesh ``build_stage`` cut from the job's (``dp / S`` x S, shard
innermost, inside a node) and ``fully_shard`` gets it as FSDP2 takes HSDP: parameters
``(Replicate(), Shard(0))``, gathered and reduce-scattered over the S shards, each
reduce-scattered gradient then all-reduced over the replicate dimension (averaged over all dp
replicas). Tied copies line up as above (same mesh, same placements). Not with tensor
parallelism yet (refused).

With tensor parallelism (``mesh.tp`` > 1) the stage's parameters are already DTensors on the TP
mesh; ``stage.dp_mesh`` is then the replicas' dimension of the same parent mesh and FSDP shards
each DTensor again over it (2-D parameters on the (dp, tp) mesh, torchtitan's composition).

After the step the module parameters are the sharded ``DTensor`` parameters again, which
``stage.optimizer(...)`` built the optimizer over; ``RankStage.grad_norm`` takes the norm
over the local shards and every rank of the job (``local_grads``), or with tensor parallelism
each 2-D DTensor's whole norm (``full_tensor``: a TP-replicated shard counted once) summed over
the pipeline.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any, Iterable, Sequence, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from partitioner.data_parallel import splits_backward
from partitioner.memory import fsdp_units
from partitioner.runtime.errors import PipelineRuntimeError
from partitioner.runtime.outline import outline_blocks
from partitioner.runtime.precision import recipe
from partitioner.runtime.spec import resolve_schedule

if TYPE_CHECKING:  # stage.py imports this module; the type points back without an import cycle
    from partitioner.runtime.stage import RankStage

__all__ = ["FsdpSync", "shard_stage", "units", "local_grads", "is_sharded", "mode", "policy"]


def units(gm: nn.Module) -> list[tuple[str, list[str]]]:
    """The stage's sharding units besides the stage module itself: (block path, the paths of
    the modules sharded as the unit: the leaves with parameters the graph calls under the
    block, or the block itself once ``runtime.outline`` made it one call); the planner's rule
    (``partitioner.memory.fsdp_units``), so what runs is what was priced."""
    return fsdp_units(gm)


def _roots(stage: RankStage) -> list[nn.Module]:
    return [m for m in stage.modules.values() if isinstance(m, FSDPModule)]


def is_sharded(stage: RankStage) -> bool:
    """Whether this rank's stages are FSDP-sharded (``zero=3``)."""
    return isinstance(stage.grad_sync, FsdpSync)


def local_grads(grads: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Each gradient's local part: a sharded ``DTensor``'s shard, another tensor itself."""
    return [g.to_local() if isinstance(g, DTensor) else g for g in grads]


def policy(stage: RankStage) -> MixedPrecisionPolicy:
    """FSDP's ``MixedPrecisionPolicy`` for the plan's precision: fp32, nothing cast;
    ``"bf16-mixed"`` / ``"fp16-mixed"``: the fp32 shards are the masters, gathered in the
    compute dtype and the gradients reduce-scattered in fp32 into fp32 shards (fp16: with the
    loss scale in them, which ``stage.optimizer`` takes out). Pure ``"bf16"`` (bf16 weights
    stepped as they are) is refused."""
    name = stage.plan.options.get("precision")
    r = recipe(stage.plan, stage.spec.param_dtype)
    floating = [n for n, p in stage.named_parameters() if p.is_floating_point() and p.dtype != torch.float32]
    if floating or (r.cast and r.name not in ("bf16-mixed", "fp16-mixed")):
        raise PipelineRuntimeError(
            f"rank {stage.global_rank}: zero=3 (FSDP inside the stages) runs fp32 models in fp32, bf16-mixed or "
            "fp16-mixed only; "
            f"this plan's precision is {name!r}" + (f" and parameters {floating[:3]} are not fp32" if floating else "")
            + ": re-partition with precision='bf16-mixed' or 'fp32', or with zero=1 (ZeRO-1 supports every "
            "precision)")
    if not r.cast:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=r.compute, reduce_dtype=torch.float32)


def _check(stage: RankStage) -> None:
    owner: dict[int, int] = {}
    for s, mod in stage.modules.items():
        for n, p in mod.named_parameters(remove_duplicate=False):
            if owner.setdefault(id(p), s) != s:
                raise PipelineRuntimeError(
                    f"rank {stage.global_rank}: parameter {n!r} is shared by stages {owner[id(p)]} and {s}, both on "
                    "this rank (a tied weight the schedule places twice on one rank, e.g. zbv's V): zero=3 shards "
                    "each stage module with its own FSDP root and cannot give one tensor two owners; use a schedule "
                    "that puts the tied stages on different ranks (1f1b, zb-h1, gpipe) or zero=1")


def mode(stage: RankStage) -> str:
    """The mode the planner priced: the plan's ``mesh.fsdp`` where it is set (``"step"`` for
    any schedule, ``"unit"`` for a whole backward only: the loader refuses it with a split
    one); else, as plans written before the field, ``"step"`` when the plan's schedule splits
    the backward (``I``/``W``), else ``"unit"`` (``partitioner.data_parallel.splits_backward``)."""
    if stage.plan.mesh.fsdp:
        return stage.plan.mesh.fsdp
    sched = resolve_schedule(stage.plan)  # the schedule the plan was priced for
    return "step" if splits_backward(sched) else "unit"


def shard_stage(stage: RankStage) -> FsdpSync:
    """Shard this rank's stage modules over its replicas (``stage.dp_group``) in place and
    return the ``FsdpSync`` that runs the step's gradient reduction. Call after replica 0's
    values were broadcast (each replica keeps its own slice of the equal full tensors)."""
    _check(stage)
    mp = policy(stage)
    group = stage.dp_group
    assert group is not None
    if stage.plan.mesh.shard and (stage.dp_mesh is None or stage.dp_mesh.ndim != 2):
        raise PipelineRuntimeError(
            f"rank {stage.global_rank}: the plan shards zero=3 hybrid (mesh.shard={stage.plan.mesh.shard}), which "
            "needs the 2-D (replicate, shard) mesh build_stage makes (runtime.stage.job_mesh): build the rank with "
            "build_stage, or re-partition without fsdp_shard")
    # with tensor parallelism the replicas' mesh is cut from the job's (dp, pp, tp) mesh: FSDP
    # then shards the TP DTensors over dp, parameters becoming DTensors on the (dp, tp) mesh;
    # with hybrid sharding it is the 2-D (dp_replicate, dp_shard) mesh (HSDP; with TP the
    # parameters are DTensors on (dp_replicate, dp_shard, tp), as torchtitan composes them)
    mesh = stage.dp_mesh if stage.dp_mesh is not None else DeviceMesh.from_group(group, stage.device.type)
    names = {id(p): n for n, p in stage.named_parameters()}
    tied = [(pg, [names[id(p)] for p in params]) for pg, params in stage._tied]
    how = mode(stage)
    # An outlined block runs the graph's own operations on the graph's own dtypes: its inputs are
    # not cast on entry (the stage module's unit casts the stage's inputs, as before outlining).
    inner = replace(mp, cast_forward_inputs=False)
    for mod in stage.modules.values():
        outlined = set(outline_blocks(mod))  # export captures: each block's span becomes one call
        graph = getattr(mod, "graph", None)
        called = {str(n.target) for n in graph.nodes if n.op == "call_module"} if graph is not None else set()
        for block, leaves in units(mod):
            if not set(leaves) <= called:  # a block left flat (outline_blocks logs why): the stage's unit,
                continue  # as a module never called would never be gathered
            fully_shard([mod.get_submodule(p) for p in leaves], mesh=mesh, reshard_after_forward=how == "unit",
                        mp_policy=inner if block in outlined else mp)
        fully_shard(mod, mesh=mesh, reshard_after_forward=how == "unit", mp_policy=mp)
    # The tie sums move here, onto the gradients FSDP reduces (module docstring).
    stage._tied = []
    return FsdpSync(stage, tied, how)


def _fsdp_params(root: nn.Module) -> dict[str, Any]:
    """FQN (the stage's, i.e. the model's) -> FSDPParam, over every unit of ``root``."""
    state = fully_shard.state(root)  # type: ignore[attr-defined]
    return {fp._param_fqn: fp for st in state._state_ctx.all_states for g in st._fsdp_param_groups
            for fp in g.fsdp_params}


def _whole_unsharded_grad(fp: Any) -> torch.Tensor:
    """The step's whole gradient of an FSDP parameter still gathered (``"step"`` mode, before
    the reduce-scatter), as one tensor in the dtype FSDP reduces it in, where FSDP will read it.

    A backward that ran under FSDP's hooks moves the gradient into ``unsharded_accumulated_grad``
    in the policy's ``reduce_dtype`` (fp32 under bf16-mixed); one computed by hand (a split
    backward's ``W``) stays in ``unsharded_param.grad`` in the compute dtype (bf16); a
    parameter may have both (earlier micro-batches through the hooks, the last by hand), or
    neither. The copies of a tie are summed over their pipeline ranks from this tensor, so
    every rank must give the same dtype (NCCL takes each rank's count and dtype as given: a
    bf16 copy beside an fp32 one reads the wrong bytes or hangs) and the whole gradient
    (a part left out would be added after the sum, on one rank only): here both parts are
    folded as FSDP's ``post_backward`` folds them, into the reduce dtype, and a missing
    gradient is zeros of that dtype."""
    fp.accumulate_unsharded_grad_if_needed()  # both parts: the by-hand part into the accumulated one
    fp.to_accumulated_grad_if_needed()  # only the by-hand part, in the compute dtype: cast to the reduce dtype
    if fp.unsharded_accumulated_grad is not None:
        return fp.unsharded_accumulated_grad
    if fp.unsharded_param.grad is None:
        dtype = fp.reduce_dtype if fp.reduce_dtype is not None else fp.unsharded_param.dtype
        zeros = torch.zeros_like(fp.unsharded_param, dtype=dtype)
        if dtype == fp.unsharded_param.dtype:
            fp.unsharded_param.grad = zeros
        else:
            fp.unsharded_accumulated_grad = zeros
        return zeros
    return fp.unsharded_param.grad


class FsdpSync:
    """The step's gradient reduction under FSDP, in ``runtime.grad_sync.GradSync``'s place
    (the interpreter's ``GradReady`` calls, and ``finish``)."""

    def __init__(self, stage: RankStage, tied: Sequence[tuple[dist.ProcessGroup, list[str]]], how: str) -> None:
        self.stage, self.roots, self.mode = stage, _roots(stage), how
        #: (the tie's group in this replica, this rank's names of the tied tensor)
        self.tied = list(tied)
        self._kept: list[torch.Tensor | None] = []  # "unit": tied shards' gradients from before the step
        self._had: list[bool] = []  # "unit": per root, whether a gradient was there before the step

    def _set(self, on: bool) -> None:
        for root in self.roots:
            m: Any = root
            m.set_is_last_backward(on)
            m.set_requires_gradient_sync(on)
            m.set_reshard_after_backward(on)

    def _tied_params(self) -> list[tuple[dist.ProcessGroup, list[str], nn.Parameter]]:
        named = dict(self.stage.named_parameters())
        return [(pg, names, next(named[n] for n in names if n in named)) for pg, names in self.tied]

    def begin(self, order: Sequence[int]) -> None:
        """A step starts. ``"step"``: every backward accumulates full gradients, nothing is
        reduced or resharded until ``finish``. ``"unit"``: FSDP's defaults; the tied shards'
        gradients from before the step are set aside (they must not be summed again)."""
        del order
        if self.mode == "step":
            self._set(False)
            return
        self._kept = []
        self._had = [any(p.grad is not None for p in root.parameters()) for root in self.roots]
        for _, _, p in self._tied_params():
            self._kept.append(p.grad)
            p.grad = None

    def arm(self, stage: int) -> None:
        del stage

    def ready(self, stage: int) -> None:
        """Reductions are FSDP's (``"unit"``) or wait for ``finish`` (``"step"``: a tie's
        all-reduce pairs ranks whose final backwards come at different times, which a
        blocking collective mid-schedule could deadlock)."""
        del stage

    def _sum_tied_full(self) -> None:
        params: dict[str, Any] = {}
        for root in self.roots:
            params.update(_fsdp_params(root))
        with torch.no_grad():
            for pg, names in self.tied:
                fp = next((params[n] for n in names if n in params), None)
                if fp is None or not hasattr(fp, "_unsharded_param"):
                    raise PipelineRuntimeError(f"rank {self.stage.global_rank}: tied weight {names}: this rank has no "
                                               "gathered copy to sum (its stages ran no forward this step)")
                g = _whole_unsharded_grad(fp)
                dist.all_reduce(g.to_local() if isinstance(g, DTensor) else g, group=pg)

    def _sum_tied_shards(self) -> None:
        with torch.no_grad():
            for (pg, _, p), old in zip(self._tied_params(), self._kept):
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(cast(DTensor, p.grad).to_local(), group=pg)
                if old is not None:
                    p.grad += old
        self._kept = []

    def _check_reduced(self) -> None:
        """``"unit"``: refuse a step whose weight gradients missed FSDP's reduction, as a
        split backward's do: a gathered parameter still holding a gradient (written after
        FSDP reduced and resharded), or a stage none of whose weights got one (its ``I``/``W``
        ran on the sharded parameters, which the forward's graph never used)."""
        left = [n for root in self.roots for n, fp in _fsdp_params(root).items()
                if hasattr(fp, "_unsharded_param") and fp._unsharded_param.grad is not None]
        # A split backward's I hands autograd the sharded parameters (the forward resharded):
        # then no weight of the stage gets a gradient at all.
        left += [next(n for n, _ in root.named_parameters()) for root, had in zip(self.roots, self._had)
                 if not had and any(p.requires_grad for p in root.parameters())
                 and all(p.grad is None for p in root.parameters())]
        if left:
            raise PipelineRuntimeError(
                f"rank {self.stage.global_rank}: gradients of {left[:3]}{' …' if len(left) > 3 else ''} were "
                "computed after FSDP reduced them, or never: this runner's schedule splits the backward (zb-h1, zbv) but the "
                "plan's does not, and zero=3 shards per unit for the plan's schedule; re-partition with the "
                "schedule you run (a split-backward plan shards for one reduction per step)")

    def finish(self) -> None:
        """After the rank's last action. ``"step"``: sum tied copies' full gradients over
        their pipeline ranks, then reduce-scatter every unit's gradients over the replicas
        (averaged) and reshard, as ``PipelineStage.perform_reduce_grad`` does. ``"unit"``:
        FSDP has reduced each micro-batch's gradients; sum the tied shards."""
        if self.mode == "unit":
            self._check_reduced()
            self._sum_tied_shards()
            return
        self._sum_tied_full()
        self._set(True)
        for root in self.roots:
            state = fully_shard.state(root)  # type: ignore[attr-defined]
            for st in state._state_ctx.all_states:
                for group in st._fsdp_param_groups:
                    group.post_backward()
            state._root_post_backward_final_callback()
