"""Every rank of a plan in this one process: the in-process transport, same interpreter.

Built from a ``PipelineSpec`` (``runtime.spec``) holding every stage. ``Pipe.train_step``
passes the pipe's stages, which share parameters with the user's model (no copies), so
gradients land in the model's own ``.grad`` and an ordinary optimizer over
``model.parameters()`` steps it; tied weights are one tensor and need no reduction.

With no ``schedule`` / ``n_microbatches`` the step runs the plan's own (what it was
priced for: ``runtime.spec.resolve_schedule``); an explicit argument wins.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from partitioner.runtime.compile import CompileOption, check_schedule, compile_kwargs, compiled_modules
from partitioner.runtime.driver import StepDriver, device_of
from partitioner.runtime.errors import PipelineRuntimeError
from partitioner.runtime.loop import (
    Normalize,
    check_normalize,
    concat_outputs,
    count_targets,
    forward_schedule,
    global_count,
)
from partitioner.runtime.microbatch import batch_size, split
from partitioner.runtime.spec import PipelineSpec, as_spec, resolve_schedule, seq_len
from partitioner.runtime.trace import write_trace
from partitioner.runtime.transport import LocalTransport, NcclTransport
from partitioner.schedule import Schedule

__all__ = ["train_step", "eval_step", "resolve_schedule", "seq_len"]


def _all_stages(spec: PipelineSpec, what: str) -> dict[int, Any]:
    return dict(zip(range(spec.plan.n_stages), spec.modules(range(spec.plan.n_stages), what)))


def train_step(spec: PipelineSpec, *inputs: Any, target: Any, loss_fn: Callable[[Any, Any], torch.Tensor],
               schedule: str | Schedule | None = None, n_microbatches: int | None = None,
               trace: str | None = None, comm: str = "buffered", compile: CompileOption = False,
               normalize: Normalize = "mean",
               **kwargs: Any) -> torch.Tensor:
    """Forward and backward over every micro-batch; grads accumulate into the stages'
    parameters (the model's, for a pipe: zero them yourself, as with any torch training
    loop). Returns the full-batch loss: the sum of ``loss_fn(out_mb, target_mb) / m``
    (detached)::

        loss = pipe.train_step(x, target=y, loss_fn=F.cross_entropy, n_microbatches=4)

    ``spec``: the ``PipelineSpec`` with every stage (``pipe.pipeline_spec()``, or
    ``PipelineSpec.build(plan, stages)``; a ``Pipe`` is accepted and asked for it).
    ``schedule`` / ``n_microbatches``: default the plan's (the schedule it was priced for and
    its micro-batch count); a name or a ``Schedule`` given here wins.

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
    ``torch.compile``, compiled once per record and reused by later steps (a pipe keeps its
    record: ``runtime.compile``); a schedule with a split backward is then refused.
    """
    spec = as_spec(spec)
    sched = resolve_schedule(spec, schedule, n_microbatches)
    if compile_kwargs(compile) is not None:
        check_schedule(sched)
    m = sched.n_microbatches
    flat = spec.flatten_inputs(inputs, kwargs)
    batch = batch_size(flat)
    transport = _transport(comm, sched.n_ranks)
    stages = _all_stages(spec, "train_step")
    driver = StepDriver(spec, compiled_modules(spec, stages, compile), sched, transport, loss_fn,
                        device_of(stages, flat))
    mb_targets = split(target, m, batch)
    check_normalize(normalize)
    count = count_targets(normalize, mb_targets)
    divisor = None if count is None else global_count(count, torch.device("cpu"), None)
    loss = driver.step(batch // m, seq_len(spec.plan, flat), split(flat, m, batch), mb_targets, loss_divisor=divisor)
    if trace is not None:

        write_trace(trace, driver.events, sched)
    assert loss is not None  # the last stage runs in this process
    return loss


def eval_step(spec: PipelineSpec, *inputs: Any, target: Any = None,
              loss_fn: Callable[[Any, Any], torch.Tensor] | None = None, schedule: str | Schedule | None = None,
              n_microbatches: int | None = None, return_outputs: bool = False, comm: str = "buffered",
              normalize: Normalize = "mean", **kwargs: Any) -> Any:
    """Forward only through every rank's stages in this process, under ``torch.no_grad``:
    the schedule's forwards and their messages (``loop.forward_schedule``), lowered as any
    schedule (default: the plan's schedule and micro-batch count, as ``train_step``).
    Returns the loss as ``train_step`` computes it (None without ``target``), or
    ``(loss, outputs)`` with ``return_outputs`` (the last stage's outputs, micro-batches
    concatenated along dim 0). No gradient is touched and no activation kept; the modules'
    train/eval mode is left as it is (call ``pipe.eval()`` for dropout off)::

        loss = pipe.eval_step(x, target=y, loss_fn=F.cross_entropy, n_microbatches=4)
    """
    spec = as_spec(spec)
    if target is not None and loss_fn is None:
        raise PipelineRuntimeError("eval_step(target=...) needs loss_fn=... to compute the loss")
    check_normalize(normalize)
    sched = forward_schedule(resolve_schedule(spec, schedule, n_microbatches))
    m = sched.n_microbatches
    flat = spec.flatten_inputs(inputs, kwargs)
    batch = batch_size(flat)
    transport = _transport(comm, sched.n_ranks)
    fn = loss_fn if loss_fn is not None else (lambda out, y: out)
    stages = _all_stages(spec, "eval_step")
    driver = StepDriver(spec, compiled_modules(spec, stages, False), sched, transport, fn, device_of(stages, flat))
    mb_targets = split(target, m, batch) if target is not None else None
    count = count_targets(normalize, mb_targets) if mb_targets is not None else None
    divisor = None if count is None else global_count(count, torch.device("cpu"), None)
    with torch.no_grad():
        loss = driver.step(batch // m, seq_len(spec.plan, flat), split(flat, m, batch), mb_targets,
                           loss_divisor=divisor, keep_outputs=return_outputs)
    if not return_outputs:
        return loss
    last = driver.last
    assert last is not None  # every stage runs in this process
    return loss, concat_outputs(last.outputs)


def _transport(comm: str, n_ranks: int) -> LocalTransport | NcclTransport:
    """The in-process transport ``comm`` names: buffered (gloo's semantics) or NCCL's rules."""
    if comm not in ("buffered", "nccl"):
        raise PipelineRuntimeError(f"comm={comm!r}: expected 'buffered' or 'nccl'")
    return LocalTransport() if comm == "buffered" else NcclTransport(n_ranks)
