"""Averaging a pipeline rank's gradients over its data-parallel replicas, overlapped with
the last backward of each stage (Megatron-LM's ``--overlap-grad-reduce``, torchtitan).

A rank's trainable parameters are packed into buckets per stage, device and dtype, in
reverse registration order (roughly the order backward finishes them), closing a bucket
once it holds ``bucket_bytes`` (``data_parallel.BUCKET_BYTES``, 25 MiB, as DDP); a
parameter is never split, so one larger than the cap is a bucket of its own. A parameter
that two stages of this rank share belongs to the one whose final backward comes later.

Per step (``Interpreter`` drives it; the schedule says which action is each stage's final
backward on this rank: the last ``B``, ``I`` or ``W`` of that stage):

- ``begin(order)``: the stages in the order their final backwards run; the buckets are
  launched in that order (stage by stage, each stage's buckets in order), the same on every
  replica, so the collectives match however autograd orders its hooks.
- ``arm(stage)`` before the stage's final backward: ``Tensor.register_post_accumulate_grad_hook``
  hooks (registered once, idle otherwise) mark each of its parameters final as autograd
  accumulates its gradient; a bucket whose parameters are all final, and whose predecessors
  have gone, is launched there, inside the backward: its gradients are copied into the
  bucket's flat buffer divided by the replica count (as DDP does, so the sum never
  overflows where the average does not) and ``dist.all_reduce(flat, async_op=True)`` is
  issued. Earlier micro-batches' backwards accumulate with the hooks disarmed: no
  communication. On CUDA the copy and the collective are queued on streams (NCCL waits for
  the current stream), so a hook never synchronises with the host.
- ``ready(stage)`` right after that action: every bucket of the stage is final (a split
  backward's ``W`` and ``I`` accumulate by hand, ``splitgrad``, so no hook fires there, and a
  parameter that got no gradient in the last micro-batch has no hook call either) and is
  launched, in order. Nothing waits.
- ``finish()`` once the rank has run its last action (``Runner.step``): launch what is left,
  wait for every bucket, and point each parameter's ``.grad`` at its averaged slice of the
  flat buffer (DDP's ``gradient_as_bucket_view``: no copy back, and the next step's
  accumulation adds into it in place unless the optimizer's ``zero_grad`` sets it to None).
  A parameter with no gradient on this replica is reduced as zeros; if the average is all
  zeros (no replica gave it one) it keeps ``grad=None``, as in one process; if only some
  replicas used it, it gets the average counting the others as zero.

Tensor parallelism's ``DTensor`` parameters are reduced as their local shards (the replicas of
one TP rank hold the same shard): buckets are laid out by the local shapes, and the averaged
slice becomes a ``DTensor`` gradient with the parameter's mesh and placements.
``launches`` and ``waits`` record (bucket, ``time.perf_counter_ns()``, how) for the last
step, ``how`` being ``"hook"`` (inside a backward), ``"ready"`` (after the final backward
action) or ``"finish"`` (after the last action), so a trace can show the overlap.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed.tensor import DTensor

from partitioner.data_parallel import BUCKET_BYTES, pack
from partitioner.runtime.profiling import named

__all__ = ["GradSync", "Bucket", "broadcast_from_first"]


@dataclass(eq=False)
class Bucket:
    """Parameters reduced by one ``all_reduce``: ``flat`` holds them at ``slices``."""

    index: int
    stage: int
    params: list[nn.Parameter]
    slices: list[tuple[int, int]]  # (offset, numel) in ``flat``
    flat: torch.Tensor
    final: set[int] = field(default_factory=set)  # positions in ``params`` whose gradient is final
    had_none: list[bool] = field(default_factory=list)
    work: dist.Work | None = None
    launched: bool = False

    def view(self, i: int) -> torch.Tensor:
        off, n = self.slices[i]
        return self.flat[off:off + n].view(_local(self.params[i]).shape)

    def grad(self, i: int) -> torch.Tensor:
        """The averaged gradient of parameter ``i``: its slice of ``flat``, as a ``DTensor``
        placed like the parameter when the parameter is one."""
        p, v = self.params[i], self.view(i)
        return DTensor.from_local(v, p.device_mesh, p.placements, run_check=False) if isinstance(p, DTensor) else v


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (its metadata: no communication), another tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def _local_grad(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """A gradient's local part, placed like its parameter first (a ``Partial`` DTensor gradient
    is reduced over the TP ranks here, so the replicas average the same thing)."""
    if isinstance(g, DTensor):
        if isinstance(p, DTensor) and g.placements != p.placements:
            g = g.redistribute(p.device_mesh, p.placements)
        return g.to_local()
    return g


class GradSync:
    """This pipeline rank's gradient reducer over ``group`` (its replicas); ``modules`` are
    its stages ({stage index: module})."""

    def __init__(self, modules: Mapping[int, nn.Module], group: dist.ProcessGroup, *,
                 bucket_bytes: int = BUCKET_BYTES) -> None:
        self.group, self.world = group, dist.get_world_size(group)
        #: bucket cap in bytes; buckets are laid out at a runner's first step, so set it before
        self.bucket_bytes = bucket_bytes
        self._stages: dict[int, list[int]] = {}  # id(param) -> stages of this rank using it
        self._params: list[nn.Parameter] = []  # trainable, each once, in registration order
        for s in sorted(modules):
            for p in modules[s].parameters():
                if not p.requires_grad:
                    continue
                if id(p) not in self._stages:
                    self._stages[id(p)] = []
                    self._params.append(p)
                self._stages[id(p)].append(s)
        self._layouts: dict[tuple[tuple[int, ...], int], tuple[list[Bucket], dict[int, tuple[Bucket, int]]]] = {}
        self._buckets: list[Bucket] = []
        self._where: dict[int, tuple[Bucket, int]] = {}  # id(param) -> (its bucket, position)
        self._next = 0  # the next bucket to launch
        self._armed: int | None = None
        self._active = False
        self.launches: list[tuple[int, int, str]] = []
        self.waits: list[tuple[int, int, int]] = []  # (bucket, wait start ns, wait end ns)
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self._params]

    @property
    def buckets(self) -> list[Bucket]:
        """The current step's buckets, in launch order."""
        return self._buckets

    # -- layout ------------------------------------------------------------------------
    def _layout(self, order: tuple[int, ...]) -> tuple[list[Bucket], dict[int, tuple[Bucket, int]]]:
        key = (order, self.bucket_bytes)
        if key not in self._layouts:
            rank_in_order = {s: i for i, s in enumerate(order)}
            owner = {id(p): max(self._stages[id(p)], key=lambda s: rank_in_order.get(s, -1)) for p in self._params}
            buckets: list[Bucket] = []
            for s in order:
                # Per (device, dtype), in reverse registration order, cut as the planner cuts them.
                groups: dict[tuple[torch.device, torch.dtype], list[nn.Parameter]] = {}
                for p in reversed(self._params):
                    if owner[id(p)] == s:
                        groups.setdefault((p.device, p.dtype), []).append(p)
                for (device, dtype), ps in groups.items():
                    sizes = [_local(p).numel() for p in ps]
                    for idx in pack([n * p.element_size() for n, p in zip(sizes, ps)], self.bucket_bytes):
                        members = [ps[i] for i in idx]
                        slices, off = [], 0
                        for i in idx:
                            slices.append((off, sizes[i]))
                            off += sizes[i]
                        flat = torch.empty(off, dtype=dtype, device=device)
                        buckets.append(Bucket(len(buckets), s, members, slices, flat))
            where = {id(p): (b, i) for b in buckets for i, p in enumerate(b.params)}
            self._layouts[key] = (buckets, where)
        return self._layouts[key]

    # -- one step ----------------------------------------------------------------------
    def begin(self, order: Sequence[int]) -> None:
        """A step starts: ``order`` lists this rank's stages as their final backwards come.
        Anything left of a step that failed is dropped."""
        self._buckets, self._where = self._layout(tuple(order) + tuple(s for s in sorted(
            {s for ss in self._stages.values() for s in ss}) if s not in order))
        for b in self._buckets:
            b.final, b.had_none, b.work, b.launched = set(), [False] * len(b.params), None, False
        self._next, self._armed, self._active = 0, None, True
        self.launches, self.waits = [], []

    def arm(self, stage: int) -> None:
        """``stage``'s final backward on this rank is about to run."""
        self._armed = stage

    def ready(self, stage: int) -> None:
        """``stage``'s final backward has run: its gradients are final; launch its buckets."""
        self._armed = None
        for b in self._buckets:
            if b.stage == stage:
                b.final = set(range(len(b.params)))
        self._launch_in_order("ready")

    def _hook(self, p: torch.Tensor) -> None:
        if self._armed is None:
            return
        got = self._where.get(id(p))
        if got is None:
            return
        b, i = got
        if b.stage != self._armed or b.launched:
            return
        b.final.add(i)
        if len(b.final) == len(b.params):
            self._launch_in_order("hook")

    def _launch_in_order(self, how: str) -> None:
        while self._next < len(self._buckets) and len(self._buckets[self._next].final) == len(self._buckets[self._next].params):
            self._launch(self._buckets[self._next], how)
            self._next += 1

    def _launch(self, b: Bucket, how: str) -> None:
        # named in a user's torch.profiler trace (and inside the backward's range when a hook launches it)
        with named("grad all-reduce: launch bucket {} (stage {})", b.index, b.stage):
            self._launch_bucket(b, how)

    def _launch_bucket(self, b: Bucket, how: str) -> None:
        with torch.no_grad():
            for i, p in enumerate(b.params):
                view, g = b.view(i), p.grad
                if g is None:
                    view.zero_()
                    b.had_none[i] = True
                else:
                    g = _local_grad(p, g)
                    torch.div(g.to_dense() if g.is_sparse else g, self.world, out=view)
        b.work = dist.all_reduce(b.flat, group=self.group, async_op=True)
        b.launched = True
        self.launches.append((b.index, time.perf_counter_ns(), how))

    def finish(self) -> None:
        """After the rank's last action: launch what is left, wait for all, and set each
        parameter's ``.grad`` to its average over the replicas."""
        if not self._active:  # called outside a runner's step: reduce everything now
            self.begin(sorted({s for ss in self._stages.values() for s in ss}))
        self._armed = None
        for b in self._buckets:
            b.final = set(range(len(b.params)))
        self._launch_in_order("finish")
        self._active = False
        check: list[tuple[nn.Parameter, torch.Tensor, torch.Tensor]] = []  # (param, its slice, its gradient)
        for b in self._buckets:
            t0 = time.perf_counter_ns()
            assert b.work is not None
            with named("grad all-reduce: wait bucket {} (stage {})", b.index, b.stage):
                b.work.wait()  # on NCCL: the current stream waits, the host does not
            self.waits.append((b.index, t0, time.perf_counter_ns()))
            b.work = None
            for i, p in enumerate(b.params):
                if b.had_none[i]:
                    check.append((p, b.view(i), b.grad(i)))
                else:
                    p.grad = b.grad(i)
        if check:  # one host sync for all of them: which averages are all zeros
            nonzero = torch.stack([torch.count_nonzero(v) for _, v, _ in check]).tolist()
            for (p, _, g), n in zip(check, nonzero):
                p.grad = g if n else None

    def remove(self) -> None:
        """Unregister the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []


def broadcast_from_first(tensors: Sequence[torch.Tensor], group: dist.ProcessGroup,
                         chunk_bytes: int = 250 * 2**20) -> None:
    """Copy replica 0's values of ``tensors`` to every member of ``group`` (as DDP does at
    construction), coalesced per device and dtype in chunks of about ``chunk_bytes``."""
    src = dist.get_global_rank(group, 0)
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    with torch.no_grad():
        for ts in groups.values():
            chunks: list[list[torch.Tensor]] = [[]]
            size = 0
            for t in ts:
                if size >= chunk_bytes:
                    chunks.append([])
                    size = 0
                chunks[-1].append(t)
                size += t.numel() * t.element_size()
            for chunk in chunks:
                flat = _flatten_dense_tensors([c.detach() for c in chunk])
                dist.broadcast(flat, src=src, group=group)
                for c, v in zip(chunk, _unflatten_dense_tensors(flat, chunk)):
                    c.copy_(v)
