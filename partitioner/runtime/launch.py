"""Start one process per rank and make a failure on any rank end all of them, quickly.

``spawn(fn, world_size, *args)`` runs ``fn(rank, world_size, *args)`` in
``world_size`` processes with the default process group initialised (env://,
MASTER_ADDR=127.0.0.1, a free port) and returns their results in rank order. Under
``torchrun`` (RANK/WORLD_SIZE set) it runs ``fn`` once, in this process.

When a rank raises, it reports its error (and the action it was running) to the
parent, which gives the others a moment to report, then terminates every rank still
alive and raises ``PipelineRuntimeError`` naming the rank that failed first for a
reason of its own, rather than the neighbours whose receives broke because of it.
Process-group timeouts bound the wait where no parent watches (torchrun).
"""

from __future__ import annotations

import io
import os
import queue
import socket
import sys
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from partitioner.runtime.errors import PipelineRuntimeError

__all__ = ["spawn", "free_port", "init_from_env"]

_GRACE_S = 2.0  # after a failure, how long other ranks may still report theirs
#: the action a rank reports when it fails while joining the process group
_JOIN = "join the process group"
#: joining failures of the local machine's sockets, not of the job: another process took the free
#: port between ``free_port`` and the store binding it, or a peer's connection dropped while the
#: ranks formed gloo's mesh on a loaded machine. ``spawn`` starts such a job once more on a new port.
_TRANSIENT_JOIN = ("connectFullMesh failed", "Address already in use", "Connection closed by peer",
                   "Connection reset by peer")


class _JoinFailed(Exception):
    """Every rank that reported failed while joining, for a transient socket reason."""

    def __init__(self, error: PipelineRuntimeError) -> None:
        super().__init__(str(error))
        self.error = error


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_from_env(backend: str = "gloo", timeout_s: float = 120.0, threads: int | None = 1) -> tuple[int, int]:
    """Join the default process group from RANK/WORLD_SIZE/MASTER_* (torchrun or spawn)."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if threads is not None and backend == "gloo":
        torch.set_num_threads(threads)  # CPU ranks share the cores: one thread each
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s))
    return rank, world


def _dumps(value: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(value, buf)  # tensors as bytes: no shared-memory handles outliving the child
    return buf.getvalue()


def _compile_in_process() -> None:
    """A forked rank compiles with inductor in its own process, never through a pool.

    A parent that has compiled before owns inductor's compile-worker pool (a subprocess
    and its reader thread); a forked child inherits the pool object but not the worker,
    so its first compilation would wait forever for results that never come. One compile
    thread makes inductor compile in the calling process. A parent that never loaded
    inductor has no pool to inherit, and the child is left alone (loading it costs seconds).
    """
    config = sys.modules.get("torch._inductor.config")
    if config is not None:
        config.compile_threads = 1  # type: ignore[attr-defined]


def _child(fn: Callable[..., Any], rank: int, world: int, args: tuple[Any, ...], port: int, backend: str,
           timeout_s: float, threads: int | None, results: Any, forked: bool = False) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    if forked:
        _compile_in_process()
    code = 0
    joined = False
    try:
        init_from_env(backend, timeout_s, threads)
        joined = True
        results.put(("ok", rank, _dumps(fn(rank, world, *args))))
    except BaseException as e:  # noqa: BLE001 - every failure must reach the parent
        code = 1
        results.put(("error", rank, getattr(e, "action", None) if joined else _JOIN, f"{type(e).__name__}: {e}",
                     traceback.format_exc(), bool(getattr(e, "secondary", False)), time.time()))
    finally:
        results.close()
        results.join_thread()
        if code == 0 and dist.is_initialized():
            dist.destroy_process_group()
    # Skip interpreter teardown: a failed rank's process group may block in its destructor.
    os._exit(code)


def spawn(fn: Callable[..., Any], world_size: int, *args: Any, backend: str = "gloo", timeout_s: float = 120.0,
          threads: int | None = 1, start_method: str | None = None) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` ranks; results in rank order.

    ``start_method`` defaults to "fork" where it is safe (Linux, CUDA not initialised):
    ``fn`` and ``args`` are then inherited, not pickled, so closures and Pipes work.
    Ranks that all fail while joining the process group for a transient socket reason (the
    free port taken meanwhile, a connection dropped while gloo forms its mesh) are started
    once more on a new port; any other failure is raised at once.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        rank, world = init_from_env(backend, timeout_s, threads)
        if world != world_size:
            raise PipelineRuntimeError(f"torchrun started {world} ranks, the job needs {world_size}: "
                                       f"use --nproc-per-node {world_size}")
        return [fn(rank, world, *args)]
    if start_method is None:
        start_method = "fork" if sys.platform == "linux" and not torch.cuda.is_initialized() else "spawn"
    ctx = mp.get_context(start_method)
    for attempt in range(2):
        try:
            return _run(ctx, fn, world_size, args, backend, timeout_s, threads, start_method == "fork")
        except _JoinFailed as e:
            if attempt:
                raise e.error from None
    raise AssertionError("unreachable")


def _run(ctx: Any, fn: Callable[..., Any], world_size: int, args: tuple[Any, ...], backend: str, timeout_s: float,
         threads: int | None, forked: bool) -> list[Any]:
    """One start of the ranks on a fresh port; their results in rank order."""
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child,  # type: ignore[attr-defined]
                         args=(fn, r, world_size, args, port, backend, timeout_s, threads, results, forked),
                         name=f"pipeline-rank-{r}") for r in range(world_size)]
    for p in procs:
        p.start()
    try:
        return _watch(procs, results, timeout_s)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()


def _watch(procs: list[Any], results: Any, timeout_s: float) -> list[Any]:
    deadline = time.monotonic() + timeout_s
    out: dict[int, Any] = {}
    errors: list[tuple[Any, ...]] = []
    failed_at: float | None = None
    while len(out) < len(procs):
        now = time.monotonic()
        try:
            msg = results.get(timeout=0.05)
        except queue.Empty:
            msg = None
        if msg is not None and msg[0] == "ok":
            out[msg[1]] = torch.load(io.BytesIO(msg[2]), weights_only=False)
        elif msg is not None:
            errors.append(msg[1:])
            failed_at = failed_at or now
        dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in {e[0] for e in errors}]
        if dead and failed_at is None:
            failed_at = now  # died without a report (killed, segfault): wait briefly for one
        if failed_at is not None and (now - failed_at > _GRACE_S or all(p.exitcode is not None for p in procs)):
            failure = _failure(errors, dead, procs)
            if not out and errors and all(e[1] == _JOIN and any(t in e[2] for t in _TRANSIENT_JOIN) for e in errors):
                raise _JoinFailed(failure)
            raise failure
        if now > deadline:
            running = [r for r, p in enumerate(procs) if r not in out]
            raise PipelineRuntimeError(f"pipeline ranks {running} did not finish within {timeout_s:g} s; "
                                       "stopped them all (a hang: check the schedule or raise timeout_s)")
    return [out[r] for r in range(len(procs))]


def _failure(errors: list[tuple[Any, ...]], dead: list[int], procs: list[Any]) -> PipelineRuntimeError:
    if dead and all(e[4] for e in errors):  # the others only broke waiting on it: the dead rank is the cause
        rank = dead[0]
        first = min(errors, key=lambda e: e[5]) if errors else None
        peers = (f"; ranks {sorted({e[0] for e in errors})} failed waiting on it (first: rank {first[0]}"
                 f"{f' at action {first[1]}' if first[1] else ''}: {first[2]})" if first else "")
        return PipelineRuntimeError(f"rank {rank} exited with code {procs[rank].exitcode} without reporting an error"
                                    f"{peers}; stopped the other ranks", rank)
    if errors:
        # The root cause is the earliest error that was not a broken receive.
        rank, action, message, tb, _, _ = min(errors, key=lambda e: (e[4], e[5]))
        others = sorted({e[0] for e in errors} - {rank})
        where = f" at action {action}" if action else ""
        also = f"; ranks {others} failed after it" if others else ""
        return PipelineRuntimeError(f"rank {rank} failed{where}: {message}{also}; stopped the other ranks\n"
                                    f"--- rank {rank} traceback ---\n{tb}", rank, action)
    rank = dead[0]
    return PipelineRuntimeError(f"rank {rank} exited with code {procs[rank].exitcode} without reporting an error; "
                                "stopped the other ranks", rank)
