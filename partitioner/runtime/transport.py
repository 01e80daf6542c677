"""How tensors move between ranks: one small interface, two implementations.

``LocalTransport`` keeps messages in a dict so every rank's action list can run in
one process; ``partitioner.runtime.dist.DistTransport`` uses torch.distributed P2P.
The interpreter only ever sees this interface, so both run the same code.

A message is named by ``Key``: (direction "F" or "B", the stage that sends it, the
stage it is for, micro-batch). The two stages need not be neighbours: a skip
connection goes straight from its producer to its consumer (``routing``).
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch

__all__ = ["Key", "Pending", "Transport", "LocalTransport"]

Key = tuple[str, int, int, int]


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

    def recv(self, key: Key, peer: int, buffers: Sequence[torch.Tensor]) -> Pending:
        """Start receiving into ``buffers`` (laid out from the plan)."""
        ...

    def arrived(self, key: Key) -> bool:
        """Whether ``recv(key)`` would not block: lets one process interleave ranks."""
        ...

    def flush(self) -> None:
        """Wait for every send started so far."""
        ...


class _Copied:
    def __init__(self, box: dict[Key, list[torch.Tensor]], key: Key, buffers: Sequence[torch.Tensor]) -> None:
        self._box, self._key, self._buffers = box, key, list(buffers)

    def wait(self) -> list[torch.Tensor]:
        sent = self._box.pop(self._key)
        # Copying into the receiver's own buffers gives it what a wire would: no aliasing
        # with the sender's activations, and the same shape check as a real receive.
        for buf, t in zip(self._buffers, sent, strict=True):
            buf.copy_(t)
        return self._buffers


class LocalTransport:
    """All ranks in this process; a message is deliverable once its SEND has run."""

    prepost = False

    def __init__(self) -> None:
        self._box: dict[Key, list[torch.Tensor]] = {}
        self.bytes_sent = 0

    def send(self, key: Key, peer: int, tensors: Sequence[torch.Tensor]) -> None:
        self.bytes_sent += sum(t.numel() * t.element_size() for t in tensors)
        self._box[key] = list(tensors)

    def recv(self, key: Key, peer: int, buffers: Sequence[torch.Tensor]) -> Pending:
        return _Copied(self._box, key, buffers)

    def arrived(self, key: Key) -> bool:
        return key in self._box

    def flush(self) -> None:
        pass
