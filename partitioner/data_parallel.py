"""Pipeline x data parallelism: the replicas' gradient all-reduce, ZeRO-1 memory, and where
ranks sit on nodes (docs/ARCHITECTURE.md, "Data parallelism").

``n_gpus = dp x pp``: ``dp`` replicas of one ``pp``-rank pipeline, each on ``1/dp`` of the
global batch. Replicas of a pipeline rank average their gradients once per step (the
runtime wraps the stage modules in PyTorch's ``DistributedDataParallel``); the plan prices
that as a ring all-reduce, 2(dp-1) messages of ``grad_bytes / dp`` each over the link the
replicas share, starting when the rank has run its last action of the step. A rank whose
list ends early (the last stages under 1F1B) hides its all-reduce in the others' cool-down;
the first rank's is exposed. ZeRO-1 (``zero=1``, PyTorch's ``ZeroRedundancyOptimizer``)
keeps 1/dp of the optimizer state (fp32 master weights and moments) per rank and, after the
update, gathers the parameters back: (dp-1) messages of ``weight_bytes / dp``.

Ranks map to the mesh as ``partitioner.plan.Mesh`` says (``dims`` ``("dp", "pp")``: rank =
d * pp + p), and to nodes in blocks of ``gpus_per_node`` (torchrun's order); the planner
prices candidate ``Mesh``es and records the one it keeps. A message between ranks on one
node uses ``link``, between nodes ``inter_link``. Pure Python (no torch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from partitioner.plan import Mesh

if TYPE_CHECKING:  # cost_models.devices imports torch; this module needs only the objects' methods
    from cost_models.devices import LinkSpec

__all__ = ["ring_allreduce_s", "allgather_s", "placements", "divisors", "ZeroShard", "price_replicas", "boundary_links"]


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def ring_allreduce_s(nbytes: float, dp: int, link: LinkSpec) -> float:
    """Ring all-reduce of ``nbytes`` over ``dp`` ranks: reduce-scatter then all-gather,
    2(dp-1) steps each sending ``nbytes / dp`` (Patarasuk and Yuan 2009; NCCL's ring)."""
    if dp <= 1 or nbytes <= 0:
        return 0.0
    return 2 * (dp - 1) * link.transfer_time(nbytes / dp)


def allgather_s(nbytes: float, dp: int, link: LinkSpec) -> float:
    """Ring all-gather of ``nbytes`` (each rank holds ``nbytes / dp``): dp-1 steps."""
    if dp <= 1 or nbytes <= 0:
        return 0.0
    return (dp - 1) * link.transfer_time(nbytes / dp)


def placements(dp: int, pp: int, gpus_per_node: int | None) -> list[Mesh]:
    """The layouts worth pricing: on one node only the default (``("dp", "pp")``); across
    nodes both dimension orders (pipelines inside nodes, or each stage's replicas inside)."""
    g = gpus_per_node or 0
    first = Mesh(dp, pp, ("dp", "pp"), g)
    if not g or first.n_nodes == 1 or dp == 1 or pp == 1:
        return [first]
    return [first, Mesh(dp, pp, ("pp", "dp"), g)]


@dataclass(frozen=True)
class ZeroShard:
    """Per position of the solver's order, the trainable parameter elements first used there,
    so a stage's gradient bytes and optimizer bytes follow from its span."""

    uses: Sequence[tuple[int, ...]]  # per position: ids of the tensors it uses (memory.Static.uses)
    numel: dict[int, int]  # id -> elements, trainable parameters only
    grad_width: int  # bytes per gradient element (the precision's parameter width)
    optimizer_bytes: int  # bytes per trainable element held by the optimizer (master + moments)

    def trainable(self, a: int, b: int) -> int:
        ids = {i for p in range(a, b) for i in self.uses[p]}
        return sum(self.numel.get(i, 0) for i in ids)

    def first_use(self) -> list[int]:
        seen: set[int] = set()
        out = []
        for used in self.uses:
            fresh = [i for i in used if i not in seen and i in self.numel]
            seen.update(fresh)
            out.append(sum(self.numel[i] for i in fresh))
        return out

    def saving(self, a: int, b: int, dp: int) -> int:
        """Static bytes ZeRO-1 saves on a stage: (dp-1)/dp of its optimizer state."""
        opt = self.trainable(a, b) * self.optimizer_bytes
        return opt - -(-opt // dp) if dp > 1 else 0


def price_replicas(layout: Mesh, zero: int, link: LinkSpec, inter_link: LinkSpec,
                   grad_bytes: Sequence[int], weight_bytes: Sequence[int],
                   rank_end: Sequence[float], pipeline_step: float) -> tuple[list[float], float]:
    """Per pipeline rank: its replicas' all-reduce (+ ZeRO's all-gather) seconds, and the
    step with them: each starts when its rank's action list ends (``rank_end``), the step
    ends when the last finishes. Returns (seconds per rank, step)."""
    times = []
    for p in range(layout.pp):
        lk = inter_link if layout.replicas_cross_nodes(p) else link
        t = ring_allreduce_s(grad_bytes[p], layout.dp, lk)
        if zero:
            t += allgather_s(weight_bytes[p], layout.dp, lk)
        times.append(t)
    step = max([pipeline_step, *(e + t for e, t in zip(rank_end, times))])
    return times, step


def boundary_links(layout: Mesh, stage_rank: Sequence[int], link: LinkSpec, inter_link: LinkSpec) -> list[LinkSpec]:
    """The link each cut (stage s -> s + 1) crosses: ``inter_link`` when, in any replica,
    the two ranks sit on different nodes."""
    return [inter_link if layout.boundary_crosses_nodes(a, b) else link
            for a, b in zip(stage_rank, stage_rank[1:])]
