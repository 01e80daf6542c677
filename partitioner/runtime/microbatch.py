"""Split a batch into micro-batches along dim 0, and check that it divides."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.utils import _pytree as pytree

from partitioner.runtime.errors import PipelineRuntimeError
from partitioner.schedule import split_problem

__all__ = ["batch_size", "split"]


def batch_size(values: Sequence[Any]) -> int:
    """Dim 0 of the first tensor among ``values`` (flattened); every batched input shares it."""
    for leaf in pytree.tree_leaves(list(values)):
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return int(leaf.shape[0])
    raise PipelineRuntimeError("no tensor input with a batch dimension (dim 0) to split into micro-batches")


def split(value: Any, m: int, batch: int) -> list[Any]:
    """``m`` copies of ``value``'s structure, each tensor leaf with dim 0 == ``batch``
    cut into equal chunks; other leaves (scalars, tensors without that batch dim, e.g. a
    shared mask) are repeated in every micro-batch."""
    problem = split_problem(batch, m)
    if problem:
        raise PipelineRuntimeError(problem)
    leaves, spec = pytree.tree_flatten(value)
    cols: list[list[Any]] = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0 and leaf.shape[0] == batch:
            cols.append(list(leaf.chunk(m)))
        else:
            cols.append([leaf] * m)
    return [pytree.tree_unflatten([c[i] for c in cols], spec) for i in range(m)]
