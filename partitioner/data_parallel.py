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

Ranks map to the mesh as ``Mesh.dims`` says (``("dp", "pp")``: rank = d * pp + p), and to
nodes in blocks of ``gpus_per_node`` (torchrun's order). A message between ranks on one
node uses ``link``, between nodes ``inter_link``. Pure Python (no torch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # cost_models.devices imports torch; this module needs only the objects' methods
    from cost_models.devices import LinkSpec

__all__ = ["Layout", "ring_allreduce_s", "allgather_s", "placements", "divisors", "ZeroShard", "price_replicas"]


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


@dataclass(frozen=True)
class Layout:
    """Where the ranks of a dp x pp mesh sit (``partitioner.plan.Mesh`` without the prices)."""

    dp: int
    pp: int
    dims: tuple[str, ...] = ("dp", "pp")
    gpus_per_node: int = 0

    def rank(self, d: int, p: int) -> int:
        return d * self.pp + p if self.dims[0] == "dp" else p * self.dp + d

    def node(self, rank: int) -> int:
        return rank // self.gpus_per_node if self.gpus_per_node else 0

    @property
    def n_nodes(self) -> int:
        return -(-self.dp * self.pp // self.gpus_per_node) if self.gpus_per_node else 1

    def replicas_cross_nodes(self, p: int) -> bool:
        """Do the replicas of pipeline rank ``p`` span more than one node?"""
        return len({self.node(self.rank(d, p)) for d in range(self.dp)}) > 1

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


def placements(dp: int, pp: int, gpus_per_node: int | None) -> list[Layout]:
    """The layouts worth pricing: on one node only the default (``("dp", "pp")``); across
    nodes both dimension orders (pipelines inside nodes, or each stage's replicas inside)."""
    g = gpus_per_node or 0
    first = Layout(dp, pp, ("dp", "pp"), g)
    if not g or first.n_nodes == 1 or dp == 1 or pp == 1:
        return [first]
    return [first, Layout(dp, pp, ("pp", "dp"), g)]


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


def price_replicas(layout: Layout, zero: int, link: LinkSpec, inter_link: LinkSpec,
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


def boundary_links(layout: Layout, stage_rank: Sequence[int], link: LinkSpec, inter_link: LinkSpec) -> list[LinkSpec]:
    """The link each cut (stage s -> s + 1) crosses: ``inter_link`` when, in any replica,
    the two ranks sit on different nodes."""
    return [inter_link if layout.boundary_crosses_nodes(a, b) else link
            for a, b in zip(stage_rank, stage_rank[1:])]


def as_plan_mesh(layout: Layout, zero: int, inter_link: LinkSpec | None, allreduce: Sequence[float],
                 exposed: float) -> dict[str, Any]:
    """``partitioner.plan.Mesh`` fields."""
    return {"dp": layout.dp, "pp": layout.pp, "dims": tuple(layout.dims), "gpus_per_node": layout.gpus_per_node,
            "zero": zero, "inter_link": inter_link.to_dict() if inter_link is not None else None,
            "allreduce_s": tuple(allreduce), "exposed_s": exposed}
