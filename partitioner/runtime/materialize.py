"""A rank's own copy of its stages' tensors on its device, from a real or a meta model.

Real tensors are copied. Tensors on the meta device (a model built under
``torch.device("meta")`` to plan something no host can hold) are allocated on ``device``
for this rank only and initialised by the code that owns them, never by touching another
stage's weights:

* each module that owns one of this rank's tensors is rebuilt as a *shell*: a shallow copy
  of the original module whose own tensors are this rank's new ones, or fresh meta
  placeholders for tensors of other ranks (writes to them cost nothing and go nowhere);
  ancestors get shells too, so initialisers that walk children (Hugging Face's
  ``_init_weights`` scales ``c_proj.weight`` from the block) reach this rank's tensors;
* every shell, children before parents (as ``Module.apply``), runs ``init_fn(module)`` when
  given, else ``module.reset_parameters()`` and then the root model's
  ``_init_weights(module)`` (the Hugging Face / nanoGPT convention), each under an RNG
  seeded by ``seed`` and the module's path, so a module's values do not depend on the plan;
* a tensor tied across ranks (``lm_head.weight`` is ``transformer.wte.weight``) is
  initialised last, by the module of its first name in the model, on every rank that holds
  it: the copies start equal.

Non-persistent buffers (rotary tables, masks) are never in a checkpoint, so they must be
*recomputed*: if the model holds real values (built with ``meta_params()``, which puts
only parameters on meta), they are copied; if they are meta, the initialisers above must
compute them (transformers' ``_init_weights`` recomputes rotary ``inv_freq``).

Floating tensors are filled with NaN before initialisation; whatever is still NaN after it
was written by nobody and is reported in ``uninitialized`` (by FQN). The runner refuses to
run while any remain: ``load_checkpoint`` / ``load_state_dict`` fill parameters and
persistent buffers; a non-persistent buffer needs an ``init_fn`` or ``meta_params()``.
"""

from __future__ import annotations

import contextlib
import copy
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

__all__ = ["Materialized", "materialize", "meta_params", "non_persistent_buffers"]


@contextlib.contextmanager
def meta_params() -> Iterator[None]:
    """Build a model with its parameters on the meta device and its buffers computed for
    real (on CPU): ``with meta_params(): model = Llama(cfg)``.

    Constructors then compute small derived buffers (rotary tables, causal masks) as
    usual, and ``build_stage`` copies them; parameters are created empty and moved to meta
    as they are registered, so no weight memory is touched (``torch.empty`` of an unused
    block commits no pages) and ``reset_parameters`` in constructors runs on meta for free.
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            p = module._parameters[name]
            assert p is not None
            module._parameters[name] = nn.Parameter(p.detach().to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def non_persistent_buffers(model: nn.Module) -> set[str]:
    """FQNs of buffers ``model.state_dict()`` leaves out."""
    out = set()
    for path, mod in model.named_modules(remove_duplicate=False):
        for name in mod._non_persistent_buffers_set:
            out.add(f"{path}.{name}" if path else name)
    return out


@dataclass
class Materialized:
    memo: dict[int, Any]  # id(original tensor) -> this rank's tensor (for deepcopy)
    uninitialized: set[str] = field(default_factory=set)  # FQNs nobody wrote
    initialized_on_device: int = 0  # tensors allocated and initialised here (were meta)


def _seed_for(seed: int, path: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(path.encode())) % (2**63)


def _fresh(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    new = torch.empty_like(t, device=device)
    if new.is_floating_point() or new.is_complex():
        new.fill_(float("nan"))
    else:
        new.zero_()
    return nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new


def _meta_like(t: torch.Tensor) -> torch.Tensor:
    new = torch.empty_like(t, device="meta")
    return nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new


def materialize(
    stage_modules: list[nn.Module],
    device: torch.device,
    model: nn.Module | None,
    *,
    init_fn: Callable[[nn.Module], Any] | None = None,
    seed: int = 0,
    tied: tuple[tuple[str, ...], ...] = (),
) -> Materialized:
    """Copies or fresh tensors on ``device`` for every tensor of ``stage_modules``, keyed by
    the original tensor's id (a tensor shared by two stages of this rank stays one)."""
    named: dict[int, list[str]] = {}  # id -> every FQN it has on this rank
    tensors: dict[int, torch.Tensor] = {}
    for mod in stage_modules:
        for n, t in [*mod.named_parameters(remove_duplicate=False), *mod.named_buffers(remove_duplicate=False)]:
            names = named.setdefault(id(t), [])
            if n not in names:
                names.append(n)
            tensors[id(t)] = t
    out = Materialized({})
    meta_ids = []
    for i, t in tensors.items():
        if t.device.type == "meta":
            out.memo[i] = _fresh(t, device)
            meta_ids.append(i)
        elif isinstance(t, nn.Parameter):
            out.memo[i] = nn.Parameter(t.detach().to(device, copy=True), requires_grad=t.requires_grad)
        else:
            out.memo[i] = t.detach().to(device, copy=True)
    if not meta_ids:
        return out
    out.initialized_on_device = len(meta_ids)
    # The modules that own this rank's meta tensors, found in the user's model (its own
    # classes, with their reset_parameters); without one, in the stage modules (fx keeps
    # leaf modules such as nn.Linear; the export route keeps plain containers).
    root: nn.Module = model if model is not None else stage_modules[0]
    owners: set[str] = set()
    for i in meta_ids:
        for n in named[i]:
            owners.add(n.rpartition(".")[0])
    aliases_by_name = {n: g for g in tied for n in g}
    canonical: dict[int, str] = {}  # tied tensor -> the first of its names in the model
    model_order = ({n: k for k, (n, _) in enumerate(root.named_parameters(remove_duplicate=False))}
                   if model is not None else {})
    for i in meta_ids:
        group = {a for n in named[i] for a in aliases_by_name.get(n, (n,))}
        if len(group) > 1:
            first = min(group, key=lambda n: (model_order.get(n, len(model_order)), n))
            canonical[i] = first
            owners.add(first.rpartition(".")[0])
    if model is None:
        lookup = _lookup_in(stage_modules)
    else:
        lookup = lambda path: root.get_submodule(path)  # noqa: E731
    # By name, not by tensor identity: the export route's stages hold their own Parameter
    # objects, so the model's modules are matched to this rank's tensors through FQNs.
    fresh: dict[str, torch.Tensor] = {}
    for i in meta_ids:
        for n in named[i]:
            for a in aliases_by_name.get(n, (n,)):
                fresh.setdefault(a, out.memo[i])
    shells = _shells(owners, lookup, fresh)
    hf_init = getattr(model, "_init_weights", None) if model is not None and init_fn is None else None
    fork_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    order = sorted(shells, key=lambda p: (-p.count(".") if p else 1, p))  # deepest first, root last

    def run_init(path: str) -> None:
        shell = shells[path]
        with torch.random.fork_rng(devices=fork_devices), torch.no_grad():
            torch.manual_seed(_seed_for(seed, path))
            if init_fn is not None:
                init_fn(shell)
                return
            reset = getattr(shell, "reset_parameters", None)
            if callable(reset):
                reset()
            if callable(hf_init):
                hf_init(shell)

    for path in order:
        run_init(path)
    for i, name in sorted(canonical.items(), key=lambda kv: kv[1]):
        run_init(name.rpartition(".")[0])  # the same values on every rank that holds a copy
    for i in meta_ids:
        t = out.memo[i]
        if (t.is_floating_point() or t.is_complex()) and bool(torch.isnan(t.detach()).any()):
            out.uninitialized.update(named[i])
    return out


def _lookup_in(sources: list[nn.Module]) -> Callable[[str], nn.Module]:
    def lookup(path: str) -> nn.Module:
        for s in sources:
            try:
                return s.get_submodule(path)
            except AttributeError:
                continue
        raise AttributeError(path)

    return lookup


def _shells(owners: set[str], lookup: Callable[[str], nn.Module],
            fresh: dict[str, torch.Tensor]) -> dict[str, nn.Module]:
    """Shallow copies of each owner and its ancestors, linked into one tree. A shell's own
    tensors are this rank's new ones (by FQN, from ``fresh``) or meta placeholders:
    tensors of other ranks, and tensors copied from real values (an initialiser must not
    overwrite what the user's model holds), take writes that go nowhere."""
    placeholders: dict[int, torch.Tensor] = {}

    def own(fqn: str, v: torch.Tensor | None) -> torch.Tensor | None:
        if v is None:
            return None
        if fqn in fresh:
            return fresh[fqn]
        if id(v) not in placeholders:
            placeholders[id(v)] = _meta_like(v)
        return placeholders[id(v)]

    def shallow(orig: nn.Module, path: str) -> nn.Module:
        pre = f"{path}." if path else ""
        shell = copy.copy(orig)
        shell.__dict__["_parameters"] = {k: own(pre + k, v) for k, v in orig._parameters.items()}
        shell.__dict__["_buffers"] = {k: own(pre + k, v) for k, v in orig._buffers.items()}
        shell.__dict__["_modules"] = dict(orig._modules)
        return shell

    paths = set()
    for p in owners:
        parts = p.split(".") if p else []
        for k in range(len(parts) + 1):
            paths.add(".".join(parts[:k]))
    shells: dict[str, nn.Module] = {}
    for path in sorted(paths, key=lambda p: p.count(".") if p else -1):
        try:
            orig = lookup(path)
        except AttributeError:
            continue
        shells[path] = shallow(orig, path)
        if path:
            parent, _, leaf = path.rpartition(".")
            if parent in shells and leaf in shells[parent]._modules:
                shells[parent]._modules[leaf] = shells[path]
    # Children that hold none of this rank's tensors: placeholder copies of the whole
    # subtree, so a parent's initialiser walking them changes nothing of the user's model.
    linked = {id(s) for s in shells.values()}

    def subtree(mod: nn.Module, path: str) -> nn.Module:
        shell = shallow(mod, path)
        shell.__dict__["_modules"] = {k: (None if c is None else subtree(c, f"{path}.{k}"))
                                      for k, c in mod._modules.items()}
        return shell

    for path, shell in list(shells.items()):
        for attr, child in list(shell._modules.items()):
            if child is not None and id(child) not in linked:
                shell._modules[attr] = subtree(child, f"{path}.{attr}" if path else attr)
    return shells
