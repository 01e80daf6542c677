"""Per-rank checkpoints keyed by the model's FQNs, so any plan can read any save.

Loading (``RankStage.load_checkpoint``) reads only this rank's keys, each once:

* a ``.safetensors`` file, or a directory holding ``model.safetensors``;
* a Hugging Face sharded directory: ``model.safetensors.index.json`` maps keys to shards;
  only the shards that hold this rank's keys are opened;
* a ``torch.distributed.checkpoint`` directory (``.metadata`` + ``*.distcp``), as
  ``save_checkpoint`` writes: keys ``model.<FQN>`` (plain ``<FQN>`` is accepted too) and,
  for the optimizer, ``optim.state.<FQN>.<field>`` and ``optim.param_groups.<FQN>``.

A tied tensor is read from whichever of its names the checkpoint holds (Hugging Face
stores ``lm_head.weight`` only as ``transformer.wte.weight``). A key that is missing or
has another shape is an error naming the key and the file, before anything is copied.
Non-persistent buffers are never read: they are recomputed (see ``materialize``).

Saving (``RankStage.save_checkpoint``) is collective: every rank writes its tensors with
``torch.distributed.checkpoint`` (tensors held by several ranks — tied weights, data
parallel replicas — are written once) into ``PATH.partial``; when all have written, rank 0
moves the previous checkpoint to ``PATH.old``, renames ``PATH.partial`` to ``PATH`` and
deletes ``PATH.old``. An interrupted save leaves ``PATH`` as it was (a crash between the
two renames, a window of microseconds, leaves it at ``PATH.old``; loading says so).
Optimizer state is keyed by parameter FQN, with each parameter's group hyperparameters
beside it, so a plan with other ranks rebuilds it for its own optimizer.
With data parallelism replica 0's pipeline writes; under ZeRO-1 (``stage.optimizer()`` is a
``ZeroRedundancyOptimizer`` over ``stage.dp_group``) the replicas' shards are first gathered
on replica 0 (``consolidate_state_dict``, collective over the replicas) and written whole,
recorded as the class it wraps (``AdamW``): the checkpoint is the same as an unsharded run's,
so either kind of optimizer, under any plan, loads either. On loading, a
``ZeroRedundancyOptimizer`` reads only its own shard. An optimizer of another class than the
saved one, or a ``ZeroRedundancyOptimizer`` over another group than ``stage.dp_group``, is
refused before anything is read.
``PATH`` must be on a file system every rank sees.

Mixed precision (``runtime.precision``): a trainable parameter is saved and loaded as its
fp32 master (``stage.unique_tensors()`` gives the master), so a mixed run's checkpoint is
the fp32 model's state and loads into any precision and layout; after loading, the
low-precision copies are refreshed from the masters. A ``MixedPrecisionOptimizer``'s state
is the optimizer it wraps (over the masters), saved under that optimizer's class; its loss
scale is not saved (a resumed fp16 run starts from the initial scale). Under ZeRO-1 each
replica holds the masters of its shard only: replica 0 gathers them all while it writes
(``RankStage.full_masters``), and on loading a replica reads the fp32 values into the
masters it holds and into the low-precision weights of the others.

Sharded stages: FSDP2 over the replicas (``zero=3``, ``runtime.fsdp``), tensor parallelism
(``mesh.tp`` > 1, ``runtime.tensor_parallel``), or both (a parameter a ``DTensor`` on a 2-D
mesh). Their parameters, and the optimizer state shaped like them (AdamW's moments), are
``DTensor``s, and a checkpoint is written and read by placement, never by layout: on saving,
every rank of the job writes in one DCP save over the default group (no replica holds the
whole state, so replica 0 cannot write for the others): DCP stores each DTensor's local
shard under the whole tensor's key and offsets, and what several ranks hold (a
``Replicate`` placement, a plain tensor, a tied copy) once. The keys are those of an
unsharded save, so the checkpoint is the same whole model for every reader: a sharded plan
reads an unsharded save and the other way round, under any cuts. On loading, a DTensor
parameter is given to DCP as it is (DCP reads the part of the saved chunks its local shard
covers: resharding is DCP's); optimizer state of a DTensor parameter is allocated like the
parameter (``empty_like``) when it has its shape, as a ``Replicate`` DTensor of its own
shape when the parameter is replicated, as a plain tensor when it is a scalar (``step``);
other state (Adafactor's factored moments on a sharded matrix) has no sharding to read it
into and is refused before anything is read. A ``Partial`` placement (a pending sum, not
a shard) is refused on saving and loading; a refusal to save on one rank is raised on every
rank (one all-reduce) before anything is written. ZeRO-1 is not combined with DTensor stages.
A ``.safetensors`` / Hugging Face tensor is read whole into one temporary and this rank
keeps its slice (``distribute_tensor(..., src_data_rank=None)``: DTensor's own slicing, no
communication). Loading stays per rank, with no collective.

Why not ``torch.distributed.checkpoint.state_dict`` (``get_model_state_dict`` /
``get_optimizer_state_dict``): a rank holds several stage modules whose parameters carry the
model's FQNs, a tied weight under two names, mixed-precision masters in place of the
parameters, and ZeRO-1 shards; those functions take one module and would prefix the
modules' names. For FSDP2 and DTensor, their sharded state dict (``full_state_dict=False``)
is the DTensors as they are, which is what the FQN keying here hands DCP, so nothing is
gathered by hand.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import warnings
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from partitioner.runtime.errors import PipelineRuntimeError
from partitioner.runtime.precision import MixedPrecisionOptimizer, ShardOptimizer

if TYPE_CHECKING:
    from partitioner.runtime.stage import RankStage

__all__ = ["load_checkpoint", "save_checkpoint", "checkpoint_format"]

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def checkpoint_format(path: str) -> str:
    """"safetensors", "hf-sharded" or "dcp"; an error saying what was expected otherwise."""
    if os.path.isfile(path):
        if path.endswith(".safetensors"):
            return "safetensors"
        if os.path.basename(path) == INDEX:
            return "hf-sharded"
    elif os.path.isdir(path):
        if os.path.isfile(os.path.join(path, ".metadata")):
            return "dcp"
        if os.path.isfile(os.path.join(path, INDEX)):
            return "hf-sharded"
        if os.path.isfile(os.path.join(path, SINGLE)):
            return "safetensors"
    elif os.path.isdir(path + ".old"):
        raise PipelineRuntimeError(
            f"no checkpoint at {path}, but {path}.old exists: a save was interrupted while replacing it; "
            f"the previous checkpoint is intact there: rename {path}.old to {path}")
    else:
        raise PipelineRuntimeError(f"no checkpoint at {path}: no such file or directory")
    raise PipelineRuntimeError(
        f"{path} is not a checkpoint this runtime reads: expected a .safetensors file, a directory with "
        f"{SINGLE} or {INDEX} (Hugging Face save_pretrained), or a torch.distributed.checkpoint directory "
        "(with .metadata)")


def _canonical_names(stage: RankStage) -> dict[int, str]:
    """id(parameter) -> the name its optimizer state is stored under: the first of all its
    names in the model (the same under every plan), else the first of them by name."""
    names = stage.spec.names
    order: dict[str, int] = {}
    if names is not None:
        for k, n in enumerate(names.parameters):
            order.setdefault(n, k)
    here: dict[int, list[str]] = {}
    for n, p in stage.named_parameters(remove_duplicate=False):
        here.setdefault(id(p), []).append(n)
    for p, master in stage._pairs:  # a mixed-precision optimizer holds the fp32 masters
        here[id(master)] = here[id(p)]
    return {i: min(stage.candidates(names), key=lambda n: (order.get(n, len(order)), n)) for i, names in here.items()}


# ----------------------------------------------------------------------------- loading


def _unwrap(optimizer: torch.optim.Optimizer | None) -> torch.optim.Optimizer | None:
    """The optimizer whose state is saved: a ``MixedPrecisionOptimizer``'s is the one it wraps."""
    return optimizer.optimizer if isinstance(optimizer, MixedPrecisionOptimizer) else optimizer


def load_checkpoint(stage: RankStage, path: str, optimizer: torch.optim.Optimizer | None = None) -> list[str]:
    files = _load_checkpoint(stage, path, _unwrap(optimizer))
    stage.sync_masters()
    return files


def _load_checkpoint(stage: RankStage, path: str, optimizer: torch.optim.Optimizer | None) -> list[str]:
    path = os.fspath(path)
    fmt = checkpoint_format(path)
    if fmt == "dcp":
        files = _load_dcp(stage, path, optimizer)
    else:
        if optimizer is not None:
            raise PipelineRuntimeError(
                f"{path} is a safetensors checkpoint: it holds weights only, no optimizer state; load the "
                "weights without optimizer=..., or load a directory written by stage.save_checkpoint")
        files = _load_safetensors(stage, path, fmt)
    return files


def _missing_error(stage: RankStage, missing: list[tuple[list[str], str]], where: str) -> PipelineRuntimeError:
    first = missing[0]
    alias = [a for a in stage.candidates(first[0]) if a != first[0][0]]
    also = f" (nor under its tied names {alias})" if alias else ""
    more = f"; {len(missing) - 1} more missing: {[m[0][0] for m in missing[1:6]]}" if len(missing) > 1 else ""
    return PipelineRuntimeError(
        f"rank {stage.rank}: key {first[0][0]!r} is not in {where}{also}{more}: the checkpoint is of another "
        "model (or another version of its code); rename the keys or load with the model it was saved from")


def _shape_error(stage: RankStage, key: str, got: tuple[int, ...], want: tuple[int, ...], file: str) -> PipelineRuntimeError:
    return PipelineRuntimeError(
        f"rank {stage.rank}: key {key!r} in {file} has shape {tuple(got)}, the model's is {tuple(want)}: "
        "the checkpoint was saved from another configuration of the model")


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def safetensors_header(file: str) -> tuple[dict[str, Any], int]:
    """The header of a .safetensors file (name -> dtype, shape, data_offsets) and where
    its data starts. Reading it touches only the first bytes of the file."""
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise PipelineRuntimeError(f"{file} is not a safetensors file (shorter than its header)")
        n = int.from_bytes(raw, "little")
        if n > 100_000_000:
            raise PipelineRuntimeError(f"{file} is not a safetensors file (header length {n})")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def _read_into(f: Any, start: int, entry: dict[str, Any], dst: torch.Tensor, key: str, file: str) -> None:
    """Read one tensor's bytes straight into ``dst`` when it is a contiguous CPU tensor of
    the same dtype (no mmap, no temporary: memory grows by the model's tensors only),
    else through one temporary of that tensor's size."""
    dtype = _DTYPES.get(entry["dtype"])
    if dtype is None:
        raise PipelineRuntimeError(f"key {key!r} in {file} has dtype {entry['dtype']}, which this reader does not know")
    begin, end = entry["data_offsets"]
    f.seek(start + begin)
    if dst.device.type == "cpu" and dst.is_contiguous() and dst.dtype == dtype:
        view = memoryview((ctypes.c_char * (end - begin)).from_address(dst.data_ptr())).cast("B")
        if f.readinto(view) != end - begin:
            raise PipelineRuntimeError(f"{file} ends inside key {key!r}: the file is truncated")
        return
    data = bytearray(end - begin)
    if f.readinto(data) != end - begin:
        raise PipelineRuntimeError(f"{file} ends inside key {key!r}: the file is truncated")
    src = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
    dst.copy_(src.reshape(dst.shape))


def _load_safetensors(stage: RankStage, path: str, fmt: str) -> list[str]:
    if fmt == "hf-sharded":
        index = path if os.path.isfile(path) else os.path.join(path, INDEX)
        root = os.path.dirname(index)
        with open(index) as f:
            weight_map: dict[str, str] = json.load(f)["weight_map"]
        where = {k: os.path.join(root, v) for k, v in weight_map.items()}
        described = index
        headers: dict[str, tuple[dict[str, Any], int]] = {}
    else:
        file = path if os.path.isfile(path) else os.path.join(path, SINGLE)
        headers = {file: safetensors_header(file)}
        where = {k: file for k in headers[file][0]}
        described = file
    todo: dict[str, list[tuple[str, torch.Tensor, list[str]]]] = {}
    missing = []
    for names, t in stage.unique_tensors():
        key = next((c for c in stage.candidates(names) if c in where), None)
        if key is None:
            missing.append((names, described))
            continue
        todo.setdefault(where[key], []).append((key, t, names))
    if missing:
        raise _missing_error(stage, missing, described)
    for file, items in todo.items():  # every key and shape checked before anything is read
        if file not in headers:
            if not os.path.isfile(file):
                raise PipelineRuntimeError(f"rank {stage.rank}: {described} names shard {file}, which does not exist")
            headers[file] = safetensors_header(file)
        for key, t, _ in items:
            entry = headers[file][0].get(key)
            if entry is None:
                raise PipelineRuntimeError(f"rank {stage.rank}: key {key!r} is not in {file}, the shard {described} "
                                           "names for it")
            if tuple(entry["shape"]) != tuple(t.shape):
                raise _shape_error(stage, key, tuple(entry["shape"]), tuple(t.shape), file)
    with torch.no_grad():
        for file in sorted(todo):
            start = headers[file][1]
            with open(file, "rb", buffering=0) as f:
                for key, t, names in sorted(todo[file], key=lambda it: headers[file][0][it[0]]["data_offsets"][0]):
                    if _is_dtensor(t):
                        _read_into_shard(f, start, headers[file][0][key], t, key, file)
                    else:
                        _read_into(f, start, headers[file][0][key], t, key, file)
                    stage.uninitialized.difference_update(names)
    return sorted(todo)


def _is_dtensor(t: Any) -> bool:
    if not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor  # noqa: PLC0415 - torch.distributed.* loads where it is used (a torch build may lack distributed)

    return isinstance(t, DTensor)


def _read_into_shard(f: Any, start: int, entry: dict[str, Any], dst: Any, key: str, file: str) -> None:
    """A sharded (``DTensor``) parameter or buffer: the whole tensor is read into one CPU
    temporary, and this rank keeps the part its placements give it. The slicing is DTensor's
    own (``distribute_tensor`` with ``src_data_rank=None``: every rank slices the full tensor
    it holds, no communication), so any placements DTensor knows (``Shard``, ``Replicate``,
    FSDP's strided shards on a 2-D mesh) are cut as DTensor cuts them."""
    from torch.distributed.tensor import distribute_tensor  # noqa: PLC0415 - torch.distributed.* loads where it is used (a torch build may lack distributed)

    _refuse_partial(dst, key)
    full = torch.empty(tuple(dst.shape), dtype=dst.dtype)
    _read_into(f, start, entry, full, key, file)
    local = distribute_tensor(full, dst.device_mesh, dst.placements, src_data_rank=None).to_local()
    dst.to_local().copy_(local)


def _refuse_partial(t: Any, key: str) -> None:
    """A ``Partial`` placement holds an addend of the value, not a part of it: written as a
    shard (or read into as one) the checkpoint would be silently wrong."""
    if any(p.is_partial() for p in t.placements):
        raise PipelineRuntimeError(
            f"{key!r} is a DTensor with placements {tuple(t.placements)}: a Partial placement holds a pending sum, "
            "not a shard of the value; redistribute it to Shard/Replicate (e.g. after the step's reduction) before "
            "saving or loading a checkpoint")


def _dcp_reader(path: str) -> tuple[Any, dict[str, Any]]:
    from torch.distributed.checkpoint import FileSystemReader  # noqa: PLC0415 - torch.distributed.* loads where it is used (a torch build may lack distributed)

    reader = FileSystemReader(path)
    return reader, dict(reader.read_metadata().state_dict_metadata)


def _load_dcp(stage: RankStage, path: str, optimizer: torch.optim.Optimizer | None) -> list[str]:
    import torch.distributed.checkpoint as dcp  # noqa: PLC0415 - torch.distributed.* loads where it is used (a torch build may lack distributed)
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata  # noqa: PLC0415 - torch.distributed.* loads where it is used (a torch build may lack distributed)

    reader, meta = _dcp_reader(path)
    dest: dict[str, Any] = {}
    missing = []
    loaded_names: list[str] = []
    for names, t in stage.unique_tensors():
        key = next((k for c in stage.candidates(names) for k in (f"model.{c}", c) if k in meta), None)
        if key is None:
            missing.append((names, path))
            continue
        m = meta[key]
        if not isinstance(m, TensorStorageMetadata):
            raise PipelineRuntimeError(f"rank {stage.rank}: key {key!r} in {path} is not a tensor")
        if tuple(m.size) != tuple(t.shape):  # a DTensor's shape is the whole tensor's
            raise _shape_error(stage, key, tuple(m.size), tuple(t.shape), path)
        if _is_dtensor(t):  # DCP reads into its local shard the part of the saved chunks it covers
            _refuse_partial(t, key)
        dest[key] = t
        loaded_names += names
    if missing:
        raise _missing_error(stage, missing, path)
    opt_dest, rebuild = _optimizer_dest(stage, optimizer, meta, path) if optimizer is not None else ({}, None)
    dest.update(opt_dest)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        dcp.load(dest, storage_reader=reader, no_dist=True)  # each rank reads its own keys: no collective
    stage.uninitialized.difference_update(loaded_names)
    if optimizer is not None and rebuild is not None:
        optimizer.load_state_dict(rebuild(dest))
    return [path]


def _optimizer_dest(stage: RankStage, optimizer: torch.optim.Optimizer, meta: dict[str, Any],
                    path: str) -> tuple[dict[str, Any], Any]:
    """The DCP keys ``optimizer``'s state is read from (tensors allocated for DCP to fill)
    and ``rebuild(loaded)``, which makes the state dict ``optimizer.load_state_dict`` takes
    (indices in ``optimizer.param_groups`` order). Everything that can be refused (class,
    missing keys, parameter groups) is refused here, before anything is read into the
    model: the small entries (class, hyperparameters) are read first. A ZeroRedundancyOptimizer takes
    the same consolidated state dict and keeps its own shard: only that shard's tensors
    are read."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata  # noqa: PLC0415 - torch.distributed.* loads where it is used (a torch build may lack distributed)

    if "optim.class" not in meta:
        raise PipelineRuntimeError(f"{path} holds no optimizer state (it was saved without optimizer=...)")
    zero = _as_zero(optimizer)
    if zero is not None:
        _check_zero(stage, zero, "load its state")
    want_class = _class_name(optimizer)
    saved_class = _read_small(path, ["optim.class"])["optim.class"]
    if saved_class != want_class:
        raise PipelineRuntimeError(
            f"rank {stage.global_rank}: {path} holds {saved_class} state; this optimizer is {want_class}"
            + (" (the ZeroRedundancyOptimizer's wrapped class)" if zero is not None else "")
            + f": build an optimizer of class {saved_class}, or load without optimizer=... (weights only) and start its state afresh")
    # ZeRO-1: this replica's shard (ZeroRedundancyOptimizer.load_state_dict drops the rest)
    owned = None if zero is None else {id(p) for p, r in zero._param_to_rank.items() if r == zero.rank}
    canon = _canonical_names(stage)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    names = []
    for p in params:
        n = canon.get(id(p))
        if n is None:
            raise PipelineRuntimeError(f"rank {stage.rank}: the optimizer holds a tensor of shape {tuple(p.shape)} "
                                       "that is not one of this stage's parameters (build it over stage.parameters())")
        names.append(n)
    dest: dict[str, Any] = {}
    fields: list[list[str]] = []
    for n in names:
        gkey = f"optim.param_groups.{n}"
        if gkey not in meta:
            raise PipelineRuntimeError(f"rank {stage.rank}: key {gkey!r} is not in {path}: the checkpoint has no "
                                       f"optimizer state for parameter {n!r}")
    hyper = _read_small(path, [f"optim.param_groups.{n}" for n in names])
    groups, i = [], 0
    for g in optimizer.param_groups:
        idx = list(range(i, i + len(g["params"])))
        i += len(g["params"])
        hypers = [json.loads(hyper[f"optim.param_groups.{names[j]}"]) for j in idx]
        if any(h != hypers[0] for h in hypers):
            bad = next(names[j] for j, h in zip(idx, hypers) if h != hypers[0])
            raise PipelineRuntimeError(
                f"{path} gives {names[idx[0]]!r} and {bad!r} different hyperparameters, but this optimizer "
                "puts them in one parameter group: group the parameters as the saved run did")
        h = hypers[0] if hypers else {}
        restored = {k: (tuple(v) if isinstance(g.get(k), tuple) and isinstance(v, list) else v)
                    for k, v in h.items()}
        groups.append({**{k: v for k, v in g.items() if k != "params"}, **restored, "params": idx})
    for n, p in zip(names, params):
        prefix = f"optim.state.{n}."
        mine = [k for k in meta if k.startswith(prefix) and "." not in k[len(prefix):]]
        if owned is not None and id(p) not in owned:
            mine = []  # another replica's shard
        fields.append([k[len(prefix):] for k in mine])
        for k in mine:
            m = meta[k]
            if not isinstance(m, TensorStorageMetadata):
                dest[k] = ""
            elif not _is_dtensor(p) or len(m.size) == 0:
                # an unsharded parameter's state, or a scalar (``step``): load_state_dict moves it
                dest[k] = torch.empty(tuple(m.size), dtype=m.properties.dtype)
            elif tuple(m.size) == tuple(p.shape):
                # state shaped like its sharded parameter (AdamW's moments) is sharded like it:
                # DCP fills this rank's shard from whatever layout wrote it
                dest[k] = torch.empty_like(p.detach(), dtype=m.properties.dtype)
            elif all(pl.is_replicate() for pl in p.placements):
                # every rank holds the whole of a replicated parameter: its state of any shape too
                from torch.distributed.tensor import empty as dtensor_empty  # noqa: PLC0415 - torch.distributed.* loads where it is used (a torch build may lack distributed)

                dest[k] = dtensor_empty(tuple(m.size), dtype=m.properties.dtype, device_mesh=p.device_mesh,
                                        placements=p.placements)
            else:
                raise PipelineRuntimeError(
                    f"rank {stage.global_rank}: {path} holds optimizer state {k!r} of shape {tuple(m.size)}, not its "
                    f"parameter's {tuple(p.shape)}, and {n!r} is sharded here (a DTensor with placements "
                    f"{tuple(p.placements)}): state of another shape than its parameter has no known sharding (e.g. "
                    "Adafactor's factored moments); load it on a layout without sharded stages (zero 0 or 1, tp 1), "
                    "or load without optimizer=... and start the optimizer state afresh")

    def rebuild(loaded: dict[str, Any]) -> dict[str, Any]:
        state = {i: {f: loaded[f"optim.state.{n}.{f}"] for f in fs}
                 for i, (n, fs) in enumerate(zip(names, fields)) if fs}
        return {"state": state, "param_groups": groups}

    return dest, rebuild


# ----------------------------------------------------------------------------- saving


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return v.item()
    raise TypeError(f"cannot store optimizer hyperparameter {v!r}")


def save_checkpoint(stage: RankStage, path: str, optimizer: torch.optim.Optimizer | None = None) -> None:
    stage.check_masters()  # the masters are what is saved: refuse stale ones (collective)
    optimizer = _unwrap(optimizer)
    zero = _as_zero(optimizer)
    if zero is not None:
        _check_zero(stage, zero, "save its state")
    if _sharded(stage):
        # Sharded stages (FSDP2 over the replicas, tensor parallelism, both): every rank of the
        # job holds a part no other rank holds, so every rank writes, in one DCP save over the
        # whole job; DCP writes each DTensor's local shard under the whole tensor's key and
        # offsets and writes what several ranks hold (replicated DTensors, plain tensors) once.
        _agree(stage, _unsaveable(stage, optimizer, zero))
        _save(stage, path, optimizer, group=None)
        return
    if stage.dp_group is None:
        _save(stage, path, optimizer)
        return
    # Replicas hold the same weights and optimizer state: replica 0's pipeline writes them.
    # Under ZeRO-1 each replica holds a shard of the state: they are gathered on replica 0
    # first (a collective over the replicas of this pipeline rank), which writes the whole
    # state as an unsharded optimizer would.
    if zero is not None:
        # ``to`` is a rank in the optimizer's group (compared with ``dist.get_rank(group)``)
        zero.consolidate_state_dict(to=dist.get_group_rank(zero.process_group,
                                                            stage.plan.mesh.rank(0, stage.pp_rank)))
    try:
        with stage.full_masters():  # ZeRO-1 mixed precision: replica 0 gathers the fp32 masters
            if stage.dp_rank == 0:
                _save(stage, path, optimizer)
    finally:
        if zero is not None:
            zero._all_state_dicts = []  # the gathered copy of the whole state: free it
    dist.barrier()  # the other replicas wait until the checkpoint is complete


def _sharded(stage: RankStage) -> bool:
    """Whether the plan shards the stages' tensors as DTensors: tensor parallelism
    (``mesh.tp`` > 1) or FSDP2 over replicas (``zero=3``), alone or together. Read from the
    plan, so every rank of the job takes the same (collective) path."""
    mesh = stage.plan.mesh
    return mesh.tp > 1 or (mesh.zero == 3 and mesh.dp > 1)


def _unsaveable(stage: RankStage, optimizer: torch.optim.Optimizer | None, zero: Any) -> str | None:
    """Why this rank cannot write its part of a sharded checkpoint, or None."""
    if zero is not None:
        return (f"rank {stage.global_rank}: a ZeroRedundancyOptimizer over sharded (DTensor) stages: its "
                "consolidation gathers plain tensors on replica 0; use the plain optimizer stage.optimizer(...) "
                "builds for this plan (its state is sharded like the parameters)")
    tensors = [(f"model.{names[0]}", t) for names, t in stage.unique_tensors()]
    if optimizer is not None:
        canon = _canonical_names(stage)
        tensors += [(f"optim.state.{canon.get(id(p), '?')}.{k}", v) for p, st in optimizer.state.items()
                    for k, v in st.items()]
    for key, t in tensors:
        if _is_dtensor(t):
            try:
                _refuse_partial(t, key)
            except PipelineRuntimeError as e:
                return f"rank {stage.global_rank}: {e}"
    return None


def _agree(stage: RankStage, problem: str | None) -> None:
    """Collective over the job: raise on every rank when any rank found ``problem`` (a rank
    refusing alone would leave the others waiting in the save's collectives)."""
    flag = torch.tensor([float(problem is not None)], device=stage.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if problem is not None:
        raise PipelineRuntimeError(problem + "; nothing was written")
    if flag.item():
        raise PipelineRuntimeError(f"rank {stage.global_rank}: another rank refused to save its part of the "
                                   "checkpoint (its error says why); nothing was written")


def _as_zero(optimizer: torch.optim.Optimizer | None) -> Any:
    """``optimizer`` if it is a ``ZeroRedundancyOptimizer``, else None."""
    if optimizer is None or not dist.is_available():
        return None
    from torch.distributed.optim import ZeroRedundancyOptimizer  # noqa: PLC0415 - torch.distributed.* loads where it is used (a torch build may lack distributed)

    return optimizer if isinstance(optimizer, ZeroRedundancyOptimizer) else None


def _check_zero(stage: RankStage, zero: Any, doing: str) -> None:
    """A ZeroRedundancyOptimizer must shard over this stage's replicas (``stage.dp_group``):
    only then are the shards, together, the state of this rank's parameters."""
    have = dist.get_process_group_ranks(zero.process_group)
    want = dist.get_process_group_ranks(stage.dp_group) if stage.dp_group is not None else None
    if have != want:
        replicas = f"are ranks {want}" if want is not None else "do not exist: the plan has no data parallelism"
        raise PipelineRuntimeError(
            f"rank {stage.global_rank}: cannot {doing}: the ZeroRedundancyOptimizer shards over ranks {have}, "
            f"but this pipeline rank's replicas (stage.dp_group) {replicas}; the shards would not be this stage's "
            "optimizer state. Build it with stage.optimizer(...) under a zero=1 plan "
            "(ZeroRedundancyOptimizer(..., process_group=stage.dp_group)), or use a plain optimizer")
    if getattr(zero, "_overlap_with_ddp", False):
        raise PipelineRuntimeError(
            f"rank {stage.global_rank}: cannot {doing}: a ZeroRedundancyOptimizer with overlap_with_ddp=True "
            "is not supported (its local optimizer is a functional one); build it with stage.optimizer(...)")


def _class_name(optimizer: torch.optim.Optimizer) -> str:
    """The class recorded with the state: a ZeroRedundancyOptimizer's is the class it wraps,
    so a plain optimizer of that class loads it, and the other way round."""
    zero = _as_zero(optimizer)
    local = zero.optim if zero is not None else optimizer
    return type(local.optimizer if isinstance(local, ShardOptimizer) else local).__qualname__


def _read_small(path: str, keys: list[str]) -> dict[str, str]:
    """The string entries ``keys`` of a DCP checkpoint (class name, hyperparameters)."""
    import torch.distributed.checkpoint as dcp  # noqa: PLC0415 - torch.distributed.* loads where it is used (a torch build may lack distributed)
    from torch.distributed.checkpoint import FileSystemReader  # noqa: PLC0415 - torch.distributed.* loads where it is used (a torch build may lack distributed)

    out: dict[str, Any] = dict.fromkeys(keys, "")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        dcp.load(out, storage_reader=FileSystemReader(path), no_dist=True)
    return out


_STAGE_GROUP: Any = object()  # ``_save``'s default: the stage's pipeline group


def _save(stage: RankStage, path: str, optimizer: torch.optim.Optimizer | None, group: Any = _STAGE_GROUP) -> None:
    """Write into ``PATH.partial``, then replace ``PATH`` (one DCP save over ``group``: the
    stage's pipeline group by default; None is the default group, every rank of the job)."""
    import torch.distributed.checkpoint as dcp  # noqa: PLC0415 - torch.distributed.* loads where it is used (a torch build may lack distributed)
    from torch.distributed.checkpoint.api import CheckpointException  # noqa: PLC0415 - torch.distributed.* loads where it is used (a torch build may lack distributed)

    path = os.fspath(path).rstrip("/")
    state: dict[str, Any] = {}
    for names, t in stage.unique_tensors():
        for n in names:
            state[f"model.{n}"] = t
    if optimizer is not None:
        state.update(_optimizer_state(stage, optimizer))
    distributed = dist.is_available() and dist.is_initialized()
    if group is _STAGE_GROUP:
        group = stage.group
    rank0 = (not distributed) or dist.get_rank(group) == 0
    partial, old = path + ".partial", path + ".old"
    if rank0 and os.path.exists(partial):
        shutil.rmtree(partial)  # an earlier save that was interrupted
    if distributed:
        dist.barrier(group=group)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process")
            dcp.save(state, checkpoint_id=partial, process_group=group, no_dist=not distributed)
    except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
        raise PipelineRuntimeError(f"rank {stage.rank}: saving to {partial} failed ({type(e).__name__}: {e}); "
                                   f"{path} is unchanged") from e
    if distributed:
        dist.barrier(group=group)  # every rank's files are written (DCP wrote .metadata last)
    if rank0:
        if os.path.exists(path):
            os.rename(path, old)
        os.rename(partial, path)
        if os.path.exists(old):
            shutil.rmtree(old)
    if distributed:
        dist.barrier(group=group)


def _optimizer_state(stage: RankStage, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    canon = _canonical_names(stage)
    sd = optimizer.state_dict()  # a ZeroRedundancyOptimizer's: the whole state, consolidated on this replica
    params = [p for g in optimizer.param_groups for p in g["params"]]
    out: dict[str, Any] = {"optim.class": _class_name(optimizer)}
    for g_obj, g in zip(optimizer.param_groups, sd["param_groups"]):
        hyper = json.dumps({k: v for k, v in g.items() if k != "params"}, sort_keys=True, default=_jsonable)
        for idx in g["params"]:
            n = canon.get(id(params[idx]))
            if n is None:
                raise PipelineRuntimeError(f"rank {stage.rank}: the optimizer holds a tensor that is not one of this "
                                           "stage's parameters (build it over stage.parameters())")
            out[f"optim.param_groups.{n}"] = hyper
            for k, v in sd["state"].get(idx, {}).items():
                if v is not None:
                    out[f"optim.state.{n}.{k}"] = v
    return out
