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

Recomputing stages (``partitioner.passes.recompute.RecomputeStage``) compile as one graph each:
dynamo traces ``torch.utils.checkpoint(use_reentrant=False)`` as a tagged region, whose
activations AOTAutograd's partitioner recomputes in the compiled backward rather than
saving them (the GPT fixture's recomputing stage keeps 27.0 KB of activations compiled,
25.1 KB eager, 273 KB without recompute), so the plan's memory model still holds. Their
segments are built eagerly before compiling, and each gets its own copy of the shared
forward function (``_compile``).

Split backward (zero-bubble schedules: an ``I`` action per micro-batch, then ``W``) is
refused: AOTAutograd compiles a stage's whole backward into one autograd node that makes
the input and the weight gradients together, so ``I`` cannot leave the weights for ``W``
(``runtime.splitgrad`` would run the whole compiled backward twice, and PyTorch refuses a
second pass over a backward compiled with donated buffers).
"""

from __future__ import annotations

import logging
import types
import weakref
from typing import Any, Mapping, Union

import torch
from torch import nn

from partitioner.passes.attention import rewrite_attention
from partitioner.passes.meta import ATTENTION
from partitioner.passes.recompute import RecomputeStage, _segments
from partitioner.runtime.errors import PipelineRuntimeError
from partitioner.schedule import Schedule

__all__ = ["CompileOption", "compile_kwargs", "check_schedule", "compiled_modules"]

log = logging.getLogger("partitioner.runtime")

#: ``compile=``: False (eager), True (``torch.compile`` defaults) or ``torch.compile``'s kwargs
CompileOption = Union[bool, Mapping[str, Any], None]

# owner (a PipelineSpec or RankStage) -> {(stage, options): compiled wrapper}. Weak on the owner, so
# the wrappers go with it; the wrappers reference the stage modules, never the owner.
_CACHE: weakref.WeakKeyDictionary[Any, dict[tuple[int, str], tuple[nn.Module, Any]]] = weakref.WeakKeyDictionary()


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
            "second time (and PyTorch refuses it for backwards compiled with donated buffers). Run this schedule "
            "without compiling, or compile with a schedule that does not split the backward (gpipe, 1f1b, "
            "interleaved-1f1b)")


def compiled_modules(owner: Any, modules: Mapping[int, nn.Module], compile: CompileOption) -> dict[int, Any]:
    """``modules`` ({stage: module}) with each module wrapped by ``torch.compile``, or
    ``modules`` itself when ``compile`` is off. The wrappers are made once per ``owner``,
    stage and options (a new runner or step reuses them, and with them dynamo's compiled
    code); a stage module replaced since gets a new wrapper.

    First, each module's attention is rewritten in place to run as the plan priced it
    (``passes.attention.rewrite_attention``: the captured causal mask and K/V repeat become
    the fused call where provably equal, per size; once per module)."""
    kwargs = compile_kwargs(compile)
    for s, mod in modules.items():
        _fuse_attention(s, mod)
    if kwargs is None:
        return dict(modules)
    key = repr(sorted(kwargs.items()))
    cache = _CACHE.setdefault(owner, {})
    out: dict[int, Any] = {}
    for s, mod in modules.items():
        hit = cache.get((s, key))
        if hit is None or hit[0] is not mod:
            try:
                hit = cache[(s, key)] = (mod, _compile(mod, s, kwargs))
            except (TypeError, ValueError, RuntimeError) as e:  # torch.compile checks its arguments here
                raise PipelineRuntimeError(f"compile={compile!r}: torch.compile refused it: {e}") from e
        out[s] = hit[1]
    return out


def _fuse_attention(stage: int, mod: nn.Module) -> None:
    """``rewrite_attention`` on a stage module, and, on a CUDA device, a warning (once per
    module) naming the attention nodes that keep an explicit mask the plan priced as fused."""
    if isinstance(getattr(mod, "meta", None), dict) and ATTENTION in mod.meta:  # type: ignore[operator]
        return
    report = rewrite_attention(mod)
    mispriced = report["priced_fused"]
    dev = next((p.device for p in mod.parameters()), None)
    if mispriced and dev is not None and dev.type == "cuda":
        log.warning("stage %d: attention %s runs with an explicit mask that is not provably the causal one: the plan "
                    "priced it as the fused causal kernel, which this stage cannot use", stage,
                    ", ".join(mispriced[:4]) + (" …" if len(mispriced) > 4 else ""))


def _compile(mod: nn.Module, stage: int, kwargs: dict[str, Any]) -> Any:
    """``torch.compile(mod)``; a recomputing stage through a private copy of its forward.

    Dynamo keeps compiled code per code object, at most ``recompile_limit`` (8) entries
    each, and every recomputing stage's forward is the same function
    (``partitioner.passes.recompute._checkpointed_forward``): a ninth such stage in one process would
    run eagerly (with a warning only). A copy of the code object per stage gives each its
    own cache (fx's generated forwards are one code object per stage already). Calling the
    bound copy skips ``nn.Module.__call__``, i.e. module hooks, which stages do not have."""
    if not isinstance(mod, RecomputeStage):
        return torch.compile(mod, **kwargs)
    # Its segments are built (fx graph surgery, which dynamo cannot trace: a graph break
    # and an eager fallback) on first use and cached while its tensors stay the same: build
    # them now, eagerly, so the compiled forward finds them.
    _segments(mod)
    fwd = type(mod).forward
    code = fwd.__code__.replace(co_name=f"{fwd.__code__.co_name}_stage{stage}")
    private = types.FunctionType(code, fwd.__globals__, code.co_name, fwd.__defaults__, fwd.__closure__)
    return torch.compile(types.MethodType(private, mod), **kwargs)
