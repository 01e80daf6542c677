"""How tensors move between ranks: one small interface, two implementations.

``LocalTransport`` keeps messages in a dict so every rank's action list can run in
one process; ``partitioner.runtime.dist.DistTransport`` uses torch.distributed P2P.
The interpreter only ever sees this interface, so both run the same code.

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

from typing import Protocol, Sequence

import torch

__all__ = ["Key", "Layout", "Pending", "Transport", "LocalTransport"]

Key = tuple[str, int, int, int]
Layout = Sequence[tuple[tuple[int, ...], torch.dtype]]  # per tensor of a message: shape, dtype


class Pending(Protocol):
    def wait(self) -> list[torch.Tensor]:
        """Block until the message is in its buffers; return them."""
        ...


class Transport(Protocol):
    #: True when receives may be posted long before use (messages matched by tag, not order).
    prepost: bool
    #: payload bytes handed to ``send`` so far (what this rank put on the wire)
    bytes_sent: int

    def send(self, key: Key, peer: int, tensors: Sequence[torch.Tensor]) -> None:
        """Start sending; the tensors must stay unchanged until ``flush``."""
        ...

    def recv(self, key: Key, peer: int, layout: Layout, device: torch.device | str | None) -> Pending:
        """Start receiving a message of ``layout`` (from the plan) onto ``device``."""
        ...

    def arrived(self, key: Key) -> bool:
        """Whether ``recv(key)`` would not block: lets one process interleave ranks."""
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
    """All ranks in this process; a message is deliverable once its SEND has run."""

    prepost = False

    def __init__(self) -> None:
        self._box: dict[Key, list[torch.Tensor]] = {}
        self.bytes_sent = 0

    def send(self, key: Key, peer: int, tensors: Sequence[torch.Tensor]) -> None:
        self.bytes_sent += sum(t.numel() * t.element_size() for t in tensors)
        self._box[key] = list(tensors)

    def recv(self, key: Key, peer: int, layout: Layout, device: torch.device | str | None) -> Pending:
        return _Copied(self._box, key, layout, device)

    def arrived(self, key: Key) -> bool:
        return key in self._box

    def flush(self) -> None:
        pass
