"""Runs passes in order, checks their declared meta keys, and can keep a snapshot after each.

The snapshot is what compiler engineers call "print IR after each pass": the readable
graph text and a summary of every node's metadata, so a diff tool can show what a pass
changed. Snapshots are plain strings and dicts: cheap to keep, safe to write out.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from torch import fx

from partitioner.passes.base import Pass
from partitioner.passes.errors import GraphError
from partitioner.passes.meta import COST, DESC, GRAPH_KEYS, MODULE, NODE_KEYS, STAGE

__all__ = ["Snapshot", "PassManager", "graph_text", "node_summary"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Snapshot:
    after: str  # the pass name ("capture" for the graph as captured)
    code: str  # readable graph, one node per line
    nodes: dict[str, dict[str, str]]  # node name → {op, target, module, stage, desc, cost}
    seconds: float = 0.0  # how long the pass took


def graph_text(gm: fx.GraphModule) -> str:
    """The graph as text, one node per line, stable across runs (no object ids)."""
    return "\n".join(n.format_node() or "" for n in gm.graph.nodes)


def node_summary(gm: fx.GraphModule) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for n in gm.graph.nodes:
        entry = {"op": n.op, "target": str(n.target)}
        for key in (MODULE, STAGE, DESC, COST):
            if key in n.meta:
                entry[key] = _short(n.meta[key])
        out[n.name] = entry
    return out


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 400 else text[:397] + "..."


@dataclass
class PassManager:
    passes: Sequence[Pass]
    keep_snapshots: bool = False
    snapshots: list[Snapshot] = field(default_factory=list)

    def run(self, gm: fx.GraphModule) -> fx.GraphModule:
        if self.keep_snapshots:
            self.snapshots.append(Snapshot("capture", graph_text(gm), node_summary(gm)))
        for p in self.passes:
            self._declared(p)
        for p in self.passes:
            self._check(p, gm, p.requires, "requires")
            self._check_graph(p, gm, p.graph_requires, "requires")
            start = time.perf_counter()
            gm = p.run(gm)
            elapsed = time.perf_counter() - start
            self._check(p, gm, p.provides, "provides")
            self._check_graph(p, gm, p.graph_provides, "provides")
            log.debug("pass %s: %.3f s, %d nodes", p.name, elapsed, len(gm.graph.nodes))
            if self.keep_snapshots:
                self.snapshots.append(Snapshot(p.name, graph_text(gm), node_summary(gm), elapsed))
        return gm

    @staticmethod
    def _declared(p: Pass) -> None:
        """Refuse, before any pass runs, a pass naming a key ``passes/meta.py`` does not declare."""
        for keys, table, where in ((p.requires, NODE_KEYS, "node.meta"), (p.provides, NODE_KEYS, "node.meta"),
                                   (getattr(p, "graph_requires", ()), GRAPH_KEYS, "gm.meta"),
                                   (getattr(p, "graph_provides", ()), GRAPH_KEYS, "gm.meta")):
            for key in keys:
                if key not in table:
                    raise GraphError(f"pass {p.name!r} names {where}[{key!r}], which passes/meta.py does not declare; "
                                     f"add it to {'GRAPH_KEYS' if table is GRAPH_KEYS else 'NODE_KEYS'} there")

    @staticmethod
    def _check_graph(p: Pass, gm: fx.GraphModule, keys: Sequence[str], what: str) -> None:
        for key in keys:
            if key not in gm.meta:
                verb = "needs" if what == "requires" else "did not set"
                raise GraphError(f"pass {p.name!r} {verb} gm.meta[{key!r}] ({GRAPH_KEYS.get(key, 'undeclared')}); "
                                 + ("run the pass that provides it first" if what == "requires" else
                                    "the pass must set every key it declares in graph_provides"))

    @staticmethod
    def _check(p: Pass, gm: fx.GraphModule, keys: Sequence[str], what: str) -> None:
        for key in keys:
            for n in gm.graph.nodes:
                if n.op not in ("placeholder", "output", "get_attr") and key not in n.meta:
                    verb = "needs" if what == "requires" else "did not set"
                    raise GraphError(f"pass {p.name!r} {verb} node.meta[{key!r}] on {n.format_node()}")
