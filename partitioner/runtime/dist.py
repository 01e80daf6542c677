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

Under tensor parallelism (``tp_group``: the stage's T > 1 TP ranks hold every boundary
value replicated) a message goes once per TP group, not T times (Megatron's scatter/gather):
the wire buffer's B bytes are cut into T chunks of ceil(B / T) (the last one shorter), TP
rank t sends chunk t to its peer (TP rank t of the other stage), which receives it into its
slice of a buffer padded to T chunks and, when the message is waited on, all-gathers the
chunks over the TP group (``dist.all_gather_single``, in place) before unpacking. Forward
activations and backward gradients alike. A message too small for every rank to get a
non-empty chunk (B < T, or the last chunk empty) goes whole, as without TP.
``PARTITIONER_TP_SCATTER=0`` (read when the transport is made) sends everything whole.

Sequence parallelism (``own``, set by ``runtime.tensor_parallel.shard_boundaries``): some values
of a message are this TP rank's own sequence shard (S/T tokens, different on every TP rank), the
others copies every TP rank holds. A message with own values goes as one buffer per TP pair:
the own values packed first, whole (each rank's shard is 1/T of the value already: no gather),
then this rank's chunk of the shared values packed as above, all-gathered over the TP group when
waited on (only when there are shared values to gather). Both ends lay the message out from the
same flags and sizes.
"""

from __future__ import annotations

import math
import os
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from partitioner.runtime.errors import PipelineRuntimeError
from partitioner.runtime.transport import Key, Layout, Pending

__all__ = ["DistTransport", "backend_for", "pack_layout"]

_ALIGN = 64  # bytes: any dtype's view of a segment is aligned

def scatter_enabled() -> bool:
    """Whether a transport made now scatters messages over its TP group (default on;
    ``PARTITIONER_TP_SCATTER=0`` turns it off, for debugging)."""
    return os.environ.get("PARTITIONER_TP_SCATTER", "1").strip().lower() not in ("0", "false", "no", "off")


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


def _message_bytes(layout: Layout) -> int:
    """Bytes of a message's wire buffer: the lone tensor's, or the packed buffer's."""
    if len(layout) == 1:
        (shape, dtype), = layout
        return math.prod(shape) * torch.empty((), dtype=dtype, device="meta").element_size()
    return pack_layout(layout)[1]


def _views(buf: torch.Tensor, layout: Layout, segs: list[tuple[int, int]]) -> list[torch.Tensor]:
    """New tensor objects over ``buf``'s bytes, one per tensor of ``layout``."""
    return [buf[off:off + n].view(dtype).view(shape) for (off, n), (shape, dtype) in zip(segs, layout)]


#: what a receive all-gathers when waited on: (the whole padded buffer, this rank's chunk slot
#: in it, the TP group, the bytes received for that slot elsewhere (copied in first) or None)
_Gather = tuple[torch.Tensor, torch.Tensor, dist.ProcessGroup, torch.Tensor | None]


class _Works:
    def __init__(self, key: Key, peer: int, works: list[dist.Work], tensors: list[torch.Tensor],
                 busy: set[Key] | None = None, gather: _Gather | None = None) -> None:
        self.key, self.peer, self.works, self.tensors, self.busy = key, peer, works, tensors, busy
        self.gather = gather  # all-gathered on wait

    def wait(self) -> list[torch.Tensor]:
        direction, src, dst, mb = self.key
        what = f"{'activations' if direction == 'F' else 'gradients'} of stage {src} for stage {dst} micro-batch {mb}"
        try:
            for w in self.works:
                w.wait()
        except Exception as e:  # the peer died or timed out: say which message we waited for
            raise PipelineRuntimeError(f"receiving {what} from rank {self.peer} failed (peer failed or timed out): {e}",
                                       secondary=True) from e
        if self.gather is not None:
            # NCCL safety: the TP ranks of a stage run identical action lists, and the interpreter
            # waits on a message at a fixed point of its list (the first compute that uses it;
            # ``arrived`` is always True here, so no timing decides the order). So every TP rank
            # issues this all-gather at the same point of its list, in the same order relative
            # to the other all-gathers and to DTensor's TP collectives inside the computes: the
            # TP communicator sees one sequence of collectives on all its ranks. It starts only
            # after this rank's chunk arrived; the chunks of the other TP ranks come from the
            # other TP ranks of the sending stage, which issued their sends at the same point of
            # their (identical) lists as our peer did, so the pipelines of the T TP indices are
            # copies of the one whose P2P order ``partitioner.comms`` makes deadlock-free, and
            # this all-gather joins copies that each reach it.
            whole, mine, tp_group, got = self.gather
            if got is not None:  # the chunk came behind this rank's own shards: into its slot
                mine[:got.numel()].copy_(got)
            try:
                dist.all_gather_single(whole, mine, group=tp_group)
            except Exception as e:
                raise PipelineRuntimeError(f"all-gathering the chunks of {what} over the tensor-parallel group "
                                           f"failed (a TP rank failed or timed out): {e}", secondary=True) from e
            self.gather = None
        if self.busy is not None:
            self.busy.discard(self.key)  # its buffer may take the next step's message
        return self.tensors


class DistTransport:
    """P2P over ``group`` (default: the world); peers are ranks within ``group``."""

    def __init__(self, n_stages: int, group: dist.ProcessGroup | None = None, *, tagless: bool = False,
                 tp_group: dist.ProcessGroup | None = None, scatter: bool | None = None) -> None:
        self.group = group
        #: the TP group whose ranks hold this rank's messages replicated (None: no TP)
        self.tp_group = tp_group
        self.tp_size = dist.get_world_size(tp_group) if tp_group is not None else 1
        self.tp_rank = dist.get_rank(tp_group) if tp_group is not None else 0
        #: send 1/T of each message and all-gather at the receiver (``scatter_enabled``)
        self.scatter = (scatter_enabled() if scatter is None else scatter) and self.tp_size > 1
        #: bytes this rank's P2P sends put on the wire (a chunk under ``scatter``; padding included)
        self.wire_bytes = 0
        #: sequence parallelism: per message key, for each tensor it carries, whether it is this
        #: TP rank's own shard (sent as it is) rather than a copy every TP rank holds; None: none are
        self.own: Callable[[Key], Sequence[bool]] | None = None
        self.tagless = tagless
        self.prepost = dist.get_backend(group) != "nccl" and not tagless
        self._n_stages = n_stages  # for the tags
        self._sends: list[tuple[list[dist.Work], list[torch.Tensor]]] = []
        self._in_flight: set[Key] = set()  # keys sent since the last flush: their buffers are busy
        self._send_bufs: dict[Key, torch.Tensor] = {}  # CPU only: reused once flushed
        self._recv_bufs: dict[Key, torch.Tensor] = {}  # CPU only: reused by the next step
        # CPU only: the shared values of a message with own shards, packed (send) or gathered (receive)
        self._whole_bufs: dict[Key, torch.Tensor] = {}
        self._receiving: set[Key] = set()  # posted, not yet waited on: never reuse their buffers
        self.bytes_sent = 0

    def _tag(self, key: Key) -> int:
        # A value with several consumers goes once to each: the receiving stage is in the tag.
        if self.tagless:
            return 0
        direction, src, dst, mb = key
        n = self._n_stages
        return (((mb * n + src) * n + dst) * 2) + (direction == "B")

    def _chunk(self, nbytes: int) -> tuple[int, int, int] | None:
        """(chunk size, this rank's offset, this rank's length) in bytes when a message of
        ``nbytes`` goes as T chunks, else None (send it whole). Sender and receiver decide
        the same from the size alone."""
        t = self.tp_size
        if not self.scatter or nbytes < t:
            return None
        chunk = -(-nbytes // t)
        if chunk * (t - 1) >= nbytes:  # the last TP rank would have nothing to send
            return None
        start = chunk * self.tp_rank
        return chunk, start, min(chunk, nbytes - start)

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

    def _flags(self, key: Key, n: int) -> Sequence[bool] | None:
        """``own``'s flags for message ``key`` of ``n`` tensors, None when none is own."""
        if self.own is None:
            return None
        flags = self.own(key)
        if len(flags) != n:
            raise PipelineRuntimeError(f"message {key}: {n} tensors, but the sequence-parallel layout names "
                                       f"{len(flags)}: the runner and the plan disagree")
        return flags if any(flags) else None

    def _mixed(self, layout: Layout, flags: Sequence[bool]) -> tuple[list[tuple[int, int]], int, Layout,
                                                                     tuple[int, int, int] | None, int]:
        """How a message with own values is laid out on this rank: the own values' (offset,
        length) in the buffer and their size (aligned), the shared values' layout, this rank's
        chunk of their bytes (``_chunk``; None: they go whole) and the bytes of them sent."""
        own = [x for x, f in zip(layout, flags) if f]
        shared = [x for x, f in zip(layout, flags) if not f]
        segs, head = pack_layout(own)
        nbytes = _message_bytes(shared) if shared else 0
        part = self._chunk(nbytes) if shared else None
        return segs, head, shared, part, (part[2] if part is not None else nbytes)

    def _send_mixed(self, key: Key, tensors: Sequence[torch.Tensor], flags: Sequence[bool],
                    dev: torch.device) -> torch.Tensor:
        """One buffer: the own values, then this rank's chunk of the shared values (``_mixed``)."""
        if len(tensors) == 1:  # a lone shard goes as it is, as a lone value without TP
            return tensors[0].to(dev).contiguous()
        dev = next((t.device for t in tensors if t.device.type != "cpu"), dev)
        layout = [(tuple(t.shape), t.dtype) for t in tensors]
        segs, head, shared_layout, part, n = self._mixed(layout, flags)
        shared = [t for t, f in zip(tensors, flags) if not f]
        free = key not in self._in_flight
        buf = self._buffer(self._send_bufs, key, head + n, torch.uint8, dev, free)
        own = [t for t, f in zip(tensors, flags) if f]
        for v, t in zip(_views(buf, [(tuple(t.shape), t.dtype) for t in own], segs), own):
            v.copy_(t)
        if shared:
            if len(shared) == 1:
                rest = shared[0].to(dev).detach().contiguous().reshape(-1).view(torch.uint8)
            else:  # packed as a message of them alone would be, so the chunks match ``_recv_mixed``'s
                ssegs, total = pack_layout(shared_layout)
                rest = self._buffer(self._whole_bufs, key, total, torch.uint8, dev, free)
                for v, t in zip(_views(rest, shared_layout, ssegs), shared):
                    v.copy_(t)
            start = part[1] if part is not None else 0
            buf[head:head + n].copy_(rest[start:start + n])
        return buf

    def _recv_mixed(self, key: Key, layout: Layout, flags: Sequence[bool], dev: torch.device
                    ) -> tuple[torch.Tensor, list[torch.Tensor], _Gather | None]:
        """The receive buffer of a message with own values, its tensors in message order, and
        the all-gather of the shared values' chunks (None when they came whole)."""
        reuse = key not in self._receiving
        self._receiving.add(key)
        if len(layout) == 1:  # a lone shard: received as it is
            (shape, dtype), = layout
            one = self._buffer(self._recv_bufs, key, math.prod(shape), dtype, dev, reuse)
            return one, [one.view(shape)], None
        segs, head, shared, part, n = self._mixed(layout, flags)
        buf = self._buffer(self._recv_bufs, key, head + n, torch.uint8, dev, reuse)
        own = iter(_views(buf, [x for x, f in zip(layout, flags) if f], segs))
        gather: _Gather | None = None
        if not shared:
            rest: list[torch.Tensor] = []
        else:
            ssegs = pack_layout(shared)[0] if len(shared) > 1 else [(0, _message_bytes(shared))]
            if part is None:
                whole = buf[head:head + n]
            else:
                assert self.tp_group is not None
                chunk, start, _ = part
                whole = self._buffer(self._whole_bufs, key, chunk * self.tp_size, torch.uint8, dev, reuse)
                gather = (whole, whole[start:start + chunk], self.tp_group, buf[head:head + n])
            rest = _views(whole, shared, ssegs)
        others = iter(rest)
        return buf, [next(own) if f else next(others) for f in flags], gather

    def _inbox(self, key: Key, layout: Layout, dev: torch.device) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The buffer a message of ``layout`` lands in, and the tensors the receiver gets."""
        # A receive of this key still outstanding (a step that failed before waiting on it)
        # keeps its buffer: gloo may still write into it.
        reuse = key not in self._receiving
        self._receiving.add(key)
        part = self._chunk(_message_bytes(layout))
        if part is not None:  # T chunks: one byte buffer padded to T x chunk, the values views of its start
            segs, total = pack_layout(layout) if len(layout) > 1 else ([(0, _message_bytes(layout))], 0)
            buf = self._buffer(self._recv_bufs, key, part[0] * self.tp_size, torch.uint8, dev, reuse)
            return buf, _views(buf, layout, segs)
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
            flags = self._flags(key, len(tensors))
            wire = self._wire(key, tensors, dev) if flags is None else self._send_mixed(key, tensors, flags, dev)
            part = self._chunk(wire.numel() * wire.element_size()) if flags is None else None
            if part is not None:  # this TP rank's chunk of the bytes: the other ranks send the rest
                _, start, n = part
                wire = wire.detach().reshape(-1).view(torch.uint8)[start:start + n]
            self.wire_bytes += wire.numel() * wire.element_size()
            self._in_flight.add(key)
            wires.append(wire)  # referenced until the send completes (flush)
            ops.append(dist.P2POp(dist.isend, wire, self._peer(peer), self.group, self._tag(key)))
        n_sends = len(ops)
        out: list[tuple[Key, int, list[torch.Tensor]]] = []
        gathers: dict[int, _Gather] = {}
        for key, peer, layout in recvs:
            if not layout:
                out.append((key, peer, []))
                continue
            flags = self._flags(key, len(layout))
            if flags is not None:  # own shards, then the shared values (whole, or a chunk to gather)
                buf, tensors, gather = self._recv_mixed(key, layout, flags, dev)
                if gather is not None:
                    gathers[len(out)] = gather
                ops.append(dist.P2POp(dist.irecv, buf, self._peer(peer), self.group, self._tag(key)))
                out.append((key, peer, tensors))
                continue
            buf, tensors = self._inbox(key, layout, dev)
            part = self._chunk(_message_bytes(layout))
            if part is not None and self.tp_group is not None:
                # a chunked message (``_inbox`` padded its buffer to T chunks): receive this
                # rank's chunk into its slice; ``_Works.wait`` all-gathers the others
                chunk, start, n = part
                gathers[len(out)] = (buf, buf[start:start + chunk], self.tp_group, None)
                buf = buf[start:start + n]
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
        for j, (key, peer, tensors) in enumerate(out):
            if not tensors:
                pending.append(_Works(key, peer, [], []))
                continue
            pending.append(_Works(key, peer, [works[i]] if per_op else list(works), tensors, self._receiving,
                                  gathers.get(j)))
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
