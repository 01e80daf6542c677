"""``Transport`` on torch.distributed point-to-point: NCCL on CUDA, gloo on CPU.

Each message is one ``batch_isend_irecv`` (as torch.distributed.pipelining does per
action), so NCCL launches its tensors as one group. Messages carry a tag made from
(direction, sending stage, receiving stage, micro-batch, value): gloo matches by tag, so every receive of a step
can be posted before the step starts and waited on just before use, overlapping the
transfer with compute. NCCL ignores tags and matches in issue order, so there receives
are posted at their RECV action, in the schedule's order (``prepost`` False), and the
interpreter issues each rank's sends to a peer in the order that peer posts them.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from partitioner.runtime.errors import PipelineRuntimeError
from partitioner.runtime.transport import Key

__all__ = ["DistTransport", "backend_for"]


def backend_for(device: torch.device | str | None) -> str:
    return "nccl" if torch.device(device or "cpu").type == "cuda" else "gloo"


class _Works:
    def __init__(self, key: Key, peer: int, works: list[dist.Work], buffers: list[torch.Tensor]) -> None:
        self.key, self.peer, self.works, self.buffers = key, peer, works, buffers

    def wait(self) -> list[torch.Tensor]:
        try:
            for w in self.works:
                w.wait()
        except Exception as e:  # the peer died or timed out: say which message we waited for
            direction, src, dst, mb = self.key
            raise PipelineRuntimeError(
                f"receiving {'activations' if direction == 'F' else 'gradients'} of stage {src} for stage {dst} "
                f"micro-batch {mb} from rank {self.peer} failed (peer failed or timed out): {e}",
                secondary=True,
            ) from e
        return self.buffers


class DistTransport:
    """P2P over ``group`` (default: the world); peers are ranks within ``group``."""

    def __init__(self, n_stages: int, n_microbatches: int, max_values: int,
                 group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.prepost = dist.get_backend(group) != "nccl"
        self._shape = (n_stages, n_microbatches, max(max_values, 1))
        self._sends: list[tuple[list[dist.Work], list[torch.Tensor]]] = []
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
        return dist.batch_isend_irecv(ops)

    def send(self, key: Key, peer: int, tensors: Sequence[torch.Tensor]) -> None:
        tensors = [t.contiguous() for t in tensors]
        self.bytes_sent += sum(t.numel() * t.element_size() for t in tensors)
        # The tensors stay referenced until the send completes (flush).
        self._sends.append((self._ops(dist.isend, key, peer, tensors), tensors))

    def recv(self, key: Key, peer: int, buffers: Sequence[torch.Tensor]) -> _Works:
        return _Works(key, peer, self._ops(dist.irecv, key, peer, buffers), list(buffers))

    def arrived(self, key: Key) -> bool:
        return True  # receives block in wait(); one process runs one rank

    def flush(self) -> None:
        sends, self._sends = self._sends, []
        try:
            for works, _ in sends:
                for w in works:
                    w.wait()
        except Exception as e:
            raise PipelineRuntimeError(f"a send did not complete (peer failed or timed out): {e}",
                                       action="end of step", secondary=True) from e
