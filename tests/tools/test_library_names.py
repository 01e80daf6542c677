"""The CLI reads the library's names instead of keeping copies (issue 13 item 1): device and link
profiles in --help come from partitioner.cost_models.devices; the defaults it fills in are partition()'s."""

from __future__ import annotations

import inspect

from partitioner.tools.cli import PARTITION_DEFAULTS, build_parser


def _flag_help(flag: str) -> str:
    plan = next(a for a in build_parser()._actions if a.dest == "command").choices["plan"]  # type: ignore[attr-defined]
    return next(a.help for a in plan._actions if flag in a.option_strings)


def test_help_lists_every_device_and_link_profile() -> None:
    from partitioner.cost_models.devices import DEVICES, LINKS

    assert all(name in _flag_help("--device") for name in DEVICES)
    assert all(name in _flag_help("--link") for name in LINKS)


def test_defaults_the_cli_fills_in_are_partitions() -> None:
    # PARTITION_DEFAULTS must stay torch-free (the parser is built for --help and plan-only
    # commands), so it cannot read partition()'s signature at import: this keeps the two equal.
    from partitioner.api import partition

    params = inspect.signature(partition).parameters
    cli_to_api = {"device": "device", "link": "link", "schedule": "schedule", "optimizer": "optimizer",
                  "recompute": "recompute", "precision": "precision", "cut_at": "cut_at", "memory_limit": "memory_limit"}
    for flag, arg in cli_to_api.items():
        assert PARTITION_DEFAULTS[flag] == params[arg].default, (flag, PARTITION_DEFAULTS[flag], params[arg].default)
