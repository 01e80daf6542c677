"""The root of the project's exception hierarchy.

It lives in the lowest layer so that every package can raise it without importing
upward; ``partitioner`` re-exports it as the public name.
"""

__all__ = ["PartitionError", "CostModelError"]


class PartitionError(ValueError):
    """Every error the project raises on purpose derives from this."""


class CostModelError(PartitionError):
    """A device/link spec or a cost formula was given something it cannot price."""
