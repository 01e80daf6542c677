"""The public surface is small and stable: this test pins it, so a change is a decision."""

from __future__ import annotations

import inspect

import partitioner


def test_exported_names() -> None:
    assert sorted(partitioner.__all__) == sorted([
        "partition", "Pipe", "Plan", "load_plan", "PartitionError", "PlanError",
        "DeviceSpec", "LinkSpec", "DEVICES", "LINKS", "calibrate_device",
    ])


def test_partition_signature() -> None:
    sig = inspect.signature(partitioner.partition)
    assert list(sig.parameters) == [
        "model", "n_gpus", "example_inputs", "example_kwargs", "schedule", "n_microbatches",
        "virtual_stages", "device", "link", "cut_at", "pinned_cuts", "optimizer", "precision",
        "recompute", "memory_limit",
        "capture_route", "leaf_modules", "concrete_args", "seq_dims", "keep_snapshots",
    ]
    assert sig.parameters["schedule"].default == "1f1b"
    assert all(p.kind is p.KEYWORD_ONLY for name, p in sig.parameters.items()
               if name not in ("model", "n_gpus", "example_inputs"))


def test_errors_share_one_root() -> None:
    assert issubclass(partitioner.PartitionError, ValueError)
    assert issubclass(partitioner.PlanError, partitioner.PartitionError)


def test_load_plan_and_apply_exist() -> None:
    assert list(inspect.signature(partitioner.load_plan).parameters) == ["source"]
    assert callable(getattr(partitioner.Plan, "apply"))
    for name in ("train_step", "build_stage", "export_onnx", "stage_source"):
        assert callable(getattr(partitioner.Pipe, name))
