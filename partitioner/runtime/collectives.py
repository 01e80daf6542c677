"""Record the collectives this process issues, to check them against NCCL's rules.

NCCL runs each process group as one communicator whose members must issue its collectives
in the same order with the same sizes and dtypes; a mismatch hangs or reads the wrong
bytes, where gloo often lets it pass. ``CollectiveRecorder`` is a context manager that
records, in issue order, every collective the process issues while it is active, as
``partitioner.comms.Collective`` (the group's name and global ranks, the operation, the
elements this rank contributes, the dtype, and the runtime code that issued it);
``comms.check_collectives`` then compares the ranks' records group by group.

It is a ``TorchDispatchMode``, so it sees what reaches the dispatcher: ``torch.distributed``'s
collectives (``c10d`` ops: the replicas' bucketed all-reduce, FSDP2's all-gathers and
reduce-scatters, ZeRO-1's broadcasts, the transport's TP all-gathers, the tie sums, the
gradient norm's all-reduce, ``all_gather_object``) and the functional collectives DTensor
issues (``_c10d_functional`` ops: tensor parallelism's all-reduces, all-gathers and
reduce-scatters), each once, after the tensor subclass has lowered it to plain tensors. A
dispatch mode is thread-local: autograd carries it into its worker threads (a backward's
hooks on CUDA are seen), a thread the program starts itself does not. On gloo groups the
recorder also compares, per group, what it saw with the group's own operation counter (which
every collective and point-to-point operation advances) and lists what it missed in
``unseen``; ``complete()`` refuses a record with gaps.

Point-to-point operations are recorded apart (``p2p``): their order is checked by
``comms.replay_log`` on the interpreter's log, not here.

``PARTITIONER_CHECK_COLLECTIVES=1`` makes every ``Runner.step`` record its collectives and
check them across the job after the step (``verify_across_ranks``): a diagnostic for gloo
dry runs of a layout (on NCCL a mismatch has hung before it could be reported).
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from typing import Any, cast

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

from partitioner.comms import Collective, CollectiveMismatchError, check_collectives
from partitioner.runtime.errors import PipelineRuntimeError

__all__ = ["CollectiveRecorder", "check_enabled", "verify_across_ranks"]

ENV = "PARTITIONER_CHECK_COLLECTIVES"

#: op name (without namespace and overload) -> the operation as NCCL runs it
_C10D = {
    "allreduce_": "all_reduce", "allreduce_coalesced_": "all_reduce", "allgather_": "all_gather",
    "_allgather_base_": "all_gather", "allgather_coalesced_": "all_gather", "allgather_into_tensor_coalesced_": "all_gather",
    "reduce_scatter_": "reduce_scatter", "_reduce_scatter_base_": "reduce_scatter",
    "reduce_scatter_tensor_coalesced_": "reduce_scatter", "broadcast_": "broadcast", "alltoall_": "all_to_all",
    "alltoall_base_": "all_to_all", "barrier": "barrier", "gather_": "gather", "scatter_": "scatter", "reduce_": "reduce",
}
_FUNCTIONAL = {
    "all_reduce": "all_reduce", "all_reduce_": "all_reduce", "all_reduce_coalesced": "all_reduce",
    "all_reduce_coalesced_": "all_reduce", "all_gather_into_tensor": "all_gather", "all_gather_into_tensor_out": "all_gather",
    "all_gather_into_tensor_coalesced": "all_gather", "reduce_scatter_tensor": "reduce_scatter",
    "reduce_scatter_tensor_coalesced": "reduce_scatter", "all_to_all_single": "all_to_all", "broadcast": "broadcast",
    "broadcast_": "broadcast",
}
_FUNCTIONAL_NAMESPACES = ("_c10d_functional", "c10d_functional", "_c10d_functional_autograd")
_P2P = {"send": "send", "recv_": "recv", "recv_any_source_": "recv"}
#: the argument holding what this rank contributes, by preference (scatter: only the root has inputs)
_CONTRIBUTION = ("input", "inputs", "input_tensor", "input_tensors", "tensors", "tensor", "self")
_REDUCE_OPS = {int(v.value): k.lower() for k, v in dist.ReduceOp.RedOpType.__members__.items()}
_THIS = __file__
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep  # .../partitioner/


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _reduce_op(value: Any) -> str | None:
    if isinstance(value, str):
        return value.lower()
    try:  # c10d's ReduceOp reaches the dispatcher as a TorchScript object with an ``op()`` method
        return _REDUCE_OPS.get(int(value.op()), str(value.op()))
    except Exception:  # noqa: BLE001 - an unknown form: the op's name alone
        return None


def _where() -> str:
    """The innermost frame outside torch, this module and generated code (an fx graph's
    ``forward``): the runtime code, test or user code that issued the collective."""
    f: Any = sys._getframe(1)
    while f is not None:
        name = f.f_code.co_filename
        if name != _THIS and not name.startswith("<") and f"{os.sep}torch{os.sep}" not in name:
            short = name[len(_PACKAGE):] if name.startswith(_PACKAGE) else os.path.basename(name)
            return f"{short}:{f.f_lineno} {f.f_code.co_name}"
        f = f.f_back
    return ""


def _group_of(func: Any, args: dict[str, Any]) -> dist.ProcessGroup | None:
    if "process_group" in args:
        return dist.ProcessGroup.unbox(args["process_group"])
    if "group_name" in args:
        return dist.distributed_c10d._resolve_process_group(args["group_name"])
    return None


def _sequence(pg: dist.ProcessGroup) -> int | None:
    """The group's operation counter on gloo (every collective and point-to-point operation
    advances it); None elsewhere (NCCL counts point-to-point operations apart)."""
    try:
        if dist.get_backend(pg) != "gloo":
            return None
        return int(cast(Any, pg)._get_sequence_number_for_group())
    except Exception:  # noqa: BLE001 - a group without a counter is not compared
        return None


class CollectiveRecorder(TorchDispatchMode):
    """While active (``with CollectiveRecorder() as rec:``), ``rec.log`` gets every collective
    this process issues, in issue order (``partitioner.comms.Collective``), and ``rec.p2p``
    every point-to-point operation as ``(group, global ranks, "send"/"recv", peer's group
    rank, numel, dtype)``. After the block, ``rec.unseen`` maps each gloo group on which
    operations ran that the recorder did not see (issued from another thread) to their
    number; ``complete()`` raises if there are any."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[Collective] = []
        self.p2p: list[tuple[str, tuple[int, ...], str, int, int, str]] = []
        self.unseen: dict[str, int] = {}
        self._start: dict[str, tuple[dist.ProcessGroup, int]] = {}
        self._ranks: dict[str, tuple[int, ...]] = {}

    def __enter__(self) -> CollectiveRecorder:
        self._start = {}
        if dist.is_available() and dist.is_initialized():
            for pg in list(dist.distributed_c10d._world.pg_map):
                seq = _sequence(pg)
                if seq is not None:
                    self._start[pg.group_name] = (pg, seq)
        super().__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        seen = Counter(c.group for c in self.log) + Counter(p[0] for p in self.p2p)
        self.unseen = {}
        for name, (pg, start) in self._start.items():
            now = _sequence(pg)
            if now is not None and now - start != seen[name]:
                self.unseen[name] = now - start - seen[name]

    def complete(self) -> None:
        """Refuse a record that missed operations the process groups counted."""
        if self.unseen:
            raise PipelineRuntimeError(
                "the collective recorder missed operations on process group(s) "
                + ", ".join(f"{g!r} ({n})" for g, n in sorted(self.unseen.items()))
                + ": issued from a thread it does not follow (a dispatch mode is thread-local), so the record "
                "cannot prove the sequence")

    def _ranks_of(self, pg: dist.ProcessGroup) -> tuple[int, ...]:
        name = pg.group_name
        if name not in self._ranks:
            self._ranks[name] = tuple(dist.get_process_group_ranks(pg))
        return self._ranks[name]

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # DTensor lowers the op first: its collectives come back here on plain tensors
        packet = getattr(func, "_overloadpacket", None)
        namespace = getattr(func, "namespace", "")
        if packet is not None and namespace in ("c10d", *_FUNCTIONAL_NAMESPACES):
            self._record(func, namespace, packet.__name__, args, kwargs)
        return func(*args, **kwargs)

    def _record(self, func: Any, namespace: str, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        found = _C10D.get(name) if namespace == "c10d" else _FUNCTIONAL.get(name)
        p2p = _P2P.get(name) if namespace == "c10d" else None
        if found is None and p2p is None:
            return  # wait_tensor, wrappers, store-side helpers: not an operation of the group
        bound = {a.name: v for a, v in zip(func._schema.arguments, args)}
        bound.update(kwargs)
        pg = _group_of(func, bound)
        if pg is None:
            return
        ranks = self._ranks_of(pg)
        if p2p is not None:
            peer = bound.get("dst", bound.get("src", bound.get("srcRank", -1)))
            ts = _tensors(bound.get("tensors"))
            self.p2p.append((pg.group_name, ranks, p2p, int(peer) if isinstance(peer, int) else -1,
                             sum(t.numel() for t in ts), str(ts[0].dtype).removeprefix("torch.") if ts else ""))
            return
        op = cast(str, found)
        key = "output_tensors" if name == "scatter_" else next((k for k in _CONTRIBUTION if k in bound), None)
        ts = _tensors(bound.get(key)) if key is not None else []
        if op in ("all_reduce", "reduce_scatter", "reduce"):
            how = _reduce_op(bound.get("reduce_op", bound.get("op")))
            op = f"{op}({how})" if how else op
        elif op == "broadcast":
            src = bound.get("root_rank", bound.get("src"))
            op = f"broadcast(src={src})" if src is not None else op
        dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in ts})
        self.log.append(Collective(pg.group_name, ranks, op, sum(t.numel() for t in ts), "/".join(dtypes), _where()))


def check_enabled() -> bool:
    """Whether ``PARTITIONER_CHECK_COLLECTIVES`` asks every runner step to check its collectives."""
    return os.environ.get(ENV, "").strip().lower() in ("1", "true", "yes", "on")


def verify_across_ranks(rec: CollectiveRecorder, rank: int) -> None:
    """Collective over the default group (every rank calls it): gather every rank's record and
    check each process group's sequences (``comms.check_collectives``) and that the record is
    complete. Raises ``PipelineRuntimeError`` on every rank, naming the group, the ranks and the
    first position where they differ."""
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, (rec.log, rec.unseen))
    problems = [f"rank {r}: missed {u}" for r, (_, u) in enumerate(every) if u]
    try:
        check_collectives({r: log for r, (log, _) in enumerate(every)})
    except CollectiveMismatchError as e:
        problems.insert(0, str(e))
    if problems:
        raise PipelineRuntimeError(f"rank {rank}: {ENV}: " + "; ".join(problems), rank,
                                   "checking the step's collectives across the job")
