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

ZeRO-3 (``zero=3``, FSDP2's ``fully_shard`` inside the stages, ``partitioner.runtime.fsdp``)
shards weights, gradients and optimizer state over the replicas and prices what the
runtime runs, in one of two modes (``ZeroShard.per_step``):

- per unit (schedules with a whole backward): before each micro-batch's forward and again
  before its backward every unit is all-gathered, and after its backward reduce-scattered:
  m x (2 all-gathers + 1 reduce-scatter) of the stage's weight bytes per step, each
  (dp-1) messages of ``bytes / dp`` (``allgather_s``, ``reduce_scatter_s``). FSDP issues
  them on their own stream, a unit ahead of the compute, so per micro-batch only what
  exceeds the stage's forward + backward is exposed, plus the last unit's reduce-scatter
  after the final backward (the last gradient bucket's bytes stand for it). Memory: the
  shards, ``(2 w + o) P / dp``, plus the units gathered at once (the stage's own unit and
  two neighbouring units, running and prefetched: repeated blocks, the token embedding, the
  output head; ``ZeroShard.units``) and one unit's full gradient.
- per step (schedules that split the backward, or any schedule with ``partition(fsdp_reshard=
  "step")``, ``plan.mesh.fsdp``): one all-gather at the step's first forward
  (exposed where it exceeds that forward) and one reduce-scatter after the rank's last
  action (exposed). Memory: the shards plus the stage's whole gathered weights and full
  gradients (``2 w P``), which the step holds from first forward to the reduction.

Hybrid sharding (HSDP, ``partition(fsdp_shard=S)``, ``plan.mesh.shard``), in either mode: the
shards are 1/S (the S replicas of a shard group, inside a node), the gathers and
reduce-scatters go over S on the link inside the node, and each reduce-scatter is followed by
a ring all-reduce of the 1/S gradient shard over the dp/S groups that replicate it, on the
link between nodes.

Exposed seconds inside the pipeline delay the rank's later actions; the step is priced as
the pipeline's plus the largest such delay, or later where a rank's tail (its last
reduce-scatter) ends after it.

Hidden is not free: a collective runs as kernels on the GPU it overlaps (NCCL's channels
occupy SMs and move bytes through HBM), so the compute beside it runs slower. ZeRO-3's
gathers and reduce-scatters are priced so (``overlap_cost``): compute overlapped by a
collective takes ``1 + OVERLAP_SLOWDOWN`` times as long, ``OVERLAP_SLOWDOWN`` being the mean
slowdown measured for compute overlapped with collectives on A100, H100, MI250 and MI210
(arXiv 2507.03114, 18.9 %; up to 40 %). The replicas' bucketed all-reduce (DDP and ZeRO-1,
``reduction_overlap``) pays the same charge: while a bucket is on the link the final backward
beside it runs slower, which delays the later buckets and the rank's later backwards. ZeRO-1's
all-gather after the update overlaps nothing and pays none; neither do the pipeline's
point-to-point transfers (one NCCL channel each, not measured by that study).

Ranks map to the mesh as ``partitioner.plan.Mesh`` says (``dims`` ``("dp", "pp")``: rank =
d * pp + p), and to nodes in blocks of ``gpus_per_node`` (torchrun's order); the planner
prices candidate ``Mesh``es and records the one it keeps. A message between ranks on one
node uses ``link``, between nodes ``inter_link``; a ring collective across nodes crosses at
``inter_link`` times the group's GPUs per node (one NIC each: ``ring_link``). Pure Python (no torch).
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Hashable, Iterable, Sequence

from partitioner.plan import Mesh
from partitioner.schedule import SCHEDULES, Schedule

if TYPE_CHECKING:  # partitioner.cost_models.devices imports torch; this module needs only the objects' methods
    from partitioner.cost_models.devices import LinkSpec

__all__ = ["OVERLAP_SLOWDOWN", "overlap_cost", "boundary_time", "ring_link", "ring_allreduce_s", "allgather_s", "reduce_scatter_s", "splits_backward", "placements", "hsdp_shards", "divisors", "ZeroShard", "price_replicas", "boundary_links",
           "BUCKET_BYTES", "pack", "Window", "reduction_windows", "reduction_end",
           "reduction_overlap"]

#: gradient bucket cap (bytes), DDP's default; the runtime's ``GradSync`` and the pricing share it
BUCKET_BYTES = 25 * 2**20

#: How much slower compute runs while a collective overlaps it, as a fraction of its time
#: alone: the mean measured by S. Lee et al., "Characterizing Compute-Communication Overlap in
#: GPU-Accelerated Distributed Deep Learning: Performance and Power Implications" (arXiv
#: 2507.03114, abstract: "an average computational slowdown of 18.9 %, with a maximum of
#: 40.0 %", GPT and Llama training on 4 A100, H100, MI250 and MI210). NCCL's kernels take SMs
#: (an all-gather of 24 blocks beside a 132-block GEMM on an H100 pushes the GEMM into a second
#: wave: forums.developer.nvidia.com/t/337991) and share HBM with the compute.
OVERLAP_SLOWDOWN = 0.189


def overlap_cost(comm: float, compute: float, slowdown: float = OVERLAP_SLOWDOWN) -> float:
    """Seconds a collective of ``comm`` seconds adds to ``compute`` seconds of work it is
    issued beside: the compute it overlaps takes ``1 + slowdown`` times as long (the
    collective keeps its own speed), so ``x = min(comm / (1 + slowdown), compute)`` seconds
    of compute are stretched, and the pair ends ``max(comm - compute, slowdown * x)`` after the
    compute alone would. ``slowdown=0`` is perfect overlap (only the excess is exposed)."""
    if comm <= 0 or compute <= 0:
        return max(0.0, comm)
    if slowdown < 0:
        raise ValueError(f"slowdown is a fraction of the compute's time, at least 0, got {slowdown!r}")
    return max(comm - compute, slowdown * min(comm / (1 + slowdown), compute))


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


def reduce_scatter_s(nbytes: float, dp: int, link: LinkSpec) -> float:
    """Ring reduce-scatter of ``nbytes`` (each rank ends with ``nbytes / dp`` reduced): dp-1
    steps, as the all-gather."""
    return allgather_s(nbytes, dp, link)


def splits_backward(schedule: str | Schedule | None) -> bool:
    """Whether a schedule (a name or hand-written lists) splits the backward into I and W:
    ``zero=3`` then reduces once per step (``partitioner.runtime.fsdp``)."""
    if isinstance(schedule, Schedule):
        return any(a.kind == "I" for acts in schedule.actions for a in acts)
    spec = SCHEDULES.get(schedule) if isinstance(schedule, str) else None
    return bool(spec and spec.split_backward)


def placements(dp: int, pp: int, gpus_per_node: int | None, tp: int = 1) -> list[Mesh]:
    """The layouts worth pricing: on one node only the default (``("dp", "pp")``); across
    nodes both dimension orders (pipelines inside nodes, or each stage's replicas inside).
    ``tp`` tensor-parallel ranks are innermost (consecutive, inside a node)."""
    g = gpus_per_node or 0
    first = Mesh(dp, pp, ("dp", "pp"), g, tp=tp)
    if not g or first.n_nodes == 1 or dp == 1 or pp == 1:
        return [first]
    return [first, Mesh(dp, pp, ("pp", "dp"), g, tp=tp)]


def hsdp_shards(dp: int, pp: int, gpus_per_node: int | None, tp: int = 1) -> list[int]:
    """The hybrid-sharding group sizes (``mesh.shard``) worth pricing for ``zero=3`` at ``dp``
    replicas of a ``pp``-rank pipeline of ``tp`` tensor-parallel ranks each: none when every
    rank sits on one node (plain FSDP's gathers already stay inside it); else, per placement
    whose replicas span nodes, k = the fewest replicas of a pipeline rank on one node (the
    shard group that keeps every gather inside a node) and 2k (shards half as large where
    memory is tight, gathers across two nodes), each a divisor of ``dp`` below it whose
    ``s x tp`` GPUs fit a node (``partition(fsdp_shard=)``'s rule)."""
    g = gpus_per_node or 0
    if dp <= 1 or not g:
        return []
    out: set[int] = set()
    for lay in placements(dp, pp, g, tp):
        if not lay.replicas_cross_nodes(0):
            continue
        k = min(Counter(lay.node(r) for r in lay.replicas(0)).values())
        out.update(s for s in (k, 2 * k) if 1 < s < dp and dp % s == 0 and s * tp <= g)
    return sorted(out)


@dataclass(frozen=True)
class ZeroShard:
    """Per position of the solver's order, the trainable parameter elements first used there,
    so a stage's gradient bytes and optimizer bytes follow from its span; and what ZeRO
    (``zero``: 1 or 3) saves on them."""

    uses: Sequence[tuple[int, ...]]  # per position: ids of the tensors it uses (memory.Static.uses)
    numel: dict[int, int]  # id -> elements, trainable parameters only
    grad_width: int  # bytes per gradient element (the precision's parameter width)
    optimizer_bytes: int  # bytes per trainable element held by the optimizer (master + moments)
    zero: int = 1  # the ZeRO stage the savings are for
    unit_of: dict[int, str] = field(default_factory=dict)  # zero=3: id -> FSDP block unit (memory.fsdp_unit_of)
    per_step: bool = False  # zero=3 with a split backward or mesh.fsdp "step": gathered for the whole step
    #: zero=3: per position, id -> the embedding or head unit it is read as there (memory.fsdp_unit_at)
    unit_at: Sequence[dict[int, str]] = ()
    #: zero=3 hybrid (HSDP, ``mesh.shard``): the replicas a shard is spread over; 0: all of them
    shard: int = 0

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
        """Static bytes ZeRO saves on a stage (negative where ZeRO-3's gathered weights cost
        more than its shards save). ZeRO-1: (dp-1)/dp of its optimizer state. ZeRO-3: its
        trainable bytes ``(2 w + o) P`` less ``fsdp_static``."""
        if dp <= 1:
            return 0
        if self.zero == 3:
            return self.trainable(a, b) * (2 * self.grad_width + self.optimizer_bytes) - self.fsdp_static(a, b, dp)
        opt = self.trainable(a, b) * self.optimizer_bytes
        return opt - -(-opt // dp)

    def units(self, a: int, b: int) -> dict[int, str]:
        """The FSDP unit of each trainable tensor a stage of positions [a, b) holds (the rule
        ``memory.fsdp_units`` applies to the stage graph): its block's, or the embedding's or
        head's unit where the stage reads it once and as that (``unit_at``: a weight tied
        between the embedding and the head is its own unit on a rank holding one of them, in
        the stage's own unit, ``""``, on a rank holding both); else ``""``."""
        reads: dict[int, int] = {}
        role: dict[int, str] = {}
        for p in range(a, b):
            at = self.unit_at[p] if self.unit_at else {}
            for i in self.uses[p]:
                if i in self.numel:
                    reads[i] = reads.get(i, 0) + 1
                    if i in at:
                        role[i] = at[i]
        return {i: (role[i] if n == 1 else "") if i in role else self.unit_of.get(i, "") for i, n in reads.items()}

    def fsdp_static(self, a: int, b: int, dp: int) -> int:
        """ZeRO-3's static bytes for the trainable parameters of positions [a, b): the shards
        of weights, gradients and optimizer state, ceil((2 w + o) P / S) (S: ``shard``, else
        dp), plus what is gathered at the peak (module docstring): per unit, the stage's own
        unit and the two units gathered together (running and prefetched: neighbours in the
        order the stage first reads them, or the largest alone), and the larger of the own
        unit's and the largest unit's full gradient; per step, ``2 w P``."""
        units: dict[str, int] = {}
        for i, key in self.units(a, b).items():
            units[key] = units.get(key, 0) + self.numel[i]
        n = sum(units.values())
        w = self.grad_width
        shards = -(-n * (2 * w + self.optimizer_bytes) // (self.shard or dp))
        if self.per_step:
            return shards + 2 * w * n
        own = units.pop("", 0)
        sizes = list(units.values())  # in first-read order (dict order follows the positions)
        pair = max([x + y for x, y in zip(sizes, sizes[1:])] + sizes, default=0)
        return shards + w * (own + pair) + w * max([own, *sizes])

    def additive(self, static: Sequence[int], dp: int) -> list[int]:
        """The solver's additive view of the saving, per position (``static``: its static
        bytes at first use): ZeRO-1 saves (dp-1)/dp of the optimizer state there; ZeRO-3
        keeps its shards (+ the whole gathered weights and gradients per step). Per unit,
        the gathered units are not additive: the planner's exact check adds them."""
        out = []
        for s, n in zip(static, self.first_use()):
            if self.zero == 3:
                full = n * (2 * self.grad_width + self.optimizer_bytes)
                out.append(s - full + -(-full // (self.shard or dp)) + (2 * self.grad_width * n if self.per_step else 0))
            else:
                out.append(s - (n * self.optimizer_bytes - -(-n * self.optimizer_bytes // dp)))
        return out


@dataclass(frozen=True)
class Window:
    """One stage's final backward on its rank (simulated ``start``/``end``) and the bytes of
    the gradient buckets it makes final, in launch order; for ZeRO-3 also one micro-batch's
    forward and backward seconds (``B``, or ``I`` + ``W``), the micro-batch count and
    whether the stage is gathered once per step (a split backward, or ``mesh.fsdp`` "step")."""

    start: float
    end: float
    buckets: tuple[int, ...]
    fwd: float = 0.0
    bwd: float = 0.0
    m: int = 1
    split: bool = False


def reduction_windows(events: Iterable[Any], stage_rank: Sequence[int],
                      stage_params: Sequence[Sequence[tuple[Hashable, int]]], n_ranks: int,
                      cap: int = BUCKET_BYTES) -> list[list[Window]]:
    """Per pipeline rank, its stages' ``Window``s in the order they end. ``events`` are the
    simulator's (``rank``, ``action``, ``start``, ``end``); ``stage_params[s]`` lists stage
    s's trainable tensors as (key, gradient bytes) in registration order. A tensor several
    stages of one rank use (one tensor there) is reduced with the stage whose final backward
    ends last; one used on several ranks is reduced on each (tied copies)."""
    final: dict[int, tuple[float, float]] = {}
    spent: dict[tuple[int, str], float] = {}  # (stage, F or backward) -> seconds over the step
    mbs: dict[int, set[int]] = {}
    split: set[int] = set()
    for e in events:
        st, kind = e.action.stage, e.action.kind
        if kind in ("B", "I", "W") and (st not in final or e.end > final[st][1]):
            final[st] = (e.start, e.end)
        if kind in ("F", "B", "I", "W"):
            key = (st, "F" if kind == "F" else "B")
            spent[key] = spent.get(key, 0.0) + e.end - e.start
        if kind == "F":
            mbs.setdefault(st, set()).add(e.action.microbatch)
        if kind == "I":
            split.add(st)
    out: list[list[Window]] = [[] for _ in range(n_ranks)]
    for r in range(n_ranks):
        mine = sorted((s for s in range(len(stage_rank)) if stage_rank[s] == r and s in final),
                      key=lambda s: final[s][1])
        owner = {k: s for s in mine for k, _ in stage_params[s]}  # the later stage wins
        for s in mine:
            sizes = [b for k, b in reversed(stage_params[s]) if owner[k] == s and b > 0]
            if sizes:
                start, end = final[s]
                m = max(len(mbs.get(s, ())), 1)
                out[r].append(Window(start, end, tuple(sum(sizes[i] for i in g) for g in pack(sizes, cap)),
                                     spent.get((s, "F"), 0.0) / m, spent.get((s, "B"), 0.0) / m, m, s in split))
    return out


def _compute_until(t: float, work: float, busy: Sequence[tuple[float, float]], i: int,
                   slowdown: float) -> tuple[float, int]:
    """When ``work`` seconds of compute started at ``t`` are done, compute running
    ``1 + slowdown`` times slower inside the ``busy`` intervals (sorted, disjoint); ``i`` is
    the first interval that may still end after ``t`` (returned advanced, for the next call)."""
    while i < len(busy) and busy[i][1] <= t:
        i += 1
    j = i
    while j < len(busy):
        a, b = busy[j]
        if a > t:
            if work <= a - t:
                return t + work, i
            work -= a - t
            t = a
        room = (b - t) / (1 + slowdown)
        if work <= room:
            return t + work * (1 + slowdown), i
        work -= room
        t = b
        j += 1
    return t + work, i


def reduction_overlap(windows: Sequence[Window], dp: int, link: LinkSpec,
                      slowdown: float = OVERLAP_SLOWDOWN) -> tuple[float, float]:
    """One rank's bucketed reduction (the model in the module docstring) and what it costs
    the compute it overlaps: returns (when the last bucket's all-reduce ends, how much later
    the rank's final backwards end than the simulation says). A bucket is ready when its
    stage's final backward has made its last byte and starts when it is ready and the bucket
    before it is done; while a bucket is on the link the backward beside it runs
    ``1 + slowdown`` times slower (``overlap_cost``'s charge, as ZeRO-3's collectives pay it),
    which delays the later buckets' readiness and every later final backward on the rank.
    ``slowdown=0`` is perfect overlap. (0.0, 0.0) without buckets."""
    if slowdown < 0:
        raise ValueError(f"slowdown is a fraction of the compute's time, at least 0, got {slowdown!r}")
    free = delay = 0.0
    busy: list[tuple[float, float]] = []
    i = 0
    for w in windows:
        total, done, work = sum(w.buckets), 0, w.end - w.start
        t, made = w.start + delay, 0.0
        for b in w.buckets:
            done += b
            target = work * done / total
            t, i = _compute_until(t, target - made, busy, i, slowdown)
            made = target
            start = max(free, t)
            free = start + ring_allreduce_s(b, dp, link)
            busy.append((start, free))
        if w.buckets:
            delay = max(delay, t - w.end)
    return free, delay


def reduction_end(windows: Sequence[Window], dp: int, link: LinkSpec, slowdown: float = 0.0) -> float:
    """When one rank's bucketed reduction ends (``reduction_overlap``'s first figure; by
    default with perfect overlap). 0.0 without buckets."""
    return reduction_overlap(windows, dp, link, slowdown)[0]


def ring_link(layout: Mesh, groups: Iterable[Sequence[int]], link: LinkSpec, inter_link: LinkSpec) -> LinkSpec:
    """The link a ring collective over each of ``groups`` (global ranks; groups that run at
    once) moves at. Inside one node: ``link``. Across nodes NCCL spreads the ring's channels
    over the NICs of the group's GPUs on each node, one NIC per GPU as ``inter_link`` states
    (nccl-tests issue #119: 3 nodes of 8 A100s with 4 HDR NICs each reach 85-96 of the 100 GB/s
    of the four NICs together; issue #309: ~370 GB/s across 2 HGX H100 hosts of 8 NDR NICs),
    so a group with k GPUs on every node crosses at k x ``inter_link``'s rate, never faster
    than the in-node link's collective rate (the ring's other hops). k is the fewest of any
    group's GPUs on one node; groups sharing a node share its NICs, one each per GPU."""
    per_node = [Counter(layout.node(r) for r in members) for members in groups]
    k = min((min(c.values()) for c in per_node if len(c) > 1), default=0)
    if not k:
        return link
    if k == 1:
        return inter_link
    rate = min(k * inter_link.bandwidth * inter_link.collective, link.bandwidth * link.collective)
    return replace(inter_link, bandwidth=rate / inter_link.collective)


def price_replicas(layout: Mesh, zero: int, link: LinkSpec, inter_link: LinkSpec,
                   windows: Sequence[Sequence[Window]], weight_bytes: Sequence[int],
                   pipeline_step: float, reduce_scale: float = 1.0,
                   slowdown: float = OVERLAP_SLOWDOWN) -> tuple[list[float], float]:
    """Per pipeline rank: its replicas' all-reduce (+ ZeRO's all-gather) seconds, as one ring
    all-reduce of all its gradient bytes (``plan.mesh.allreduce_s``), and the step: the
    pipeline's plus the most any rank's final backwards were slowed by the buckets beside
    them, or later where a rank's reduction (``reduction_overlap`` over its ``windows``, each
    bucket priced as its own ring all-reduce) plus ZeRO-1's all-gather ends after it.
    ``zero=3``: ``price_fsdp`` (``reduce_scale`` as there). ``slowdown``: as in
    ``overlap_cost``, the same charge for every collective hidden behind compute.
    Returns (seconds per rank, step)."""
    if zero == 3:
        return price_fsdp(layout, link, inter_link, windows, pipeline_step, slowdown, reduce_scale=reduce_scale)
    times, ends, delays = [], [], [0.0]
    for p in range(layout.pp):
        lk = ring_link(layout, [layout.replicas(p)], link, inter_link)
        grads = sum(b for w in windows[p] for b in w.buckets)
        gather = allgather_s(weight_bytes[p], layout.dp, lk) if zero else 0.0
        times.append(ring_allreduce_s(grads, layout.dp, lk) + gather)
        end, delay = reduction_overlap(windows[p], layout.dp, lk, slowdown)
        ends.append(end + gather)
        delays.append(delay)
    return times, max([pipeline_step + max(delays), *ends])


def price_fsdp(layout: Mesh, link: LinkSpec, inter_link: LinkSpec, windows: Sequence[Sequence[Window]],
               pipeline_step: float, slowdown: float = OVERLAP_SLOWDOWN,
               reduce_scale: float = 1.0) -> tuple[list[float], float]:
    """ZeRO-3 (the module docstring's model): per pipeline rank, the seconds of its gathers
    and reduce-scatters, and the step. A stage's weight bytes are its gradient buckets'
    (the same tensors at the same width). Hybrid sharding (``layout.shard`` = S < dp): the
    gathers and reduce-scatters run over the S replicas of a shard group (on ``link`` when the
    group sits inside a node), and each reduce-scatter is followed by a ring all-reduce of
    its 1/S gradient shard over the dp/S groups (``inter_link`` when they span nodes), as
    FSDP2 reduces over a ``(replicate, shard)`` mesh. What a gather or reduce-scatter issued
    beside compute adds is ``overlap_cost`` (the excess over the compute, or the slowdown of
    the compute it overlaps, whichever is larger; ``slowdown=0``: the excess only).
    ``reduce_scale``: the reduce dtype's width over the gathered weights' (the runtime's
    mixed-precision policy gathers bf16 / fp16 weights and reduce-scatters fp32 gradients: 2;
    fp32 plans: 1). Returns (seconds per rank, step)."""
    times, inside, ends = [], [], []
    s_deg = layout.shard_degree
    r_deg = layout.dp // s_deg
    for p in range(layout.pp):
        lk = ring_link(layout, layout.shard_groups(p), link, inter_link)
        rk = ring_link(layout, layout.replica_groups(p), link, inter_link)

        def reduce(nbytes: float) -> float:  # reduce-scatter in the shard group, all-reduce of its shard across
            nbytes *= reduce_scale  # the gradients at FSDP's reduce dtype
            return reduce_scatter_s(nbytes, s_deg, lk) + ring_allreduce_s(nbytes / s_deg, r_deg, rk)

        total = exposed = tail = last = 0.0
        for w in windows[p]:
            nbytes = sum(w.buckets)
            gather, scatter = allgather_s(nbytes, s_deg, lk), reduce(nbytes)
            if w.split:  # one gather at the first forward, one reduce-scatter after the rank's last action
                total += gather + scatter
                exposed += overlap_cost(gather, w.fwd, slowdown)
                tail += scatter
            else:  # per micro-batch: gather for forward and for backward, reduce-scatter after backward
                per_mb = 2 * gather + scatter
                total += w.m * per_mb
                exposed += w.m * overlap_cost(per_mb, w.fwd + w.bwd, slowdown)
                tail = max(tail, reduce(w.buckets[-1]))
            last = max(last, w.end)
        times.append(total)
        inside.append(exposed)
        ends.append(last + exposed + tail if windows[p] else 0.0)
    return times, max([pipeline_step + max(inside, default=0.0), *ends])


def boundary_links(layout: Mesh, stage_rank: Sequence[int], link: LinkSpec, inter_link: LinkSpec) -> list[LinkSpec]:
    """The link each cut (stage s -> s + 1) crosses: ``inter_link`` when, in any replica,
    the two ranks sit on different nodes."""
    return [inter_link if layout.boundary_crosses_nodes(a, b) else link
            for a, b in zip(stage_rank, stage_rank[1:])]


def boundary_time(link: LinkSpec, degree: int, group_link: LinkSpec | None = None, *,
                  sequence_parallel: bool = False) -> Callable[[float], float]:
    """Seconds to move one boundary message of ``nbytes`` from a stage's ``degree``-way
    tensor-parallel group to the next one's: each rank sends its ``ceil(nbytes / degree)``
    chunk on ``link`` (the pairs in parallel), then the receivers all-gather the whole message
    on ``group_link`` (default ``link``; the link inside a node). A message of fewer bytes than
    makes a chunk for every rank goes whole, as ``runtime.dist`` sends it. ``degree`` 1:
    ``link.transfer_time``, unchanged. ``sequence_parallel``: the activations crossing a cut
    are split on the sequence already (``runtime.tensor_parallel``): each rank sends its own
    ``ceil(nbytes / degree)`` and nothing is gathered. A message's values without a sequence
    dimension (integer ids, masks, scalars), which the runtime still chunks and gathers, are
    priced the same way: their all-gather is left out."""
    if degree <= 1:
        return link.transfer_time
    if sequence_parallel:
        return lambda nbytes: link.transfer_time(math.ceil(nbytes / degree))
    inside = group_link if group_link is not None else link

    def seconds(nbytes: float) -> float:
        chunk = math.ceil(nbytes / degree)
        if nbytes < degree or chunk * (degree - 1) >= nbytes:  # the runtime's rule: sent whole
            return link.transfer_time(nbytes)
        return link.transfer_time(chunk) + allgather_s(chunk * degree, degree, inside)

    return seconds
