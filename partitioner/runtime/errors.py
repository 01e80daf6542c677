"""The runtime's errors: one class, a ``RuntimeError`` under the project's root
``PartitionerError`` (input errors are ``PartitionError``, a ``ValueError``)."""

from __future__ import annotations

from partitioner.cost_models.errors import PartitionerError

__all__ = ["PipelineRuntimeError"]


class PipelineRuntimeError(PartitionerError, RuntimeError):
    """A pipeline step failed: a stage raised, a value crossed a cut with the wrong
    shape or dtype, or a rank died. ``rank`` and ``action`` say where, when known."""

    def __init__(self, message: str, rank: int | None = None, action: str | None = None,
                 secondary: bool = False) -> None:
        super().__init__(message)
        self.rank = rank
        self.action = action
        # True when this rank failed only because a peer did (a receive broke or timed
        # out): a launcher reports the rank that failed first for its own reasons.
        self.secondary = secondary

    def __reduce__(self) -> tuple[type, tuple[str, int | None, str | None, bool]]:
        # Keep the fields when the error crosses a process boundary (pickled).
        return (type(self), (str(self), self.rank, self.action, self.secondary))
