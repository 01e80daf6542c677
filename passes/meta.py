"""The metadata keys this project reads and writes, and the types of their values.

Two kinds, both declared here and nowhere else:

- ``node.meta`` keys (``NODE_KEYS``): one value per graph node;
- ``gm.meta`` keys (``GRAPH_KEYS``): one value per ``fx.GraphModule``, e.g. the FakeTensorMode
  shape-prop ran in, which annotate must reuse.

Keys are namespaced (``pp.``) so they never collide with torch's own; ``"val"`` is torch's
key (a FakeTensor, or a nested structure / SymInt / plain value), which we fill the same
way ``torch.export`` does so that both capture routes look alike downstream.

A pass names the keys it reads and writes (``Pass.requires`` / ``provides`` for node keys,
``Pass.graph_requires`` / ``graph_provides`` for graph keys); ``PassManager`` checks them
before and after the pass and refuses a key declared nowhere in this module, so a new key
is added here first (docs/ARCHITECTURE.md, "Where to add").
"""

from __future__ import annotations

__all__ = [
    "VAL", "COST", "MODULE", "STAGE", "DESC", "MARKER", "RECOMPUTE", "SIZE_ONLY", "NODE_KEYS",
    "FAKE_MODE", "SYMBOLS", "EXAMPLE", "SYMBOLIC", "FAKE_PARAMS", "FAKES_BY_MODULE", "DEVICE", "RETYPE",
    "MARKERS", "ORDER", "ORDER_PINNED", "RECOMPUTE_MODE", "ATTENTION", "GRAPH_KEYS", "is_declared",
]

# -- node.meta ------------------------------------------------------------------------------
#: FakeTensor (or nested structure of them, or a SymInt / Python value): the node's output.
VAL = "val"
#: ``cost_models.NodeCost``: the node's cost per micro-batch, symbolic in B (and S).
COST = "pp.cost"
#: ``str``: dotted path of the innermost module the node belongs to ("" for the root).
MODULE = "pp.module"
#: ``int``: the pipeline stage the node was assigned to.
STAGE = "pp.stage"
#: ``TensorDesc`` for a tensor output; for other outputs the same nesting as the value with
#: ints/SymInts as sympy expressions in B/S, and other Python values as they are.
DESC = "pp.desc"
#: ``int``: on the first compute node after a ``pipe_split()``, the marker's index (``passes/markers.py``).
MARKER = "pp.marker"
#: ``int``: the checkpointed region the node belongs to, in a stage module (``passes/recompute.py``).
RECOMPUTE = "pp.recompute"
#: ``passes.attention.SizeOnly``: on a stage input, that its value is a function of sizes alone
#: (an attention mask the capture built from shapes), and that function (``passes/attention.py``).
SIZE_ONLY = "pp.size_only"

#: Every node key, with what it holds (``PassManager`` refuses a pass naming another).
NODE_KEYS: dict[str, str] = {
    VAL: "the node's output as a FakeTensor / SymInt / Python value (torch.export's key)",
    COST: "cost_models.NodeCost per micro-batch, symbolic in B and S",
    MODULE: "dotted path of the innermost module the node belongs to",
    STAGE: "pipeline stage index",
    DESC: "TensorDesc (or the nesting of the value) with sizes symbolic in B and S",
    MARKER: "index of the pipe_split() marker just before this node (passes/markers.py)",
    RECOMPUTE: "recompute region id (passes/recompute.py)",
    SIZE_ONLY: "a stage input computed from sizes alone, and how (passes/attention.py)",
}

# -- gm.meta --------------------------------------------------------------------------------
#: ``FakeTensorMode`` shape-prop ran in (annotate re-enters it: same ShapeEnv, same symbols).
FAKE_MODE = "pp.fake_mode"
#: ``dict[sympy.Expr, sympy.Symbol]``: ShapeEnv symbol → the project's ``B`` / ``S``.
SYMBOLS = "pp.symbols"
#: ``dict[str, int]``: the example sizes of ``B`` / ``S``.
EXAMPLE = "pp.example"
#: ``bool``: False when shape-prop fell back to static shapes (costs exact at the example only).
SYMBOLIC = "pp.symbolic"
#: ``dict[str, FakeTensor]``: fake parameters and buffers by qualified name.
FAKE_PARAMS = "pp.fake_params"
#: ``dict``: fake state grouped by owning module (annotate builds it lazily).
FAKES_BY_MODULE = "pp.fakes_by_module"
#: ``torch.device`` the fakes live on.
DEVICE = "pp.device"
#: ``(from dtype, to dtype)`` or None: the mixed-precision recast shape-prop applied.
RETYPE = "pp.retype"
#: ``int``: how many ``pipe_split()`` calls capture removed (``passes/markers.py``).
MARKERS = "pp.markers"
#: ``partitioner.passes.order.OrderReport``: the linear order chosen for a multi-branch graph.
ORDER = "pp.order"

#: ``tuple[str, ...]``: compute-node names in the order a re-applied plan fixes (``partitioner.passes.order.pin_order``).
ORDER_PINNED = "pp.order_pinned"
#: ``str``: a stage module's recompute mode, "full" or "selective" (``passes/recompute.py``).
RECOMPUTE_MODE = "pp.recompute_mode"

#: ``partitioner.passes.tensor_parallel.Sharded``: the graph is one tensor-parallel rank's view
#: (``partitioner.tensor_parallel.view``): its sharded regions, costs and parameter divisors.
TP = "pp.tp"

#: ``partitioner.runtime.tensor_parallel.TensorParallelPlan``: how a stage module was sharded at run time.
TENSOR_PARALLEL = "pp.tensor_parallel"

#: ``dict[str, list[str]]``: the attention nodes of a stage module the runtime rewrote to the
#: fused causal / grouped-query call, and those left with their explicit mask (``passes/attention.py``).
ATTENTION = "pp.attention"

#: Every graph key, with what it holds (``PassManager`` refuses a pass naming another).
GRAPH_KEYS: dict[str, str] = {
    FAKE_MODE: "FakeTensorMode shape-prop ran in",
    SYMBOLS: "ShapeEnv symbol -> B / S",
    EXAMPLE: "example sizes of B and S",
    SYMBOLIC: "False when shape-prop fell back to static shapes",
    FAKE_PARAMS: "fake parameters and buffers by qualified name",
    FAKES_BY_MODULE: "fake state grouped by owning module",
    DEVICE: "device the fakes live on",
    RETYPE: "mixed-precision recast (from, to) or None",
    MARKERS: "number of pipe_split() markers capture removed",
    ORDER: "OrderReport: bytes crossing each position before and after reordering",
    ORDER_PINNED: "compute-node order a re-applied plan fixes (OrderForCuts keeps it)",
    TP: "Sharded: one tensor-parallel rank's regions, costs and parameter divisors",
    TENSOR_PARALLEL: "TensorParallelPlan: how a stage module was sharded at run time",
    RECOMPUTE_MODE: "a stage module's recompute mode (passes/recompute.py)",
    ATTENTION: "attention nodes rewritten to the fused call / left with an explicit mask (passes/attention.py)",
}


def is_declared(key: str, *, graph: bool) -> bool:
    """Whether ``key`` is declared here as a graph-level (``graph=True``) or node-level key."""
    return key in (GRAPH_KEYS if graph else NODE_KEYS)
