"""Turn what a user types into objects: ``file.py:factory`` / ``pkg.mod:factory`` and plan files.

Every failure becomes a ``ToolError`` with one line that says what was wrong and how to
write it instead; the CLI prints that line, never a traceback.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from partitioner.plan import PlanError, load_plan

__all__ = ["ToolError", "load_factory", "load_model", "read_plan", "is_plan_file"]

_SPEC_FORM = "write MODEL as path/to/file.py:factory or package.module:factory"


class ToolError(Exception):
    """A user-facing failure of a command: its message is the whole story."""


def load_factory(spec: str) -> Any:
    """The callable ``spec`` names, imported (a file is executed as a fresh module)."""
    where, sep, attr = spec.rpartition(":")
    if not sep or not where or not attr:
        raise ToolError(f"model spec {spec!r} has no ':factory' part; {_SPEC_FORM}")
    if where.endswith(".py") or os.sep in where or "/" in where:
        path = Path(where)
        if not path.is_file():
            raise ToolError(f"model file {where!r} does not exist; {_SPEC_FORM}")
        # A unique module name, so two specs from different files never share a cache entry.
        name = f"_partitioner_model_{abs(hash(str(path.resolve())))}"
        mod_spec = importlib.util.spec_from_file_location(name, path)
        if mod_spec is None or mod_spec.loader is None:
            raise ToolError(f"cannot import {where!r} as Python")
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[name] = module
        # As `python file.py` would: the file's folder is importable, so `import layers` beside it works.
        folder = str(path.resolve().parent)
        if folder not in sys.path:
            sys.path.insert(0, folder)
        try:
            mod_spec.loader.exec_module(module)
        except Exception as e:  # the user's file: any failure is theirs to read about
            raise ToolError(f"importing {where!r} failed: {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise ToolError(f"cannot import module {where!r}: {e}; {_SPEC_FORM}") from e
        except Exception as e:
            raise ToolError(f"importing {where!r} failed: {type(e).__name__}: {e}") from e
    if not hasattr(module, attr):
        public = sorted(n for n in vars(module) if callable(getattr(module, n)) and not n.startswith("_"))
        raise ToolError(f"{where!r} has no attribute {attr!r} (callables there: {', '.join(public[:8]) or 'none'})")
    factory = getattr(module, attr)
    if not callable(factory):
        raise ToolError(f"{spec!r} is a {type(factory).__name__}, not a callable factory")
    return factory


def load_model(spec: str) -> tuple[Any, Any]:
    """Call the factory: it must return ``(model, example_inputs)``, inputs a tuple or dict."""
    factory = load_factory(spec)
    try:
        result = factory()
    except Exception as e:
        raise ToolError(f"factory {spec!r} raised {type(e).__name__}: {e}") from e
    import torch  # noqa: PLC0415 - CLI start-up (torch loads only when a model is loaded)

    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.nn.Module)):
        raise ToolError(f"factory {spec!r} must return (model, example_inputs), got {type(result).__name__}")
    model, inputs = result
    if isinstance(inputs, list):
        inputs = tuple(inputs)
    if not isinstance(inputs, (tuple, dict, torch.Tensor)):
        raise ToolError(f"factory {spec!r}: example_inputs must be a tuple or a dict, got {type(inputs).__name__}")
    return model, inputs


def is_plan_file(text: str) -> bool:
    return text.endswith(".json") and ":" not in Path(text).name


def read_plan(path: str) -> Any:
    """``load_plan`` with its PlanError (which names the JSON path) turned into a ToolError."""
    if not Path(path).is_file():  # before importing torch, so the common typo answers at once
        raise ToolError(f"plan file {path!r} does not exist")
    # The submodule, not the package: once partitioner/__init__ and partitioner.plan stop
    # importing torch eagerly, show and diff of plan files need no torch at all.

    try:
        return load_plan(Path(path))
    except PlanError as e:
        raise ToolError(f"{path}: {e}") from e
