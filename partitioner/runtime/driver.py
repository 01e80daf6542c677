"""One step driver for every way the runtime runs: all ranks in one process, or one rank per process.

``train_step`` / ``eval_step`` (``runtime.local``) hold every rank's stages and an
in-process transport; ``Runner.step`` / ``Runner.eval_step`` (``runtime.stage``) hold one
rank's stages and ``DistTransport``. Both build a ``StepDriver`` over the stages they hold:
one ``Interpreter`` per rank those stages belong to, which it starts, drives and finishes.
Driving is round-robin over those interpreters, each running until it needs a message not
yet arrived: the order ``schedule.replay`` validates, so a valid schedule always finishes;
a rank left waiting is a deadlock, reported with the grid. With one interpreter over
torch.distributed every message counts as arrived (its receive blocks in ``wait``), so the
rank simply runs its steps in order.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from partitioner.runtime.diagnose import log_failure
from partitioner.runtime.errors import PipelineRuntimeError
from partitioner.runtime.interpreter import GradReady, Interpreter, LossFn, TraceEvent
from partitioner.runtime.spec import PipelineSpec
from partitioner.runtime.transport import NcclTransport, Transport
from partitioner.schedule import Schedule

__all__ = ["StepDriver", "device_of"]


def device_of(modules: Mapping[int, nn.Module], flat_inputs: Sequence[Any]) -> torch.device:
    """Where one process's stages run: the device of their parameters (else of the inputs,
    else the CPU). Messages between in-process ranks land there."""
    for mod in modules.values():
        for t in mod.parameters():
            return t.device
    return next((v.device for v in flat_inputs if isinstance(v, torch.Tensor)), torch.device("cpu"))


class StepDriver:
    """Runs one step of ``schedule`` over the stages this process holds.

    Args:
        spec: the plan, its routes and output structure (``PipelineSpec``).
        modules: stage index -> the module to call (eager or compiled) for every stage this
            process runs; each rank those stages belong to gets one ``Interpreter`` and must
            be held whole.
        schedule: the schedule every rank runs.
        transport: moves the messages (``LocalTransport``/``NcclTransport`` in one process,
            ``DistTransport`` between processes).
        loss_fn, device, grad_sync: as ``Interpreter``'s.
    """

    def __init__(self, spec: PipelineSpec, modules: Mapping[int, nn.Module], schedule: Schedule,
                 transport: Transport, loss_fn: LossFn, device: torch.device | str | None, *,
                 grad_sync: GradReady | None = None) -> None:
        ranks = sorted({schedule.rank_of(s) for s in modules})
        self.schedule, self.transport = schedule, transport
        #: one interpreter per rank held here, in rank order
        self.interpreters = [
            Interpreter(r, {s: m for s, m in modules.items() if schedule.rank_of(s) == r}, spec.plan, schedule,
                        transport, loss_fn, spec.unflatten_outputs, device, routes=spec.routes, grad_sync=grad_sync)
            for r in ranks]

    def step(self, microbatch_size: int, seq: int, inputs: Sequence[Sequence[Any]] | None, targets: Sequence[Any] | None,
             *, loss_divisor: float | torch.Tensor | None = None, keep_outputs: bool = False) -> torch.Tensor | None:
        """Start every interpreter (``Interpreter.start``: stage 0's holder takes ``inputs``,
        the last stage's ``targets``), drive them to the end, finish them. Returns the
        step's loss where the last stage runs here, else None."""
        for it in self.interpreters:
            it.start(microbatch_size, seq, inputs, targets, loss_divisor=loss_divisor, keep_outputs=keep_outputs)
        self.drive()
        losses = [it.finish() for it in self.interpreters]
        return next((x for x in losses if x is not None), None)

    def drive(self) -> None:
        """Round-robin over the interpreters' steps, each running until it needs a message not
        yet arrived; a failing action is logged with the grid around it; a rank left
        waiting is a deadlock, raised with the grid."""
        its = self.interpreters
        pcs = [0] * len(its)
        progress = True
        while progress:
            progress = False
            for k, it in enumerate(its):
                while pcs[k] < len(it.steps) and it.can_run(it.steps[pcs[k]]):
                    try:
                        it.run(it.steps[pcs[k]])
                    except PipelineRuntimeError as e:
                        log_failure(self.schedule, e, it.rank)  # the grid around the failing action
                        raise
                    pcs[k] += 1
                    progress = True
        stuck = [f"rank {it.rank} at {it.steps[pcs[k]]}" for k, it in enumerate(its) if pcs[k] < len(it.steps)]
        nccl = isinstance(self.transport, NcclTransport)
        waits = self.transport.pending() if isinstance(self.transport, NcclTransport) else []
        if stuck or waits:
            raise PipelineRuntimeError(f"schedule {self.schedule.name!r} deadlocks" + (" under NCCL's rules" if nccl else "")
                                       + ": " + "; ".join(stuck + waits) + f"\n{self.schedule.grid(comms=True)}")

    @property
    def events(self) -> list[TraceEvent]:
        """The last step's events, every interpreter's."""
        return [ev for it in self.interpreters for ev in it.events]

    @property
    def last(self) -> Interpreter | None:
        """The interpreter running the last stage, if it runs here."""
        return next((it for it in self.interpreters if it.last in it.modules), None)
