"""Errors raised by graph passes (capture, shape propagation, codegen)."""

from partitioner.cost_models.errors import PartitionError

__all__ = ["CaptureError", "GraphError"]


class CaptureError(PartitionError):
    """Neither torch.fx nor torch.export could capture the model."""


class GraphError(PartitionError):
    """A graph or a stage assignment breaks a rule a pass relies on."""
