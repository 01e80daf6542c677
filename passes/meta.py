"""The ``node.meta`` keys this project reads and writes, and the types of their values.

Keys are namespaced (``pp.``) so they never collide with torch's own; ``"val"`` is torch's
key (a FakeTensor, or a nested structure / SymInt / plain value), which we fill the same
way ``torch.export`` does so that both capture routes look alike downstream.
"""

from __future__ import annotations

__all__ = ["VAL", "COST", "MODULE", "STAGE"]

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
__all__ += ["DESC"]
