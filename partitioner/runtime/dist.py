"""``Transport`` on torch.distributed point-to-point: NCCL on CUDA, gloo on CPU.

A message goes as one tensor: the values of a message with several are packed into one
byte buffer (each at a 64-byte aligned offset) and received as views of one buffer, so
a message costs one send and one receive whatever it carries (a cut inside a Llama layer
sends five values: one transfer, one wake-up of the receiver, not five). Each group the interpreter posts
(``partitioner.comms``: a batch of the lowering) is one ``batch_isend_irecv``: on NCCL one
group, whose operations progress together.

Messages carry a tag made from (direction, sending stage, receiving stage,
micro-batch): gloo matches by tag, so every receive of a step can be posted before the
step starts and waited on just before use, overlapping the transfer with compute.
NCCL ignores tags and matches in issue order (``prepost`` False): there the receives go
in the lowering's batches, whose order and grouping cannot deadlock under NCCL's rules.
``DistTransport(..., tagless=True)`` runs gloo that way too (every tag 0, receives in
their batches, so gloo matches in issue order per pair of ranks as NCCL does): the tests
use it to run the NCCL code path's message order for real on CPU.

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
from partitioner.runtime.transport import Key, Layout, Pending

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

    def __init__(self, n_stages: int, group: dist.ProcessGroup | None = None, *, tagless: bool = False) -> None:
        self.group = group
        self.tagless = tagless
        self.prepost = dist.get_backend(group) != "nccl" and not tagless
        self._n_stages = n_stages  # for the tags
        self._sends: list[tuple[list[dist.Work], list[torch.Tensor]]] = []
        self._in_flight: set[Key] = set()  # keys sent since the last flush: their buffers are busy
        self._send_bufs: dict[Key, torch.Tensor] = {}  # CPU only: reused once flushed
        self._recv_bufs: dict[Key, torch.Tensor] = {}  # CPU only: reused by the next step
        self._receiving: set[Key] = set()  # posted, not yet waited on: never reuse their buffers
        self.bytes_sent = 0

    def _tag(self, key: Key) -> int:
        # A value with several consumers goes once to each: the receiving stage is in the tag.
        if self.tagless:
            return 0
        direction, src, dst, mb = key
        n = self._n_stages
        return (((mb * n + src) * n + dst) * 2) + (direction == "B")

    def _peer(self, peer: int) -> int:
        return peer if self.group is None else dist.get_global_rank(self.group, peer)

    def _wire(self, key: Key, tensors: Sequence[torch.Tensor], dev: torch.device) -> torch.Tensor:
        """One tensor for the message: the value itself, or the values packed in one buffer."""
        if len(tensors) == 1:
            # A lone non-tensor value is encoded on the CPU: it goes from the stage's device
            # (NCCL needs every tensor of a group on it; the receiver allocates it there too).
            return tensors[0].to(dev).contiguous()
        # Non-tensor values are encoded on the CPU; they travel in the accelerator's
        # buffer with the activations (the receiver unpacks on its stage's device).
        dev = next((t.device for t in tensors if t.device.type != "cpu"), tensors[0].device)
        layout = [(tuple(t.shape), t.dtype) for t in tensors]
        segs, total = pack_layout(layout)
        buf = self._buffer(self._send_bufs, key, total, torch.uint8, dev, key not in self._in_flight)
        for v, t in zip(_views(buf, layout, segs), tensors):
            v.copy_(t)
        return buf

    def _inbox(self, key: Key, layout: Layout, dev: torch.device) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The buffer a message of ``layout`` lands in, and the tensors the receiver gets."""
        # A receive of this key still outstanding (a step that failed before waiting on it)
        # keeps its buffer: gloo may still write into it.
        reuse = key not in self._receiving
        self._receiving.add(key)
        if len(layout) == 1:
            (shape, dtype), = layout
            buf = self._buffer(self._recv_bufs, key, math.prod(shape), dtype, dev, reuse)
            return buf, [buf.view(shape)]
        segs, total = pack_layout(layout)
        buf = self._buffer(self._recv_bufs, key, total, torch.uint8, dev, reuse)
        return buf, _views(buf, layout, segs)

    def post(self, rank: int, sends: Sequence[tuple[Key, int, Sequence[torch.Tensor]]],
             recvs: Sequence[tuple[Key, int, Layout]], device: torch.device | str | None) -> list[Pending]:
        dev = torch.device(device or "cpu")
        ops: list[dist.P2POp] = []
        wires: list[torch.Tensor] = []
        for key, peer, tensors in sends:
            if not tensors:
                continue
            self.bytes_sent += sum(t.numel() * t.element_size() for t in tensors)
            wire = self._wire(key, tensors, dev)
            self._in_flight.add(key)
            wires.append(wire)  # referenced until the send completes (flush)
            ops.append(dist.P2POp(dist.isend, wire, self._peer(peer), self.group, self._tag(key)))
        n_sends = len(ops)
        out: list[tuple[Key, int, list[torch.Tensor]]] = []
        for key, peer, layout in recvs:
            if not layout:
                out.append((key, peer, []))
                continue
            buf, tensors = self._inbox(key, layout, dev)
            ops.append(dist.P2POp(dist.irecv, buf, self._peer(peer), self.group, self._tag(key)))
            out.append((key, peer, tensors))
        if not ops:
            return [_Works(key, peer, [], t) for key, peer, t in out]
        try:
            works = dist.batch_isend_irecv(ops)
        except RuntimeError as e:  # gloo posts on the socket now: a dead peer shows here, not in wait()
            keys = [k for k, _, _ in sends] + [k for k, _, _ in recvs]
            raise PipelineRuntimeError(f"posting messages {keys} (direction, from stage, to stage, micro-batch) "
                                       f"failed (a peer failed or timed out): {e}", secondary=True) from e
        # NCCL returns one work for the whole group (a wait covers it all); gloo one per operation.
        per_op = len(works) == len(ops)
        self._sends.append((works[:n_sends] if per_op else list(works), wires))
        pending: list[Pending] = []
        i = n_sends
        for key, peer, tensors in out:
            if not tensors:
                pending.append(_Works(key, peer, [], []))
                continue
            pending.append(_Works(key, peer, [works[i]] if per_op else list(works), tensors, self._receiving))
            i += 1
        return pending

    def _buffer(self, cache: dict[Key, torch.Tensor], key: Key, numel: int, dtype: torch.dtype,
                device: torch.device, reuse: bool) -> torch.Tensor:
        buf = cache.get(key) if reuse else None
        if buf is None or buf.numel() != numel or buf.dtype != dtype or buf.device != device:
            buf = torch.empty(numel, dtype=dtype, device=device)
            if device.type == "cpu":
                cache[key] = buf
        return buf

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
