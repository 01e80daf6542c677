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
from partitioner.runtime.microbatch import batch_size, split
from partitioner.runtime.routing import routes
from partitioner.runtime.transport import LocalTransport, NcclTransport
from partitioner.schedule import Schedule, build_schedule

if TYPE_CHECKING:  # pipe.py imports the runtime lazily; the types point back without an import cycle
    from partitioner.pipe import Pipe
    from partitioner.plan import Plan

__all__ = ["train_step", "resolve_schedule", "seq_len"]


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
               **kwargs: Any) -> torch.Tensor:
    """Forward and backward over every micro-batch; grads accumulate into the model's
    parameters (zero them yourself, as with any torch training loop). Returns the
    full-batch loss: the sum of ``loss_fn(out_mb, target_mb) / m`` (detached)::

        loss = pipe.train_step(x, target=y, loss_fn=F.cross_entropy, n_microbatches=4)

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
    if comm not in ("buffered", "nccl"):
        raise PipelineRuntimeError(f"comm={comm!r}: expected 'buffered' or 'nccl'")
    transport: LocalTransport | NcclTransport = LocalTransport() if comm == "buffered" else NcclTransport(sched.n_ranks)
    modules = compiled_modules(pipe, {s: pipe.stages[s] for s in range(len(pipe.stages))}, compile)
    table = routes(pipe.plan, cast("list[fx.GraphModule]", list(pipe.stages)))
    ranks = [
        Interpreter(r, {s: mod for s, mod in modules.items() if sched.rank_of(s) == r}, pipe.plan, sched,
                    transport, loss_fn, pipe.unflatten_outputs, routes=table)
        for r in range(sched.n_ranks)
    ]
    mb_inputs = split(flat, m, batch)
    mb_targets = split(target, m, batch)
    for it in ranks:
        it.start(batch // m, seq, mb_inputs, mb_targets)
    pcs = [0] * len(ranks)
    # Round-robin over ranks, each running until it needs a message not yet sent: the
    # order schedule.replay validates, so a valid schedule always finishes.
    while True:
        progress = False
        for r, it in enumerate(ranks):
            while pcs[r] < len(it.steps) and it.can_run(it.steps[pcs[r]]):
                try:
                    it.run(it.steps[pcs[r]])
                except PipelineRuntimeError as e:
                    log_failure(sched, e, r)  # the grid around the failing action
                    raise
                pcs[r] += 1
                progress = True
        if not progress:
            break
    stuck = [f"rank {r} at {it.steps[pcs[r]]}" for r, it in enumerate(ranks) if pcs[r] < len(it.steps)]
    waits = transport.pending() if isinstance(transport, NcclTransport) else []
    if stuck or waits:
        raise PipelineRuntimeError(f"schedule {sched.name!r} deadlocks"
                                   + (" under NCCL's rules" if comm == "nccl" else "") + ": "
                                   + "; ".join(stuck + waits) + f"\n{sched.grid(comms=True)}")
    losses = [it.finish() for it in ranks]
    if trace is not None:
        from partitioner.runtime.trace import write_trace

        write_trace(trace, [ev for it in ranks for ev in it.events], sched)
    loss = next(x for x in losses if x is not None)
    return loss
