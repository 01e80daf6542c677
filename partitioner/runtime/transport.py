"""How tensors move between ranks: one small interface, three implementations.

``LocalTransport`` keeps messages in a dict so every rank's action list can run in
one process (buffered, as gloo behaves); ``NcclTransport`` does the same under NCCL's
rules, the double the tests run every schedule on; ``partitioner.runtime.dist.DistTransport``
uses torch.distributed P2P. The interpreter only ever sees this interface, so all run
the same code. The interpreter issues a rank's operations in groups (``post``), as
``partitioner.comms`` lowers them.

A message is named by ``Key``: (direction "F" or "B", the stage that sends it, the
stage it is for, micro-batch). The two stages need not be neighbours: a skip
connection goes straight from its producer to its consumer (``routing``).

A receive names the message's ``Layout`` (each tensor's shape and dtype, from the
plan) and the transport returns tensors of that layout. It owns the memory: a
transport may hand out the same storage again when the same key is received in a
later step (``DistTransport`` on CPU does), always as new tensor objects, so nothing
carries over (``.grad``, ``requires_grad``) but the bytes, which the new message
overwrites. So a receiver must be done with a step's messages when the step ends.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import torch

from partitioner.comms import NcclModel, describe
from partitioner.runtime.errors import PipelineRuntimeError

__all__ = ["Key", "Layout", "Pending", "Transport", "LocalTransport", "NcclTransport"]

Key = tuple[str, int, int, int]  # partitioner.comms.Key
Layout = Sequence[tuple[tuple[int, ...], torch.dtype]]  # per tensor of a message: shape, dtype


class Pending(Protocol):
    def wait(self) -> list[torch.Tensor]:
        """Block until the message is in its buffers; return them."""
        ...


class Transport(Protocol):
    #: True when receives may be posted long before use (messages matched by tag, not order):
    #: the interpreter then posts every receive of a step at its start.
    prepost: bool
    #: payload bytes handed to ``post`` so far (what this rank put on the wire)
    bytes_sent: int

    def post(self, rank: int, sends: Sequence[tuple[Key, int, Sequence[torch.Tensor]]],
             recvs: Sequence[tuple[Key, int, Layout]], device: torch.device | str | None) -> list[Pending]:
        """Issue one group for ``rank``: sends ``(key, peer, tensors)`` (unchanged until
        ``flush``) and receives ``(key, peer, layout from the plan)`` onto ``device``, which
        progress together. Returns one ``Pending`` per receive, in order."""
        ...

    def arrived(self, key: Key) -> bool:
        """Whether waiting for message ``key`` would not block: lets one process interleave ranks."""
        ...

    def flush(self) -> None:
        """Wait for every send started so far."""
        ...


class _Copied:
    def __init__(self, box: dict[Key, list[torch.Tensor]], key: Key, layout: Layout,
                 device: torch.device | str | None) -> None:
        self._box, self._key, self._layout, self._device = box, key, list(layout), device

    def wait(self) -> list[torch.Tensor]:
        sent = self._box.pop(self._key)
        # Copying into the receiver's own buffers gives it what a wire would: no aliasing
        # with the sender's activations, and the same shape check as a real receive.
        out = [torch.empty(shape, dtype=dtype, device=self._device) for shape, dtype in self._layout]
        for buf, t in zip(out, sent, strict=True):
            buf.copy_(t)
        return out


class LocalTransport:
    """All ranks in this process; a message is deliverable once its send has been issued
    (buffered, matched by name: gloo's semantics)."""

    prepost = False

    def __init__(self) -> None:
        self._box: dict[Key, list[torch.Tensor]] = {}
        self.bytes_sent = 0

    def post(self, rank: int, sends: Sequence[tuple[Key, int, Sequence[torch.Tensor]]],
             recvs: Sequence[tuple[Key, int, Layout]], device: torch.device | str | None) -> list[Pending]:
        for key, _, tensors in sends:
            self.bytes_sent += sum(t.numel() * t.element_size() for t in tensors)
            self._box[key] = list(tensors)
        return [_Copied(self._box, key, layout, device) for key, _, layout in recvs]

    def arrived(self, key: Key) -> bool:
        return key in self._box

    def flush(self) -> None:
        pass


class _Matched:
    def __init__(self, transport: NcclTransport, rank: int, key: Key) -> None:
        self._t, self._rank, self._key = transport, rank, key

    def wait(self) -> list[torch.Tensor]:
        if not self._t.arrived(self._key):  # the driver only waits for what has arrived
            raise PipelineRuntimeError(f"rank {self._rank} waited for {describe(self._key)} before its batch completed")
        return self._t._delivered.pop(self._key)


class NcclTransport:
    """All ranks in this process, under NCCL's rules (``partitioner.comms.NcclModel``):
    one in-order queue of groups per rank, tags ignored (the k-th send from rank a to rank
    b meets the k-th receive b posts from a, whatever its key), a send completes only when
    its receive runs, a wait covers the receive's whole group. A message whose key or
    layout differs from the receive it meets raises: on NCCL it would land silently in the
    wrong buffer. ``train_step(..., comm="nccl")`` runs a step on it."""

    prepost = False

    def __init__(self, n_ranks: int) -> None:
        self.model = NcclModel(n_ranks, on_match=self._match)
        self.bytes_sent = 0
        self._data: dict[tuple[int, Key], list[torch.Tensor]] = {}  # (sender, key) -> tensors
        self._want: dict[tuple[int, Key], tuple[Layout, torch.device | str | None]] = {}
        self._delivered: dict[Key, list[torch.Tensor]] = {}
        self._receiver: dict[Key, int] = {}

    def _match(self, key: Key, send: Any, recv: Any) -> None:
        sent = self._data.pop((send.rank, key))
        layout, device = self._want.pop((recv.rank, key))
        got = [(tuple(t.shape), t.dtype) for t in sent]
        if got != [(tuple(s), d) for s, d in layout]:
            raise PipelineRuntimeError(f"rank {send.rank}'s message {describe(key)} ({got}) met a receive of layout "
                                       f"{list(layout)} on rank {recv.rank}: sizes differ")
        out = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in layout]
        for buf, t in zip(out, sent):
            buf.copy_(t)
        self._delivered[key] = out

    def post(self, rank: int, sends: Sequence[tuple[Key, int, Sequence[torch.Tensor]]],
             recvs: Sequence[tuple[Key, int, Layout]], device: torch.device | str | None) -> list[Pending]:
        for key, _, tensors in sends:
            self.bytes_sent += sum(t.numel() * t.element_size() for t in tensors)
            self._data[(rank, key)] = list(tensors)
        for key, _, layout in recvs:
            self._want[(rank, key)] = (layout, device)
            self._receiver[key] = rank
        self.model.issue(rank, [(k, p) for k, p, _ in sends], [(k, p) for k, p, _ in recvs],
                         " ".join([*(f"send {k}" for k, _, _ in sends), *(f"recv {k}" for k, _, _ in recvs)]))
        self.model.progress()
        return [_Matched(self, rank, key) for key, _, _ in recvs]

    def arrived(self, key: Key) -> bool:
        self.model.progress()
        rank = self._receiver.get(key)
        return rank is not None and self.model.complete(rank, key)

    def flush(self) -> None:
        self.model.progress()

    def pending(self) -> list[str]:
        """What each rank's queue waits for (empty when every group completed)."""
        self.model.progress()
        return self.model.waits()
