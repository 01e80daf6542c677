"""``partitioner run``: train a few steps on the real pipeline, one process per rank (gloo on CPU).

The loss is a default that needs no labels: next-token cross-entropy when the model maps
token ids (B, T) to logits (B, T, V), else the mean square of the outputs. Both are there
to show that the pipeline trains, not to train anything useful.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import tempfile
from typing import Any

import torch
import torch.nn.functional as F

from partitioner.tools.commands import (
    _library_output,
    _refuse_partition_flags,
    check_partition_args,
    partition_from_args,
)
from partitioner.tools.loading import ToolError, load_model, read_plan
from partitioner.tools.outputs import check_outputs

__all__ = ["run", "default_loss"]


def default_loss(model: torch.nn.Module, inputs: Any, normalize: str = "mean") -> tuple[Any, Any]:
    """(loss_fn(output, target), target) for the factory's example inputs; with
    ``normalize="tokens"`` the next-token loss is a sum (the runner divides by the step's
    token count), refused for a model that does not map token ids to logits."""
    tokens = inputs[0] if isinstance(inputs, tuple) and len(inputs) == 1 else None
    if isinstance(tokens, torch.Tensor) and tokens.dim() == 2 and not tokens.is_floating_point():
        with torch.no_grad():
            out = model(tokens)
        if isinstance(out, torch.Tensor) and out.dim() == 3 and out.shape[:2] == tokens.shape:
            reduction = "sum" if normalize == "tokens" else "mean"

            def next_token(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
                # position t predicts token t + 1: drop the last logit and the first id
                return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction=reduction)
            return next_token, tokens
    if normalize == "tokens":
        raise ToolError("--normalize tokens needs a model that maps token ids (B, T) to logits (B, T, V): "
                        "its default loss is the next-token cross-entropy; use --normalize mean")

    def mean_square(out: Any, _unused: torch.Tensor) -> torch.Tensor:
        flat = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
        return sum((t.float().pow(2).mean() for t in flat), torch.zeros(()))

    batch = next(t.shape[0] for t in torch.utils._pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor))
    return mean_square, torch.zeros(batch)  # the runner splits a target by batch; this one is unused


def _train(rank: int, world: int, pipe: Any, inputs: Any, target: Any, loss_fn: Any, args: argparse.Namespace,
           trace_path: str | None, schedule: str, loss_name: str) -> list[float]:
    stage = pipe.build_stage(rank, "cpu")
    params = stage.parameters()
    opt = stage.optimizer(torch.optim.SGD, lr=args.lr) if params else None  # a stage may own no weights
    m = pipe.plan.prediction.n_microbatches
    # "tokens": the target's last position predicts nothing (next_token drops it), so it is not counted.
    normalize: Any = (lambda ids: ids[:, 1:].numel()) if args.normalize == "tokens" else "mean"
    runner = stage.runner(schedule, n_microbatches=m, loss_fn=loss_fn, compile=args.compile, normalize=normalize)
    pos, kw = (inputs, {}) if isinstance(inputs, tuple) else ((), inputs)
    last = stage.is_last and stage.dp_rank == 0  # with data parallelism: replica 0's loss (its share of the batch)
    losses = []
    for step in range(args.steps):
        for p in params:
            p.grad = None
        trace = trace_path if trace_path and step == args.steps - 1 else None  # the last, warmed-up step
        loss = runner.step(*pos, target=target, trace=trace, **kw)
        losses.append(float("nan") if loss is None else float(loss.item()))
        norm = stage.clip_grad_norm_(args.clip) if args.clip is not None else None  # collective: every rank
        if opt is not None:
            opt.step()
        if last:  # as it happens: a long run shows progress, and a crash later keeps the losses seen
            extra = f", gradient norm {float(norm):.6f} before clipping to {args.clip:g}" if norm is not None else ""
            print(f"step {step + 1}: loss {losses[-1]:.6f} ({loss_name}){extra}", flush=True)
        if args.eval_every and (step + 1) % args.eval_every == 0:
            ev = runner.eval_step(*pos, target=target, **kw)  # collective; forward only, no gradients
            if last:
                print(f"step {step + 1}: eval loss {float(ev):.6f} ({loss_name})", flush=True)
    return losses


def run(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("partitioner.runtime") is None:
        raise ToolError("runtime not available: partitioner.runtime is not installed in this build")

    if args.steps < 1:
        raise ToolError(f"--steps must be >= 1, got {args.steps}")
    if args.eval_every < 0:
        raise ToolError(f"--eval-every must be >= 0, got {args.eval_every}")
    if args.clip is not None and not args.clip > 0:
        raise ToolError(f"--clip must be > 0, got {args.clip}")
    check_outputs([("--trace", args.trace)], [args.plan or "", args.model.rpartition(":")[0]])
    if args.plan:
        _refuse_partition_flags(args, "with --plan (the plan fixes stages, schedule and micro-batches)")
        plan = read_plan(args.plan)
    else:
        check_partition_args(args)
    from partitioner.runtime import spawn  # noqa: PLC0415 - the runtime may be absent from this build (run checks it first)

    model, inputs = load_model(args.model)
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    loss_fn, target = default_loss(model, inputs, args.normalize)
    if args.plan:
        with _library_output(args):
            pipe = plan.apply(model, inputs)
    else:
        pipe = partition_from_args(args, args.model, loaded=(model, inputs))
    ranks = int(pipe.plan.options["n_gpus"])
    schedule = pipe.plan.prediction.schedule
    if args.compile:  # refused here, in one line, rather than in every rank
        from partitioner.runtime.compile import check_schedule  # noqa: PLC0415 - the runtime may be absent from this build (run checks it first)
        from partitioner.runtime.errors import PipelineRuntimeError  # noqa: PLC0415 - the runtime may be absent from this build (run checks it first)
        from partitioner.runtime.local import resolve_schedule  # noqa: PLC0415 - the runtime may be absent from this build (run checks it first)

        try:
            check_schedule(resolve_schedule(pipe, schedule, pipe.plan.prediction.n_microbatches))
        except PipelineRuntimeError as e:
            raise ToolError(f"--compile: {e}") from None
    name = getattr(loss_fn, "__name__", "loss").replace("_", "-")
    tmp = None
    if args.trace:  # written beside the target and renamed at the end: no half-written trace
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(args.trace)}.", suffix=".tmp",
                                   dir=os.path.dirname(os.path.abspath(args.trace)))
        os.close(fd)
    try:
        spawn(_train, ranks, pipe, inputs, target, loss_fn, args, tmp, schedule, name)
        if tmp:
            os.replace(tmp, args.trace)
            tmp = None
    finally:
        if tmp:
            os.unlink(tmp)
    if args.trace:
        print(f"wrote {args.trace}")
    return 0
