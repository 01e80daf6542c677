"""Shape propagation: FakeTensors through the graph, sizes symbolic in B and S.

No real compute and no real weight is touched: inputs are created inside a
``FakeTensorMode`` from their ``InputSpec`` (the listed dims backed by ShapeEnv symbols),
parameters and buffers are converted to fake tensors once (static shapes, requires_grad
kept), and ``call_module`` nodes run their module through ``torch.func.functional_call``
with those fakes. A 7B-parameter model built on the meta device propagates in seconds.

Each node gets ``meta["val"]`` (as torch.export writes it), ``meta["pp.desc"]`` (the same
value with sizes as sympy expressions in ``cost_models.BATCH``/``SEQ``) and
``meta["pp.module"]``. If symbolic propagation fails or a guard pins B or S to a number,
the whole graph is propagated again with static shapes and ``gm.meta["pp.symbolic"]`` is
False: costs are then valid for the example sizes only.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
import weakref
from dataclasses import dataclass
from typing import Any

import sympy
import torch
from torch import fx, nn
from torch._dispatch.python import enable_python_dispatcher
from torch._dynamo.source import ConstantSource
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensorMode,
    unset_fake_temporarily,
)
from torch.fx.experimental.symbolic_shapes import DimDynamic, GuardOnDataDependentSymNode, ShapeEnv
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from partitioner.cost_models.cost import BATCH, SEQ
from partitioner.cost_models.errors import PartitionError
from partitioner.passes.base import InputSpec, Pass, TensorDesc
from partitioner.passes.meta import (
    DESC,
    DEVICE,
    EXAMPLE,
    FAKE_MODE,
    FAKE_PARAMS,
    FAKES_BY_MODULE,
    MODULE,
    RETYPE,
    SYMBOLIC,
    SYMBOLS,
    VAL,
)

__all__ = ["OnDevice", "ShapeProp", "ShapePropError", "default_specs", "fake_params", "module_of", "node_key",
           "quiet_fake_tensors", "to_desc"]

log = logging.getLogger(__name__)

#: torch's loggers that report, at ERROR and with a traceback, a fake-tensor kernel failure
#: the caller catches (``FakeTensorMode`` logs "failed while attempting to run meta for ..."
#: and re-raises): the passes here catch and handle every such failure themselves.
_FAKE_TENSOR_LOGGERS = ("torch._subclasses.fake_tensor",)


class _ToDebug(logging.Filter):
    """Drops torch's WARNING-and-above fake-tensor records; repeats each on this module's
    logger at DEBUG, one line (the message and the exception's first line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        if log.isEnabledFor(logging.DEBUG):
            exc = record.exc_info[1] if record.exc_info else None
            why = f" ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]})" if exc else ""
            log.debug("torch %s: %s%s (handled)", record.levelname, record.getMessage(), why)
        return False


@contextlib.contextmanager
def quiet_fake_tensors() -> Any:
    """While shapes are propagated and nodes priced on fake tensors, torch's own ERROR
    reports of a failing fake kernel go to DEBUG: the failure itself is caught and handled
    (a retry, a fallback, or an error of ours naming the node)."""
    loggers = [logging.getLogger(name) for name in _FAKE_TENSOR_LOGGERS]
    demote = _ToDebug()
    for logger in loggers:
        logger.addFilter(demote)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(demote)

_NAMED = {"B": BATCH, "S": SEQ}
_DTYPES = {str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)}


class ShapePropError(PartitionError):
    """A node could not be propagated, even with static shapes."""


class _NodeFailed(Exception):
    def __init__(self, node: fx.Node, cause: BaseException, pinned: frozenset[str] = frozenset()) -> None:
        super().__init__(f"{node.format_node()}: {type(cause).__name__}: {cause}")
        self.node, self.cause, self.pinned = node, cause, pinned  # pinned: size names a guard made constant


@dataclass(frozen=True)
class ShapeProp(Pass):
    """Propagate FakeTensors; write ``val``, ``pp.desc`` and ``pp.module`` on every node."""

    name = "shape-prop"
    provides = (VAL, DESC, MODULE)

    inputs: tuple[InputSpec, ...] = ()  # one per placeholder, in order
    #: Device type the fakes live on. Pricing must not depend on where the model object lives
    #: (meta, CPU, GPU): parameters, buffers and inputs are all re-made as fakes on this device,
    #: so the kernels the dispatcher picks (and the tensors they save) are the same either way.
    device: str = "cpu"
    #: Compute dtype ("float32", "bfloat16", "float16") for floating parameters, buffers and
    #: inputs; None keeps each tensor's own dtype. Mixed precision prices activations this way.
    dtype: str | None = None

    def run(self, gm: fx.GraphModule) -> fx.GraphModule:
        n_ph = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
        if n_ph != len(self.inputs):
            raise ShapePropError(
                f"ShapeProp got {len(self.inputs)} InputSpecs for {n_ph} placeholders; "
                "pass one InputSpec per flat graph input"
            )
        names = frozenset(self._example())
        first: _NodeFailed | None = None
        while True:
            try:
                with quiet_fake_tensors():
                    self._propagate(gm, symbolic=names)
                break
            except _NodeFailed as failed:
                if not names:
                    raise ShapePropError(
                        f"shape propagation failed at node {failed.node.format_node()} "
                        f"({type(failed.cause).__name__}: {failed.cause}); even static shapes fail, "
                        "so the node cannot run on these inputs"
                    ) from failed.cause
                first = first or failed
                # Only the sizes a guard pinned become static (a capture that fixed S keeps B
                # symbolic, so micro-batches of another size still run); any other failure: all.
                pinned = failed.pinned & names
                names = names - pinned if pinned and pinned != names else frozenset()
        if first is not None:
            static = {k: v for k, v in self._example().items() if k not in names}
            kept = f" ({', '.join(sorted(names))} stays symbolic)" if names else ""
            warnings.warn(
                f"symbolic shape propagation failed at {first}; costs fall back to the static "
                f"example sizes {static}{kept}",
                stacklevel=2,
            )
        return gm

    def _example(self) -> dict[str, int]:
        ex: dict[str, int] = {}
        for spec in self.inputs:
            for dim, sym in spec.dims:
                ex.setdefault(sym, spec.shape[dim])
        return ex

    def _propagate(self, gm: fx.GraphModule, symbolic: frozenset[str]) -> None:
        """``symbolic``: the size names (B, S) made ShapeEnv symbols; the others stay the example's."""
        env = ShapeEnv(duck_shape=False)  # duck sizing would merge B and S when equal
        mode = FakeTensorMode(shape_env=env, allow_non_fake_inputs=False)
        symbols: dict[str, Any] = {}  # name → SymInt
        for name, value in self._example().items():
            if name in symbolic:
                src = ConstantSource(f"pp_{name}")
                sym = env.create_symbol(value, src, dynamic_dim=DimDynamic.DYNAMIC, do_not_specialize_zero_one=True)
                symbols[name] = env.create_symintnode(sym, hint=value, source=src)
        mapping = {s.node.expr: _NAMED.get(n, sympy.Symbol(n, positive=True, integer=True)) for n, s in symbols.items()}
        device = torch.device(self.device)
        cast = _DTYPES[self.dtype] if self.dtype else None
        with mode:
            args = [self._make_input(spec, symbols, device, cast) for spec in self.inputs]
        interp = _FakeInterpreter(gm, mode, mapping, device, cast)
        retype = (_param_dtype(gm), cast) if cast is not None and cast != _param_dtype(gm) else None
        # The Python dispatcher (as torch.export traces): C++ kernels without a SymInt path
        # (constant_pad_nd, ...) take their Python meta instead of reading sizes as ints,
        # which guards B and S to the example's sizes.
        with mode, enable_python_dispatcher(), OnDevice(device, retype):
            interp.run(*args)
        _SHOWN_BY_GRAPH[gm] = interp.shown
        gm.meta.update(
            {
                FAKE_MODE: mode,
                SYMBOLS: mapping,
                EXAMPLE: self._example(),
                SYMBOLIC: symbolic == frozenset(self._example()),
                FAKE_PARAMS: interp.fakes,
                FAKES_BY_MODULE: interp.by_module,
                DEVICE: device,
                RETYPE: retype,
            }
        )

    @staticmethod
    def _make_input(spec: InputSpec, symbols: dict[str, Any], device: torch.device,
                    cast: torch.dtype | None = None) -> Any:
        if spec.kind != "tensor":
            return spec.value
        dims = dict(spec.dims)
        shape = [symbols.get(dims.get(i, ""), s) for i, s in enumerate(spec.shape)]
        dtype = _DTYPES.get(spec.dtype)
        if dtype is None:
            raise ShapePropError(
                f"input {spec.name!r} has unknown dtype {spec.dtype!r}; use a torch dtype name such as 'float32'"
            )
        if cast is not None and dtype.is_floating_point:
            dtype = cast
        return torch.empty(shape, dtype=dtype, device=device)


class OnDevice(TorchDispatchMode):
    """Every op that names a device (``arange(..., device=...)``, ``.to(device)``) gets the
    fakes' device instead: a graph captured from a model on meta or cuda bakes its device
    into such calls (inside higher-order ops too), and pricing must not depend on it. The
    capture's own metadata asserts (``_assert_tensor_metadata``: the device and dtype seen
    at capture) are skipped for the same reason: pricing re-makes tensors on purpose.

    ``retype=(src, dst)``: the capture also bakes its dtype into casts (Hugging Face norms
    cast back to the input's dtype, float32 when captured in fp32), so pricing another
    precision turns every ``src`` dtype argument into ``dst``. An upcast the model makes on
    purpose (a norm's statistics in fp32) is a no-op in an fp32 capture and so is priced in
    ``dst`` too: capture the model in its training dtype for exact bytes."""

    def __init__(self, device: torch.device, retype: tuple[torch.dtype, torch.dtype] | None = None) -> None:
        super().__init__()
        self.device, self.retype = device, retype

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.ops.aten._assert_tensor_metadata.default:
            return None
        if isinstance(kwargs.get("device"), torch.device) and kwargs["device"] != self.device:
            kwargs = {**kwargs, "device": self.device}
        if self.retype is not None:
            src, dst = self.retype

            def swap(a: Any) -> Any:
                return dst if a is src else a

            args, kwargs = tuple(swap(a) for a in args), {k: swap(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


class _FakeInterpreter(fx.Interpreter):
    """Runs every node on fake values and records them in ``node.meta``."""

    def __init__(self, gm: fx.GraphModule, mode: FakeTensorMode, mapping: dict[Any, sympy.Expr],
                 device: torch.device, cast: torch.dtype | None) -> None:
        super().__init__(gm)
        self.mode, self.mapping = mode, mapping
        self.symbols = tuple(mapping)
        self.device, self.cast = device, cast
        self.fakes = fake_params(gm, mode, device, cast)
        self.by_module = state_by_module(self.fakes)
        self.templates: dict[str, Any] = {}
        self.shown = _Shown()

    def run_node(self, n: fx.Node) -> Any:
        env = self.mode.shape_env
        desc: Any = None
        try:
            key = node_key(n, self.module, self.shown, shapes=True) \
                if n.op in ("call_module", "call_function", "call_method") else None
            hit = self.templates.get(key) if key is not None else None
            if hit is not None:
                # Structurally identical to a node already run (same op, same input shapes): the
                # same output. Its fake value is shared, not re-made: values are only read after
                # shape-prop (annotate re-creates fresh leaves from them), and in-place ops, the
                # only writers, are never shared (``node_key``). Nothing runs, so no
                # guard can pin a size; its description is the template's while the ShapeEnv
                # has made no replacement since.
                out, desc, replacements = hit
                if replacements != _replacements(env):
                    desc = None
            else:
                out = super().run_node(n)
                pinned = frozenset(str(self.mapping[s]) for s in self.symbols
                                   if env is not None and env.replace(s).is_number)
                if pinned:
                    raise _NodeFailed(n, RuntimeError(
                        f"a guard specialized a symbolic size ({', '.join(sorted(pinned))}) to a constant"), pinned)
        except _NodeFailed:
            raise
        except Exception as e:  # any failure is reported with the node that raised it
            raise _NodeFailed(n, e) from e
        if desc is None:
            desc = to_desc(out, self.mapping, env)
            if key is not None and hit is None and _shareable(out):
                self.templates[key] = (out, desc, _replacements(env))
        n.meta[VAL] = out
        n.meta[DESC] = desc
        n.meta[MODULE] = module_of(n)
        return out

    def get_attr(self, target: Any, args: Any, kwargs: Any) -> Any:
        if target in self.fakes:
            return self.fakes[target]
        value = self.fetch_attr(target)  # a constant tensor the capture inlined
        if isinstance(value, torch.Tensor):
            self.fakes[target] = value = _fake_like(value, self.mode, self.device, self.cast, {})
        return value

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        mod = self.fetch_attr(target)
        state = self.by_module.get(str(target), {})
        try:
            return torch.func.functional_call(mod, state, tuple(args), dict(kwargs), strict=False)
        except DATA_DEPENDENT as e:
            return self._run_leaf_for_real(str(target), mod, args, kwargs, e)

    def _run_leaf_for_real(self, target: str, mod: nn.Module, args: Any, kwargs: Any, cause: Exception) -> Any:
        """A leaf module with data-dependent control flow cannot run on fake tensors (that is
        why the user made it a leaf): run it once on real random inputs of the same shapes
        and take its output shapes from there. Sizes it produces are then static."""
        if any(t.device.type == "meta" for t in [*mod.parameters(), *mod.buffers()]):
            raise RuntimeError(
                f"leaf module {target!r} branches on tensor data and its weights are on the meta device, "
                "so its output shape cannot be computed; load its weights or make the branch a tensor op"
            ) from cause
        real_args, real_kwargs = pytree.tree_map_only(torch.Tensor, _real_like, (args, kwargs))
        with unset_fake_temporarily(), torch.no_grad():
            out = mod(*real_args, **real_kwargs)
        warnings.warn(
            f"leaf module {target!r} branches on tensor data: its output shape comes from one real run on "
            "random inputs and is not symbolic", stacklevel=2,
        )
        return pytree.tree_map_only(torch.Tensor, lambda t: self.mode.from_tensor(t, static_shapes=True), out)


def state_by_module(fakes: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """module path → {name relative to it: fake} for every parameter and buffer below it
    (one pass; looking prefixes up per node is quadratic on deep models)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in fakes.items():
        parts = k.split(".")
        for i in range(1, len(parts)):
            out.setdefault(".".join(parts[:i]), {})[".".join(parts[i:])] = v
    return out


def _replacements(env: ShapeEnv | None) -> int:
    """How many replacements the ShapeEnv has made (a size description is valid while none is added)."""
    return len(env.replacements) if env is not None else 0


def _shareable(out: Any) -> bool:
    """Whether a structurally identical node may share this node's value: plain tensors with
    sizes in the backed symbols only (ints and unbacked, data-dependent sizes always run)."""
    leaves = pytree.tree_leaves(out)
    if not leaves or not all(isinstance(t, torch.Tensor) and not t.is_sparse and t.layout == torch.strided
                             for t in leaves):
        return False
    for t in leaves:
        for s in (*t.shape, *t.stride()):
            if isinstance(s, torch.SymInt) and s.node.expr.free_symbols and any(
                    str(x).startswith("u") for x in s.node.expr.free_symbols):
                return False  # data-dependent (unbacked) sizes differ per call
    return True


class _Shown:
    """Memo of what ``node_key`` (shape-prop's and annotate's cache keys) print per input node and per
    module: a node's shape description is printed once, not once per consumer (sympy printing
    was most of the key's cost on deep graphs), and a leaf module's type, options and state
    shapes once per module."""

    def __init__(self) -> None:
        self.nodes: dict[fx.Node, str] = {}
        self.modules: dict[str, Any] = {}

    def node(self, a: fx.Node) -> str:
        hit = self.nodes.get(a)
        if hit is None:
            hit = self.nodes[a] = _show_desc(a.meta.get(DESC, a.name))
        return hit

    def args(self, node: fx.Node) -> Any:
        """``(node.args, node.kwargs)`` with every input node replaced by its printed shape
        description, or None for containers the fast walk does not know (namedtuples, ...)."""
        try:
            return (self._walk(node.args), self._walk(node.kwargs))
        except _Unknown:
            return None

    def _walk(self, a: Any) -> Any:
        t = type(a)
        if t is fx.Node:
            return ("node", self.node(a))
        if t in _TUPLES:
            return tuple(self._walk(x) for x in a)
        if t in _LISTS:
            return [self._walk(x) for x in a]
        if t in _DICTS:
            return {k: self._walk(v) for k, v in a.items()}
        if isinstance(a, (tuple, list, dict, fx.Node)):
            raise _Unknown  # a subclass pytree may treat otherwise: take the general path
        return a

    def module(self, root: nn.Module, target: str) -> tuple[bool, Any]:
        """Whether the module has submodules, and its type, options, mode and state shapes."""
        hit = self.modules.get(target)
        if hit is None:
            mod = root.get_submodule(target)
            state = [(k, tuple(v.shape), v.dtype, v.requires_grad) for k, v in mod.state_dict(keep_vars=True).items()]
            hit = self.modules[target] = (any(True for _ in mod.children()),
                                          (type(mod).__qualname__, mod.extra_repr(), mod.training, state))
        return hit


#: The ``_Shown`` memo of the last propagation of each graph: annotate's cost keys print the
#: same shape descriptions and modules again (half of their cost on a 10,000-node graph).
_SHOWN_BY_GRAPH: weakref.WeakKeyDictionary[fx.GraphModule, _Shown] = weakref.WeakKeyDictionary()


def shown_for(gm: fx.GraphModule) -> _Shown:
    """The ``_Shown`` memo shape-prop filled for ``gm`` (its descriptions are the graph's
    ``pp.desc``), or a new one."""
    return _SHOWN_BY_GRAPH.get(gm) or _Shown()


class _Unknown(Exception):
    pass


def _show_desc(desc: Any) -> str:
    """``repr(desc)``, the same text, with each size expression printed once per process
    (sympy's printer costs ~50 us a call; a deep graph has a handful of distinct sizes)."""
    t = type(desc)
    if t is TensorDesc:
        dims = ", ".join(_show_expr(e) for e in desc.shape)
        shape = f"({dims},)" if len(desc.shape) == 1 else f"({dims})"
        return f"TensorDesc(shape={shape}, dtype={desc.dtype!r}, requires_grad={desc.requires_grad!r})"
    if t is tuple or t is list:
        items = ", ".join(_show_desc(d) for d in desc)
        return (f"({items},)" if len(desc) == 1 else f"({items})") if t is tuple else f"[{items}]"
    if isinstance(desc, sympy.Basic):
        return _show_expr(desc)
    return repr(desc)


_SHOWN: dict[int, tuple[Any, str]] = {}  # id(expr) -> (expr, its repr): the entry keeps the id alive


def _show_expr(e: Any) -> str:
    # By identity, not equality: sympy's __eq__ is slow, and the sizes of a graph are mostly
    # the same few objects (shape-prop's translations are cached by sympy).
    hit = _SHOWN.get(id(e))
    if hit is not None and hit[0] is e:
        return hit[1]
    if len(_SHOWN) > 1 << 14:
        _SHOWN.clear()
    text = repr(e)
    _SHOWN[id(e)] = (e, text)
    return text


_TUPLES = (tuple,)
_LISTS = (list, fx.immutable_collections.immutable_list)
_DICTS = (dict, fx.immutable_collections.immutable_dict)


def node_key(node: fx.Node, root: nn.Module, shown: _Shown | None = None, *, shapes: bool = False) -> str | None:
    """One node's cache key: what it runs and on what (its inputs' printed shape descriptions,
    dtypes and grad flags, other arguments as they are; a module's type, options, mode and
    state shapes; an attribute's description). Nodes with equal keys compute alike.

    ``shapes=False`` (annotate's cost key): every node has a key, and a function is named by
    its module and qualified name. ``shapes=True`` (shape-prop's key for sharing an output):
    None where the output may not be shared (an in-place op, whose result is its input; a
    module with submodules, which may do anything; a target that is not callable), and a
    function is also named by its identity.
    """
    if shapes:
        if node.op == "call_method" and str(node.target).endswith("_"):
            return None  # in-place: its result is its input
        name = getattr(node.target, "__name__", "")
        if node.op == "call_function" and (name.endswith("_") or not callable(node.target)):
            return None
    shown = shown or _Shown()
    args = shown.args(node)
    if args is None:
        args = pytree.tree_map(lambda a: ("node", shown.node(a)) if isinstance(a, fx.Node) else a,
                               (node.args, node.kwargs), is_leaf=lambda a: isinstance(a, fx.Node))
    target: Any
    if node.op == "call_module":
        nested, target = shown.module(root, str(node.target))
        if nested and shapes:
            return None  # a module with submodules may do anything: run it
    elif node.op == "get_attr" and not shapes:
        target = node.meta.get(DESC)
    elif shapes:
        target = (getattr(node.target, "__module__", ""), getattr(node.target, "__qualname__", str(node.target)),
                  id(node.target))
    else:
        target = getattr(node.target, "__module__", ""), getattr(node.target, "__qualname__", node.target)
    return repr((node.op, target, args))


#: What fake tensors raise when an op needs real values (``.item()``, ``nonzero``, branches).
DATA_DEPENDENT: tuple[type[Exception], ...] = (
    GuardOnDataDependentSymNode, DataDependentOutputException, DynamicOutputShapeException,
)


def _real_like(t: torch.Tensor) -> torch.Tensor:
    """A real tensor with ``t``'s concrete (hinted) shape and dtype, on the CPU."""
    with unset_fake_temporarily():
        shape = [int(s.node.hint) if isinstance(s, torch.SymInt) else int(s) for s in t.shape]
        if t.dtype.is_floating_point or t.dtype.is_complex:
            return torch.randn(shape, dtype=t.dtype)
        return torch.zeros(shape, dtype=t.dtype)


def default_specs(values: Any, names: Any = None) -> tuple[InputSpec, ...]:
    """InputSpecs for flat example inputs under the usual policy: every tensor's dim 0 is
    "B", and a 2-D integer tensor (token ids) also has dim 1 "S"."""
    specs = []
    for i, v in enumerate(values):
        name = names[i] if names is not None else f"arg{i}"
        if isinstance(v, torch.Tensor):
            dims: tuple[tuple[int, str], ...] = ((0, "B"),) if v.dim() >= 1 else ()
            if v.dim() == 2 and not (v.is_floating_point() or v.is_complex()):
                dims += ((1, "S"),)
            specs.append(InputSpec(name, "tensor", tuple(v.shape), str(v.dtype).removeprefix("torch."), dims))
        else:
            kind = "none" if v is None else type(v).__name__
            specs.append(InputSpec(name, kind, (), "", (), v))
    return tuple(specs)


def fake_params(gm: fx.GraphModule, mode: FakeTensorMode, device: torch.device | str = "cpu",
                cast: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (tied ones under each name) as a static-shaped fake tensor
    on ``device`` (floating ones in ``cast`` when given, as ``model.to(dtype)`` would make
    them); tied weights map to one fake."""
    memo: dict[int, torch.Tensor] = {}
    out = {k: _fake_like(v, mode, torch.device(device), cast, memo)
           for k, v in gm.named_parameters(remove_duplicate=False)}
    out.update({k: _fake_like(v, mode, torch.device(device), cast, memo)
                for k, v in gm.named_buffers(remove_duplicate=False)})
    return out


def _fake_like(t: torch.Tensor, mode: FakeTensorMode, device: torch.device, cast: torch.dtype | None,
               memo: dict[int, torch.Tensor]) -> torch.Tensor:
    """A fake of ``t``'s shape on ``device``, never reading ``t``'s data (it may be on meta)."""
    hit = memo.get(id(t))
    if hit is not None:
        return hit
    dtype = cast if cast is not None and t.dtype.is_floating_point else t.dtype
    fake: torch.Tensor
    if type(t) in (torch.Tensor, nn.Parameter) and t.layout == torch.strided and not t.is_quantized:
        # A plain dense tensor: the fake is made from a meta tensor of its shape and strides,
        # directly (what ``torch.empty_strided`` under the mode does, without dispatch;
        # ``from_tensor`` describes the whole tensor and cost ~0.2 ms each on a 10,000-
        # parameter model). The same fake whether the model lives on meta, CPU or GPU.
        meta = torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=dtype, device="meta")
        fake = mode.fake_tensor_converter.from_meta_and_device(mode, meta, device)
        if t.requires_grad:
            fake.requires_grad_(True)
    elif t.device == device and dtype == t.dtype:
        fake = mode.from_tensor(t, static_shapes=True)
    else:
        with mode:
            fake = torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=dtype, device=device)
        if t.requires_grad:
            fake.requires_grad_(True)
    memo[id(t)] = fake
    return fake


def _param_dtype(gm: nn.Module) -> torch.dtype:
    return next((p.dtype for p in gm.parameters() if p.is_floating_point()), torch.float32)


def to_desc(value: Any, mapping: dict[Any, sympy.Expr], env: ShapeEnv | None = None) -> Any:
    """``value`` with tensors as ``TensorDesc`` and sizes as sympy expressions in B/S."""
    if isinstance(value, torch.Tensor):
        shape = tuple(_expr(s, mapping, env) for s in value.shape)
        return TensorDesc(shape, value.dtype, value.requires_grad)
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return _expr(value, mapping, env)
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return sympy.Integer(value)
    if isinstance(value, (tuple, list)):
        items = [to_desc(v, mapping, env) for v in value]
        return type(value)(items) if type(value) in (tuple, list) else tuple(items)
    if isinstance(value, dict):
        return {k: to_desc(v, mapping, env) for k, v in value.items()}
    return value


def _expr(size: Any, mapping: dict[Any, sympy.Expr], env: ShapeEnv | None) -> sympy.Expr:
    if isinstance(size, int):
        return sympy.Integer(size)
    expr = size.node.expr
    if env is not None:
        expr = env.replace(expr)
    return sympy.sympify(expr).xreplace(mapping)


def module_of(node: fx.Node) -> str:
    """Dotted path of the innermost module owning ``node`` ("" for the root)."""
    if node.op == "call_module":
        return str(node.target)
    if node.op == "get_attr":  # a parameter belongs to the module that holds it
        return str(node.target).rpartition(".")[0]
    stack = node.meta.get("nn_module_stack")
    for entry in reversed(list((stack or {}).values())):
        path = str(entry[0])
        # torch.export files shape nodes under a pseudo-module with this prefix: not a path.
        if path.startswith("_empty_nn_module_stack"):
            continue
        # torch.export / dynamo spell paths as "L['self'].layers.0" or "L__self___layers_0".
        return path.removeprefix("L['self'].").removeprefix("L['self']")
    return ""
