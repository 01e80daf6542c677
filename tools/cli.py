"""``partitioner``: plan, show, diff, run and export pipeline partitions from the shell (and
calibrate a device profile).

Every failure a user can cause prints one line, ``error: ...``, on stderr and exits 2;
``--debug`` shows the traceback instead. ``diff`` exits like diff(1): 0 same, 1 different.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import re
import sys
import warnings
from typing import Iterator, NoReturn, Sequence

# Torch-free modules: --help and the plan-only commands (show, diff A B) never import torch.
from partitioner.cost_models.devices import DEVICES, LINKS
from partitioner.cost_models.errors import PartitionerError
from partitioner.options import OPTIMIZER_STATES, PRECISIONS, RECOMPUTE
from partitioner.schedule import SCHEDULES
from partitioner.tools.loading import ToolError

__all__ = ["main", "build_parser"]

_SCHEDULES = (*SCHEDULES, "auto")  # the registry (partitioner.schedule, torch-free) and the automatic choice
_MODEL_HELP = "model factory: path/to/file.py:factory or package.module:factory, returning (model, example_inputs)"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the usage text is one ``--help`` away)."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see '{self.prog} --help')", file=sys.stderr)
        sys.exit(2)


#: What partition() uses when a flag is not given. The parser's own defaults are None so a
#: command can tell a flag the user typed from one left alone (and refuse the ones it ignores).
PARTITION_DEFAULTS = {"gpus": 4, "virtual_stages": None, "device": "h100-sxm", "link": "nvlink4", "schedule": "1f1b",
                      "microbatches": None, "cut_at": None, "pin": [], "memory_limit": None, "optimizer": "adam",
                      "leaf_module": [], "precision": None, "recompute": "auto", "objective": None,
                      "dp": 1, "zero": 0, "gpus_per_node": None, "inter_link": None}


def _microbatches(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {text!r}") from None


def _zero(text: str) -> int | str:
    if text in ("0", "1", "3", "auto"):
        return text if text == "auto" else int(text)
    raise argparse.ArgumentTypeError(f"expected 0, 1, 3 or 'auto', got {text!r}")


def _partition_options() -> _Parser:
    p = _Parser(add_help=False)
    g = p.add_argument_group("partitioning")
    g.add_argument("--gpus", type=int, default=None, metavar="N",
                   help="GPUs (ranks): data-parallel replicas x pipeline ranks (default: 4)")
    g.add_argument("--dp", type=_microbatches, default=None, metavar="D",
                   help="data-parallel replicas of the pipeline, a divisor of --gpus, or 'auto': the degree with "
                        "the fastest predicted step that fits (prints the candidates) (default: 1)")
    g.add_argument("--zero", type=_zero, default=None, metavar="{0,1,3,auto}",
                   help="1: shard optimizer state over the replicas (ZeRO-1); 3: shard weights, gradients and "
                        "optimizer state inside the stages (FSDP2); auto: choose it with the replicas, tensor "
                        "parallelism, schedule and micro-batches left open, the fastest predicted layout that fits "
                        "(prints the candidates) (default: 0)")
    g.add_argument("--fsdp-shard", type=int, default=None, metavar="S",
                   help="with --zero 3: hybrid sharding (HSDP): shard over groups of S replicas inside a node, "
                        "replicate over the --dp / S groups (default: shard over every replica; --zero auto "
                        "also tries HSDP where the replicas span nodes, listed as 'zero=3 HSDP RxS')")
    g.add_argument("--tp", type=_microbatches, default=None, metavar="T",
                   help="tensor-parallel ranks per pipeline rank (attention and MLP split over the group inside a "
                        "node), or 'auto': the degree with the fastest predicted step (prints the candidates) "
                        "(default: 1)")
    g.add_argument("--sequence-parallel", action="store_true", default=None,
                   help="with --tp: shard the activations between the attention/MLP regions (norms, residuals) on "
                        "the sequence over the TP group (Megatron's sequence parallelism)")
    g.add_argument("--gpus-per-node", type=int, default=None, metavar="G",
                   help="GPUs per node (torchrun's order): ranks on other nodes talk over --inter-link "
                        "(default: all on one node)")
    g.add_argument("--inter-link", default=None,
                   help=f"link between nodes: {', '.join(LINKS)} (default: ib-ndr-400 with --gpus-per-node)")
    g.add_argument("--virtual-stages", type=int, default=None, metavar="V",
                   help="stages per rank; V > 1 needs --schedule interleaved-1f1b (or zbv: V = 2) "
                        "(default: the schedule's: 2 for zbv, else 1)")
    g.add_argument("--device", default=None,
                   help=f"device profile: {', '.join(DEVICES)}, local (measured), or a profile file FILE.json "
                        "('partitioner calibrate' writes one) (default: h100-sxm)")
    g.add_argument("--link", default=None,
                   help=f"link profile: {', '.join(LINKS)} (default: nvlink4)")
    g.add_argument("--schedule", default=None, choices=_SCHEDULES, metavar="NAME",
                   help="pipeline schedule: " + "; ".join(f"{n}: {s.help}" for n, s in SCHEDULES.items())
                   + "; auto: the predicted-fastest that fits memory (see plan --explain) (default: 1f1b)")
    g.add_argument("--microbatches", type=_microbatches, default=None, metavar="M",
                   help="micro-batches per step, or 'auto': the predicted-fastest divisor of the batch that fits "
                        "(default: up to 2 x GPUs, dividing the batch)")
    g.add_argument("--cut-at", default=None, metavar="GLOB",
                   help="cut only between modules matching GLOB, e.g. 'transformer.h.*' (default: anywhere)")
    g.add_argument("--pin", action="append", default=None, metavar="CUT",
                   help="force a cut before this node or module path; repeatable (default: none)")
    g.add_argument("--memory-limit", default=None, metavar="SIZE",
                   help="memory per device, e.g. 40GiB or 80GB (default: the device profile's)")
    g.add_argument("--optimizer", default=None, choices=tuple(OPTIMIZER_STATES),
                   help="optimizer whose state is priced into each stage's memory (default: adam)")
    g.add_argument("--precision", default=None, choices=tuple(PRECISIONS),
                   help="training precision priced into memory: bytes per weight, gradient, master copy and "
                        "optimizer state (default: from the parameters' dtype: bf16/fp16 train mixed, else fp32)")
    g.add_argument("--recompute", default=None, choices=tuple(RECOMPUTE),
                   help="activation recompute the solver may use per stage; auto: only where a stage would "
                        "not fit otherwise (default: auto)")
    g.add_argument("--objective", default=None, choices=("auto", "bottleneck", "step"),
                   help="what the cuts minimise: the slowest stage (bottleneck) or the schedule's simulated "
                        "step time (step); auto (default): bottleneck for 1f1b, step for the other schedules")
    g.add_argument("--leaf-module", action="append", default=None, metavar="PATH",
                   help="trace this submodule (module path, e.g. 'encoder.router') as one opaque node; "
                        "repeatable (default: none)")
    return p


def given_partition_flags(args: argparse.Namespace) -> list[str]:
    """The partitioning flags the user typed (parser defaults are None)."""
    return ["--" + k.replace("_", "-") for k in PARTITION_DEFAULTS if getattr(args, k, None) is not None]


def fill_partition_defaults(args: argparse.Namespace) -> None:
    for key, value in PARTITION_DEFAULTS.items():
        if getattr(args, key, None) is None:
            setattr(args, key, list(value) if isinstance(value, list) else value)


def build_parser() -> argparse.ArgumentParser:
    top = _Parser(add_help=False)
    top.add_argument("--debug", action="store_true",
                     help="show tracebacks and library logs instead of one-line errors (default: off)")
    # The subcommands' --debug must not reset one given before the subcommand: SUPPRESS keeps it.
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks and library logs instead of one-line errors (default: off)")
    part = _partition_options()
    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(prog="partitioner", description=__doc__, formatter_class=fmt, parents=[top])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("plan", parents=[common, part], help="partition a model and write its plan",
                       description="Trace MODEL, solve for balanced stages, print the per-stage table, "
                                   "and write the plan JSON atomically.")
    p.add_argument("model", metavar="MODEL", help=_MODEL_HELP + "; or hf:CONFIG (a Hugging Face causal LM built "
                   "from a config.json, a folder holding one, or a hub model id, on the meta device: no weights)")
    p.add_argument("--seq", type=int, default=None, metavar="S",
                   help="hf: models: tokens per sample (default: 2048, or the model's maximum if smaller)")
    p.add_argument("--batch", type=int, default=None, metavar="B",
                   help="hf: models: samples per step, the global batch (default: 8 per GPU)")
    p.add_argument("--output", "-o", default="plan.json", help="plan file to write (default: %(default)s)")
    p.add_argument("--dot", metavar="FILE", help="also write the segmentation as Graphviz DOT (default: no)")
    p.add_argument("--svg", metavar="FILE", help="also draw the segmentation as SVG (default: no)")
    p.add_argument("--depth", type=int, default=None,
                   help="collapse pictures to module paths of this depth (default: auto, boxes <= 60)")
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing but errors")
    p.add_argument("--explain", action="store_true",
                   help="also print how --schedule auto / --microbatches auto ranked the candidates "
                        "(predicted step of each, and those that did not fit) (default: off)")

    s = sub.add_parser("show", parents=[common], help="print a plan's per-stage table",
                       description="Per-stage nodes, parameter bytes, FLOPs (forward+backward per micro-batch), "
                                   "memory, time, bytes sent and cut labels; predicted step time and bubble; "
                                   "the solver's bound.")
    s.add_argument("plan", metavar="PLAN.json", help="a plan written by 'partitioner plan'")
    s.add_argument("--json", action="store_true", help="print the summary as JSON (stable keys) instead")
    s.add_argument("--timeline", metavar="FILE", help="draw the predicted schedule timeline (.svg or .png)")
    s.add_argument("--trace", metavar="TRACE.json",
                   help="with --timeline: draw a measured Chrome trace instead of the prediction")

    d = sub.add_parser("diff", parents=[common, part], help="compare two plans, or show what the compiler did",
                       description="diff A.json B.json: nodes that moved, per-stage cost changes, cut traffic, "
                                   "cuts that moved.  diff --passes MODEL: what each pass changed.  "
                                   "diff --stages MODEL: original graph vs stages.  Exit 0: no differences, "
                                   "1: differences (for --stages: a node not in exactly one stage), 2: trouble.")
    d.add_argument("inputs", nargs="+", metavar="A B | MODEL", help="two plan files, or MODEL with --passes/--stages")
    mode = d.add_mutually_exclusive_group()
    mode.add_argument("--passes", action="store_true", help="diff the graph pass by pass while partitioning MODEL")
    mode.add_argument("--stages", action="store_true", help="diff MODEL's original graph against its stages")
    d.add_argument("--json", action="store_true", help="print the diff as JSON (stable keys)")
    d.add_argument("--html", metavar="FILE", help="also write a self-contained side-by-side HTML page")

    r = sub.add_parser("run", parents=[common, part], help="train a few steps on the pipeline (gloo on CPU)",
                       description="Spawn one process per rank, train --steps steps on the factory's example "
                                   "inputs with a default loss, print each step's loss.")
    r.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    r.add_argument("--plan", metavar="PLAN.json",
                   help="run this saved plan on MODEL instead of partitioning again (default: partition now)")
    r.add_argument("--steps", type=int, default=3, help="training steps (default: %(default)s)")
    r.add_argument("--lr", type=float, default=1e-3, help="SGD learning rate (default: %(default)s)")
    r.add_argument("--trace", metavar="FILE", help="write a Chrome trace of what ran (default: no)")
    r.add_argument("--compile", action="store_true",
                   help="run each stage through torch.compile (inductor; not with a split-backward schedule "
                        "such as zb-h1, zbv)")
    r.add_argument("--clip", type=float, metavar="MAX_NORM",
                   help="clip the gradient norm over every rank to MAX_NORM each step and print it (default: no)")
    r.add_argument("--eval-every", type=int, default=0, metavar="K",
                   help="every K steps, a forward-only evaluation step on the same batch; print its loss "
                        "(default: 0, never)")
    r.add_argument("--normalize", choices=["mean", "tokens"], default="mean",
                   help="'mean': each micro-batch's mean loss / micro-batches; 'tokens': the next-token loss "
                        "summed and divided by the step's token count (models mapping token ids to logits); "
                        "default: %(default)s")

    c = sub.add_parser("calibrate", parents=[common], help="measure this machine's efficiency curves into a profile",
                       description="Time matmuls, flash attention, memory bandwidth, the kernel launch floor and an "
                                   "AdamW step on --device, fit the cost model's efficiency curves to them, and write "
                                   "the device profile; then 'partitioner plan --device FILE' prices on it.")
    c.add_argument("--out", required=True, metavar="FILE", help="profile JSON to write")
    c.add_argument("--device", default="cuda", metavar="cuda|cpu",
                   help="the device to measure: cuda, cuda:N or cpu (default: %(default)s)")
    c.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                   help="time spent measuring, about (default: 180 on a GPU, 5 on the CPU)")
    c.add_argument("--base", default=None, metavar="NAME",
                   help=f"datasheet profile the measured rates are fractions of: {', '.join(DEVICES)} "
                        "(default: the built-in profile named in the GPU's name; cpu on the CPU)")

    e = sub.add_parser("export", parents=[common, part], help="write each stage's Python source (and ONNX)",
                       description="Write DIR/stage{i}.py for each stage. SOURCE is MODEL (partitioned now) or a "
                                   "plan file, re-applied to --model without solving again.")
    e.add_argument("source", metavar="MODEL|PLAN.json", help="a model factory, or a plan file (then --model is needed)")
    e.add_argument("--model", dest="model_spec", metavar="MODEL", help="the model a plan file is applied to")
    e.add_argument("--out", required=True, metavar="DIR", help="directory to write into (created if missing)")
    e.add_argument("--onnx", action="store_true", help="also export each stage as ONNX into DIR")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    from partitioner.tools import commands  # noqa: PLC0415 - import cycle (commands imports this module's flag tables) and CLI start-up

    handler = {"plan": commands.cmd_plan, "show": commands.cmd_show, "diff": commands.cmd_diff,
               "run": commands.cmd_run, "export": commands.cmd_export,
               "calibrate": commands.cmd_calibrate}[args.command]
    try:
        with _library_noise(debug):
            return handler(args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2


@contextlib.contextmanager
def _library_noise(debug: bool) -> Iterator[None]:
    """torch's log lines and Python warnings stay out of the way unless --debug asks for them.

    What the planner itself warns about is recorded in the plan's notes, which the table prints.
    """
    if debug:
        yield
        return

    logging.disable(logging.CRITICAL)  # torch's handlers hold the real stderr: disable, not redirect
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)


#: Python argument names in the library's messages → the flag that sets them here.
_FLAG_NAMES = [
    (r"n_gpus(?:=(\d+))?", "--gpus"), (r"virtual_stages(?:=(\d+))?", "--virtual-stages"),
    (r"n_microbatches(?:=(\d+))?", "--microbatches"), (r"leaf_modules=\[\.\.\.\]", "--leaf-module PATH"),
    (r"leaf_modules=\[\w+\] \(or \['([^']+)'\]\)", "--leaf-module"),  # a named submodule: its path
    (r"leaf_modules", "--leaf-module"), (r"cut_at(?:=\.\.\.)?", "--cut-at"), (r"pinned_cuts", "--pin"),
    (r"memory_limit", "--memory-limit"), (r"schedule='([\w-]+)'", "--schedule"),
    (r"optimizer=", "--optimizer"), (r"concrete_args", "concrete_args (Python API only)"),
    (r"route='export'", "capture_route='export' (Python API only)"),
    (r"data_parallel(?:=(\d+|'auto'))?", "--dp"), (r"gpus_per_node", "--gpus-per-node"),
    (r"inter_link", "--inter-link"), (r"zero(?:=(\d|'auto'))?", "--zero"),
    (r"fsdp_shard(?:=(\d+))?", "--fsdp-shard"), (r"tensor_parallel(?:=(\d+|'auto'))?", "--tp"), (r"sequence_parallel(?:=\w+)?", "--sequence-parallel"),
]


def flag_names(text: str) -> str:
    """``n_gpus`` → ``--gpus`` etc. in a library message; JSON paths ($.options.n_gpus) stay."""
    for pattern, flag in _FLAG_NAMES:
        def sub(m: re.Match[str], flag: str = flag) -> str:
            value = m.group(1) if m.groups() else None
            return f"{flag} {value}" if value else flag
        text = re.sub(r"(?<![.\w$])" + pattern + r"(?!\w)", sub, text)
    return text


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    # Our own and the partitioner's errors (PartitionerError: input errors are ValueErrors, a failed
    # step a RuntimeError) are written for users; anything else is named, so a bug report says what broke.
    if isinstance(e, (ToolError, OSError, ValueError, PartitionerError)):
        return text
    return f"{type(e).__name__}: {text}"


if __name__ == "__main__":
    sys.exit(main())
