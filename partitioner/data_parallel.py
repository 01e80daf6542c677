"""Pipeline x data parallelism: the replicas' gradient all-reduce, ZeRO-1 memory, and where
ranks sit on nodes (docs/ARCHITECTURE.md, "Data parallelism").

``n_gpus = dp x pp``: ``dp`` replicas of one ``pp``-rank pipeline, each on ``1/dp`` of the
global batch. Replicas of a pipeline rank average their gradients once per step, overlapped
with each stage's last backward (``partitioner.runtime.grad_sync``, Megatron-LM's
``--overlap-grad-reduce``): the gradients go in buckets (``pack``: reverse registration
order, ``BUCKET_BYTES`` each), and a bucket's all-reduce is launched as soon as the final
backward of its stage on the rank (the last ``B``/``I``/``W`` of that stage in the schedule)
has made its gradients final; the step waits for all of them after the rank's last action.

The plan prices that (``price_replicas``): each bucket is a ring all-reduce, 2(dp-1)
messages of ``bucket_bytes / dp`` over the link the replicas share (``ring_allreduce_s``);
a stage's buckets become ready evenly, by bytes, over its final backward (simulated start
S, end E: the bucket ending at byte c of the stage's G is ready at S + (E - S) c / G), and
one rank's buckets go over the link one at a time in launch order. So the rank's reduction
ends at max over its buckets k of (ready_k + the time of k and every bucket after it);
for one stage that is at least E + the last bucket's time, and at most
max(S + the whole reduction, E + the last bucket's time) when every bucket is ready by the
time the ones before it are done. The step ends when the pipeline and every rank's
reduction (+ ZeRO-1's all-gather) have. ZeRO-1 (``zero=1``, PyTorch's
``ZeroRedundancyOptimizer``) keeps 1/dp of the optimizer state (fp32 master weights and
moments) per rank and, after the update (so after the reduction), gathers the parameters
back: (dp-1) messages of ``weight_bytes / dp``.

Ranks map to the mesh as ``partitioner.plan.Mesh`` says (``dims`` ``("dp", "pp")``: rank =
d * pp + p), and to nodes in blocks of ``gpus_per_node`` (torchrun's order); the planner
prices candidate ``Mesh``es and records the one it keeps. A message between ranks on one
node uses ``link``, between nodes ``inter_link``. Pure Python (no torch).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Hashable, Iterable, Sequence

from partitioner.plan import Mesh

if TYPE_CHECKING:  # partitioner.cost_models.devices imports torch; this module needs only the objects' methods
    from partitioner.cost_models.devices import LinkSpec

__all__ = ["ring_allreduce_s", "allgather_s", "placements", "divisors", "ZeroShard", "price_replicas", "boundary_links",
           "BUCKET_BYTES", "pack", "Window", "reduction_windows", "reduction_end"]

#: gradient bucket cap (bytes), DDP's default; the runtime's ``GradSync`` and the pricing share it
BUCKET_BYTES = 25 * 2**20


def pack(sizes: Sequence[int], cap: int = BUCKET_BYTES) -> list[list[int]]:
    """Buckets over items of ``sizes`` (bytes, in launch order): consecutive runs, each
    closed once it holds ``cap`` bytes or more; an item is never split."""
    out: list[list[int]] = []
    cur: list[int] = []
    total = 0
    for i, n in enumerate(sizes):
        cur.append(i)
        total += n
        if total >= cap:
            out.append(cur)
            cur, total = [], 0
    if cur:
        out.append(cur)
    return out


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def ring_allreduce_s(nbytes: float, dp: int, link: LinkSpec) -> float:
    """Ring all-reduce of ``nbytes`` over ``dp`` ranks: reduce-scatter then all-gather,
    2(dp-1) steps each sending ``nbytes / dp`` (Patarasuk and Yuan 2009; NCCL's ring)."""
    if dp <= 1 or nbytes <= 0:
        return 0.0
    return 2 * (dp - 1) * link.collective_step(nbytes / dp)  # at NCCL's ring bus bandwidth (LinkSpec)


def allgather_s(nbytes: float, dp: int, link: LinkSpec) -> float:
    """Ring all-gather of ``nbytes`` (each rank holds ``nbytes / dp``): dp-1 steps."""
    if dp <= 1 or nbytes <= 0:
        return 0.0
    return (dp - 1) * link.collective_step(nbytes / dp)


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


@dataclass(frozen=True)
class Window:
    """One stage's final backward on its rank (simulated ``start``/``end``) and the bytes of
    the gradient buckets it makes final, in launch order."""

    start: float
    end: float
    buckets: tuple[int, ...]


def reduction_windows(events: Iterable[Any], stage_rank: Sequence[int],
                      stage_params: Sequence[Sequence[tuple[Hashable, int]]], n_ranks: int,
                      cap: int = BUCKET_BYTES) -> list[list[Window]]:
    """Per pipeline rank, its stages' ``Window``s in the order they end. ``events`` are the
    simulator's (``rank``, ``action``, ``start``, ``end``); ``stage_params[s]`` lists stage
    s's trainable tensors as (key, gradient bytes) in registration order. A tensor several
    stages of one rank use (one tensor there) is reduced with the stage whose final backward
    ends last; one used on several ranks is reduced on each (tied copies)."""
    final: dict[int, tuple[float, float]] = {}
    for e in events:
        st, kind = e.action.stage, e.action.kind
        if kind in ("B", "I", "W") and (st not in final or e.end > final[st][1]):
            final[st] = (e.start, e.end)
    out: list[list[Window]] = [[] for _ in range(n_ranks)]
    for r in range(n_ranks):
        mine = sorted((s for s in range(len(stage_rank)) if stage_rank[s] == r and s in final),
                      key=lambda s: final[s][1])
        owner = {k: s for s in mine for k, _ in stage_params[s]}  # the later stage wins
        for s in mine:
            sizes = [b for k, b in reversed(stage_params[s]) if owner[k] == s and b > 0]
            if sizes:
                start, end = final[s]
                out[r].append(Window(start, end, tuple(sum(sizes[i] for i in g) for g in pack(sizes, cap))))
    return out


def reduction_end(windows: Sequence[Window], dp: int, link: LinkSpec) -> float:
    """When one rank's bucketed reduction ends (the model in the module docstring): each
    bucket is ready when its stage's final backward has made its last byte, and starts when
    it is ready and the bucket before it is done. 0.0 without buckets."""
    free = 0.0
    for w in windows:
        total, done = sum(w.buckets), 0
        for b in w.buckets:
            done += b
            ready = w.start + (w.end - w.start) * done / total
            free = max(free, ready) + ring_allreduce_s(b, dp, link)
    return free


def price_replicas(layout: Mesh, zero: int, link: LinkSpec, inter_link: LinkSpec,
                   windows: Sequence[Sequence[Window]], weight_bytes: Sequence[int],
                   pipeline_step: float) -> tuple[list[float], float]:
    """Per pipeline rank: its replicas' all-reduce (+ ZeRO's all-gather) seconds, as one ring
    all-reduce of all its gradient bytes (``plan.mesh.allreduce_s``), and the step: the
    pipeline's, or later where a rank's reduction (``reduction_end`` over its ``windows``,
    each bucket priced as its own ring all-reduce) plus ZeRO-1's all-gather ends after it.
    Returns (seconds per rank, step)."""
    times, ends = [], []
    for p in range(layout.pp):
        lk = inter_link if layout.replicas_cross_nodes(p) else link
        grads = sum(b for w in windows[p] for b in w.buckets)
        gather = allgather_s(weight_bytes[p], layout.dp, lk) if zero else 0.0
        times.append(ring_allreduce_s(grads, layout.dp, lk) + gather)
        ends.append(reduction_end(windows[p], layout.dp, lk) + gather)
    return times, max([pipeline_step, *ends])


def boundary_links(layout: Mesh, stage_rank: Sequence[int], link: LinkSpec, inter_link: LinkSpec) -> list[LinkSpec]:
    """The link each cut (stage s -> s + 1) crosses: ``inter_link`` when, in any replica,
    the two ranks sit on different nodes."""
    return [inter_link if layout.boundary_crosses_nodes(a, b) else link
            for a, b in zip(stage_rank, stage_rank[1:])]
