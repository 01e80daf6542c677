"""The public surface is small and stable: this test pins it, so a change is a decision."""

from __future__ import annotations

import inspect

import partitioner


def test_exported_names() -> None:
    assert sorted(partitioner.__all__) == sorted([
        "partition", "Pipe", "Plan", "load_plan", "PartitionerError", "PartitionError", "PlanError",
        "InfeasibleError", "CaptureError", "PipelineRuntimeError",
        "DeviceSpec", "LinkSpec", "DEVICES", "LINKS", "calibrate_device",
    ])


def test_partition_signature() -> None:
    sig = inspect.signature(partitioner.partition)
    assert list(sig.parameters) == [
        "model", "n_gpus", "example_inputs", "example_kwargs", "schedule", "n_microbatches",
        "virtual_stages", "device", "link", "cut_at", "pinned_cuts", "optimizer", "precision",
        "recompute", "memory_limit",
        "capture_route", "leaf_modules", "concrete_args", "seq_dims", "keep_snapshots",
        "objective", "data_parallel", "zero", "gpus_per_node", "inter_link", "tensor_parallel",
        "fsdp_reshard", "sequence_parallel", "fsdp_shard",
    ]
    assert sig.parameters["schedule"].default == "1f1b"
    assert all(p.kind is p.KEYWORD_ONLY for name, p in sig.parameters.items()
               if name not in ("model", "n_gpus", "example_inputs"))


def test_errors_share_one_root() -> None:
    root = partitioner.PartitionerError
    assert issubclass(partitioner.PartitionError, ValueError)
    for name in ("PlanError", "InfeasibleError", "CaptureError"):  # input errors: ValueErrors
        cls = getattr(partitioner, name)
        assert issubclass(cls, partitioner.PartitionError) and issubclass(cls, ValueError), name
    # a step that fails while running is a RuntimeError, not an input error
    assert issubclass(partitioner.PipelineRuntimeError, RuntimeError)
    assert issubclass(partitioner.PipelineRuntimeError, root)
    assert not issubclass(partitioner.PipelineRuntimeError, ValueError)
    assert issubclass(partitioner.PartitionError, root) and not issubclass(root, (ValueError, RuntimeError))


def test_every_project_error_is_under_the_root() -> None:
    import importlib
    import pkgutil

    import partitioner.cost_models
    import partitioner.passes

    seen = []
    for pkg in (partitioner, partitioner.passes, partitioner.cost_models):
        for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            if ".examples" in info.name or info.name.endswith("__main__"):
                continue
            module = importlib.import_module(info.name)
            for name, value in vars(module).items():  # public classes (private ones are internal signals)
                if (isinstance(value, type) and issubclass(value, Exception) and value.__module__ == info.name
                        and not name.startswith("_")):
                    seen.append(value)
                    assert issubclass(value, partitioner.PartitionerError), value
                    # one family each: input (ValueError) or running (RuntimeError)
                    if value is not partitioner.PartitionerError:
                        assert issubclass(value, ValueError) != issubclass(value, RuntimeError), value
    assert partitioner.PipelineRuntimeError in seen and partitioner.PlanError in seen


def test_annotate_failures_have_their_own_class() -> None:
    from partitioner.passes.annotate import AnnotateError

    assert issubclass(AnnotateError, partitioner.PartitionError)


def test_load_plan_and_apply_exist() -> None:
    assert list(inspect.signature(partitioner.load_plan).parameters) == ["source"]
    assert callable(getattr(partitioner.Plan, "apply"))
    for name in ("train_step", "build_stage", "export_onnx", "stage_source"):
        assert callable(getattr(partitioner.Pipe, name))
