"""The user's own split points: ``torch.distributed.pipelining.pipe_split()`` in ``forward``.

Capture removes every ``pipe_split`` node (both routes record one: torch.export by itself,
fx through ``partitioner.passes.trace``) and marks the first compute node after it with
``node.meta[MARKER]`` (the marker's index, in call order); ``gm.meta[MARKERS]`` counts
the calls. ``cut_constraints`` turns the marks into what the solver obeys:

* ``k`` markers and ``k + 1`` stages (no ``cut_at``, no ``pinned_cuts``): the markers are the cuts;
* ``cut_at="markers"``: with at most ``k + 1`` stages the cuts are chosen among the markers;
  with more, every marker is a cut and the solver places the rest;
* otherwise the markers are not used, and the plan's notes (and a warning) say so.

It also checks a ``cut_at`` glob against the model's module paths, so a glob that
matches nothing says so and names the nearest paths instead of "not enough cuts".
"""

from __future__ import annotations

import difflib
import fnmatch
import re
import warnings
from dataclasses import dataclass, replace
from typing import Any, Sequence

from torch import fx

from partitioner.cost_models.errors import PartitionError
from partitioner.passes.meta import MARKER, MARKERS, MODULE
from partitioner.passes.split import compute_nodes

__all__ = ["MARKER", "MARKERS", "CUT_AT_MARKERS", "CutConstraints", "cut_constraints", "is_marker", "take_markers"]

#: The ``cut_at`` value that means "at the pipe_split() markers".
CUT_AT_MARKERS = "markers"

_NOT_COMPUTE = ("placeholder", "get_attr", "output")


def is_marker(node: fx.Node) -> bool:
    return node.op == "call_function" and str(node.target) in ("pippy._pipe_split.default", "pippy._pipe_split")


def take_markers(gm: fx.GraphModule) -> int:
    """Remove the ``pipe_split`` nodes of ``gm``; mark the node after each. Returns the count."""
    count = 0
    pending: int | None = None
    for node in list(gm.graph.nodes):
        if is_marker(node):
            if pending is not None:
                warnings.warn(f"pipe_split() markers {pending} and {count} have no operation between them; "
                              "they make one cut", stacklevel=3)
            else:
                pending = count
            count += 1
            gm.graph.erase_node(node)
        elif pending is not None and node.op not in _NOT_COMPUTE:
            node.meta[MARKER] = pending
            pending = None
    if pending is not None:
        warnings.warn(f"pipe_split() marker {pending} comes after the last operation of forward; it makes no cut",
                      stacklevel=3)
    gm.meta[MARKERS] = count
    if count:
        gm.recompile()
    return count


@dataclass(frozen=True)
class CutConstraints:
    """What the markers and ``cut_at`` ask of the solver."""

    glob: str | None  # the module glob cuts must fall between (None: anywhere)
    pins: tuple[str, ...] = ()  # node names a cut must precede
    only: tuple[str, ...] | None = None  # when set: the only node names a cut may precede
    notes: tuple[str, ...] = ()
    where: tuple[str, ...] = ()  # per pin: "marker 0 (before node 'add_3' in 'layers.1')"

    def apply(self, priced: Any) -> Any:
        """``priced`` (a ``partitioner.pricing.Priced``) with cuts off the markers disallowed
        (``only``); a marker that must be a cut but cannot be says which marker and why."""
        names = [n.name for n in priced.order]
        for pin, where in zip(self.pins, self.where):
            k = names.index(pin)
            if not priced.allowed[k]:
                raise PartitionError(f"pipe_split() {where} cannot be a cut: {priced.blocked_by[k]}; move that "
                                     "pipe_split() call to where only tensors are live")
        if self.only is None:
            return priced
        keep = set(self.only)
        n = len(names)
        allowed, why = list(priced.allowed), list(priced.blocked_by)
        for k in range(1, n):
            if names[k] not in keep and allowed[k]:
                allowed[k] = False
                why[k] = "not at a pipe_split() marker (cut_at='markers')"
        return replace(priced, allowed=tuple(allowed), blocked_by=tuple(why))


def _paths(order: Sequence[fx.Node]) -> list[str]:
    """Every module path (and each prefix of one) that owns a node, in graph order."""
    seen: dict[str, None] = {}
    for node in order:
        parts = str(node.meta.get(MODULE, "")).split(".")
        for i in range(1, len(parts) + 1):
            if parts[0]:
                seen.setdefault(".".join(parts[:i]), None)
    return list(seen)


def check_cut_at(order: Sequence[fx.Node], cut_at: str) -> None:
    """Raise when the glob ``cut_at`` matches no module path; name the nearest ones."""
    paths = _paths(order)
    if any(fnmatch.fnmatchcase(p, cut_at) for p in paths):
        return
    shapes = list(dict.fromkeys(re.sub(r"(?<=\.)\d+(?=\.|$)", "*", p) for p in paths))
    near = difflib.get_close_matches(cut_at, shapes, n=5, cutoff=0.4) or shapes[:5]
    raise PartitionError(
        f"cut_at={cut_at!r} matches no module of this model; the nearest module paths are "
        f"{', '.join(near)} (cut_at is a glob over module paths such as 'model.layers.*'; "
        f"cut_at={CUT_AT_MARKERS!r} cuts at pipe_split() calls)")


def cut_constraints(gm: fx.GraphModule, cut_at: str | None, n_stages: int,
                    pinned_cuts: Sequence[str] = ()) -> CutConstraints:
    """Read the markers of ``gm`` (``node.meta[MODULE]`` must be set) and check ``cut_at``."""
    order = compute_nodes(gm)
    count = int(gm.meta.get(MARKERS, 0))
    marked = [(k, n) for k, n in enumerate(order) if MARKER in n.meta]
    notes: list[str] = []
    if marked and marked[0][0] == 0:  # before the first operation: no cut there
        notes.append(f"pipe_split() marker {marked[0][1].meta[MARKER]} comes before the first operation "
                     "of forward; it makes no cut")
        marked = marked[1:]
    names = tuple(n.name for _, n in marked)
    where = tuple(f"marker {n.meta[MARKER]} (before node {n.name!r} in {str(n.meta.get(MODULE, '')) or 'forward'!r})"
                  for _, n in marked)
    need = n_stages - 1
    if cut_at == CUT_AT_MARKERS:
        if not marked:
            raise PartitionError(
                f"cut_at={CUT_AT_MARKERS!r}, but forward calls torch.distributed.pipelining.pipe_split() "
                f"{'nowhere' if not count else 'only where it makes no cut'}; call pipe_split() between the "
                "blocks you want as stages, or pass a module glob such as cut_at='model.layers.*'")
        if need <= len(marked):
            notes.append(f"cuts chosen among the {len(marked)} pipe_split() markers (cut_at='markers')")
            return CutConstraints(None, only=names, notes=tuple(notes))
        notes.append(f"the {len(marked)} pipe_split() markers are cuts; the solver placed the other "
                     f"{need - len(marked)} (cut_at='markers')")
        return CutConstraints(None, pins=names, notes=tuple(notes), where=where)
    if cut_at is not None:
        check_cut_at(order, cut_at)
    if marked and cut_at is None and not pinned_cuts and need == len(marked):
        notes.append(f"cuts at the {len(marked)} pipe_split() markers")
        return CutConstraints(None, pins=names, notes=tuple(notes), where=where)
    if marked:
        why = (f"{len(marked)} markers make {len(marked) + 1} stages, not {n_stages}" if need != len(marked)
               else "cut_at or pinned_cuts was given")
        msg = (f"forward calls pipe_split() {len(marked)} times, but the markers are not used ({why}); "
               f"pass cut_at={CUT_AT_MARKERS!r} to cut at them (plus the solver's choice with more stages)")
        warnings.warn(msg, stacklevel=3)
        notes.append(msg)
    return CutConstraints(cut_at, notes=tuple(notes))
