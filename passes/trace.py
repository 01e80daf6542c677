"""Capture: model → a flat ``fx.GraphModule``, by ``torch.fx`` first, ``torch.export`` where fx cannot.

Both routes end in the same shape of graph: placeholders are the flat inputs in order,
parameters and buffers are reached through ``get_attr``/``call_module`` with their original
fully qualified names, and the output node returns a flat tuple whose structure is kept
in ``Captured.out_spec``. Nothing here mutates the user's module: ``GraphModule(model, g)``
refers to the user's submodules and tensors, it does not move or copy them.

The captured module generates its Python code on first use (torch's ``_LazyGraphModule``:
calling it, ``.code`` or ``print`` compile it as a plain ``GraphModule`` would): planning
reads the graph only, and generating and compiling the code of a 10,000-node graph costs
~0.3 s. ``torch.export`` is asked not to record each node's Python stack trace (nothing
here reads it; about a quarter of export's time on a Hugging Face Llama): its error
messages still name the failing line of the model.
"""

from __future__ import annotations

import builtins
import contextlib
import difflib
import functools
import inspect
import logging
import operator
import traceback
import warnings
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.fx.config as fx_config
from torch import fx, nn
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.export import Dim, export
from torch.fx._pytree import tree_flatten_spec
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols
from torch.utils import _pytree as pytree

from partitioner.passes.errors import CaptureError
from partitioner.passes.markers import take_markers
from partitioner.passes.shape_prop import DATA_DEPENDENT, _real_like
from partitioner.passes.split import copy_persistence

log = logging.getLogger(__name__)

try:  # private, but what torch.compile uses for the same reason; a plain GraphModule otherwise
    from torch.fx._lazy_graph_module import _LazyGraphModule as _GraphModule
except ImportError:  # pragma: no cover - other torch versions
    _GraphModule = fx.GraphModule  # type: ignore[misc,assignment]

__all__ = ["Captured", "capture", "check_example_names", "ROUTES", "with_seq_dims"]

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


class _UserMapping:
    """An output mapping whose class pytree does not know (a user's ``OrderedDict`` or
    ``dict`` subclass): flattened as its values, rebuilt as its own class.

    torch.fx turns every mapping it returns into its ``immutable_dict``, and pytree treats
    an unregistered subclass as one opaque leaf; the structure is read from what
    ``forward`` returned instead, and this node keeps the class."""

    def __init__(self, cls: type, items: dict[Any, Any]) -> None:
        self.cls, self.items = cls, items


def _rebuild_mapping(values: Any, context: Any) -> Any:
    cls, keys = context
    try:
        return cls(zip(keys, values))
    except Exception:  # noqa: BLE001 - a subclass whose __init__ takes other arguments
        out = cls.__new__(cls)
        dict.update(out, zip(keys, values))
        return out


pytree.register_pytree_node(
    _UserMapping,
    lambda m: (list(m.items.values()), (m.cls, list(m.items))),
    _rebuild_mapping,
    serialized_type_name="partitioner.passes.trace._UserMapping",
)


def _unregistered_mapping(x: Any) -> bool:
    return isinstance(x, Mapping) and type(x) not in pytree.SUPPORTED_NODES and not isinstance(x, fx.Proxy)


def _output_tree(out: Any) -> tuple[list[Any], pytree.TreeSpec]:
    """The leaves and structure of what ``forward`` returned while fx traced it: the
    model's own containers (``ModelOutput`` subclasses, dicts, ``OrderedDict``s,
    namedtuples), not the ones fx rebuilds them as."""

    def keep(x: Any) -> Any:
        if _unregistered_mapping(x):
            return _UserMapping(type(x), {k: pytree.tree_map(keep, v, is_leaf=_unregistered_mapping)
                                          for k, v in x.items()})
        return x

    return pytree.tree_flatten(pytree.tree_map(keep, out, is_leaf=_unregistered_mapping))


_SCALARS = frozenset({int, float, bool, str, type(None)})


class _Tracer(fx.Tracer):
    def __init__(self, leaf_modules: frozenset[str], leaf_types: tuple[type, ...]) -> None:
        super().__init__()
        self._leaf_paths = leaf_modules
        self._leaf_types = leaf_types
        #: the structure of what forward returned (None: fx's own output is kept)
        self.out_spec: pytree.TreeSpec | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self._leaf_paths or (self._leaf_types and isinstance(m, self._leaf_types)):
            return True
        return super().is_leaf_module(m, qualname)

    def create_arg(self, a: Any) -> Any:
        """fx's own, with the two commonest arguments first: a proxy is its node, a plain
        scalar itself (what fx returns for them after checking each against parameters,
        buffers and registered opaque types: a fifth of tracing a 10,000-node graph)."""
        t = type(a)
        if t is fx.Proxy:
            return a.node
        if t in _SCALARS:
            return a
        return super().create_arg(a)

    def create_args_for_root(self, root_fn: Any, is_module: bool, concrete_args: Any = None) -> Any:
        """The root function, returning its outputs as a flat tuple; their structure (with
        the model's own container classes) goes to ``out_spec``."""
        fn, args = super().create_args_for_root(root_fn, is_module, concrete_args)
        if isinstance(self.graph._codegen, fx.graph._PyTreeCodeGen):  # fx flattens (and rebuilds) itself
            return fn, args

        def flat_outputs(*a: Any) -> Any:  # not functools.wraps: fn's return annotation is not this one's
            leaves, self.out_spec = _output_tree(fn(*a))
            return tuple(leaves)

        return flat_outputs, args


def _flat_output(graph: fx.Graph) -> pytree.TreeSpec:
    """Rewrite the output node to return a flat tuple; return the structure it had."""
    out = next(n for n in reversed(graph.nodes) if n.op == "output")
    leaves, spec = pytree.tree_flatten(out.args[0])
    out.args = (tuple(leaves),)
    return spec


_MISSING = object()
#: Defaults fx can bake in as they are (other defaults, such as tuples, stay graph inputs).
_CONSTANTS = (type(None), bool, int, float, complex, str, torch.dtype, torch.device)
_VAR_KINDS = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


def _same(a: Any, b: Any) -> bool:
    """Whether ``a`` is the constant ``b`` a graph was captured with (tensors never are)."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor) or type(a) is not type(b):
        return False
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - containers of tensors, odd __eq__: not the same constant
        return False


def _show(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return f"a {str(v.dtype).removeprefix('torch.')} tensor of shape {tuple(v.shape)}"
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _call_arguments(sig: inspect.Signature, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The arguments a call passes, by parameter name (``**kwargs`` entries by their own name)."""
    bound = sig.bind(*args, **kwargs)
    out: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        if sig.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        else:
            out[name] = value
    return out


def _defaults(sig: inspect.Signature) -> dict[str, Any]:
    return {k: p.default for k, p in sig.parameters.items() if p.default is not p.empty}


def _include_hint(name: str) -> str:
    return (f"include {name} in the example inputs (example_inputs={{..., {name!r}: ...}} or "
            f"example_kwargs={{{name!r}: ...}}) and partition again")


def _not_captured(model: nn.Module, name: str, value: Any) -> CaptureError:
    return CaptureError(
        f"{type(model).__name__}: this call passes {name}={_show(value)}, but {name!r} was not in the "
        f"example inputs, so the captured graph has no input for it and would ignore it; {_include_hint(name)}"
    )


def _not_passed(model: nn.Module, name: str, example: Any) -> CaptureError:
    return CaptureError(
        f"{type(model).__name__}: this call does not pass {name!r}, which the example inputs had "
        f"({_show(example)}) and the captured graph takes as an input; pass {name}=..., or partition "
        f"again without {name!r} in the example inputs")


def _normalize_slices(graph: fx.Graph) -> None:
    """Give every slice whose bounds are graph values a node of its own.

    ``x[:, :n]`` with a traced ``n`` leaves ``slice(None, n, None)`` inside a node's
    arguments; fx walks slices but pytree (and so the cost passes) does not. A
    ``builtins.slice`` node makes the slice an ordinary value: every node nested in an
    argument is then in a tuple, list or dict, where every walker finds it.
    """

    def has_node(a: Any) -> bool:
        found: list[fx.Node] = []

        def see(n: fx.Node) -> fx.Node:
            found.append(n)
            return n

        fx.map_arg(a, see)
        return bool(found)

    for node in list(graph.nodes):
        made: dict[int, fx.Node] = {}

        def lift(a: Any) -> Any:
            if isinstance(a, slice):
                if not has_node((a.start, a.stop, a.step)):
                    return a
                key = id(a)
                if key not in made:
                    with graph.inserting_before(node):
                        made[key] = graph.call_function(builtins.slice, (lift(a.start), lift(a.stop), lift(a.step)))
                    made[key].meta = {k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")}
                return made[key]
            if isinstance(a, tuple) and not hasattr(a, "_fields"):
                return tuple(lift(x) for x in a)
            if isinstance(a, list):
                return [lift(x) for x in a]
            if isinstance(a, dict):
                return {k: lift(v) for k, v in a.items()}
            return a

        if node.op in ("placeholder", "output", "get_attr"):
            continue
        args, kwargs = lift(node.args), lift(node.kwargs)
        if made:
            node.args, node.kwargs = args, kwargs


def _drop_specialization_asserts(graph: fx.Graph) -> None:
    """Remove the asserts fx adds for concrete arguments: ``flatten`` checks them with a
    message that says how to include the argument instead."""
    phs = {n for n in graph.nodes if n.op == "placeholder"}
    for node in reversed(list(graph.nodes)):
        if node.op != "call_function" or node.users:
            continue
        if node.target is torch.fx._symbolic_trace._assert_is_none and node.args and node.args[0] in phs:
            graph.erase_node(node)
        elif node.target is torch._assert and len(node.args) == 2 and "has been specialized" in str(node.args[1]):
            cond = node.args[0]
            graph.erase_node(node)
            if (isinstance(cond, fx.Node) and not cond.users and cond.target is operator.eq
                    and cond.args and cond.args[0] in phs):
                graph.erase_node(cond)


class _RecordingOp:
    """``torch.ops.pippy._pipe_split`` while fx traces: a call leaves a node; anything
    else (``.default``, which the module defining the op reads when first imported)
    is the real op's."""

    def __init__(self, real: Any, record: Callable[[], None]) -> None:
        self._real, self._record = real, record

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        self._record()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real._pipe_split, name)


class _RecordingNamespace:
    """``torch.ops.pippy`` while fx traces: ``_pipe_split`` records, the rest is the real namespace."""

    def __init__(self, real: Any, record: Callable[[], None]) -> None:
        self._real, self._record = real, record

    def __getattr__(self, name: str) -> Any:
        if name == "_pipe_split":
            return _RecordingOp(self._real, self._record)
        return getattr(self._real, name)


@contextlib.contextmanager
def _recording_pipe_split(tracer: fx.Tracer) -> Any:
    """While fx traces, ``torch.distributed.pipelining.pipe_split()`` leaves a node.

    ``pipe_split`` calls ``torch.ops.pippy._pipe_split()``, which takes no tensor, so fx
    would run it eagerly and record nothing; torch.export records it by itself. The
    namespace is replaced for the duration whether or not the op exists yet: a
    ``forward`` that imports ``torch.distributed.pipelining`` itself registers the op
    during this very trace, and its first call must be recorded as the second is.
    """
    real = torch.ops.pippy

    def record() -> None:
        tracer.create_node("call_function", torch.ops.pippy._pipe_split.default, (), {})

    setattr(torch.ops, "pippy", _RecordingNamespace(real, record))
    try:
        yield
    finally:
        setattr(torch.ops, "pippy", real)


def _trace_fx(
    model: nn.Module,
    leaf_modules: Sequence[str | type],
    concrete_args: dict[str, Any] | None,
    example: dict[str, Any] | None = None,
) -> Captured:
    """``example``: the example inputs by parameter name, when there are any. Parameters
    with a default that the example leaves out (or passes at its default) are traced at
    that default: fx would otherwise bake a Proxy into ``x if bias is None else ...``."""
    paths = frozenset(m for m in leaf_modules if isinstance(m, str))
    types = tuple(m for m in leaf_modules if isinstance(m, type))
    tracer = _Tracer(paths, types)
    sig = inspect.signature(model.forward)
    params = list(sig.parameters)
    signature_defaults = _defaults(sig)
    fixed = dict(concrete_args or {})
    concrete: dict[str, Any] = dict(fixed)
    from_example: set[str] = set()
    if example is not None:
        for k, default in signature_defaults.items():
            if k not in fixed and sig.parameters[k].kind not in _VAR_KINDS and isinstance(default, _CONSTANTS) and (
                    k not in example or _same(example[k], default)):
                concrete[k] = default
        for k, v in example.items():  # flags: Python branches on them, as torch.export would fix them
            if k not in concrete and k in sig.parameters and isinstance(v, (bool, str, type(None))):
                concrete[k] = v
                from_example.add(k)
    with _recording_pipe_split(tracer):
        graph = tracer.trace(model, concrete_args=concrete or None)
    _drop_specialization_asserts(graph)
    phs = [n for n in graph.nodes if n.op == "placeholder"]
    if len(phs) == len(params):  # fx names a concrete argument's placeholder "bias_1": say "bias"
        for node, param in zip(phs, params):
            if param in concrete and node.name != param:
                node._rename(param)
                if node.name == param:
                    node.target = param
    _normalize_slices(graph)
    out_spec = _flat_output(graph)
    if tracer.out_spec is not None and tracer.out_spec.num_leaves == out_spec.num_leaves:
        out_spec = tracer.out_spec  # else a leaf fx itself expanded (an unregistered container): fx's structure
    gm = _GraphModule(tracer.root, graph, class_name=type(model).__name__)
    copy_persistence(model, gm)
    take_markers(gm)
    names = tuple(n.name for n in gm.graph.nodes if n.op == "placeholder")
    # fx makes one placeholder per forward parameter, in order (a concrete arg's
    # placeholder may be renamed, e.g. "flag_1"), so map them by position.
    if len(names) == len(params):
        keys = params
    else:
        keys = [str(n.target).lstrip("*") for n in gm.graph.nodes if n.op == "placeholder"]
    model_name = type(model).__name__
    # inputs the example gave as tensors: leaving one out would feed its default (None) to the graph
    tensor_inputs = [k for k, v in (example or {}).items() if k not in concrete and k in sig.parameters
                     and any(isinstance(t, torch.Tensor) for t in pytree.tree_leaves(v))]

    def flatten(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError as e:
            raise CaptureError(f"inputs do not match {model_name}.forward{sig}: {e}") from None
        given = bound.arguments
        for k, baked in concrete.items():
            value = given.get(k, signature_defaults.get(k, _MISSING))
            if _same(value, baked):
                continue
            if k in from_example:
                raise CaptureError(
                    f"{model_name} was captured with {k}={_show(baked)} (as in the example inputs), so this call's "
                    f"{k}={_show(value) if value is not _MISSING else '<not passed>'} cannot be honoured; "
                    f"pass {k}={_show(baked)}, or partition again with {k}={_show(value)} in the example inputs")
            if k in fixed:
                raise CaptureError(
                    f"{model_name} was captured with {k}={_show(baked)} (concrete_args), so this call's "
                    f"{k}={_show(value) if value is not _MISSING else '<not passed>'} cannot be honoured; "
                    f"pass {k}={_show(baked)}, or partition again with concrete_args={{{k!r}: ...}} set to "
                    "the value you call with")
            raise _not_captured(model, k, value)
        for k in tensor_inputs:
            if k not in given:
                raise _not_passed(model, k, example[k])  # type: ignore[index]
        values = {**signature_defaults, **fixed, **given}
        return [values.get(k) for k in keys]

    return Captured(gm, "fx", names, flatten, out_spec)


@contextlib.contextmanager
def _no_stack_traces() -> Any:
    """torch.fx's switch for recording each traced node's Python stack trace, off for the
    duration (a plain module attribute in torch.fx.config; restored afterwards)."""
    before = fx_config.do_not_emit_stack_traces
    fx_config.do_not_emit_stack_traces = True
    try:
        yield
    finally:
        fx_config.do_not_emit_stack_traces = before


@dataclass
class _Leaf:
    """A leaf module while torch.export traces: its real state, and what one call passed."""

    path: str
    module: nn.Module
    forward: Callable[..., Any]  # the module's own forward
    state: dict[str, torch.Tensor]  # its real parameters and buffers (export swaps in fakes)
    in_spec: pytree.TreeSpec | None = None  # (args, kwargs) of the call
    in_leaves: list[Any] | None = None  # their leaves; tensors replaced by None
    out_spec: pytree.TreeSpec | None = None  # what it returned, from the real run


#: The leaves of the capture under way, by key (the only argument the recorded op keeps).
_LEAVES: dict[str, _Leaf] = {}


@functools.cache
def _leaf_op() -> Any:
    """``partitioner::opaque_leaf``: a leaf module's call, one node while torch.export traces
    (registered on first use: only captures with leaf modules on that route need it)."""

    @torch.library.custom_op("partitioner::opaque_leaf", mutates_args=())
    def opaque_leaf(key: str, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        return [t.clone() for t in _run_leaf(_LEAVES[key], tensors)]  # never run outside a capture

    @opaque_leaf.register_fake
    def _(key: str, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Output shapes from one real run on random inputs of the example's sizes (the leaf
        branches on data, so no fake run can give them): static."""
        leaf = _LEAVES[key]
        device = tensors[0].device if tensors else torch.device("cpu")
        with unset_fake_temporarily():
            if any(t.device.type == "meta" for t in leaf.state.values()):
                raise CaptureError(f"leaf module {leaf.path!r} has its weights on the meta device, so its output "
                                   "shapes cannot come from a real run; load its weights first")
            with torch.no_grad():
                outs = _run_leaf(leaf, [_real_like(t) for t in tensors])
        return [torch.empty(tuple(o.shape), dtype=o.dtype, device=device) for o in outs]

    return torch.ops.partitioner.opaque_leaf


def _run_leaf(leaf: _Leaf, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    it = iter(tensors)
    flat = [next(it) if v is None else v for v in leaf.in_leaves or []]
    args, kwargs = pytree.tree_unflatten(flat, leaf.in_spec)  # type: ignore[arg-type]
    shadow = leaf.module.__dict__.pop("forward", None)  # the module's own forward for this run
    try:
        out = torch.func.functional_call(leaf.module, leaf.state, tuple(args), dict(kwargs), strict=False)
    finally:
        if shadow is not None:
            leaf.module.forward = shadow  # type: ignore[method-assign]
    leaves, leaf.out_spec = pytree.tree_flatten(out)
    if not all(isinstance(t, torch.Tensor) for t in leaves):
        raise CaptureError(f"leaf module {leaf.path!r} returns {type(out).__name__} with non-tensor values; "
                           "a leaf module on the torch.export route must return tensors (in tuples, lists or dicts)")
    return leaves


def _leaf_modules(model: nn.Module, leaf_modules: Sequence[str | type]) -> dict[str, nn.Module]:
    """The modules ``leaf_modules`` names (by path, by type, or by ``str(type)`` as a plan
    stores it), outermost only."""
    names = {m for m in leaf_modules if isinstance(m, str)}
    types = tuple(m for m in leaf_modules if isinstance(m, type))
    found: dict[str, nn.Module] = {}
    for path, mod in model.named_modules():
        if not path or any(path.startswith(p + ".") for p in found):
            continue
        if path in names or str(type(mod)) in names or (types and isinstance(mod, types)):
            found[path] = mod
    return found


@contextlib.contextmanager
def _opaque_leaves(model: nn.Module, leaf_modules: Sequence[str | type]) -> Any:
    """While torch.export traces: each leaf module's call is one ``partitioner::opaque_leaf``
    node (its forward shadowed on the instance, restored afterwards). Yields {key: _Leaf}."""
    leaves: dict[str, _Leaf] = {}  # one record per call (a module may be called twice, differently)
    modules = _leaf_modules(model, leaf_modules)
    for path, mod in modules.items():
        leaf = _Leaf(path, mod, mod.forward, dict(mod.state_dict(keep_vars=True)))

        def forward(*args: Any, _leaf: _Leaf = leaf, **kwargs: Any) -> Any:
            key = f"{id(model)}:{_leaf.path}#{len(leaves)}"
            call = leaves[key] = _LEAVES[key] = replace(_leaf)
            flat, call.in_spec = pytree.tree_flatten((args, kwargs))
            _refuse_data_dependent_arguments(_leaf, args, kwargs)
            call.in_leaves = [None if isinstance(v, torch.Tensor) else v for v in flat]
            outs = _leaf_op()(key, [v for v in flat if isinstance(v, torch.Tensor)])
            return pytree.tree_unflatten(list(outs), call.out_spec)  # type: ignore[arg-type]

        mod.forward = forward  # type: ignore[method-assign]
    try:
        yield leaves
    finally:
        for key in leaves:
            _LEAVES.pop(key, None)
        for mod in modules.values():
            del mod.forward  # the class's forward again


def _refuse_data_dependent_arguments(leaf: _Leaf, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """A leaf cannot take a value computed from tensor data before it (a ``.item()`` in a
    caller): the real run that gives its output shapes would have to guess it."""
    try:
        named = dict(inspect.signature(leaf.forward).bind(*args, **kwargs).arguments)
    except TypeError:
        named = {f"argument {i}": a for i, a in enumerate([*args, *kwargs.values()])}
    for name, value in named.items():
        if any(isinstance(v, (torch.SymInt, torch.SymBool, torch.SymFloat)) and free_unbacked_symbols(v)
               for v in pytree.tree_leaves(value)):
            path = leaf.path
            callers = [path.rsplit(".", k)[0] for k in range(1, path.count(".") + 1)]
            raise CaptureError(
                f"leaf module {path!r} ({type(leaf.module).__name__}) is passed {name}, a value computed from tensor "
                "data before it (a .item() in a caller): torch.export cannot hand such a value to a leaf; make the "
                f"module that computes it a leaf instead (one of {', '.join(repr(c) for c in callers)}), or the "
                "model itself cannot be split there")


def _call_leaves(graph: fx.Graph, leaves: dict[str, _Leaf]) -> None:
    """Each ``opaque_leaf`` node becomes a ``call_module`` of its leaf (run eagerly, as on
    the fx route), its outputs read from the module's own output structure."""
    target = _leaf_op().default
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not target:
            continue
        leaf = leaves[node.args[0]]
        it = iter(node.args[1])
        flat = [next(it) if v is None else v for v in leaf.in_leaves or []]
        args, kwargs = pytree.tree_unflatten(flat, leaf.in_spec)  # type: ignore[arg-type]
        with graph.inserting_before(node):
            call = graph.call_module(leaf.path, tuple(args), dict(kwargs))
        call.meta = {k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")}
        out_spec = leaf.out_spec
        assert out_spec is not None  # the fake kernel ran while export traced the call
        paths = [p for p, _ in pytree.tree_flatten_with_path(
            pytree.tree_unflatten(list(range(out_spec.num_leaves)), out_spec))[0]]
        for user in list(node.users):
            if user.target is not operator.getitem:
                raise CaptureError(f"leaf module {leaf.path!r}: unexpected use of its outputs ({user.format_node()})")
            value = call
            with graph.inserting_before(user):
                for k in paths[user.args[1]]:
                    name = getattr(k, "key", getattr(k, "idx", getattr(k, "name", None)))
                    value = (graph.call_function(getattr, (value, name)) if isinstance(k, pytree.GetAttrKey)
                             else graph.call_function(operator.getitem, (value, name)))
            user.replace_all_uses_with(value)
            graph.erase_node(user)
        graph.erase_node(node)


def _trace_export(
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    dynamic: dict[str, dict[int, str]],
    leaf_modules: Sequence[str | type] = (),
) -> Captured:
    def dims_for(name: str, value: Any) -> Any:
        if isinstance(value, torch.Tensor) and name in dynamic:
            return {d: Dim.AUTO for d in dynamic[name]}
        return None

    sig = inspect.signature(model.forward)
    bound = sig.bind(*args, **kwargs)
    pos_names = list(bound.arguments)[: len(args)]
    dyn_args = tuple(dims_for(n, v) for n, v in list(bound.arguments.items())[: len(args)])
    dyn_kwargs = {k: dims_for(k, v) for k, v in kwargs.items()}
    dynamic_shapes: Any = (*dyn_args, *dyn_kwargs.values()) if not kwargs else {
        **dict(zip(pos_names, dyn_args)),
        **dyn_kwargs,
    }
    with warnings.catch_warnings(), _no_stack_traces(), _opaque_leaves(model, leaf_modules) as leaves:
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
    if leaves:
        _call_leaves(graph, leaves)
        owned = {leaf.path: leaf.module for leaf in leaves.values()}
        for path, mod in owned.items():  # the leaf's own module (export kept none of its tensors)
            unlifted.add_submodule(path, mod)
        listed = ", ".join(repr(path) for path in owned)
        warnings.warn(f"leaf module(s) {listed} run eagerly as one node each on the torch.export route: output "
                      "shapes from one real run on the example's sizes (static), costs from one real run",
                      stacklevel=3)
    gm = _GraphModule(unlifted, graph, class_name=type(model).__name__)
    copy_persistence(model, gm)
    gm.graph.eliminate_dead_code()  # pipe_split is side-effectful: DCE keeps it for take_markers
    take_markers(gm)
    gm.recompile()
    names = tuple(n.name for n in gm.graph.nodes if n.op == "placeholder")
    example = {**dict(zip(pos_names, args)), **kwargs}
    defaults = _defaults(sig)
    model_name = type(model).__name__

    def check(name: str, value: Any, want: Any) -> None:
        """``value`` must have the example's structure, with the example's constants."""
        got_leaves, got_spec = pytree.tree_flatten(value)
        want_leaves, want_spec = pytree.tree_flatten(want)
        if got_spec != want_spec:
            raise CaptureError(
                f"{model_name}: input {name!r} is {_show(value)}, but the graph was captured with "
                f"{_show(want)} (a different structure); call with the example's structure or "
                "partition again with this one in the example inputs")
        for g, w in zip(got_leaves, want_leaves):
            if isinstance(w, torch.Tensor):
                if not isinstance(g, torch.Tensor):
                    raise CaptureError(f"{model_name}: input {name!r} must be a tensor, as in the example "
                                       f"inputs; got {_show(g)}")
            elif not _same(g, w):
                raise CaptureError(
                    f"{model_name}: this call passes {name}={_show(value)}, but the graph was captured "
                    f"with {name}={_show(want)} (torch.export fixes non-tensor inputs); call with "
                    f"{name}={_show(want)}, or partition again with {name}={_show(value)} in the example inputs")

    def flatten(call_args: tuple[Any, ...], call_kwargs: dict[str, Any]) -> list[Any]:
        try:
            given = _call_arguments(sig, call_args, call_kwargs)
        except TypeError as e:
            raise CaptureError(f"inputs do not match {model_name}.forward{sig}: {e}") from None
        for k, v in given.items():
            if k not in example and not (k in defaults and _same(v, defaults[k])):
                raise _not_captured(model, k, v)
        for k, want in example.items():
            if k not in given:
                if k in defaults and _same(want, defaults[k]):
                    given[k] = want
                    continue
                raise _not_passed(model, k, want)
            check(k, given[k], want)
        pos = tuple(given[n] for n in pos_names)
        rest = {k: given[k] for k in kwargs}
        try:
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


def _innermost_submodule(model: nn.Module, e: BaseException) -> tuple[str, nn.Module, str] | None:
    """(path, module, "Gate.forward, file.py:12") of the innermost submodule frame of ``e``'s traceback."""
    paths = {id(m): name for name, m in model.named_modules() if name}
    found = None
    tb = e.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        owner = frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in paths:
            code = frame.f_code
            found = (paths[id(owner)], owner,
                     f"{type(owner).__name__}.{code.co_name}, {code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno}")
        tb = tb.tb_next
    return found


def _failing_submodule(model: nn.Module, e: BaseException) -> str:
    """" in submodule 'gate' (Gate.forward, file.py:12)" for the innermost module frame."""
    found = _innermost_submodule(model, e)
    return f" in submodule {found[0]!r} ({found[2]})" if found else ""


def _export_advice(model: nn.Module, e: BaseException) -> str:
    """What to do when torch.export fails: for code that branches on tensor data, which
    module to make a leaf (or, in the model's own forward, that no leaf can help)."""
    cause: BaseException | None = e
    while cause is not None and not isinstance(cause, DATA_DEPENDENT):
        cause = cause.__cause__ or cause.__context__
    if cause is None:
        return ("Mark the failing submodule as a leaf module (leaf_modules=[...]), pass concrete_args for Python "
                "control flow on flags, or make data-dependent branches tensor ops (torch.where)")
    found = _innermost_submodule(model, e)
    if found is None:
        return (f"The code that branches on tensor data is in {type(model).__name__}.forward itself, which no leaf "
                "module can cover: make the branch a tensor op (torch.where), or move it into a submodule and pass "
                "that as leaf_modules=[...]; concrete_args only fixes flags that are not tensors")
    path, mod, where = found
    return (f"The code that branches on tensor data is in submodule {path!r} ({where}): pass "
            f"leaf_modules=[{type(mod).__name__}] (or [{path!r}]) so that it runs eagerly as one node (output "
            "shapes from one real run), or make the branch a tensor op (torch.where); concrete_args only fixes "
            "flags that are not tensors")


def _causes(e: BaseException) -> list[BaseException]:
    """``e`` and the exceptions it was raised from (or during), innermost last."""
    out: list[BaseException] = []
    cause: BaseException | None = e
    while cause is not None and cause not in out:
        out.append(cause)
        cause = cause.__cause__ or cause.__context__
    return out


def _first_line(e: BaseException) -> str:
    """The message's first line: torch.export ends its errors with boilerplate."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = lines[0] if lines else type(e).__name__
    return f"{type(e).__name__}: {text[:240]}"


def _last_line(e: BaseException) -> str:
    text = "".join(traceback.format_exception_only(type(e), e)).strip().splitlines()
    return text[-1] if text else type(e).__name__


def with_seq_dims(specs: Sequence[Any], seq_dims: Any, *, strict: bool = True) -> tuple[Any, ...]:
    """``specs`` (``InputSpec``s) with ``seq_dims`` (input name → dim) marked "S".

    ``strict``: every name must be a tensor input with that dim (the example inputs, by
    ``forward``'s parameter names); otherwise names that match no spec are skipped (the
    flat graph inputs, which may be named differently)."""
    if not seq_dims:
        return tuple(specs)
    if not isinstance(seq_dims, Mapping) or not all(isinstance(k, str) for k in seq_dims):
        raise CaptureError(f"seq_dims must map input names to a dimension, e.g. {{'input_ids': 1}}; got {seq_dims!r}")
    by_name = {s.name: s for s in specs}
    tensors = [s.name for s in specs if s.kind == "tensor"]
    out = {s.name: s for s in specs}
    for name, dim in seq_dims.items():
        spec = by_name.get(name)
        if spec is None or spec.kind != "tensor":
            if strict:
                raise CaptureError(f"seq_dims names {name!r}, which is not a tensor in the example inputs; "
                                   f"name one of {', '.join(tensors) or '(none)'}")
            continue
        rank = len(spec.shape)
        if not isinstance(dim, int) or isinstance(dim, bool) or not -rank <= dim < rank or dim % rank == 0:
            raise CaptureError(f"seq_dims[{name!r}] = {dim!r} is not a sequence dimension of a tensor of shape "
                               f"{tuple(spec.shape)}: use an int in 1..{rank - 1} (dim 0 is the batch)")
        marks = {**dict(spec.dims), dim % rank: "S"}
        out[name] = spec._replace(dims=tuple(sorted(marks.items())))
    return tuple(out[s.name] for s in specs)


def check_example_names(model: nn.Module, kwargs: dict[str, Any]) -> None:
    """A misspelled example key: name ``forward``'s parameters (and the likely one).

    ``forward(**kwargs)`` swallows any key, so a typo there would surface later as the
    model's own complaint about a missing input; a key close to a parameter's name is
    taken for a typo."""
    sig = inspect.signature(model.forward)
    named = [k for k, p in sig.parameters.items() if p.kind not in _VAR_KINDS]
    for key in kwargs:
        if key in named:
            continue
        # no likely typo: forward(**kwargs) may take it, or Signature.bind says what is wrong
        close = difflib.get_close_matches(key, named, n=3, cutoff=0.75)
        if close:
            raise CaptureError(f"example input {key!r} is not a parameter of {type(model).__name__}.forward "
                               f"(its parameters: {', '.join(named)}); did you mean "
                               f"{' or '.join(repr(c) for c in close)}?")


def _use_cache_hint(model: nn.Module, kwargs: dict[str, Any] | None) -> str:
    """Hugging Face caches do not export: say so when the capture ran with one on."""
    on = (kwargs or {}).get("use_cache")
    if on is None:
        on = getattr(getattr(model, "config", None), "use_cache", False)
    if on is True:
        return (" with use_cache=True (Hugging Face models capture only with use_cache=False: set "
                "config.use_cache = False or pass use_cache=False in the example inputs)")
    return ""


def _eager_failure(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> BaseException | None:
    """After a failed capture: what running the model itself on the example raises, if it
    does (a bad config is not a capture problem). Meta-device models are not run."""
    if any(t.device.type == "meta" for t in [*model.parameters(), *model.buffers()]):
        return None
    buffers = [(b, b.detach().clone()) for b in model.buffers()]  # batch norm statistics stay as they were
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    except Exception as e:
        return e
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
    return None


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
    if kwargs:
        check_example_names(model, kwargs)
    example: dict[str, Any] | None = None
    if args is not None or kwargs:
        try:
            example = _call_arguments(inspect.signature(model.forward), tuple(args or ()), dict(kwargs or {}))
        except TypeError as e:
            raise CaptureError(f"example inputs do not match {name}.forward"
                               f"{inspect.signature(model.forward)}: {e}") from None
    fx_error: BaseException | None = None
    if route in ("auto", "fx"):
        try:
            cap = _trace_fx(model, leaf_modules, concrete_args, example)
            log.debug("captured %s with torch.fx: %d nodes", name, len(cap.gm.graph.nodes))
            return cap
        except CaptureError:
            raise
        except Exception as e:  # fx raises TraceError, TypeError, AttributeError, ...
            fx_error = e
            log.debug("torch.fx could not trace %s: %s", name, _last_line(e))
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
        cap = _trace_export(model, tuple(args or ()), dict(kwargs or {}), dynamic or {}, leaf_modules)
    except CaptureError:
        raise
    except Exception as e:
        ours = next((c for c in _causes(e) if isinstance(c, CaptureError)), None)
        if ours is not None:  # raised by a leaf while export traced: it already says what to do
            raise CaptureError(f"cannot capture {name}: {ours}") from e
        eager = _eager_failure(model, tuple(args or ()), dict(kwargs or {}))
        if eager is not None:
            raise CaptureError(
                f"{name} fails on the example inputs when run eagerly, before any capture: "
                f"{_first_line(eager)}; check the model's config and the example inputs"
            ) from eager
        why_fx = f"torch.fx{_failing_submodule(model, fx_error)}: {_last_line(fx_error)}; " if fx_error else ""
        raise CaptureError(
            f"cannot capture {name}{_use_cache_hint(model, kwargs)}: {why_fx}torch.export: {_first_line(e)}. "
            f"{_export_advice(model, e)}"
        ) from e
    if fx_error is not None:
        cap = Captured(cap.gm, cap.route, cap.input_names, cap.flatten, cap.out_spec, _last_line(fx_error))
    log.debug("captured %s with torch.export: %d nodes", name, len(cap.gm.graph.nodes))
    return cap
