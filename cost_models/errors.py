"""The root of the project's exception hierarchy.

It lives in the lowest layer so that every package can raise it without importing
upward; ``partitioner`` re-exports the names users catch. The tree::

    PartitionerError                      every error the project raises on purpose
    ├── PartitionError (ValueError)       bad input: model, options, graph, plan file
    │   ├── CostModelError, PolyError, ScheduleError, PlanError, ExportError
    │   ├── CaptureError, GraphError, ShapePropError, AnnotateError   (passes/)
    │   └── SolverInputError, InfeasibleError                         (solver)
    └── PipelineRuntimeError (RuntimeError)   a step failed while running (partitioner.runtime)

Catch ``PartitionError`` around ``partition()`` / ``load_plan()``, ``PipelineRuntimeError``
around ``train_step`` / ``runner().step``, ``PartitionerError`` for both.
"""

__all__ = ["PartitionerError", "PartitionError", "CostModelError"]


class PartitionerError(Exception):
    """Every error the project raises on purpose derives from this."""


class PartitionError(PartitionerError, ValueError):
    """Something the caller gave (a model, an option, a plan) cannot be partitioned as asked."""


class CostModelError(PartitionError):
    """A device/link spec or a cost formula was given something it cannot price."""
