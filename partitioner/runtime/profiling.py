"""Naming the pipeline's work in a user's ``torch.profiler`` trace.

``named(what, *args)`` is ``torch.profiler.record_function(name)`` while a profiler records
(``torch.autograd._profiler_enabled()``, the check PyTorch's RPC and datapipes make before
their own ranges), and a no-op context otherwise; the name (``str(what)``, formatted with
``args`` if any) is only built when it is used. Why not ``record_function`` always: with no
profiler it still dispatches an operator and makes a handle on enter, about 7 us per call
on this repository's CPU machine against well under 1 us for the check
(``benchmarks/profiler_bench.py``), and the interpreter enters one per action.
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager

import torch

__all__ = ["named"]

_NOTHING = contextlib.nullcontext()  # stateless: one instance serves every call


def named(what: object, *args: Any) -> ContextManager[Any]:
    """A ``record_function`` range named ``str(what)`` (``.format(*args)`` when given)
    while a profiler is on, else a no-op context."""
    if not torch.autograd._profiler_enabled():
        return _NOTHING
    return torch.profiler.record_function(str(what).format(*args) if args else str(what))
