"""Stage modules run through ``torch.compile`` (``compile=True`` on ``build_stage``,
``RankStage.runner``, ``pipe.train_step`` and ``partitioner run --compile``).

Each stage module is wrapped once by ``torch.compile`` (default backend: inductor; a dict
gives ``torch.compile``'s keyword arguments instead, e.g. ``{"mode": "max-autotune"}`` or
``{"backend": "aot_eager"}``). The wrapper shares the stage's parameters (an
``OptimizedModule`` holds the module itself), so gradients, optimizers, checkpoints and
the data-parallel reducer see the same tensors as without compiling; the interpreter only
calls a different module. The originals are left as they are: ``RankStage.modules`` and
``pipe.stages`` stay the eager modules, and a rank compiles only the stages it runs.

Shapes: ``dynamic=None`` (``torch.compile``'s default) unless the dict says otherwise. A
stage is first compiled for the shapes it sees (every micro-batch of a step has the same
shapes, so one compilation serves the whole step and every later step); when a shape
changes (another sequence length or micro-batch size) dynamo recompiles once with that
dimension symbolic ("automatic dynamic shapes"), and later sizes reuse it. Marking the
plan's ``B``/``S`` dimensions dynamic up front would avoid that one recompilation but
would give every run the slower symbolic kernels, and an error where a model specialises
a dimension.

Recomputing stages (``passes.recompute.RecomputeStage``) compile as they are: dynamo
traces ``torch.utils.checkpoint(use_reentrant=False)`` as its checkpoint operator and
AOTAutograd recomputes the region in the compiled backward.

Split backward (zero-bubble schedules: an ``I`` action per micro-batch, then ``W``) is
refused: AOTAutograd compiles a stage's whole backward into one autograd node that makes
the input and the weight gradients together, so ``I`` cannot leave the weights for ``W``
(``runtime.splitgrad`` would run the whole compiled backward twice, and PyTorch refuses a
second pass over a backward compiled with donated buffers).
"""

from __future__ import annotations

import weakref
from typing import Any, Mapping, Union

import torch
from torch import nn

from partitioner.runtime.errors import PipelineRuntimeError
from partitioner.schedule import Schedule

__all__ = ["CompileOption", "compile_kwargs", "check_schedule", "compiled_modules"]

#: ``compile=``: False (eager), True (``torch.compile`` defaults) or ``torch.compile``'s kwargs
CompileOption = Union[bool, Mapping[str, Any], None]

# owner (a Pipe or RankStage) -> {(stage, options): compiled wrapper}. Weak on the owner, so
# the wrappers go with it; the wrappers reference the stage modules, never the owner.
_CACHE: weakref.WeakKeyDictionary[Any, dict[tuple[int, str], nn.Module]] = weakref.WeakKeyDictionary()


def compile_kwargs(compile: CompileOption) -> dict[str, Any] | None:
    """``torch.compile``'s keyword arguments for ``compile=``, or None for eager."""
    if compile is None or compile is False:
        return None
    if compile is True:
        return {}
    if isinstance(compile, Mapping):
        return dict(compile)
    raise PipelineRuntimeError(f"compile= takes True, False or a dict of torch.compile arguments, got {compile!r}")


def check_schedule(schedule: Schedule) -> None:
    """Refuse a schedule with a split backward (``I``/``W`` actions) for compiled stages."""
    split = sorted({a.kind for acts in schedule.actions for a in acts} & {"I", "W"})
    if split:
        raise PipelineRuntimeError(
            f"schedule {schedule.name!r} splits each backward into I (input gradients) and W (weight gradients), "
            "which compiled stages cannot do: torch.compile (AOTAutograd) makes a stage's whole backward one "
            "autograd node that computes input and weight gradients together, so W would run that backward a "
            "second time (and PyTorch refuses it for backwards compiled with donated buffers). Use compile=False "
            "with this schedule, or a schedule without a split backward (gpipe, 1f1b, interleaved-1f1b) with "
            "compile=True")


def compiled_modules(owner: Any, modules: Mapping[int, nn.Module], compile: CompileOption) -> dict[int, nn.Module]:
    """``modules`` ({stage: module}) with each module wrapped by ``torch.compile``, or
    ``modules`` itself when ``compile`` is off. The wrappers are made once per ``owner``,
    stage and options (a new runner or step reuses them, and with them dynamo's compiled
    code); a stage module replaced since gets a new wrapper."""
    kwargs = compile_kwargs(compile)
    if kwargs is None:
        return dict(modules)
    key = repr(sorted(kwargs.items()))
    cache = _CACHE.setdefault(owner, {})
    out: dict[int, nn.Module] = {}
    for s, mod in modules.items():
        hit = cache.get((s, key))
        if hit is None or getattr(hit, "_orig_mod", None) is not mod:
            hit = cache[(s, key)] = torch.compile(mod, **kwargs)
        out[s] = hit
    return out
