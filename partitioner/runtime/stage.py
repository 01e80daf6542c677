"""This rank's share of a pipeline: its stage modules on its device, and a runner.

>>> stage = pipe.build_stage(rank, "cpu")                      # doctest: +SKIP
>>> runner = stage.runner("1f1b", n_microbatches=8, loss_fn=loss_fn)
>>> loss = runner.step(x, target=y)   # x on the first rank, y on the last; None elsewhere
>>> opt.step()                        # opt over stage.parameters()

The modules are copies (the user's model is untouched), so weights tied across ranks
(``plan.tied_parameters``) are separate tensors here: every step all-reduces their
gradients over the ranks that hold them, which keeps the copies equal under any
optimizer that is a function of the gradient.
"""

from __future__ import annotations

import copy
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.utils import _pytree as pytree

from partitioner.runtime.dist import DistTransport, backend_for
from partitioner.runtime.errors import PipelineRuntimeError
from partitioner.runtime.interpreter import Interpreter, TraceEvent
from partitioner.runtime.local import resolve_schedule, seq_len
from partitioner.runtime.microbatch import batch_size, split
from partitioner.runtime.routing import routes
from partitioner.schedule import Schedule

__all__ = ["build_stage", "RankStage", "Runner"]


def _copy_to(modules: list[nn.Module], device: torch.device) -> list[nn.Module]:
    """Deep copies made together, so a tensor shared by two stages of this rank stays
    one tensor; parameters and buffers are copied straight onto ``device``."""
    memo: dict[int, Any] = {}
    for mod in modules:
        for _, p in mod.named_parameters(remove_duplicate=False):
            if id(p) not in memo:
                memo[id(p)] = nn.Parameter(p.detach().to(device, copy=True), requires_grad=p.requires_grad)
        for _, b in mod.named_buffers(remove_duplicate=False):
            if id(b) not in memo:
                memo[id(b)] = b.detach().to(device, copy=True)
    return copy.deepcopy(modules, memo)


class RankStage:
    """The stages ``rank`` runs (stage s lives on rank s % n_ranks)."""

    def __init__(self, pipe: Any, rank: int, device: torch.device, group: dist.ProcessGroup | None) -> None:
        plan = pipe.plan
        self.pipe, self.plan, self.rank, self.device, self.group = pipe, plan, rank, device, group
        self.n_ranks = plan.options.get("n_gpus") or max(st.rank for st in plan.stages) + 1
        mine = [st.index for st in plan.stages if st.rank == rank]
        if not mine:
            raise PipelineRuntimeError(f"rank {rank} runs no stage of this plan (ranks 0..{self.n_ranks - 1})", rank)
        self.modules: dict[int, nn.Module] = dict(zip(mine, _copy_to([pipe.stages[s] for s in mine], device)))
        self._tied = self._tie_groups()

    def _tie_groups(self) -> list[tuple[dist.ProcessGroup, list[nn.Parameter]]]:
        """One subgroup per tied set spanning several ranks. ``new_group`` is collective:
        every rank creates every subgroup, in plan order, member or not."""
        out = []
        named = {n: p for mod in self.modules.values() for n, p in mod.named_parameters(remove_duplicate=False)}
        for names in self.plan.tied_parameters:
            ranks = sorted({st.rank for st in self.plan.stages if set(st.parameters) & set(names)})
            if len(ranks) < 2:
                continue  # one rank holds every use: a single tensor after _copy_to
            global_ranks = ranks if self.group is None else [dist.get_global_rank(self.group, r) for r in ranks]
            pg = dist.new_group(global_ranks)
            if self.rank in ranks:
                params = list({id(named[n]): named[n] for n in names if n in named}.values())
                out.append((pg, params))
        return out

    def parameters(self) -> list[nn.Parameter]:
        seen: dict[int, nn.Parameter] = {}
        for mod in self.modules.values():
            for p in mod.parameters():
                seen.setdefault(id(p), p)
        return list(seen.values())

    def named_parameters(self) -> dict[str, nn.Parameter]:
        """FQN → parameter, the model's names (a tied tensor appears under each name)."""
        return {n: p for mod in self.modules.values() for n, p in mod.named_parameters(remove_duplicate=False)}

    def runner(self, schedule: str | Schedule = "1f1b", n_microbatches: int | None = None,
               loss_fn: Callable[[Any, Any], torch.Tensor] | None = None, *, batch_size: int | None = None) -> Runner:
        if loss_fn is None:
            raise PipelineRuntimeError("runner() needs loss_fn=...: the last stage computes the loss")
        return Runner(self, resolve_schedule(self.pipe, schedule, n_microbatches), loss_fn, batch_size)

    def as_pipelining_stage(self, stage_index: int, n_microbatches: int | None = None, batch: int | None = None) -> Any:
        """This rank's stage ``stage_index`` as a ``torch.distributed.pipelining.PipelineStage``."""
        from partitioner.runtime.interop import pipelining_stage

        return pipelining_stage(self, stage_index, n_microbatches, batch)

    def reduce_tied_grads(self, saved: list[list[torch.Tensor | None]] | None = None) -> None:
        """Sum the gradients of tied tensors over their ranks (call it yourself after a
        step of a torch.distributed.pipelining schedule). ``saved`` holds gradients from
        before this step, which each rank already has in full, so they are not summed."""
        for i, (pg, params) in enumerate(self._tied):
            before = saved[i] if saved is not None else [None] * len(params)
            for p, old in zip(params, before):
                g = p.grad if p.grad is not None else torch.zeros_like(p)
                dist.all_reduce(g, group=pg)
                p.grad = g if old is None else old + g

    def take_tied_grads(self) -> list[list[torch.Tensor | None]]:
        saved = []
        for _, params in self._tied:
            saved.append([p.grad for p in params])
            for p in params:
                p.grad = None
        return saved


class Runner:
    """Runs one training step of this rank's action list per ``step`` call."""

    def __init__(self, stage: RankStage, schedule: Schedule, loss_fn: Callable[[Any, Any], torch.Tensor],
                 batch: int | None) -> None:
        plan = stage.plan
        if schedule.n_ranks != stage.n_ranks:
            raise PipelineRuntimeError(f"schedule is for {schedule.n_ranks} ranks, the plan for {stage.n_ranks}")
        self.stage, self.schedule = stage, schedule
        self.batch = batch if batch is not None else int(plan.symbols.get("B", 0))
        m = schedule.n_microbatches
        if self.batch % m:
            raise PipelineRuntimeError(
                f"the batch of {self.batch} samples does not split into {m} micro-batches; choose n_microbatches "
                f"among {[d for d in range(1, self.batch + 1) if self.batch % d == 0]} (or pass batch_size=...)")
        width = max((len(b.values) for b in plan.boundaries), default=1)
        self.transport = DistTransport(plan.n_stages, m, width, stage.group)
        self.interpreter = Interpreter(stage.rank, stage.modules, plan, schedule, self.transport, loss_fn,
                                       stage.pipe.unflatten_outputs, stage.device,
                                       routes=routes(plan, stage.pipe.stages))
        self.events: list[TraceEvent] = []

    def step(self, *inputs: Any, target: Any = None, trace: str | None = None, **kwargs: Any) -> torch.Tensor | None:
        """One forward+backward over every micro-batch. The first rank passes the model's
        inputs, the last rank ``target``; returns the loss on the last rank, else None.
        With ``trace``, every rank must pass it (it gathers events); rank 0 writes the file."""
        it, m, dev = self.interpreter, self.schedule.n_microbatches, self.stage.device
        mb_inputs = mb_targets = None
        if 0 in it.modules:
            flat = pytree.tree_map(lambda v: v.to(dev) if isinstance(v, torch.Tensor) else v,
                                   self.stage.pipe.flatten_inputs(inputs, kwargs))
            got = batch_size(flat)
            if got != self.batch:
                raise PipelineRuntimeError(
                    f"rank {self.stage.rank}: the inputs have batch {got}, the runner expects {self.batch} "
                    f"(the other ranks size their buffers from it): pass runner(..., batch_size={got})")
            mb_inputs = split(flat, m, self.batch)
        if it.last in it.modules:
            if target is None:
                raise PipelineRuntimeError(f"rank {self.stage.rank} runs the last stage: step() needs target=...")
            mb_targets = split(pytree.tree_map(lambda v: v.to(dev) if isinstance(v, torch.Tensor) else v, target),
                               m, self.batch)
        it.start(self.batch // m, seq_len(self.stage.plan), mb_inputs, mb_targets)
        saved = self.stage.take_tied_grads()
        for a in it.actions:
            it.run(a)
        loss = it.finish()
        self.stage.reduce_tied_grads(saved)
        self.events = list(it.events)
        if trace is not None:
            self.write_trace(trace)
        return loss

    def write_trace(self, path: str) -> None:
        """Collective: gathers the last step's events to rank 0, which writes ``path``."""
        from partitioner.runtime.trace import write_trace

        gathered: list[Any] = [None] * dist.get_world_size(self.stage.group) if self.stage.rank == 0 else []
        dst = 0 if self.stage.group is None else dist.get_global_rank(self.stage.group, 0)
        dist.gather_object(self.events, gathered if self.stage.rank == 0 else None, dst=dst, group=self.stage.group)
        if self.stage.rank == 0:
            write_trace(path, [TraceEvent(*e) for evs in gathered for e in evs], self.schedule)


def build_stage(pipe: Any, rank: int, device: torch.device | str | None = None, *,
                init_process_group: bool | str = "auto", group: dist.ProcessGroup | None = None,
                timeout_s: float = 300.0) -> RankStage:
    """This rank's stages, copied onto ``device`` (default: cuda:LOCAL_RANK if CUDA, else cpu).

    ``init_process_group="auto"`` joins the default group from the environment (torchrun,
    ``spawn``) unless one exists; NCCL on CUDA devices, gloo on CPU.
    """
    if device is None:
        device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)  # NCCL binds each rank's communicators to its current device
    if init_process_group and not dist.is_initialized():
        dist.init_process_group(backend_for(dev), init_method="env://", timeout=timedelta(seconds=timeout_s))
    if not dist.is_initialized():
        raise PipelineRuntimeError("build_stage needs torch.distributed initialised (init_process_group=True)")
    n_ranks = pipe.plan.options.get("n_gpus") or max(st.rank for st in pipe.plan.stages) + 1
    world = dist.get_world_size(group)
    if world != n_ranks:
        raise PipelineRuntimeError(f"the plan runs on {n_ranks} ranks, the process group has {world}: "
                                   f"launch {n_ranks} processes or re-partition with n_gpus={world}")
    return RankStage(pipe, rank, dev, group)
