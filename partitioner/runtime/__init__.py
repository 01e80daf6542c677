"""Run a plan's stages for real: one interpreter over the schedule's action lists, in
one process (``train_step``) or one process per rank over torch.distributed
(``build_stage`` + ``runner().step``), with ``spawn`` to launch ranks locally. Every
entry point is built from a ``PipelineSpec`` (``runtime.spec``: the plan, the stage
modules, the input/output mapping), never from the compiler's ``Pipe``; with no schedule
given they run the plan's.
A model on the meta device is materialised per rank (``build_stage``, ``meta_params``)
and loaded per rank (``RankStage.load_checkpoint`` / ``save_checkpoint``)."""

from partitioner.runtime.errors import PipelineRuntimeError
from partitioner.runtime.launch import spawn
from partitioner.runtime.local import eval_step, train_step
from partitioner.runtime.materialize import meta_params
from partitioner.runtime.spec import IOSpec, PipelineSpec
from partitioner.runtime.stage import RankStage, Runner, build_stage

__all__ = ["IOSpec", "PipelineRuntimeError", "PipelineSpec", "RankStage", "Runner", "build_stage", "eval_step",
           "meta_params", "spawn", "train_step"]
