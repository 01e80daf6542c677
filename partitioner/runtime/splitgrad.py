"""Backward split in two for zero-bubble schedules: input gradients now, weights later.

``input_grads`` computes the gradients of a stage's inputs with ``torch.autograd.grad``
(``retain_graph=True``), recording on the way the gradient that reaches each autograd
node where a weight's branch joins the inputs' backward path (PyTorch pipelining's
"parameter groups", ``torch.distributed.pipelining._backward``); ``weight_grads`` later
runs backward from those nodes to the weights only, so no gradient is computed twice.

Weights whose branch never meets an input's path (every weight of a stage whose inputs
need no gradient, e.g. stage 0 fed token ids) cannot be split off that way: when no
input needs a gradient, ``I`` does nothing and ``W`` runs the whole backward; weights
outside every group in a stage that has such inputs get their gradients in ``I``.

Both accumulate into ``.grad`` by hand (``torch.autograd.grad`` then ``+=``), so no
``register_post_accumulate_grad_hook`` fires for those weights (only a ``W`` that runs the
whole backward fires them): ``runtime.grad_sync`` learns that a stage's weights are final
from the interpreter, right after the stage's last ``W``.

Checkpointed stages (``partitioner.passes.recompute.RecomputeStage``, non-reentrant
``torch.utils.checkpoint``) work: ``W`` is a second backward pass through the same
graph, so a checkpointed region is recomputed again for it (a recomputing stage pays
its forward twice under a split backward; tests/runtime/test_zero_bubble.py checks the
gradients).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch.distributed.pipelining import _backward as _pp

__all__ = ["WeightWork", "input_grads", "weight_grads"]


@dataclass
class WeightWork:
    """What ``W`` needs: either the whole backward (``roots``/``seeds``) or the saved
    parameter groups. ``roots`` keep the graph (and so the activations) alive until W."""

    roots: list[torch.Tensor] = field(default_factory=list)
    seeds: list[torch.Tensor | None] = field(default_factory=list)
    groups: list[dict[str, Any]] | None = None
    params: list[torch.nn.Parameter] = field(default_factory=list)


def _accumulate(t: torch.Tensor, g: torch.Tensor | None) -> None:
    if g is None:
        return
    if t.grad is None:
        t.grad = g
    else:
        t.grad += g


def input_grads(roots: list[torch.Tensor], seeds: list[torch.Tensor | None], args: Sequence[Any],
                params: list[torch.nn.Parameter]) -> WeightWork:
    """Accumulate the gradients of the tensor ``args`` that require grad into their
    ``.grad``; return what ``weight_grads`` needs for ``params``."""
    inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    if not roots:
        return WeightWork()
    if not inputs:  # nothing to send back: the whole backward waits for W
        return WeightWork(roots, seeds)
    out_fns = [fn for fn in map(_pp._get_grad_fn_or_grad_acc, roots) if fn is not None]
    in_fns = [fn for fn in map(_pp._get_grad_fn_or_grad_acc, inputs) if fn is not None]
    w_fns = {}
    for p in params:
        fn = _pp._get_grad_fn_or_grad_acc(p)
        if fn is not None:
            w_fns[fn] = p
    reverse = _pp.construct_reverse_graph(out_fns)
    groups = _pp.get_param_groups(in_fns, list(w_fns), reverse)
    covered = set().union(*(g["params"] for g in groups)) if groups else set()
    early: list[torch.Tensor] = [p for fn, p in w_fns.items() if fn not in covered]
    handles = []
    for group in groups:
        group["intermediates"] = list(group["intermediates"])
        for i, node in enumerate(group["intermediates"]):
            def hook(grad_inputs: Any, group: dict[str, Any] = group, i: int = i) -> None:
                if group.get("grads") is None:
                    group["grads"] = [None] * len(group["intermediates"])
                group["grads"][i] = grad_inputs
            handles.append(node.register_prehook(hook))
    try:
        grads = torch.autograd.grad(roots, inputs + early, seeds, retain_graph=True, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    for t, g in zip(inputs + early, grads):
        _accumulate(t, g)
    groups = [g for g in groups if g.get("grads") is not None]  # branches no gradient reached
    return WeightWork(roots, seeds, groups, [w_fns[fn] for g in groups for fn in g["params"]])


def weight_grads(work: WeightWork) -> None:
    """Accumulate the weights' gradients into their ``.grad``; frees the graph."""
    if work.groups is None:
        if work.roots:
            torch.autograd.backward(work.roots, work.seeds)
        return
    if work.groups:
        _pp.stage_backward_weight(iter(work.params), work.groups, retain_graph=False)
    work.roots.clear()
