"""What a training loop needs around the step: loss normalisation, forward-only schedules,
outputs put back together, the global gradient norm.

Loss normalisation (``normalize=`` of ``runner(...)`` and ``train_step``):

- ``"mean"`` (default): the last stage computes ``loss_fn(out_mb, target_mb) / m`` per
  micro-batch, which is the full-batch loss for a loss that is a mean over equal-sized
  micro-batches (MSE, cross-entropy without ignored labels). It is *not* the full-batch loss
  of a token mean whose valid tokens are spread unevenly: with ``ignore_index=-100`` and 4,
  32, 24 and 32 valid tokens in four micro-batches, each micro-batch's mean weighs 1/4, so
  the 4 tokens of the first count eight times as much as in the full batch.
- ``"tokens"``: ``loss_fn`` returns a *sum* over tokens
  (``F.cross_entropy(..., reduction="sum", ignore_index=-100)``) and each micro-batch's sum
  is divided by the step's count of target elements that are not ``-100``, counted from the
  targets before any forward (and summed over the data-parallel replicas), so the loss and
  its gradients are those of the full batch's token mean.
- a callable ``count(target_mb) -> int``: as ``"tokens"``, counting with it (another
  ignore index, a mask in a dict of targets, documents per micro-batch, ...).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Sequence, Union

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.utils import _pytree as pytree

from partitioner.runtime.errors import PipelineRuntimeError
from partitioner.schedule import Action, Schedule

__all__ = ["IGNORE_INDEX", "Normalize", "check_normalize", "count_targets", "forward_schedule", "concat_outputs",
           "global_grad_norm"]

#: the label ``normalize="tokens"`` does not count (PyTorch's and Hugging Face's default ``ignore_index``)
IGNORE_INDEX = -100

Normalize = Union[str, Callable[[Any], Any]]


def check_normalize(normalize: Normalize) -> None:
    if not callable(normalize) and normalize not in ("mean", "tokens"):
        raise PipelineRuntimeError(f"normalize={normalize!r}: expected 'mean', 'tokens' or a function "
                                   "count(target) -> number of elements the loss sums over")


def count_targets(normalize: Normalize, targets: Sequence[Any]) -> int | None:
    """The number of elements the step's summed loss is divided by (None for ``"mean"``):
    over the micro-batched ``targets`` of this rank."""
    if normalize == "mean":
        return None
    total = 0
    for t in targets:
        if callable(normalize):
            n = normalize(t)
        else:
            if not isinstance(t, torch.Tensor):
                raise PipelineRuntimeError(
                    f"normalize='tokens' counts the target elements that are not {IGNORE_INDEX}, but the target is a "
                    f"{type(t).__name__}: pass normalize=fn, fn(target) -> the number of elements the loss sums over")
            n = (t != IGNORE_INDEX).sum()
        total += int(n)
    return total


def global_count(count: int, device: torch.device, group: dist.ProcessGroup | None) -> int:
    """``count`` summed over ``group`` (the data-parallel replicas; None: no reduction)."""
    if group is not None and dist.get_world_size(group) > 1:
        t = torch.tensor([count], dtype=torch.int64, device=device)
        dist.all_reduce(t, group=group)
        count = int(t.item())
    if count == 0:
        raise PipelineRuntimeError("the step's targets have no element to average the loss over (every label is "
                                   f"{IGNORE_INDEX}, or the normalize function counted 0): the token-mean loss is "
                                   "undefined (PyTorch's would be nan); skip this batch")
    return count


@functools.lru_cache(maxsize=8)
def forward_schedule(schedule: Schedule) -> Schedule:
    """``schedule`` with only its forwards and their messages (``F``, ``SEND_F``, ``RECV_F``),
    in each rank's order: evaluation runs it, lowered (``partitioner.comms.lower``) like any
    schedule, so its messages match on every rank under NCCL's rules too."""
    keep = ("F", "SEND_F", "RECV_F")
    acts = tuple(tuple(Action(*a) for a in rank if a.kind in keep) for rank in schedule.actions)
    return Schedule(f"{schedule.name}-forward", schedule.n_ranks, schedule.n_stages, schedule.n_microbatches,
                    acts, schedule.placement)


def concat_outputs(outputs: Sequence[Any]) -> Any:
    """The micro-batches' outputs as one batch: tensor leaves concatenated along dim 0 (as
    the batch was split), other leaves from the first micro-batch."""
    if not outputs:
        return None
    flat = [pytree.tree_flatten(o) for o in outputs]
    spec = flat[0][1]
    cols = zip(*(leaves for leaves, _ in flat))
    return pytree.tree_unflatten([torch.cat(c) if isinstance(c[0], torch.Tensor) and c[0].dim() > 0 else c[0]
                                  for c in cols], spec)


def _whole(norm: torch.Tensor) -> torch.Tensor:
    """A DTensor gradient's norm (tensor parallelism) as a plain tensor: the whole tensor's,
    its shards' partial norms combined over the TP ranks (``full_tensor``), a replica once."""

    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def global_grad_norm(grads: Iterable[torch.Tensor], norm_type: float, device: torch.device,
                     group: dist.ProcessGroup | None) -> torch.Tensor:
    """The ``norm_type``-norm of ``grads`` over every rank of ``group``: each rank's
    per-tensor norms combined as ``torch.nn.utils.get_total_norm`` combines them, then
    summed (``p``-th powers) or maxed (inf) over the group. Written out rather than calling
    ``get_total_norm`` because the partial norms must cross ranks before the root is taken,
    and low-precision gradients are normed in fp32."""
    norms = [_whole(torch.linalg.vector_norm(g.detach(), norm_type, dtype=torch.float32)).to(device) for g in grads]
    local = (torch.linalg.vector_norm(torch.stack(norms), norm_type) if norms
             else torch.zeros((), dtype=torch.float32, device=device))
    if norm_type == float("inf"):
        dist.all_reduce(local, op=dist.ReduceOp.MAX, group=group)
        return local
    powered = local.pow(norm_type)
    dist.all_reduce(powered, group=group)
    return powered.pow(1.0 / norm_type)
