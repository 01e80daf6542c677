"""``Transport`` on torch.distributed point-to-point: NCCL on CUDA, gloo on CPU.

A message goes as one tensor: the values of a message with several are packed into one
byte buffer (each at a 64-byte aligned offset) and received as views of one buffer, so
a message costs one send and one receive whatever it carries (a cut inside a Llama layer
sends five values: one transfer, one wake-up of the receiver, not five). Each message is
one ``batch_isend_irecv`` (as torch.distributed.pipelining does per action).

Messages carry a tag made from (direction, sending stage, receiving stage,
micro-batch): gloo matches by tag, so every receive of a step can be posted before the
step starts and waited on just before use, overlapping the transfer with compute.
NCCL ignores tags and matches in issue order, so there receives are posted at their
RECV action, in the schedule's order (``prepost`` False), and the interpreter issues
each rank's sends to a peer in the order that peer posts them.

On CPU the buffers are kept per message key and reused by the next step (the step's
receives are all posted at its start, so a step holds them all anyway; a new step
only begins once the last one's backward is done, see ``transport``). On CUDA they
are allocated per message: the caching allocator makes that cheap, and keeping them
would hold a step's activations' worth of memory through the optimizer step.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.distributed as dist

from partitioner.runtime.errors import PipelineRuntimeError
from partitioner.runtime.transport import Key, Layout

__all__ = ["DistTransport", "backend_for", "pack_layout"]

_ALIGN = 64  # bytes: any dtype's view of a segment is aligned


def backend_for(device: torch.device | str | None) -> str:
    return "nccl" if torch.device(device or "cpu").type == "cuda" else "gloo"


def pack_layout(layout: Layout) -> tuple[list[tuple[int, int]], int]:
    """(byte offset, byte length) of each tensor of ``layout`` in one packed buffer, and
    the buffer's size."""
    segs, off = [], 0
    for shape, dtype in layout:
        n = math.prod(shape) * torch.empty((), dtype=dtype, device="meta").element_size()
        segs.append((off, n))
        off += -(-n // _ALIGN) * _ALIGN
    return segs, off


def _views(buf: torch.Tensor, layout: Layout, segs: list[tuple[int, int]]) -> list[torch.Tensor]:
    """New tensor objects over ``buf``'s bytes, one per tensor of ``layout``."""
    return [buf[off:off + n].view(dtype).view(shape) for (off, n), (shape, dtype) in zip(segs, layout)]


class _Works:
    def __init__(self, key: Key, peer: int, works: list[dist.Work], tensors: list[torch.Tensor],
                 busy: set[Key] | None = None) -> None:
        self.key, self.peer, self.works, self.tensors, self.busy = key, peer, works, tensors, busy

    def wait(self) -> list[torch.Tensor]:
        try:
            for w in self.works:
                w.wait()
            if self.busy is not None:
                self.busy.discard(self.key)  # its buffer may take the next step's message
        except Exception as e:  # the peer died or timed out: say which message we waited for
            direction, src, dst, mb = self.key
            raise PipelineRuntimeError(
                f"receiving {'activations' if direction == 'F' else 'gradients'} of stage {src} for stage {dst} "
                f"micro-batch {mb} from rank {self.peer} failed (peer failed or timed out): {e}",
                secondary=True,
            ) from e
        return self.tensors


class DistTransport:
    """P2P over ``group`` (default: the world); peers are ranks within ``group``."""

    def __init__(self, n_stages: int, n_microbatches: int, max_values: int,
                 group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.prepost = dist.get_backend(group) != "nccl"
        self._shape = (n_stages, n_microbatches, max(max_values, 1))
        self._sends: list[tuple[list[dist.Work], list[torch.Tensor]]] = []
        self._in_flight: set[Key] = set()  # keys sent since the last flush: their buffers are busy
        self._send_bufs: dict[Key, torch.Tensor] = {}  # CPU only: reused once flushed
        self._recv_bufs: dict[Key, torch.Tensor] = {}  # CPU only: reused by the next step
        self._receiving: set[Key] = set()  # posted, not yet waited on: never reuse their buffers
        self.bytes_sent = 0

    def _tag(self, key: Key, i: int) -> int:
        # A value with several consumers goes once to each: the receiving stage is in the tag.
        direction, src, dst, mb = key
        n_stages, _, width = self._shape
        return ((((mb * n_stages + src) * n_stages + dst) * 2) + (direction == "B")) * width + i

    def _peer(self, peer: int) -> int:
        return peer if self.group is None else dist.get_global_rank(self.group, peer)

    def _ops(self, op: object, key: Key, peer: int, tensors: Sequence[torch.Tensor]) -> list[dist.Work]:
        if not tensors:
            return []
        p = self._peer(peer)
        ops = [dist.P2POp(op, t, p, self.group, self._tag(key, i)) for i, t in enumerate(tensors)]  # type: ignore[arg-type]
        try:
            return dist.batch_isend_irecv(ops)
        except RuntimeError as e:  # gloo posts on the socket now: a dead peer shows here, not in wait()
            what = "sending" if op is dist.isend else "receiving"
            raise PipelineRuntimeError(f"{what} message {key} (direction, from stage, to stage, micro-batch) with rank "
                                       f"{peer} failed (peer failed or timed out): {e}", secondary=True) from e

    def _buffer(self, cache: dict[Key, torch.Tensor], key: Key, numel: int, dtype: torch.dtype,
                device: torch.device, reuse: bool) -> torch.Tensor:
        buf = cache.get(key) if reuse else None
        if buf is None or buf.numel() != numel or buf.dtype != dtype or buf.device != device:
            buf = torch.empty(numel, dtype=dtype, device=device)
            if device.type == "cpu":
                cache[key] = buf
        return buf

    def send(self, key: Key, peer: int, tensors: Sequence[torch.Tensor]) -> None:
        self.bytes_sent += sum(t.numel() * t.element_size() for t in tensors)
        if len(tensors) <= 1:
            wire = [t.contiguous() for t in tensors]
        else:
            # Non-tensor values are encoded on the CPU; they travel in the accelerator's
            # buffer with the activations (the receiver unpacks on its stage's device).
            dev = next((t.device for t in tensors if t.device.type != "cpu"), tensors[0].device)
            layout = [(tuple(t.shape), t.dtype) for t in tensors]
            segs, total = pack_layout(layout)
            buf = self._buffer(self._send_bufs, key, total, torch.uint8, dev, key not in self._in_flight)
            for v, t in zip(_views(buf, layout, segs), tensors):
                v.copy_(t)
            wire = [buf]
        self._in_flight.add(key)
        # The tensors stay referenced until the send completes (flush).
        self._sends.append((self._ops(dist.isend, key, peer, wire), wire))

    def recv(self, key: Key, peer: int, layout: Layout, device: torch.device | str | None) -> _Works:
        dev = torch.device(device or "cpu")
        if not layout:
            return _Works(key, peer, [], [])
        # A receive of this key still outstanding (a step that failed before waiting on it)
        # keeps its buffer: gloo may still write into it.
        reuse = key not in self._receiving
        self._receiving.add(key)
        if len(layout) == 1:
            (shape, dtype), = layout
            buf = self._buffer(self._recv_bufs, key, math.prod(shape), dtype, dev, reuse)
            return _Works(key, peer, self._ops(dist.irecv, key, peer, [buf]), [buf.view(shape)], self._receiving)
        segs, total = pack_layout(layout)
        buf = self._buffer(self._recv_bufs, key, total, torch.uint8, dev, reuse)
        return _Works(key, peer, self._ops(dist.irecv, key, peer, [buf]), _views(buf, layout, segs), self._receiving)

    def arrived(self, key: Key) -> bool:
        return True  # receives block in wait(); one process runs one rank

    def flush(self) -> None:
        sends, self._sends = self._sends, []
        try:
            for works, _ in sends:
                for w in works:
                    w.wait()
        except Exception as e:  # the keys stay in flight: their buffers are never reused
            raise PipelineRuntimeError(f"a send did not complete (peer failed or timed out): {e}",
                                       action="end of step", secondary=True) from e
        self._in_flight.clear()
