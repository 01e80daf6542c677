"""Our stages as ``torch.distributed.pipelining.PipelineStage``s, so PyTorch's own
schedules (ScheduleGPipe, Schedule1F1B, ScheduleInterleaved1F1B, and for our zero-bubble
names ScheduleInterleavedZeroBubble ("zb-h1") and ScheduleZBVZeroBubble ("zbv"), whose V
places stages as ours does) can run a plan: ``pytorch_schedule(name)`` gives the class.

PipelineStage moves tensors only, so the wrapper carries non-tensor boundary values
(ints, floats, bools) as the same one-element tensors our runtime sends, and leaves
values the plan knows are None off the wire. Its shapes are given up front (static
mode, no metadata exchange): they come from running the stages before ``stage_index``
once, without grad, on zeros shaped like the plan's inputs, which also yields the
real values of any integers that cross a cut.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from partitioner.runtime.errors import PipelineRuntimeError
from partitioner.runtime.spec import seq_len
from partitioner.runtime.values import Wire, boundary_wires, decode, encode, input_wires
from partitioner.schedule import SCHEDULES, split_problem

__all__ = ["TensorOnlyStage", "pipelining_stage", "pytorch_schedule"]


def pytorch_schedule(name: str) -> Any:
    """The ``torch.distributed.pipelining`` schedule class that runs our schedule ``name``
    (the registry's ``ScheduleSpec.pytorch``); an error for names PyTorch has no class for."""
    import torch.distributed.pipelining as pp  # noqa: PLC0415 - torch.distributed.* loads where it is used (a torch build may lack distributed)

    spec = SCHEDULES.get(name)
    if spec is None or spec.pytorch is None:
        have = [n for n, s in SCHEDULES.items() if s.pytorch]
        raise PipelineRuntimeError(f"PyTorch pipelining has no class for schedule {name!r}; it runs {', '.join(have)}")
    return getattr(pp, spec.pytorch)


def _to_wire(wires: Sequence[Wire], values: Sequence[Any], *, detach: bool) -> tuple[torch.Tensor, ...]:
    """The runtime's encoding (``values.encode``); detached example tensors get the
    ``requires_grad`` the plan records, as PipelineStage's shape inference expects."""
    out = encode("pipelining stage", wires, values, detach=detach)
    if detach:
        tensors = iter(w for w in wires if w.travels)
        out = [t.requires_grad_(w.requires_grad) if w.kind == "tensor" else t for w, t in zip(tensors, out)]
    return tuple(out)


def _from_wire(wires: Sequence[Wire], tensors: Sequence[torch.Tensor]) -> list[Any]:
    return decode(wires, tensors, grad=None)  # PyTorch's autograd owns the tensors' grad flags


class TensorOnlyStage(nn.Module):
    """``module`` with its boundary values as tensors; the last stage returns the model's
    output structure (what the user's loss_fn takes)."""

    def __init__(self, module: nn.Module, in_wires: Sequence[Wire], out_wires: Sequence[Wire] | None,
                 unflatten: Callable[[Sequence[Any]], Any]) -> None:
        super().__init__()
        self.module = module
        self.in_wires, self.out_wires, self.unflatten = tuple(in_wires), out_wires, unflatten

    def forward(self, *args: torch.Tensor) -> Any:
        out = self.module(*_from_wire(self.in_wires, args))
        if self.out_wires is None:
            return self.unflatten(list(out))
        return _to_wire(self.out_wires, list(out), detach=False)


def pipelining_stage(stage: Any, stage_index: int, n_microbatches: int | None = None, batch: int | None = None) -> Any:
    """A PipelineStage for ``stage_index`` of a RankStage (``stage.as_pipelining_stage``)."""
    from torch.distributed.pipelining import PipelineStage  # noqa: PLC0415 - torch.distributed.* loads where it is used (a torch build may lack distributed)

    plan, spec = stage.plan, stage.spec
    if stage_index not in stage.modules:
        raise PipelineRuntimeError(f"stage {stage_index} does not run on rank {stage.rank} "
                                   f"(it holds {sorted(stage.modules)})", stage.rank)
    m = n_microbatches if n_microbatches is not None else plan.prediction.n_microbatches
    b = batch if batch is not None else int(plan.symbols.get("B", 1))
    problem = split_problem(b, m)
    if problem:
        raise PipelineRuntimeError(problem)
    mb, seq = b // m, seq_len(plan)
    first = input_wires(plan, mb, seq)
    wires = [first, *(boundary_wires(plan, i, mb, seq) for i in range(plan.n_stages - 1))]
    values: list[Any] = [torch.zeros(w.shape, dtype=w.dtype) if w.kind == "tensor" else None for w in first]
    # the record's stages (the user's, not this rank's copies): one example forward
    mods = spec.modules(range(stage_index + 1), "as_pipelining_stage (one example forward through the stages up to it)")
    with torch.no_grad():
        for mod in mods[:-1]:
            values = list(mod(*values))
        out = list(mods[-1](*values))
    last = stage_index == plan.n_stages - 1
    dev = stage.device
    in_args = tuple(t.to(dev) for t in _to_wire(wires[stage_index], values, detach=True))
    if last:
        res = spec.unflatten_outputs(out)
        out_args = tuple(t.to(dev) for t in (res if isinstance(res, tuple) else (res,)))
    else:
        out_args = tuple(t.to(dev) for t in _to_wire(wires[stage_index + 1], out, detach=True))
    wrapped = TensorOnlyStage(stage.modules[stage_index], wires[stage_index], None if last else wires[stage_index + 1],
                              spec.unflatten_outputs)
    return PipelineStage(wrapped, stage_index, plan.n_stages, dev, input_args=in_args, output_args=out_args,
                         group=stage.group)
