"""Log records of one logger, for tests (pytest's ``caplog`` is gone: CI runs ``-p no:logging``)."""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator


@contextlib.contextmanager
def captured(name: str, level: int | None = None) -> Iterator[list[logging.LogRecord]]:
    """Collect what logger ``name`` emits inside the block; ``level`` lowers the logger's own
    level for the block (restored after)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger(name)
    old = logger.level
    logger.addHandler(handler)
    if level is not None:
        logger.setLevel(level)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
