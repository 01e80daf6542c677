"""Tensor parallelism inside pipeline stages (``runtime.tensor_parallel``), on gloo: a tiny
Llama (export route) and a plain attention + MLP model (fx route) as 2 pipeline stages x 2
tensor-parallel ranks train under 1F1B (and zb-h1) like one process on the whole batch (outputs, losses, gradient
norms with clipping, parameters after the steps), DTensor issues one all-reduce per
row-parallel linear in forward (``CommDebugMode``), and a pattern that tp does not divide
is refused naming the node."""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from partitioner import partition
from partitioner.plan import load_plan
from partitioner.runtime.errors import PipelineRuntimeError
from partitioner.runtime.launch import spawn
from partitioner.runtime.tensor_parallel import full_state, shard_plan, with_tensor_parallel
from tests.runtime.helpers import sgd_reference

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TIMEOUT_S = 120.0
LR, STEPS, M, MAX_NORM = 0.1, 3, 2, 1.0
# float32: a row-parallel linear sums two half dot products where one process sums one,
# so values differ from the reference by rounding only.
RTOL, ATOL = 1e-5, 1e-6


class Block(nn.Module):
    """Pre-norm attention (matmul + softmax, 4 heads) and a GELU MLP, as plain modules."""

    def __init__(self, d: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        h = self.norm1(x)
        q, k, v = (lin(h).view(b, s, self.heads, d // self.heads).transpose(1, 2) for lin in (self.q, self.k, self.v))
        att = torch.softmax(q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5, dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, s, d)
        x = x + self.o(y)
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class Net(nn.Module):
    def __init__(self, n_blocks: int = 2) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(Block() for _ in range(n_blocks)))
        self.head = nn.Linear(32, 8)  # its output leaves the stage: kept whole

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, vocab_size=64, max_position_embeddings=64, use_cache=False,
                      attn_implementation="sdpa", bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg)


def _llama_loss(out: Any, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.logits.flatten(0, 1), y.flatten())


def _data(name: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    if name == "llama":
        return {"input_ids": torch.randint(0, 64, (4, 8), generator=g)}, torch.randint(0, 64, (4, 8), generator=g)
    return {"x": torch.randn(4, 8, 32, generator=g)}, torch.randn(4, 8, 8, generator=g)


LOSS = {"llama": _llama_loss, "net": F.mse_loss}


@functools.cache
def _built(name: str, n_gpus: int = 2) -> tuple[nn.Module, Any, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = _llama() if name == "llama" else Net()
    inputs, _ = _data(name)
    cut = "model.layers.1" if name == "llama" else "blocks.1"
    pipe = partition(model, n_gpus, inputs, device="cpu", link="loopback",
                     pinned_cuts=[cut] if n_gpus > 1 else [], n_microbatches=M)
    return model, pipe, copy.deepcopy(model.state_dict())


def _reference(name: str) -> tuple[list[float], list[float], dict[str, torch.Tensor]]:
    model, _, init = _built(name)
    inputs, y = _data(name)
    ref = sgd_reference(model, inputs, y, LOSS[name], steps=STEPS, lr=LR, max_norm=MAX_NORM, init=init,
                        remove_duplicate=True)
    return ref.losses, ref.norms, ref.params


class _NoModuleTracking:
    """What CommDebugMode reads of its module tracker, for one module ("Global")."""

    name, is_bw, activation_checkpointing = "Global", False, False
    module_parents_dict: dict[str, set[str]] = {"Global": set()}

    def __enter__(self) -> _NoModuleTracking:
        return self

    def __exit__(self, *args: Any) -> None:
        return None


def _train(rank: int, world: int, name: str, pipe: Any, schedule: str = "1f1b") -> dict[str, Any]:
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.debug import CommDebugMode

    inputs, y = _data(name)
    stage = pipe.build_stage(rank, "cpu")
    opt = torch.optim.SGD(stage.parameters(), lr=LR)
    runner = stage.runner(schedule, loss_fn=LOSS[name])
    kw = inputs if stage.is_first else {}
    target = y if stage.is_last else None
    # forward only (every micro-batch of this rank's stage): the collectives DTensor chose.
    # CommDebugMode's per-module tracker fails when a module runs twice in one context (torch
    # 2.13: each call adds one more post-hook popping its parent stack -> IndexError), and the
    # stages run once per micro-batch; the global op counts need no module tracking.
    comm = CommDebugMode()
    comm.advanced_module_tracker = _NoModuleTracking()  # type: ignore[assignment]
    with comm:
        _, outputs = runner.eval_step(**kw, target=target, return_outputs=True)  # type: ignore[misc]
    if outputs is not None:
        outputs = outputs.logits if name == "llama" else outputs
    forward = {str(k): v for k, v in comm.get_comm_counts().items()}
    losses, norms = [], []
    step = {}
    for i in range(STEPS):
        stage.zero_grad()
        comm = CommDebugMode()
        comm.advanced_module_tracker = _NoModuleTracking()  # type: ignore[assignment]
        with comm if i == 0 else contextlib.nullcontext():
            loss = runner.step(**kw, target=target)
        step = step or {str(k): v for k, v in comm.get_comm_counts().items()}
        norms.append(stage.clip_grad_norm_(MAX_NORM).item())
        opt.step()
        losses.append(None if loss is None else loss.item())
    placements = {n: (repr(p.placements[0]), tuple(p.to_local().shape)) for n, p in stage.named_parameters()
                  if isinstance(p, DTensor)}
    return {"pp": stage.pp_rank, "tp": stage.tp_rank, "losses": losses, "norms": norms, "forward": forward, "step": step, "outputs": outputs,
            "rows": sum(len(p.row) for p in stage.tp_plans.values()), "placements": placements,
            "embeddings": sum(len(p.embeddings) for p in stage.tp_plans.values()),
            "heads": sum(len(p.heads) for p in stage.tp_plans.values()),
            "params": full_state(stage.named_parameters())}


def _check_training(name: str, results: list[dict[str, Any]]) -> None:
    model, _, init = _built(name)
    inputs, _ = _data(name)
    ref = copy.deepcopy(model)
    ref.load_state_dict(init)
    with torch.no_grad():
        out = ref(**inputs)
    for r in results[2:]:  # the last stage's outputs before training: the model's
        torch.testing.assert_close(r["outputs"], out.logits if name == "llama" else out, rtol=RTOL, atol=ATOL)
    want_losses, want_norms, want = _reference(name)
    # tp innermost: ranks 0, 1 are pipeline rank 0's TP ranks, 2, 3 pipeline rank 1's
    assert [(r["pp"], r["tp"]) for r in results] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for r in results[2:]:
        assert r["losses"] == pytest.approx(want_losses, rel=RTOL)
    for r in results:
        assert r["norms"] == pytest.approx(want_norms, rel=RTOL)  # whole model's norm: shards once, replicas once
        assert r["params"], "no parameters"
        for n, v in r["params"].items():
            torch.testing.assert_close(v, want[n], rtol=RTOL, atol=ATOL, msg=lambda m, n=n: f"{n}: {m}")
    assert set().union(*(r["params"] for r in results)) == set(want)
    def count(counts: dict[str, int]) -> tuple[int, int]:
        return (sum(v for k, v in counts.items() if "all_reduce" in k or "allreduce" in k),
                sum(v for k, v in counts.items() if "gather" in k or "scatter" in k or "all_to_all" in k))

    for r in results:
        # per micro-batch forward: one all-reduce per row-parallel linear and per token lookup in a
        # table split by vocabulary, three for a cross-entropy on logits split by vocabulary (max,
        # sum of exponentials, target logit); the eval's outputs are gathered whole once
        loss = 3 * r["heads"]
        # plus the transport's all-gather of each boundary message a rank receives (each TP rank
        # receives its chunk, ``runtime.dist``): M activations into stage 1, M gradients into stage 0
        boundary = M if r["pp"] == 1 else 0
        assert r["rows"] >= 2 and count(r["forward"]) == (M * (r["rows"] + r["embeddings"] + loss),
                                                          (1 if r["heads"] else 0) + boundary), r["forward"]
        # a training step: as many again in backward per column group's input gradient (each
        # column group here feeds one row linear) and per output layer's input gradient; the
        # lookups need none; nothing gathered but the boundary messages; the pipeline's P2P not counted
        assert count(r["step"]) == (M * (2 * r["rows"] + r["embeddings"] + r["heads"] + loss), M), r["step"]


@pytest.mark.timeout(200)
def test_llama_two_stages_by_two_tp_ranks_train_like_one_process() -> None:
    _, pipe, init = _built("llama")
    _built("llama")[0].load_state_dict(init)
    assert pipe.plan.capture == "export"
    results = spawn(_train, 4, "llama", with_tensor_parallel(pipe, 2), timeout_s=TIMEOUT_S)
    _check_training("llama", results)
    got = {**results[0]["placements"], **results[2]["placements"]}
    for layer in (0, 1):
        p = f"model.layers.{layer}."
        # q (4 heads x 8) and k, v (2 kv heads x 8) by rows, o by columns; gate/up by rows, down by columns
        assert got[p + "self_attn.q_proj.weight"] == ("Shard(dim=0)", (16, 32))
        assert got[p + "self_attn.k_proj.weight"] == ("Shard(dim=0)", (8, 32))
        assert got[p + "self_attn.v_proj.weight"] == ("Shard(dim=0)", (8, 32))
        assert got[p + "self_attn.o_proj.weight"] == ("Shard(dim=1)", (32, 16))
        assert got[p + "mlp.gate_proj.weight"] == ("Shard(dim=0)", (32, 32))
        assert got[p + "mlp.up_proj.weight"] == ("Shard(dim=0)", (32, 32))
        assert got[p + "mlp.down_proj.weight"] == ("Shard(dim=1)", (32, 32))
        assert got[p + "input_layernorm.weight"] == ("Replicate()", (32,))
    # split by vocabulary: the table by rows, the output layer by output features (the logits
    # stay split for the loss)
    assert got["lm_head.weight"] == ("Shard(dim=0)", (32, 32))
    assert got["model.embed_tokens.weight"] == ("Shard(dim=0)", (32, 32))
    assert (results[0]["embeddings"], results[0]["heads"], results[2]["embeddings"], results[2]["heads"]) == (1, 0, 0, 1)


@pytest.mark.timeout(200)
@pytest.mark.parametrize("schedule", ["1f1b", "zb-h1"])  # zb-h1: weight gradients of DTensor shards in W
def test_plain_attention_mlp_two_stages_by_two_tp_ranks_train_like_one_process(schedule: str) -> None:
    _, pipe, init = _built("net")
    _built("net")[0].load_state_dict(init)
    assert pipe.plan.capture == "fx"
    results = spawn(_train, 4, "net", with_tensor_parallel(pipe, 2), schedule, timeout_s=TIMEOUT_S)
    _check_training("net", results)
    got = {**results[0]["placements"], **results[2]["placements"]}
    assert got["blocks.0.q.weight"] == ("Shard(dim=0)", (16, 32))
    assert got["blocks.0.q.bias"] == ("Shard(dim=0)", (16,))
    assert got["blocks.1.o.weight"] == ("Shard(dim=1)", (32, 16))
    assert got["blocks.1.o.bias"] == ("Replicate()", (32,))  # added once, after the all-reduce
    assert got["blocks.1.down.weight"] == ("Shard(dim=1)", (32, 64))
    assert got["head.weight"] == ("Replicate()", (8, 32))


def _tp_only(rank: int, world: int, pipe: Any) -> dict[str, Any]:
    inputs, y = _data("net")
    stage = pipe.build_stage(rank, "cpu")
    opt = torch.optim.SGD(stage.parameters(), lr=LR)
    runner = stage.runner("gpipe", loss_fn=F.mse_loss)
    losses = []
    for _ in range(STEPS):
        stage.zero_grad()
        losses.append(runner.step(**inputs, target=y).item())
        stage.clip_grad_norm_(MAX_NORM)
        opt.step()
    return {"losses": losses, "params": full_state(stage.named_parameters())}


@pytest.mark.timeout(120)
def test_tensor_parallel_alone_on_one_stage() -> None:
    model, pipe, init = _built("net", 1)
    model.load_state_dict(init)
    assert pipe.plan.n_stages == 1
    results = spawn(_tp_only, 2, with_tensor_parallel(pipe, 2), timeout_s=TIMEOUT_S)
    want_losses, _, want = _reference("net")
    for r in results:
        assert r["losses"] == pytest.approx(want_losses, rel=RTOL)
        for n, v in r["params"].items():
            torch.testing.assert_close(v, want[n], rtol=RTOL, atol=ATOL, msg=lambda m, n=n: f"{n}: {m}")


def _build(rank: int, world: int, pipe: Any) -> None:
    pipe.build_stage(rank, "cpu")


def test_a_launch_of_the_wrong_size_is_refused() -> None:
    _, pipe, _ = _built("net")
    with pytest.raises(PipelineRuntimeError, match=r"2 pipeline ranks x tp=2 = 4 ranks, the process group has 2"):
        spawn(_build, 2, with_tensor_parallel(pipe, 2), timeout_s=60.0)


def test_a_pattern_tp_does_not_divide_is_refused_naming_the_node() -> None:
    _, pipe, _ = _built("llama")
    plan = shard_plan(pipe.stages[0], 2)
    assert len(plan.column) == 5 and len(plan.row) == 2
    # 2 key/value heads do not split over 4 ranks: refused, not silently replicated
    with pytest.raises(PipelineRuntimeError, match=r"view_1: view .* heads\), which tp=4 does not divide"):
        shard_plan(pipe.stages[0], 4)
    # a linear that tp does not divide: 64 // 3
    with pytest.raises(PipelineRuntimeError, match="tp=3 does not divide"):
        shard_plan(pipe.stages[0], 3)
    # key and value kept whole by request: the query then meets them whole in attention, so
    # q and o stay whole too (replicated, which is correct), and the MLP shards over 4
    kv = ("model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.v_proj.weight")
    kept = shard_plan(pipe.stages[0], 4, replicate=kv)
    assert set(kept.column) == {"model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"}
    assert "model.layers.0.self_attn.q_proj.weight" in kept.replicated
    assert "model.layers.0.self_attn.o_proj.weight" not in kept.row


class _Odd(nn.Module):
    """A linear feeding a norm (needs every feature) and one feeding a linear: only the pair shards."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.norm, self.b, self.c = nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.b(self.norm(self.a(x))))
        return self.c(h * h.shape[-1] ** -0.5)  # a size of the sharded value: the global one


def test_unrecognised_patterns_stay_replicated_with_a_reason() -> None:
    pipe = partition(_Odd(), 1, (torch.randn(4, 8),), device="cpu", link="loopback")
    plan = shard_plan(pipe.stages[0], 2)
    assert plan.column == {"b.weight": "b"} and plan.row == {"c.weight": "c"}
    assert "norm" in plan.replicated["a.weight"]
    assert plan.placements["norm.weight"] == "Replicate" and plan.placements["b.bias"] == "Shard(0)"


def test_plan_mesh_tp_round_trips_and_old_plans_load_as_tp_1() -> None:
    _, pipe, _ = _built("net")
    tp = with_tensor_parallel(pipe, 2)
    assert (tp.plan.mesh.tp, pipe.plan.mesh.tp) == (2, 1) and tp.stages is pipe.stages
    assert load_plan(tp.plan.to_json()).mesh.tp == 2
    old = json.loads(pipe.plan.to_json())
    assert "tp" not in old["mesh"]  # tp = 1 is not written: such a plan is what it was before the field
    assert load_plan(json.dumps(old)).mesh.tp == 1
    # tp innermost: pipeline rank p, TP rank t is global rank p * tp + t
    assert [tp.plan.mesh.rank(0, p, t) for p in range(2) for t in range(2)] == [0, 1, 2, 3]
    assert tp.plan.mesh.coords(3) == (0, 1)


@pytest.mark.timeout(200)
def test_a_plan_the_planner_made_with_tensor_parallelism_trains_like_one_process() -> None:
    # partition(tensor_parallel=2) prices one rank of each group and records mesh.tp: the
    # runtime runs that plan as it is (no with_tensor_parallel)
    model, _, init = _built("net")
    inputs, _ = _data("net")
    pipe = partition(model, 4, inputs, device="cpu", link="loopback", pinned_cuts=["blocks.1"], n_microbatches=M,
                     tensor_parallel=2)
    assert (pipe.plan.mesh.pp, pipe.plan.mesh.tp, pipe.plan.options["tensor_parallel"]) == (2, 2, 2)
    assert load_plan(pipe.plan.to_json()).mesh.tp == 2
    results = spawn(_train, 4, "net", pipe, timeout_s=TIMEOUT_S)
    _check_training("net", results)


def _planner_split(gm: Any, tp: int) -> dict[str, set[str]]:
    """What the planner prices as split at ``tp`` on the captured graph, by weight."""
    from partitioner.passes.tensor_parallel import shard

    sharded = shard(gm, tp)
    weight = {n.name: str(a.target) for n in gm.graph.nodes for a in n.all_input_nodes[1:2] if a.op == "get_attr"}
    weight.update({n.name: f"{n.target}.weight" for n in gm.graph.nodes if n.op == "call_module"})
    vocab = sharded.vocab
    return {"column": {weight[c.name] for r in sharded.regions for c in r.columns},
            "row": {weight[w.name] for r in sharded.regions for w in r.rows},
            "embedding": {vocab.owner[n] for n in vocab.embeddings}, "head": {vocab.owner[n] for n in vocab.heads}}


@pytest.mark.timeout(200)
@pytest.mark.parametrize("name", ["llama", "gpt2", "net"])
def test_the_planner_prices_the_split_the_runtime_makes(name: str) -> None:
    # the planner's finder on the whole captured graph and the runtime's on each stage graph
    # name the same weights: column- and row-parallel linears, vocabulary-split tables and
    # output layers (GPT-2's Conv1D layers: whole in both)
    if name == "gpt2":
        from tests.hf.models import _ids, gpt2

        torch.manual_seed(0)
        model, inputs, cut = gpt2(2), {"input_ids": _ids(2, 8)}, "transformer.h.1"
        pipe = partition(model, 2, inputs, device="cpu", link="loopback", pinned_cuts=[cut])
    else:
        pipe = _built(name)[1]
    want = _planner_split(pipe.graph, 2)
    got: dict[str, set[str]] = {k: set() for k in want}
    for s, stage in enumerate(pipe.stages):
        plan = shard_plan(stage, 2, last=s == len(pipe.stages) - 1)
        for k, d in (("column", plan.column), ("row", plan.row), ("embedding", plan.embeddings), ("head", plan.heads)):
            got[k] |= set(d)
    assert got == want
    assert want["column"] or name == "gpt2"  # not vacuous: llama and net shard every layer
    assert bool(want["head"]) == (name != "net")  # net's head narrows (32 -> 8): not an output layer over classes
