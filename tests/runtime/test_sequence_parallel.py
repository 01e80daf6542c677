"""Sequence parallelism with tensor parallelism (``runtime.tensor_parallel``, Megatron's SP), on
gloo: a GPT (tests/fixtures/models.py's, fx route) and a tiny Hugging Face Llama with its loss in
the graph (export route, vocabulary-parallel embedding, output layer and cross-entropy) train 3
steps as 1 or 2 pipeline stages x 2 tensor-parallel ranks, under 1F1B and zb-h1, like one process
on the whole batch (losses, the last stage's outputs, every parameter after the steps); the row
outputs are reduce-scattered and the region inputs all-gathered (``CommDebugMode``), not
all-reduced. Stage boundaries travel as sequence shards: each TP rank sends 1/T of the
activation (and of its gradient) to its peer, nothing is all-gathered at the cut, and the
ranks' messages replay under NCCL's rules; the transport alone delivers messages mixing a rank's
own shards with shared values exactly. The planner prices it (``passes.tensor_parallel.shard``):
the collectives as an all-gather / reduce-scatter pair per region (a region whose input is not
yet split, the first stage's first, as the all-reduce of its gradient it runs), the ops between
regions at 1/T, the cuts at 1/T per pair, by amounts computed here from the annotated costs. A
sequence T does not divide is refused."""

from __future__ import annotations

import copy
import functools
import os
from typing import Any

import pytest
import sympy
import torch
import torch.nn.functional as F
from torch import nn

from partitioner import PartitionError, partition
from partitioner.comms import replay_log
from partitioner.cost_models.devices import get_link
from partitioner.data_parallel import allgather_s, ring_allreduce_s
from partitioner.examples.gpt import GPT, GPTConfig
from partitioner.passes.meta import COST
from partitioner.plan import load_plan
from partitioner.runtime.errors import PipelineRuntimeError
from partitioner.runtime.launch import spawn
from partitioner.runtime.tensor_parallel import full_state, shard_plan, with_tensor_parallel
from tests.runtime.helpers import sgd_reference
from tests.runtime.test_tensor_parallel import _NoModuleTracking

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TIMEOUT_S = 150.0
LR, STEPS, M = 0.1, 3, 2
# float32: a reduce-scatter sums the same two partial products an all-reduce does, and the
# ops between regions run on token slices: rounding only
RTOL, ATOL = 1e-5, 1e-6
VOCAB = 64


def _gpt(tied: bool) -> nn.Module:
    # the fixture's GPT (tests/fixtures/models.py), smaller; untied for two pipeline ranks (tensor
    # parallelism refuses weights tied across pipeline ranks)
    return GPT(GPTConfig(vocab_size=VOCAB, block_size=16, n_layer=2, n_head=2, n_embd=32, tie_weights=tied))


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64, use_cache=False,
                      attn_implementation="sdpa", bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg)


def _ids(seed: int, seq: int = 8) -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, seq), generator=torch.Generator().manual_seed(seed))


def _gpt_loss(out: Any, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.flatten(0, 1), y.flatten())


def _in_graph_loss(out: Any, y: Any) -> torch.Tensor:
    return out.loss


CASES: dict[str, Any] = {
    # name: (model, inputs, target, loss_fn, pipeline ranks, pinned cuts)
    "gpt-pp1": (lambda: _gpt(True), {"idx": _ids(1)}, _ids(2), _gpt_loss, 1, []),
    "gpt-pp2": (lambda: _gpt(False), {"idx": _ids(1)}, _ids(2), _gpt_loss, 2, ["transformer.h.1"]),
    "llama-pp2": (_llama, {"input_ids": _ids(1), "labels": _ids(2)}, _ids(2), _in_graph_loss, 2, ["model.layers.1"]),
}


@functools.cache
def _built(name: str) -> tuple[nn.Module, Any, dict[str, torch.Tensor]]:
    make, inputs, _, _, pp, cuts = CASES[name]
    torch.manual_seed(0)
    model = make()
    pipe = partition(model, pp * 2, inputs, device="cpu", link="loopback", pinned_cuts=cuts, n_microbatches=M,
                     tensor_parallel=2, sequence_parallel=True)
    return model, pipe, copy.deepcopy(model.state_dict())


@functools.cache
def _reference(name: str) -> tuple[list[float], dict[str, torch.Tensor], torch.Tensor]:
    model, _, init = _built(name)
    _, inputs, y, loss_fn, _, _ = CASES[name]
    ref = copy.deepcopy(model)
    ref.load_state_dict(init)
    with torch.no_grad():
        out = ref(**inputs)
    run = sgd_reference(model, inputs, y, loss_fn, steps=STEPS, lr=LR, init=init, remove_duplicate=True)
    return run.losses, run.params, getattr(out, "logits", out)


def _counts(comm: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for k, v in comm.get_comm_counts().items():
        key = str(k)
        kind = ("reduce_scatter" if "reduce_scatter" in key else "all_reduce" if "all_reduce" in key or
                "allreduce" in key else "boundary" if "_allgather_base" in key else "all_gather" if "gather" in key
                else key)
        out[kind] = out.get(kind, 0) + v
    return out


def _train(rank: int, world: int, name: str, pipe: Any, schedule: str, p2p: str = "auto") -> dict[str, Any]:
    from torch.distributed.tensor.debug import CommDebugMode

    _, inputs, y, loss_fn, _, _ = CASES[name]
    stage = pipe.build_stage(rank, "cpu")
    opt = torch.optim.SGD(stage.parameters(), lr=LR)
    runner = stage.runner(schedule, loss_fn=loss_fn, p2p=p2p)
    kw = inputs if stage.is_first else {}
    target = y if stage.is_last else None
    comm = CommDebugMode()
    comm.advanced_module_tracker = _NoModuleTracking()  # type: ignore[assignment]
    with comm:  # the forward's collectives, every micro-batch of this rank's stage
        _, outputs = runner.eval_step(**kw, target=target, return_outputs=True)  # type: ignore[misc]
    forward = _counts(comm)
    losses = []
    for _ in range(STEPS):
        stage.zero_grad()
        loss = runner.step(**kw, target=target)
        opt.step()
        losses.append(None if loss is None else loss.item())
    return {"losses": losses, "outputs": getattr(outputs, "logits", outputs), "last": stage.is_last,
            "forward": forward, "rows": sum(len(p.row) for p in stage.tp_plans.values()),
            "sequence": sum(len(p.sequence) for p in stage.tp_plans.values()), "first": stage.is_first,
            "entering": sorted(n for p in stage.tp_plans.values() for n in p.sequence_inputs),
            "heads": sum(len(p.heads) for p in stage.tp_plans.values()), "log": list(runner.interpreter.comm_log),
            "wire_bytes": runner.transport.wire_bytes, "bytes_sent": runner.transport.bytes_sent,
            "params": full_state(stage.named_parameters())}


def _check(name: str, results: list[dict[str, Any]]) -> None:
    want_losses, want, logits = _reference(name)
    for r in results:
        if r["last"]:
            torch.testing.assert_close(r["outputs"], logits, rtol=RTOL, atol=ATOL)
            assert r["losses"] == pytest.approx(want_losses, rel=RTOL)
        for n, v in r["params"].items():
            torch.testing.assert_close(v, want[n], rtol=RTOL, atol=ATOL, msg=lambda m, n=n: f"{n}: {m}")
        # every row linear runs sequence-parallel: its output reduce-scattered once per micro-batch
        # (not all-reduced), and each region's input gathered from the sequence shards
        assert r["rows"] >= 1 and r["sequence"] == r["rows"]
        # a later stage takes the residual stream as its sequence shard (one input: the hidden
        # states; Llama's rotary tables enter whole)
        assert len(r["entering"]) == (0 if r["first"] else 1), r["entering"]
        assert r["forward"].get("reduce_scatter", 0) == M * r["rows"], r["forward"]
        assert r["forward"].get("all_gather", 0) >= M * r["rows"] - M, r["forward"]
    assert set().union(*(r["params"] for r in results)) == set(want)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("name,schedule", [("gpt-pp1", "1f1b"), ("gpt-pp2", "1f1b"), ("gpt-pp2", "zb-h1"),
                                           ("llama-pp2", "1f1b"), ("llama-pp2", "zb-h1")])
def test_sequence_parallel_trains_like_one_process(name: str, schedule: str) -> None:
    _, pipe, _ = _built(name)
    assert pipe.plan.options["sequence_parallel"] is True and pipe.plan.mesh.tp == 2
    assert load_plan(pipe.plan.to_json()).options["sequence_parallel"] is True
    results = spawn(_train, len(pipe.stages) * 2, name, pipe, schedule, timeout_s=TIMEOUT_S)
    _check(name, results)


def test_old_plans_load_with_sequence_parallelism_off() -> None:
    _, pipe, _ = _built("gpt-pp2")
    plain = with_tensor_parallel(pipe, 2)
    assert "sequence_parallel" not in plain.plan.options and "sequence_parallel" not in plain.plan.to_json()
    assert shard_plan(plain.stages[0], 2).sequence == {}
    sp = with_tensor_parallel(pipe, 2, sequence_parallel=True)
    assert sp.plan.options["sequence_parallel"] is True
    with pytest.raises(PipelineRuntimeError, match="needs tp > 1"):
        with_tensor_parallel(pipe, 1, sequence_parallel=True)
    with pytest.raises(PartitionError, match="sequence_parallel=True"):
        partition(_gpt(True), 2, (_ids(1),), device="cpu", link="loopback", sequence_parallel=True)


def test_a_sequence_tp_does_not_divide_is_refused() -> None:
    # by the planner, at the example's length
    with pytest.raises(PartitionError, match=r"sequence length 7 does not divide by 2"):
        partition(_gpt(True), 2, (_ids(1, seq=7),), device="cpu", link="loopback", tensor_parallel=2,
                  sequence_parallel=True)
    # by the runtime, naming the row linear, at a length the plan did not see
    _, pipe, _ = _built("gpt-pp1")
    with pytest.raises(PipelineRuntimeError, match=r"output of .* has a sequence of 7 tokens .* does not divide by 2"):
        spawn(_odd_step, 2, pipe, timeout_s=60.0)


@pytest.mark.timeout(120)
def test_a_boundary_sequence_tp_does_not_divide_is_refused_naming_the_value() -> None:
    # two stages: the cut's residual stream would travel as 7 / 2 tokens per TP rank
    _, pipe, _ = _built("gpt-pp2")
    with pytest.raises(PipelineRuntimeError, match=r"boundary value 'add_2' has a sequence of 7 tokens .* does not "
                                                   r"divide by 2"):
        spawn(_odd_step, 4, pipe, timeout_s=60.0)


def _odd_step(rank: int, world: int, pipe: Any) -> None:
    stage = pipe.build_stage(rank, "cpu")
    stage.runner("1f1b", loss_fn=_gpt_loss).step(idx=_ids(1, seq=7), target=_ids(2, seq=7), seq_len=7)


class _Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(16), nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.gelu(self.up(self.norm(x))))


def test_a_row_output_without_a_sequence_dimension_is_refused_naming_it() -> None:
    # a float input whose sequence dimension nobody named: shape-prop sizes it 8, not S
    model, x = _Mlp(), torch.randn(4, 8, 16)
    pipe = partition(model, 2, (x,), device="cpu", link="loopback", tensor_parallel=2)
    with pytest.raises(PipelineRuntimeError, match=r"row-parallel linear down .* no dimension sized by the sequence"):
        shard_plan(pipe.stages[0], 2, sequence_parallel=True)
    with pytest.raises(PartitionError, match=r"row-parallel linear down .* no dimension sized by the sequence"):
        partition(model, 2, (x,), device="cpu", link="loopback", tensor_parallel=2, sequence_parallel=True)
    # named: S, and it shards
    ok = partition(model, 2, (x,), device="cpu", link="loopback", tensor_parallel=2, sequence_parallel=True,
                   seq_dims={"x": 1})
    assert shard_plan(ok.stages[0], 2, sequence_parallel=True).sequence == {"down": 1}


@pytest.mark.parametrize("degree", [2, 4])
def test_the_planner_prices_sequence_parallelism_by_its_formula(degree: int) -> None:
    from partitioner.tensor_parallel import node_time, view

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB, block_size=16, n_layer=2, n_head=4, n_embd=32, tie_weights=False))
    pipe = partition(model, 1, (_ids(1),), device="cpu", link="loopback")
    gm = pipe.graph
    plain, without = view(gm, degree)
    sp, with_sp = view(gm, degree, sequence_parallel=True)
    assert with_sp.regions and [r.rows for r in with_sp.regions] == [r.rows for r in without.regions]
    link = get_link("nvlink4")
    values = {"B": 4, "S": 8}

    def seconds(g: Any) -> dict[str, tuple[float, float]]:
        timed = node_time(lambda c, v: (0.0, 0.0), g, link)  # the collectives only
        return {n.name: timed(n.meta[COST], values) for n in g.graph.nodes if COST in n.meta}

    def nbytes(node: Any) -> int:
        return int(node.meta["pp.desc"].nbytes().subs({sympy.Symbol("B", positive=True, integer=True): 4,
                                                        sympy.Symbol("S", positive=True, integer=True): 8}))

    got, base = seconds(sp), seconds(plain)
    by_name = {n.name: n for n in gm.graph.nodes}
    for r in with_sp.regions:
        for w in r.rows:  # forward: a reduce-scatter of the output in place of its all-reduce; backward its all-gather
            b = nbytes(by_name[w.name])
            assert base[w.name] == pytest.approx((ring_allreduce_s(b, degree, link), 0.0))
            assert got[w.name] == pytest.approx((allgather_s(b, degree, link), allgather_s(b, degree, link)))
            assert allgather_s(b, degree, link) == pytest.approx(ring_allreduce_s(b, degree, link) / 2)
        first = r.columns[0]  # the input's all-gather forward, its gradient's reduce-scatter backward
        x = first.args[0]
        b = nbytes(x)
        if x.name in with_sp.seq_sharded:
            assert got[first.name] == pytest.approx((allgather_s(b, degree, link), allgather_s(b, degree, link)))
        else:  # a whole input (no row output before it): nothing gathered, its gradient all-reduced
            assert got[first.name] == pytest.approx((0.0, ring_allreduce_s(b, degree, link)))
            assert got[first.name] == pytest.approx(base[first.name])
    # GPT's attention is one fused c_attn split into q, k, v: whole in the planner as in the
    # runtime, so the regions are the two MLPs; only the first (layer 0's, before any row
    # output) reads a whole value
    assert [r.columns[0].args[0].name in with_sp.seq_sharded for r in with_sp.regions] == [False, True]
    # per layer on the wire: the pair costs what the all-reduces did
    assert sum(f + b for f, b in got.values()) == pytest.approx(sum(f + b for f, b in base.values()))
    # the ops between the regions: norms, residual adds at 1/T of the whole graph's FLOPs and activations
    between = {n for n in with_sp.seq_sharded}
    names = {n.name for n in gm.graph.nodes}
    assert {"transformer_h_1_ln_1", "transformer_ln_f"} <= between <= names
    assert "transformer_h_0_ln_2" not in between  # before layer 0's MLP: no row output has split it yet
    for name in between:
        whole, mine = by_name[name].meta[COST], sp.graph.find_nodes(op=by_name[name].op, target=by_name[name].target)
        cost = next(n for n in mine if n.name == name).meta[COST]
        assert cost.fwd_flops == whole.fwd_flops / degree and cost.saved_bytes == whole.saved_bytes / degree
        assert cost.param_bytes == whole.param_bytes  # the norm weights stay whole
        plain_cost = next(n for n in plain.graph.nodes if n.name == name).meta[COST]
        assert plain_cost.fwd_flops == whole.fwd_flops  # without sequence parallelism: whole on every rank


def _train_fsdp(rank: int, world: int, pipe: Any) -> dict[str, Any]:
    _, inputs, y, loss_fn, _, _ = CASES["gpt-pp1"]
    stage = pipe.build_stage(rank, "cpu")
    opt = stage.optimizer(torch.optim.SGD, lr=LR)
    runner = stage.runner("1f1b", loss_fn=loss_fn)
    losses = []
    for _ in range(STEPS):
        stage.zero_grad()
        losses.append(runner.step(**inputs, target=y, loss_on_every_rank=True).item())
        opt.step()
    return {"losses": losses, "sync": type(stage.grad_sync).__name__, "dp": stage.dp_rank,
            "sequence": sum(len(p.sequence) for p in stage.tp_plans.values()),
            "params": full_state(stage.named_parameters())}


@pytest.mark.timeout(240)
def test_sequence_parallel_with_fsdp_replicas_trains_like_one_process() -> None:
    # PP1 x DP2 x TP2, zero=3: FSDP shards the TP DTensors over the replicas, each replica's TP
    # group splits its half of the batch on the sequence between the regions
    model, _, init = _built("gpt-pp1")
    _, inputs, _, _, _, _ = CASES["gpt-pp1"]
    pipe = partition(copy.deepcopy(model), 4, inputs, device="cpu", link="loopback", n_microbatches=1,
                     data_parallel=2, zero=3, tensor_parallel=2, sequence_parallel=True)
    assert (pipe.plan.mesh.dp, pipe.plan.mesh.tp, pipe.plan.mesh.zero) == (2, 2, 3)
    results = spawn(_train_fsdp, 4, pipe, timeout_s=TIMEOUT_S)
    want_losses, want, _ = _reference("gpt-pp1")
    assert sorted(r["dp"] for r in results) == [0, 0, 1, 1] and {r["sync"] for r in results} == {"FsdpSync"}
    for r in results:
        assert r["sequence"] >= 1
        assert r["losses"] == pytest.approx(want_losses, rel=RTOL)
        for n, v in r["params"].items():
            torch.testing.assert_close(v, want[n], rtol=RTOL, atol=ATOL, msg=lambda m, n=n: f"{n}: {m}")
    assert set().union(*(r["params"] for r in results)) == set(want)


@pytest.mark.parametrize("degree", [2, 4])
def test_a_plan_with_sequence_parallelism_prices_less_compute_and_activations(degree: int) -> None:
    # the plan's stage (one pipeline rank) with and without: its forward FLOPs drop by (1 - 1/T)
    # of the whole graph's FLOPs between the regions, its saved activations drop, its time drops
    from partitioner.cost_models.cost import evaluate
    from partitioner.poly import from_text
    from partitioner.tensor_parallel import view

    # large enough that the ops between the regions are priced above the per-kernel launch floor
    # (a toy width runs every element-wise op at the floor, where 1/T of the tokens saves nothing)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB, block_size=512, n_layer=2, n_head=8, n_embd=512, tie_weights=False))
    ids = _ids(1, seq=512)

    def stage(sp: bool) -> Any:
        pipe = partition(model, degree, (ids,), device="h100-sxm", link="nvlink4", tensor_parallel=degree,
                         sequence_parallel=sp, recompute="none", n_microbatches=1)
        assert pipe.plan.mesh.tp == degree and len(pipe.plan.stages) == 1
        return pipe, pipe.plan.stages[0].cost

    _, plain = stage(False)
    _, sp = stage(True)
    whole = partition(model, 1, (ids,), device="h100-sxm", link="nvlink4").graph  # annotated, unsharded
    between = view(whole, degree, sequence_parallel=True)[1].seq_sharded
    by_name = {n.name: n for n in whole.graph.nodes}
    want = sum(evaluate(by_name[n].meta[COST].fwd_flops, 4, 8) for n in between) * (1 - 1 / degree)
    got = evaluate(from_text(plain.fwd_flops), 4, 8) - evaluate(from_text(sp.fwd_flops), 4, 8)
    assert want > 0 and got == pytest.approx(want, rel=1e-6, abs=len(between))
    assert evaluate(from_text(sp.saved_bytes), 4, 8) < evaluate(from_text(plain.saved_bytes), 4, 8)
    assert sp.fwd_time_s + sp.bwd_time_s < plain.fwd_time_s + plain.bwd_time_s


# -- stage boundaries as sequence shards -----------------------------------------------------

def _train_counted(rank: int, world: int, name: str, pipe: Any, schedule: str) -> dict[str, Any]:
    """``_train`` in NCCL's message order (tag 0), with every P2P send's (peer, bytes) and every
    all-gather the transport runs at a cut (``dist.all_gather_single``) counted."""
    import torch.distributed as dist

    from tests.runtime.test_tp_boundary import _record_sends

    sends = _record_sends()
    gathers = []
    real = dist.all_gather_single

    def counted(*args: Any, **kwargs: Any) -> Any:
        gathers.append(args[0].numel())
        return real(*args, **kwargs)

    dist.all_gather_single = counted  # type: ignore[assignment]  # forked child: this rank only
    out = _train(rank, world, name, pipe, schedule, p2p="ordered")
    return {**out, "sends": list(sends), "gathers": list(gathers)}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("schedule", ["1f1b", "zb-h1"])
def test_boundaries_travel_as_sequence_shards_without_a_gather(schedule: str) -> None:
    _, pipe, _ = _built("gpt-pp2")
    results = spawn(_train_counted, 4, "gpt-pp2", pipe, schedule, timeout_s=TIMEOUT_S)
    _check("gpt-pp2", results)
    # the cut carries one (2, 8, 32) float32 residual stream per micro-batch (and its gradient
    # back): each TP rank sends its half, 8 / 2 tokens, to the same TP index of the other stage
    (cut,) = pipe.plan.boundaries
    whole = 2 * 8 * 32 * 4
    assert [v.name for v in cut.values] == ["add_2"] and cut.bytes == whole
    for r in results:
        forwards = (1 + STEPS) * M if r["first"] else 0  # eval_step's forwards, then the steps'
        grads = 0 if r["first"] else STEPS * M
        assert [b for _, b in r["sends"]] == [whole // 2] * (forwards + grads), r["sends"]
        assert r["wire_bytes"] == r["bytes_sent"] == (forwards + grads) * whole // 2
        # nothing all-gathered at the cut: not by the transport, not by the graphs (the sender
        # used to gather its output whole, the receiver the transport's chunks)
        assert r["gathers"] == [] and r["forward"].get("boundary", 0) == 0, (r["gathers"], r["forward"])
        if r["first"]:
            # the first stage's one region (the MLP: the runtime keeps this GPT's fused q/k/v
            # attention whole) reads a value no row output has split yet, and the residual stream
            # it sends leaves as the rank's shard: no all-gather at all in its forward (gathering
            # the output whole for the cut cost one per micro-batch)
            assert r["rows"] == 1 and r["forward"].get("all_gather", 0) == 0, r["forward"]
            assert r["forward"].get("reduce_scatter", 0) == M, r["forward"]
    assert {p for p, _ in results[0]["sends"]} == {2} and {p for p, _ in results[1]["sends"]} == {3}
    assert {p for p, _ in results[2]["sends"]} == {0} and {p for p, _ in results[3]["sends"]} == {1}
    # NCCL: the TP ranks of a stage issue the same operations in the same order, and each TP
    # index's pipeline replays under NCCL's rules (in-order per pair, tags ignored)
    assert results[0]["log"] == results[1]["log"] and results[2]["log"] == results[3]["log"]
    for t in (0, 1):
        replay_log([results[t]["log"], results[2 + t]["log"]])


def _mixed(rank: int, world: int, tagless: bool) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh

    from partitioner.runtime.dist import DistTransport
    from tests.runtime.test_tp_boundary import _record_sends

    sends = _record_sends()
    dm = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "tp"))
    pp, tp = dm.get_local_rank("pp"), dm.get_local_rank("tp")
    tr = DistTransport(2, dm.get_group("pp"), tagless=tagless, tp_group=dm.get_group("tp"), scatter=True)
    flags = [True, False, False, True, False]
    tr.own = lambda key: flags if key[3] % 2 == 0 else [True]  # even keys: the mix; odd: one shard
    got = []
    for mb in range(2):
        for direction, src in (("F", 0), ("B", 1)):
            for key, vals in (((direction, src, 1 - src, 2 * mb), _mix(mb, direction, tp)),
                              ((direction, src, 1 - src, 2 * mb + 1), _mix(mb, direction, tp)[:1])):
                if pp == src:
                    tr.post(pp, [(key, 1 - src, vals)], [], "cpu")
                else:
                    layout = [(tuple(v.shape), v.dtype) for v in vals]
                    (pending,) = tr.post(pp, [], [(key, src, layout)], "cpu")
                    got.append((direction, mb, key[3] % 2, [t.clone() for t in pending.wait()]))
            tr.flush()
    return {"pp": pp, "tp": tp, "got": got, "sends": list(sends)}


def _mix(mb: int, direction: str, tp: int) -> list[torch.Tensor]:
    """Own values (float shards, different on each TP rank) between shared ones (odd sizes,
    integer and bool: the same on every TP rank)."""
    g = torch.Generator().manual_seed(mb * 2 + (direction == "B"))
    mine = torch.Generator().manual_seed(100 + 10 * tp + mb * 2 + (direction == "B"))
    return [torch.randn(2, 3, 5, generator=mine), torch.randint(-100, 100, (7,), dtype=torch.int8, generator=g),
            torch.rand(5, generator=g) > 0.5, torch.randn(1, 3, 4, generator=mine),
            torch.randint(0, 2**40, (3, 5), dtype=torch.int64, generator=g)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("tagless", [False, True])
def test_the_transport_sends_own_shards_whole_and_scatters_the_shared_values(tagless: bool) -> None:
    from partitioner.runtime.dist import pack_layout

    results = spawn(_mixed, 4, tagless, timeout_s=60.0)
    for r in results:
        assert len(r["got"]) == 4  # one direction per stage, two micro-batches, two messages
        for direction, mb, odd, tensors in r["got"]:
            want = _mix(mb, direction, r["tp"])[:1 if odd else 5]  # the own values of the same TP index
            assert len(tensors) == len(want)
            for t, w in zip(tensors, want):
                assert t.dtype == w.dtype and t.shape == w.shape and torch.equal(t, w), (direction, mb, odd)
        # on the wire: the own values packed (aligned) then this rank's chunk of the shared ones;
        # a lone shard as it is
        own = pack_layout([((2, 3, 5), torch.float32), ((1, 3, 4), torch.float32)])[1]
        shared = pack_layout([((7,), torch.int8), ((5,), torch.bool), ((3, 5), torch.int64)])[1]
        chunk = -(-shared // 2) if r["tp"] == 0 else shared - -(-shared // 2)
        assert [b for _, b in r["sends"]] == [own + chunk, 2 * 3 * 5 * 4] * 2, r["sends"]


def test_a_sequence_parallel_cut_is_priced_as_one_shard_per_pair_without_a_gather() -> None:
    from partitioner.cost_models.devices import get_link
    from partitioner.data_parallel import boundary_time
    from partitioner.schedule import build_schedule
    from partitioner.simulator import boundary_bytes, predict_plan, predict_step

    ib, nvlink = get_link("ib-ndr-400"), get_link("nvlink4")
    mib = 2**20
    sp = boundary_time(ib, 4, nvlink, sequence_parallel=True)
    assert sp(mib) == ib.transfer_time(mib / 4) and sp(3) == ib.transfer_time(1) and sp(0) == 0.0
    # without sequence parallelism the chunks are all-gathered in the receiving group on top
    assert boundary_time(ib, 4, nvlink)(mib) == pytest.approx(sp(mib) + allgather_s(mib, 4, nvlink))
    assert boundary_time(ib, 1, nvlink, sequence_parallel=True)(mib) == ib.transfer_time(mib)  # no TP: as before
    # the plan's step is simulated with its cut priced so, and replays the same from the saved plan
    _, pipe, _ = _built("gpt-pp2")
    plan = load_plan(pipe.plan.to_json())
    link = get_link("loopback")
    sched = build_schedule(plan.options["schedule"], plan.pp_ranks, plan.prediction.n_microbatches, plan.n_stages)
    fwd, grad = boundary_bytes(plan.boundaries, plan.prediction.microbatch_size, plan.symbols.get("S", 1))
    times = ([st.cost.fwd_time_s for st in plan.stages], [st.cost.bwd_time_s for st in plan.stages])
    shards = predict_step(sched, *times, boundary_time(link, 2, sequence_parallel=True), fwd, grad).step_time
    gathered = predict_step(sched, *times, boundary_time(link, 2), fwd, grad).step_time
    assert plan.prediction.step_time_s == pytest.approx(shards, rel=1e-9)
    assert predict_plan(plan, sched).step_time == pytest.approx(shards, rel=1e-9)
    assert shards < gathered * (1 - 1e-6)
