"""The examples in public docstrings run."""

from __future__ import annotations

import doctest

import partitioner.api
import partitioner.solver


def test_docstring_examples_run() -> None:
    for module in (partitioner.api, partitioner.solver):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0, module.__name__
