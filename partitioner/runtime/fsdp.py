"""FSDP2 inside pipeline stages: ``plan.mesh.zero == 3`` with replicas (``plan.mesh.dp`` > 1).

Instead of whole replicas averaging their gradients (``runtime.grad_sync.GradSync``), each
pipeline rank's stage modules are sharded over the replicas of that pipeline rank with
PyTorch's ``torch.distributed.fsdp.fully_shard`` (FSDP2): between steps every replica
holds 1/dp of each parameter (a ``DTensor`` sharded on dim 0), its gradient and so the
optimizer state over it.

Units. A stage graph keeps the model's module names: each leaf the graph calls
(``call_module``, e.g. ``transformer.h.0.attn.c_attn``) is a submodule at that path. The
leaves with parameters under one repeated block (the shortest path prefix ending in a
list index, e.g. ``transformer.h.0``) are sharded together as one unit
(``fully_shard([leaves])``): FSDP gathers a unit when the first of its leaves runs. The
block module itself is never called by the flat graph, so it cannot carry FSDP's hooks;
its called leaves do. Everything else (parameters read by ``get_attr``, leaves outside
blocks, weights shared between modules) belongs to the stage module's own unit
(``fully_shard(stage)``, applied last). A block one of whose parameters the graph also
reads by ``get_attr`` stays in the stage's unit too (its hooks would not fire there).

One gather and one reduce-scatter per step, as ``torch.distributed.pipelining`` runs FSDP
(``PipelineStage.backward_maybe_with_nosync`` / ``perform_reduce_grad``) and torchtitan
configures it with pipelining: units are not resharded after forward
(``reshard_after_forward=False``), so the first forward of the step all-gathers each unit
and later micro-batches reuse the gathered weights; every backward of the step runs with
gradient sync and resharding off (``set_requires_gradient_sync(False)``,
``set_reshard_after_backward(False)``), accumulating full gradients; after the rank's last
action (``Runner.step`` → ``RankStage.sync_replicas`` → ``FsdpSync.finish``) each unit's
``post_backward`` reduce-scatters (averaging over the replicas) and reshards, then FSDP's
root callback waits for the reductions. Split backward (``zb-h1``, ``zbv``) accumulates
the weights' gradients into the gathered parameters by hand in ``W``; they are reduced
with the rest at the end. Memory during the step is therefore the stage's gathered
weights and full gradients on top of the shards (``partitioner.data_parallel.fsdp_static``
prices it so).

Tied weights across pipeline ranks: each copy is sharded the same way (dim 0 over the same
replica count), so summing the copies' full gradients over the tie's ranks of one replica
before the reduce-scatter gives every copy the summed, replica-averaged gradient. This
module does that in ``finish`` and takes the tie groups over from ``RankStage`` (whose own
sum of ``.grad`` would run on shards after the step). A tensor shared by two stage
modules of one rank (``zbv`` puts the first and last stage on one rank) cannot be owned by
two FSDP roots: refused. Only fp32 plans: a mixed-precision plan is refused (its fp32
masters and casts are ``runtime.precision``'s, which this path does not combine with
FSDP's ``MixedPrecisionPolicy``).

After the step the module parameters are the sharded ``DTensor`` parameters again, which
``stage.optimizer(...)`` built the optimizer over; ``RankStage.grad_norm`` takes the norm
over the local shards and every rank of the job (``local_grads``).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from partitioner.runtime.errors import PipelineRuntimeError

if TYPE_CHECKING:  # stage.py imports this module; the type points back without an import cycle
    from partitioner.runtime.stage import RankStage

__all__ = ["FsdpSync", "shard_stage", "units", "local_grads", "is_sharded"]

_INDEX = re.compile(r"^\d+$")


def units(gm: nn.Module) -> list[tuple[str, list[str]]]:
    """The stage's sharding units besides the stage module itself: (block path, the paths of
    the leaves with parameters the graph calls under it), in graph order. See the module
    docstring for which blocks qualify."""
    graph = getattr(gm, "graph", None)
    if graph is None:
        return []
    counts: dict[int, int] = {}
    for _, p in gm.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    read = [str(n.target) for n in graph.nodes if n.op == "get_attr"]
    blocks: dict[str, list[str]] = {}
    spoiled: set[str] = set()
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        path = str(node.target)
        parts = path.split(".")
        cut = next((i for i, part in enumerate(parts[:-1]) if _INDEX.match(part)), None)
        if cut is None:
            continue  # not under a repeated block: the stage's unit
        block = ".".join(parts[:cut + 1])
        leaf = gm.get_submodule(path)
        params = list(leaf.parameters())
        if not params:
            continue
        leaves = blocks.setdefault(block, [])
        if path not in leaves:
            leaves.append(path)
        if any(counts[id(p)] > 1 for p in params):  # a weight shared with another module
            spoiled.add(block)
    for target in read:
        spoiled.update(b for b in blocks if target.startswith(b + "."))
    return [(b, leaves) for b, leaves in blocks.items() if b not in spoiled]


def _roots(stage: RankStage) -> list[nn.Module]:
    return [m for m in stage.modules.values() if isinstance(m, FSDPModule)]


def is_sharded(stage: RankStage) -> bool:
    """Whether this rank's stages are FSDP-sharded (``zero=3``)."""
    return isinstance(stage.grad_sync, FsdpSync)


def local_grads(grads: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Each gradient's local part: a sharded ``DTensor``'s shard, another tensor itself."""
    return [g.to_local() if isinstance(g, DTensor) else g for g in grads]


def _check(stage: RankStage) -> None:
    plan = stage.plan
    name = plan.options.get("precision")
    floating = [n for n, p in stage.named_parameters() if p.is_floating_point() and p.dtype != torch.float32]
    if name not in (None, "fp32") or floating:
        raise PipelineRuntimeError(
            f"rank {stage.global_rank}: zero=3 (FSDP inside the stages) runs fp32 plans only; this plan's precision is "
            f"{name!r}" + (f" and parameters {floating[:3]} are not fp32" if floating else "")
            + ": re-partition with precision='fp32', or with zero=1 (ZeRO-1 supports mixed precision)")
    owner: dict[int, int] = {}
    for s, mod in stage.modules.items():
        for n, p in mod.named_parameters(remove_duplicate=False):
            if owner.setdefault(id(p), s) != s:
                raise PipelineRuntimeError(
                    f"rank {stage.global_rank}: parameter {n!r} is shared by stages {owner[id(p)]} and {s}, both on "
                    "this rank (a tied weight the schedule places twice on one rank, e.g. zbv's V): zero=3 shards "
                    "each stage module with its own FSDP root and cannot give one tensor two owners; use a schedule "
                    "that puts the tied stages on different ranks (1f1b, zb-h1, gpipe) or zero=1")


def shard_stage(stage: RankStage) -> FsdpSync:
    """Shard this rank's stage modules over its replicas (``stage.dp_group``) in place and
    return the ``FsdpSync`` that runs the step's gradient reduction. Call after replica 0's
    values were broadcast (each replica keeps its own slice of the equal full tensors)."""
    _check(stage)
    group = stage.dp_group
    assert group is not None
    mesh = DeviceMesh.from_group(group, stage.device.type)
    names = {id(p): n for n, p in stage.named_parameters()}
    tied = [(pg, [names[id(p)] for p in params]) for pg, params in stage._tied]
    for mod in stage.modules.values():
        for _, leaves in units(mod):
            fully_shard([mod.get_submodule(p) for p in leaves], mesh=mesh, reshard_after_forward=False)
        fully_shard(mod, mesh=mesh, reshard_after_forward=False)
    # The tie sums move here, onto the full gradients before the reduce-scatter (module docstring).
    stage._tied = []
    return FsdpSync(_roots(stage), tied)


def _fsdp_params(root: nn.Module) -> dict[str, Any]:
    """FQN (the stage's, i.e. the model's) -> FSDPParam, over every unit of ``root``."""
    state = fully_shard.state(root)  # type: ignore[attr-defined]
    return {fp._param_fqn: fp for st in state._state_ctx.all_states for g in st._fsdp_param_groups
            for fp in g.fsdp_params}


class FsdpSync:
    """The step's gradient reduction under FSDP, in ``runtime.grad_sync.GradSync``'s place
    (the interpreter's ``GradReady`` calls, and ``finish``)."""

    def __init__(self, roots: Sequence[nn.Module], tied: Sequence[tuple[dist.ProcessGroup, list[str]]]) -> None:
        self.roots = list(roots)
        #: (the tie's group in this replica, this rank's names of the tied tensor)
        self.tied = list(tied)

    def _set(self, on: bool) -> None:
        for root in self.roots:
            m: Any = root
            m.set_is_last_backward(on)
            m.set_requires_gradient_sync(on)
            m.set_reshard_after_backward(on)

    def begin(self, order: Sequence[int]) -> None:
        """A step starts: every backward accumulates full gradients, nothing reduced or resharded."""
        del order
        self._set(False)

    def arm(self, stage: int) -> None:
        del stage

    def ready(self, stage: int) -> None:
        """Reductions wait for ``finish``: a tie's all-reduce pairs ranks whose final backwards
        come at different times, which a blocking collective mid-schedule could deadlock."""
        del stage

    def _sum_tied(self) -> None:
        if not self.tied:
            return
        params: dict[str, Any] = {}
        for root in self.roots:
            params.update(_fsdp_params(root))
        with torch.no_grad():
            for pg, names in self.tied:
                fp = next((params[n] for n in names if n in params), None)
                if fp is None or not hasattr(fp, "_unsharded_param"):
                    raise PipelineRuntimeError(f"tied weight {names}: this rank has no gathered copy to sum "
                                               "(its stages ran no forward this step)")
                acc = fp.unsharded_accumulated_grad
                g = acc if acc is not None else fp.unsharded_param.grad
                if g is None:
                    g = torch.zeros_like(fp.unsharded_param)
                    fp.unsharded_param.grad = g
                dist.all_reduce(g, group=pg)

    def finish(self) -> None:
        """After the rank's last action: sum tied copies' full gradients over their pipeline
        ranks, then reduce-scatter every unit's gradients over the replicas (averaged) and
        reshard, as ``PipelineStage.perform_reduce_grad`` does."""
        self._sum_tied()
        self._set(True)
        for root in self.roots:
            state = fully_shard.state(root)  # type: ignore[attr-defined]
            for st in state._state_ctx.all_states:
                for group in st._fsdp_param_groups:
                    group.post_backward()
            state._root_post_backward_final_callback()
