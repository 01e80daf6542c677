"""Capture: model → a flat ``fx.GraphModule``, by ``torch.fx`` first, ``torch.export`` where fx cannot.

Both routes end in the same shape of graph: placeholders are the flat inputs in order,
parameters and buffers are reached through ``get_attr``/``call_module`` with their original
fully qualified names, and the output node returns a flat tuple whose structure is kept
in ``Captured.out_spec``. Nothing here mutates the user's module: ``GraphModule(model, g)``
refers to the user's submodules and tensors, it does not move or copy them.
"""

from __future__ import annotations

import inspect
import traceback
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from passes.errors import CaptureError
from passes.split import copy_persistence

__all__ = ["Captured", "capture", "ROUTES"]

ROUTES = ("auto", "fx", "export")


@dataclass(frozen=True)
class Captured:
    gm: fx.GraphModule  # flat graph: placeholders = flat inputs, output = flat tuple
    route: str  # "fx" or "export": which capture produced gm
    input_names: tuple[str, ...]  # placeholder names, in order
    flatten: Callable[[tuple[Any, ...], dict[str, Any]], list[Any]]  # user call → flat inputs
    out_spec: pytree.TreeSpec  # flat outputs → the model's output structure
    fallback_reason: str = ""  # why fx was not used, when route == "export"

    def unflatten_outputs(self, flat: Sequence[Any]) -> Any:
        return pytree.tree_unflatten(list(flat), self.out_spec)


class _Tracer(fx.Tracer):
    def __init__(self, leaf_modules: frozenset[str], leaf_types: tuple[type, ...]) -> None:
        super().__init__()
        self._leaf_paths = leaf_modules
        self._leaf_types = leaf_types

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self._leaf_paths or (self._leaf_types and isinstance(m, self._leaf_types)):
            return True
        return super().is_leaf_module(m, qualname)


def _flat_output(graph: fx.Graph) -> pytree.TreeSpec:
    """Rewrite the output node to return a flat tuple; return the structure it had."""
    out = next(n for n in reversed(graph.nodes) if n.op == "output")
    leaves, spec = pytree.tree_flatten(out.args[0])
    out.args = (tuple(leaves),)
    return spec


def _trace_fx(
    model: nn.Module,
    leaf_modules: Sequence[str | type],
    concrete_args: dict[str, Any] | None,
) -> Captured:
    paths = frozenset(m for m in leaf_modules if isinstance(m, str))
    types = tuple(m for m in leaf_modules if isinstance(m, type))
    tracer = _Tracer(paths, types)
    graph = tracer.trace(model, concrete_args=concrete_args)
    out_spec = _flat_output(graph)
    gm = fx.GraphModule(tracer.root, graph, class_name=type(model).__name__)
    copy_persistence(model, gm)
    names = tuple(n.name for n in gm.graph.nodes if n.op == "placeholder")
    sig = inspect.signature(model.forward)
    params = list(sig.parameters)
    # fx makes one placeholder per forward parameter, in order (a concrete arg's
    # placeholder may be renamed, e.g. "flag_1"), so map them by position.
    if len(names) == len(params):
        keys = params
    else:
        keys = [str(n.target).lstrip("*") for n in gm.graph.nodes if n.op == "placeholder"]
    signature_defaults = {k: p.default for k, p in sig.parameters.items() if p.default is not p.empty}
    fixed = dict(concrete_args or {})

    def flatten(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError as e:
            raise CaptureError(f"inputs do not match {type(model).__name__}.forward{sig}: {e}") from None
        values = {**signature_defaults, **fixed, **bound.arguments}
        return [values.get(k) for k in keys]

    return Captured(gm, "fx", names, flatten, out_spec)


def _trace_export(
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    dynamic: dict[str, dict[int, str]],
) -> Captured:
    from torch.export import Dim, export

    def dims_for(name: str, value: Any) -> Any:
        if isinstance(value, torch.Tensor) and name in dynamic:
            return {d: Dim.AUTO for d in dynamic[name]}
        return None

    sig = inspect.signature(model.forward)
    bound = sig.bind(*args, **kwargs)
    dyn_args = tuple(dims_for(n, v) for n, v in list(bound.arguments.items())[: len(args)])
    dyn_kwargs = {k: dims_for(k, v) for k, v in kwargs.items()}
    dynamic_shapes: Any = (*dyn_args, *dyn_kwargs.values()) if not kwargs else {
        **dict(zip(list(bound.arguments)[: len(args)], dyn_args)),
        **dyn_kwargs,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = export(model, args, kwargs=kwargs, dynamic_shapes=dynamic_shapes, strict=False)
        unlifted = ep.module()
    in_spec = unlifted._in_spec
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in unlifted.graph.nodes:
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            continue  # export's input guard; shapes are checked against the plan instead
        if node.op == "output":
            graph.output(tuple(fx.map_arg(a, lambda n: env[n]) for a in node.args[0]))
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
    _split_tied_attrs(graph, model)
    gm = fx.GraphModule(unlifted, graph, class_name=type(model).__name__)
    copy_persistence(model, gm)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    names = tuple(n.name for n in gm.graph.nodes if n.op == "placeholder")

    def flatten(call_args: tuple[Any, ...], call_kwargs: dict[str, Any]) -> list[Any]:
        b = sig.bind(*call_args, **call_kwargs)
        pos = tuple(b.arguments[n] for n in list(b.arguments)[: len(args)])
        rest = {k: v for k, v in b.arguments.items() if k in kwargs}
        try:
            from torch.fx._pytree import tree_flatten_spec

            return list(tree_flatten_spec((pos, rest), in_spec))
        except Exception as e:  # pytree says only "mismatch"; name what was expected
            raise CaptureError(
                f"inputs do not match the exported signature {in_spec}: {e}"
            ) from None

    out_spec = unlifted._out_spec
    if out_spec is None:  # export always records it; say so rather than fail later
        raise CaptureError(f"torch.export gave no output structure for {type(model).__name__}")
    return Captured(gm, "export", names, flatten, out_spec)


def _split_tied_attrs(graph: fx.Graph, model: nn.Module) -> None:
    """Give each use of a tied tensor the name its own module knows it by.

    ``torch.export`` keeps one name per tensor, so GPT-2's embedding would read
    ``lm_head.weight``; fx (and users' checkpoints) say ``transformer.wte.weight`` there.
    """
    names: dict[int, list[str]] = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        names.setdefault(id(t), []).append(name)
    by_name = {n: aliases for aliases in names.values() if len(aliases) > 1 for n in aliases}
    for node in list(graph.nodes):
        if node.op != "get_attr" or node.target not in by_name:
            continue
        for user in list(node.users):
            stack = [str(v[0]) for v in (user.meta.get("nn_module_stack") or {}).values()]
            owner = next((a for path in reversed(stack) for a in by_name[node.target]
                          if a.rpartition(".")[0] == path), None)
            if owner is None or owner == node.target:
                continue
            with graph.inserting_before(user):
                alias = graph.get_attr(owner)
            alias.meta = dict(node.meta)
            user.replace_input_with(node, alias)


def _failing_submodule(model: nn.Module, e: BaseException) -> str:
    """" in submodule 'gate' (Gate.forward, file.py:12)" for the innermost module frame."""
    paths = {id(m): name for name, m in model.named_modules() if name}
    found = ""
    tb = e.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        owner = frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in paths:
            code = frame.f_code
            found = (f" in submodule {paths[id(owner)]!r} ({type(owner).__name__}.{code.co_name}, "
                     f"{code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno})")
        tb = tb.tb_next
    return found


def _first_line(e: BaseException) -> str:
    """The message's first line: torch.export ends its errors with boilerplate."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = lines[0] if lines else type(e).__name__
    return f"{type(e).__name__}: {text[:240]}"


def _last_line(e: BaseException) -> str:
    text = "".join(traceback.format_exception_only(type(e), e)).strip().splitlines()
    return text[-1] if text else type(e).__name__


def capture(
    model: nn.Module,
    args: tuple[Any, ...] | None = None,
    kwargs: dict[str, Any] | None = None,
    *,
    route: str = "auto",
    leaf_modules: Sequence[str | type] = (),
    concrete_args: dict[str, Any] | None = None,
    dynamic: dict[str, dict[int, str]] | None = None,
) -> Captured:
    """Capture ``model`` as a flat graph; ``dynamic`` maps input name → {dim: "B"/"S"}."""
    if route not in ROUTES:
        raise CaptureError(f"unknown capture route {route!r}; use one of {', '.join(ROUTES)}")
    name = type(model).__name__
    fx_error: BaseException | None = None
    if route in ("auto", "fx"):
        try:
            return _trace_fx(model, leaf_modules, concrete_args)
        except CaptureError:
            raise
        except Exception as e:  # fx raises TraceError, TypeError, AttributeError, ...
            fx_error = e
            if route == "fx":
                raise CaptureError(
                    f"torch.fx could not trace {name}{_failing_submodule(model, e)}: {_last_line(e)}. Mark the offending "
                    "submodule as a leaf (leaf_modules=[...]), pass concrete_args for "
                    "control-flow flags, or use route='export'"
                ) from e
    if args is None and not kwargs:
        raise CaptureError(
            f"torch.fx could not trace {name} ({_last_line(fx_error) if fx_error else 'not tried'}) "
            "and torch.export needs example inputs: pass example_inputs=(...)"
        )
    try:
        cap = _trace_export(model, tuple(args or ()), dict(kwargs or {}), dynamic or {})
    except Exception as e:
        why_fx = f"torch.fx{_failing_submodule(model, fx_error)}: {_last_line(fx_error)}; " if fx_error else ""
        raise CaptureError(
            f"cannot capture {name}: {why_fx}torch.export: {_first_line(e)}. Mark the failing "
            "submodule as a leaf module (leaf_modules=[...]), pass concrete_args for Python "
            "control flow on flags, or make data-dependent branches tensor ops (torch.where)"
        ) from e
    if fx_error is not None:
        cap = Captured(cap.gm, cap.route, cap.input_names, cap.flatten, cap.out_spec, _last_line(fx_error))
    return cap
