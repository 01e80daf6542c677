"""Every rank of a plan in this one process: the in-process transport, same interpreter.

The stages share parameters with the user's model (``Pipe`` makes no copies), so
gradients land in the model's own ``.grad`` and an ordinary optimizer over
``model.parameters()`` steps it; tied weights are one tensor and need no reduction.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, cast

import torch
from torch import fx

from partitioner.runtime.compile import CompileOption, check_schedule, compile_kwargs, compiled_modules
from partitioner.runtime.diagnose import log_failure
from partitioner.runtime.errors import PipelineRuntimeError
from partitioner.runtime.interpreter import Interpreter
from partitioner.runtime.loop import (
    Normalize,
    check_normalize,
    concat_outputs,
    count_targets,
    forward_schedule,
    global_count,
)
from partitioner.runtime.microbatch import batch_size, split
from partitioner.runtime.routing import routes
from partitioner.runtime.transport import LocalTransport, NcclTransport
from partitioner.schedule import Schedule, build_schedule

if TYPE_CHECKING:  # pipe.py imports the runtime lazily; the types point back without an import cycle
    from partitioner.pipe import Pipe
    from partitioner.plan import Plan

__all__ = ["train_step", "eval_step", "resolve_schedule", "seq_len"]


def resolve_schedule(pipe: Pipe, schedule: str | Schedule, n_microbatches: int | None) -> Schedule:
    """A Schedule for the pipe's stages: a name is built for the plan's ranks and stages."""
    plan = pipe.plan
    n_ranks = plan.pp_ranks
    if isinstance(schedule, Schedule):
        return schedule
    sched = plan.stored_schedule()
    if sched is not None and schedule == sched.name:  # the plan's hand-written lists
        if n_microbatches is not None and n_microbatches != sched.n_microbatches:
            raise PipelineRuntimeError(f"schedule {schedule!r} is hand-written for {sched.n_microbatches} "
                                       f"micro-batches, not {n_microbatches}: pass a Schedule built for them")
        return sched
    m = n_microbatches if n_microbatches is not None else plan.prediction.n_microbatches
    return build_schedule(schedule, n_ranks, m, plan.n_stages)


def device_of(pipe: Pipe, flat_inputs: list[Any]) -> torch.device:
    """Where one process's stages run: the device of the model's parameters (else of the
    inputs, else the CPU). Messages between in-process ranks land there."""
    for stage in pipe.stages:
        for t in stage.parameters():
            return t.device
    return next((v.device for v in flat_inputs if isinstance(v, torch.Tensor)), torch.device("cpu"))


def seq_len(plan: Plan, flat_inputs: list[Any] | None = None) -> int:
    """S for shapes: read from the inputs where the plan marks a sequence dim, else the plan's."""
    for spec, value in zip(plan.inputs, flat_inputs or ()):
        for d, sym in spec.get("dims", ()):
            if sym == "S" and isinstance(value, torch.Tensor):
                return int(value.shape[int(d)])
    return int(plan.symbols.get("S", 1))


def train_step(pipe: Pipe, *inputs: Any, target: Any, loss_fn: Callable[[Any, Any], torch.Tensor],
               schedule: str | Schedule = "gpipe", n_microbatches: int | None = None,
               trace: str | None = None, comm: str = "buffered", compile: CompileOption = False,
               normalize: Normalize = "mean",
               **kwargs: Any) -> torch.Tensor:
    """Forward and backward over every micro-batch; grads accumulate into the model's
    parameters (zero them yourself, as with any torch training loop). Returns the
    full-batch loss: the sum of ``loss_fn(out_mb, target_mb) / m`` (detached)::

        loss = pipe.train_step(x, target=y, loss_fn=F.cross_entropy, n_microbatches=4)

    That is the full-batch loss for a mean over equal micro-batches, not for a token mean
    with ignored labels (-100) spread unevenly over them: there pass ``normalize="tokens"``
    and a ``loss_fn`` that sums (``reduction="sum"``); each micro-batch's sum is divided by
    the batch's count of labels that are not -100 (``runtime.loop``).

    ``comm="nccl"`` moves the messages under NCCL's rules (``runtime.transport.NcclTransport``:
    in-order groups per rank, tags ignored, sends that wait for their receive) instead of
    buffering them, so a schedule that would hang on GPUs fails here, naming the ranks and
    operations that wait on each other.

    The stages share the user's parameters, so this runs in the model's own dtypes and
    ignores the plan's ``precision`` (no casts, no master weights, no loss scaling); a plan
    priced at another compute dtype than the model's (an fp32 model planned bf16-mixed)
    fails here on the first value that crosses a cut in the wrong dtype. ``build_stage``
    runs the plan's precision (``partitioner.runtime.precision``).

    ``compile=True`` (or a dict of ``torch.compile`` arguments) runs each stage through
    ``torch.compile``, compiled once per pipe and reused by later steps
    (``runtime.compile``); a schedule with a split backward is then refused.
    """
    sched = resolve_schedule(pipe, schedule, n_microbatches)
    if compile_kwargs(compile) is not None:
        check_schedule(sched)
    m = sched.n_microbatches
    flat = pipe.flatten_inputs(inputs, kwargs)
    batch = batch_size(flat)
    seq = seq_len(pipe.plan, flat)
    transport = _transport(comm, sched.n_ranks)
    modules = compiled_modules(pipe, {s: pipe.stages[s] for s in range(len(pipe.stages))}, compile)
    table = routes(pipe.plan, cast("list[fx.GraphModule]", list(pipe.stages)))
    ranks = [
        Interpreter(r, {s: mod for s, mod in modules.items() if sched.rank_of(s) == r}, pipe.plan, sched,
                    transport, loss_fn, pipe.unflatten_outputs, device_of(pipe, flat), routes=table)
        for r in range(sched.n_ranks)
    ]
    mb_inputs = split(flat, m, batch)
    mb_targets = split(target, m, batch)
    check_normalize(normalize)
    count = count_targets(normalize, mb_targets)
    divisor = None if count is None else global_count(count, torch.device("cpu"), None)
    for it in ranks:
        it.start(batch // m, seq, mb_inputs, mb_targets, loss_divisor=divisor)
    _drive(ranks, sched, transport, comm)
    losses = [it.finish() for it in ranks]
    if trace is not None:
        from partitioner.runtime.trace import write_trace

        write_trace(trace, [ev for it in ranks for ev in it.events], sched)
    loss = next(x for x in losses if x is not None)
    return loss


def eval_step(pipe: Pipe, *inputs: Any, target: Any = None, loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
              schedule: str | Schedule = "gpipe", n_microbatches: int | None = None, return_outputs: bool = False,
              comm: str = "buffered", normalize: Normalize = "mean", **kwargs: Any) -> Any:
    """Forward only through every rank's stages in this process, under ``torch.no_grad``:
    the schedule's forwards and their messages (``loop.forward_schedule``), lowered as any
    schedule. Returns the loss as ``train_step`` computes it (None without ``target``), or
    ``(loss, outputs)`` with ``return_outputs`` (the last stage's outputs, micro-batches
    concatenated along dim 0). No gradient is touched and no activation kept; the modules'
    train/eval mode is left as it is (call ``pipe.eval()`` for dropout off)::

        loss = pipe.eval_step(x, target=y, loss_fn=F.cross_entropy, n_microbatches=4)
    """
    if target is not None and loss_fn is None:
        raise PipelineRuntimeError("eval_step(target=...) needs loss_fn=... to compute the loss")
    check_normalize(normalize)
    sched = forward_schedule(resolve_schedule(pipe, schedule, n_microbatches))
    m = sched.n_microbatches
    flat = pipe.flatten_inputs(inputs, kwargs)
    batch = batch_size(flat)
    transport = _transport(comm, sched.n_ranks)
    table = routes(pipe.plan, cast("list[fx.GraphModule]", list(pipe.stages)))
    fn = loss_fn if loss_fn is not None else (lambda out, y: out)
    ranks = [Interpreter(r, {s: pipe.stages[s] for s in range(len(pipe.stages)) if sched.rank_of(s) == r}, pipe.plan,
                         sched, transport, fn, pipe.unflatten_outputs, device_of(pipe, flat), routes=table)
             for r in range(sched.n_ranks)]
    mb_targets = split(target, m, batch) if target is not None else None
    count = count_targets(normalize, mb_targets) if mb_targets is not None else None
    divisor = None if count is None else global_count(count, torch.device("cpu"), None)
    with torch.no_grad():
        for it in ranks:
            it.start(batch // m, seq_len(pipe.plan, flat), split(flat, m, batch), mb_targets, loss_divisor=divisor,
                     keep_outputs=return_outputs)
        _drive(ranks, sched, transport, comm)
        loss = next((x for x in (it.finish() for it in ranks) if x is not None), None)
    if not return_outputs:
        return loss
    last = next(it for it in ranks if it.last in it.modules)
    return loss, concat_outputs(last.outputs)


def _transport(comm: str, n_ranks: int) -> LocalTransport | NcclTransport:
    """The in-process transport ``comm`` names: buffered (gloo's semantics) or NCCL's rules."""
    if comm not in ("buffered", "nccl"):
        raise PipelineRuntimeError(f"comm={comm!r}: expected 'buffered' or 'nccl'")
    return LocalTransport() if comm == "buffered" else NcclTransport(n_ranks)


def _drive(ranks: list[Interpreter], sched: Schedule, transport: LocalTransport | NcclTransport, comm: str) -> None:
    """Round-robin over the ranks' steps, each running until it needs a message not yet
    sent: the order ``schedule.replay`` validates, so a valid schedule always finishes; a
    rank left waiting is a deadlock, reported with the grid."""
    pcs = [0] * len(ranks)
    progress = True
    while progress:
        progress = False
        for r, it in enumerate(ranks):
            while pcs[r] < len(it.steps) and it.can_run(it.steps[pcs[r]]):
                try:
                    it.run(it.steps[pcs[r]])
                except PipelineRuntimeError as e:
                    log_failure(sched, e, r)
                    raise
                pcs[r] += 1
                progress = True
    stuck = [f"rank {r} at {it.steps[pcs[r]]}" for r, it in enumerate(ranks) if pcs[r] < len(it.steps)]
    waits = transport.pending() if isinstance(transport, NcclTransport) else []
    if stuck or waits:
        raise PipelineRuntimeError(f"schedule {sched.name!r} deadlocks" + (" under NCCL's rules" if comm == "nccl" else "")
                                   + ": " + "; ".join(stuck + waits) + f"\n{sched.grid(comms=True)}")
