"""``Pipe``: the partitioned model: its stages, its plan, and a way to run them in order.

Stages share parameters with the model they came from (no copies), as
``torch.distributed.pipelining`` does within one process; ``build_stage`` makes a
rank's own copy on its device.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import fx, nn

from partitioner.export import export_onnx
from partitioner.passes.manager import Snapshot
from partitioner.passes.trace import Captured
from partitioner.plan import Plan

__all__ = ["Pipe"]


class Pipe(nn.Module):
    """The stages of one model, in pipeline order, with the plan that made them.

    ``pipe(*args, **kwargs)`` runs every stage in this process, one after another, and
    returns what ``model(*args, **kwargs)`` returns. Made by ``partition()`` or
    ``Plan.apply``, not by hand.

    Attributes:
        stages: one ``fx.GraphModule`` per stage, in pipeline order, sharing the model's
            parameters (no copies).
        plan: the ``Plan`` they were built from.
        graph: the whole annotated graph (``node.meta`` holds costs and stage indices).
        snapshots: graph text after capture and after each pass (``keep_snapshots=True``).
    """

    def __init__(
        self,
        captured: Captured,
        stages: Sequence[fx.GraphModule],
        plan: Plan,
        graph: fx.GraphModule | None = None,
        snapshots: Sequence[Snapshot] = (),
        model: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.plan = plan
        self._captured = captured
        #: the whole annotated graph (node.meta holds costs and stages); not a submodule,
        #: so it adds nothing to parameters() or state_dict()
        self.__dict__["graph"] = graph if graph is not None else captured.gm
        #: the model the stages came from (not a submodule): ``build_stage`` initialises a meta
        #: model's tensors through its modules' own init code and reads which buffers persist
        self.__dict__["model"] = model
        #: graph text + metadata after capture and after each pass (partition(keep_snapshots=True))
        self.snapshots: tuple[Snapshot, ...] = tuple(snapshots)

    def flatten_inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
        return self._captured.flatten(args, kwargs)

    def unflatten_outputs(self, flat: Sequence[Any]) -> Any:
        return self._captured.unflatten_outputs(flat)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        values: Sequence[Any] = self.flatten_inputs(args, kwargs)
        for stage in self.stages:
            values = stage(*values)
        return self.unflatten_outputs(values)

    def stage_source(self, index: int) -> str:
        """Readable Python source of one stage (``forward`` of its GraphModule)."""
        return str(self.stages[index].code)

    def __repr__(self) -> str:
        cuts = ", ".join(self.plan.cuts) or "none"
        return f"Pipe({self.plan.model}, {len(self.stages)} stages, cuts: {cuts})"

    # -- the hand-off to the runtime -------------------------------------------------------
    # partitioner.runtime never imports this module: it is built from a PipelineSpec, which
    # these methods make. The imports are deferred: the runtime loads torch.distributed and
    # more, and ``import partitioner`` stays light.
    def pipeline_spec(self) -> Any:
        """The record the runtime is built from (``partitioner.runtime.spec.PipelineSpec``):
        the plan, these stages (shared with the model), where each boundary value goes, the
        capture's input flattening and output structure, the model's tensor names and dtype,
        and the model itself only when it holds meta tensors (``build_stage`` initialises
        them through its modules). Built anew on each call."""
        from partitioner.runtime.precision import model_dtype  # noqa: PLC0415 - deferred: see above
        from partitioner.runtime.spec import IOSpec, PipelineSpec  # noqa: PLC0415 - deferred: see above

        cap = self._captured
        io = IOSpec(cap.input_names, cap.out_spec, cap.flatten)
        model: nn.Module | None = self.__dict__["model"]
        graph: fx.GraphModule = self.__dict__["graph"]
        return PipelineSpec.build(self.plan, list(self.stages), io=io, model=model,
                                  param_dtype=model_dtype(graph.parameters()))

    def _step_spec(self) -> Any:
        """``pipeline_spec()`` kept for ``train_step``/``eval_step`` while the plan and the stage
        modules stay the same objects, so stages compiled for one step (cached per record)
        serve the next."""
        kept = self.__dict__.get("_runtime_spec")
        if kept is None or kept.plan is not self.plan or len(kept.stages) != len(self.stages) or any(
                kept.stages[i] is not m for i, m in enumerate(self.stages)):
            kept = self.__dict__["_runtime_spec"] = self.pipeline_spec()
        return kept

    def train_step(self, *args: Any, **kwargs: Any) -> Any:
        """One training step of every stage in this process: ``partitioner.runtime.local.train_step``
        on this pipe's record (the plan's schedule and micro-batch count unless given)."""
        from partitioner.runtime.local import train_step  # noqa: PLC0415 - deferred: see above

        return train_step(self._step_spec(), *args, **kwargs)

    def eval_step(self, *args: Any, **kwargs: Any) -> Any:
        """Forward only, under ``torch.no_grad``: ``partitioner.runtime.local.eval_step``."""
        from partitioner.runtime.local import eval_step  # noqa: PLC0415 - deferred: see above

        return eval_step(self._step_spec(), *args, **kwargs)

    def build_stage(self, rank: int, device: torch.device | str | None = None, **kwargs: Any) -> Any:
        """This rank's copy of its stages: ``partitioner.runtime.stage.build_stage`` on this
        pipe's record (``pipeline_spec()``)."""
        from partitioner.runtime.stage import build_stage  # noqa: PLC0415 - deferred: see above

        return build_stage(self.pipeline_spec(), rank, device, **kwargs)

    def export_onnx(self, directory: str, *args: Any, **kwargs: Any) -> list[str]:
        return export_onnx(self, directory, *args, **kwargs)
