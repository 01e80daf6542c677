"""One tensor-parallel rank as the planner sees it: costs per rank, the all-reduces in the node times."""

from __future__ import annotations

import functools

import pytest
import torch

from partitioner.cost_models.cost import evaluate
from partitioner.cost_models.devices import DEVICES, LINKS
from partitioner.data_parallel import ring_allreduce_s
from partitioner.passes.meta import COST, DESC, MODULE
from partitioner.plan import load_plan
from partitioner.tensor_parallel import node_time, param_divisor, view
from tests.passes.test_tensor_parallel import Block, _annotated


def test_the_view_prices_one_rank_and_leaves_the_graph_alone() -> None:
    gm = _annotated(Block(), torch.randn(2, 8, 32))
    before = {n.name: n.meta.get(COST) for n in gm.graph.nodes}
    tp, sharded = view(gm, 2)
    assert {n.name: n.meta.get(COST) for n in gm.graph.nodes} == before  # the original is untouched
    assert [n.name for n in tp.graph.nodes] == [n.name for n in gm.graph.nodes]
    for n in tp.graph.nodes:
        assert n.meta.get(COST) is (sharded.costs.get(n.name) or before[n.name])
    assert param_divisor(tp)["q.weight"] == 2 and param_divisor(gm) == {}
    assert tp.get_parameter("q.weight") is gm.get_parameter("q.weight")  # shared, not copied


def test_node_times_gain_the_ring_all_reduces_on_the_group_link() -> None:
    gm = _annotated(Block(), torch.randn(2, 8, 32))
    tp, _ = view(gm, 4)
    dev, link = DEVICES["h100-sxm"], LINKS["nvlink4"]
    base = dev.node_time
    timed = node_time(base, tp, link)
    assert node_time(base, gm, link) is base  # nothing to add without a view
    values = {"B": 2, "S": 8}
    nodes = {n.name: n for n in tp.graph.nodes}
    ring = ring_allreduce_s(2 * 8 * 32 * 4, 4, link)
    assert ring > 0
    for name, extra in (("o", (ring, 0.0)), ("down", (ring, 0.0)), ("q", (0.0, ring)), ("up", (0.0, ring)),
                        ("k", (0.0, 0.0)), ("v", (0.0, 0.0))):
        cost = nodes[name].meta[COST]
        got, plain = timed(cost, values), base(cost, values)
        assert got[0] == pytest.approx(plain[0] + extra[0]) and got[1] == pytest.approx(plain[1] + extra[1]), name


def test_partition_prices_one_rank_of_each_tensor_parallel_group() -> None:
    from partitioner import partition
    from partitioner.cost_models.errors import PartitionError

    torch.manual_seed(0)
    model = torch.nn.Sequential(*(Block(h=64, heads=8, inner=256) for _ in range(4)))
    x = torch.randn(8, 128, 64)
    kw = dict(example_inputs=(x,), device="h100-sxm", link="nvlink4", n_microbatches=4)
    one = partition(model, n_gpus=2, **kw).plan
    two = partition(model, n_gpus=4, tensor_parallel=2, **kw).plan
    assert (two.mesh.pp, two.mesh.tp, two.options["n_gpus"], two.options["tensor_parallel"]) == (2, 2, 4, 2)
    assert "tensor_parallel" not in one.options and "tp" not in one.to_dict()["mesh"]  # plans without TP unchanged
    # each rank holds about half of every sharded weight: the biases of the row linears and the
    # norms stay whole, so a little more than half
    w1 = sum(st.cost.param_bytes for st in one.stages)
    w2 = sum(st.cost.param_bytes for st in two.stages)
    assert 0.5 * w1 < w2 < 0.52 * w1
    # half the FLOPs of every region per rank; the all-reduces add time, so not half the step
    f1 = sum(c["fwd_flops"] for c in one.cost_at(batch=2, seq=128))
    f2 = sum(c["fwd_flops"] for c in two.cost_at(batch=2, seq=128))
    assert 0.5 * f1 < f2 < 0.6 * f1
    auto = partition(model, n_gpus=4, tensor_parallel="auto", gpus_per_node=4, **kw).plan
    ranking = auto.rankings["tp"]  # the candidates as data: fastest first, the first picked
    assert {r["label"].split()[0] for r in ranking} == {"T=1", "T=2", "T=4"}
    assert ranking[0]["picked"] and not any(r["picked"] for r in ranking[1:])
    steps = [r["step_s"] for r in ranking]
    assert steps == sorted(steps) and auto.prediction.step_time_s == pytest.approx(steps[0], rel=1e-9)
    assert auto.mesh.tp == int(ranking[0]["label"].split()[0][2:])
    assert load_plan(auto.to_json()).rankings == auto.rankings
    assert "rankings" not in one.to_dict()  # no automatic choice: left out
    with pytest.raises(PartitionError, match="tensor_parallel=3"):
        partition(model, n_gpus=4, tensor_parallel=3, **kw)
    with pytest.raises(PartitionError, match="does not divide gpus_per_node=2"):
        partition(model, n_gpus=4, tensor_parallel=4, gpus_per_node=2, **kw)


@functools.cache
def _lm() -> tuple[torch.fx.GraphModule, dict[str, int]]:
    """A one-layer Llama with a vocabulary 32x its hidden size and its loss in the graph
    (labels given, as ``partitioner plan hf:...`` traces), built on the meta device."""
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM

    from partitioner import partition

    # 8 key/value heads: T = 4 and 8 divide them (the runtime refuses a head split over ranks)
    cfg = LlamaConfig(num_hidden_layers=1, hidden_size=256, num_attention_heads=8, num_key_value_heads=8,
                      intermediate_size=512, vocab_size=8192, max_position_embeddings=4096, use_cache=False,
                      attn_implementation="sdpa", bos_token_id=0, eos_token_id=0, pad_token_id=0)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    ids = torch.zeros((2, 64), dtype=torch.long, device="meta")
    pipe = partition(model, n_gpus=1, example_inputs={"input_ids": ids, "labels": ids.clone()}, device="h100-sxm",
                     link="nvlink4")
    return pipe.graph, {"B": 2, "S": 4096}


def test_the_output_layer_and_its_loss_cost_a_t_th_per_rank() -> None:
    gm, values = _lm()
    dev, link = DEVICES["h100-sxm"], LINKS["nvlink4"]
    for t in (4, 8):
        tp, sharded = view(gm, t)
        timed = node_time(dev.node_time, tp, link)
        (head,), (loss,), (emb,) = sharded.vocab.heads, sharded.vocab.losses, sharded.vocab.embeddings
        assert head.meta.get(MODULE) == "lm_head" and emb.meta.get(MODULE) == "model.embed_tokens"
        assert param_divisor(tp)["lm_head.weight"] == t and param_divisor(tp)["model.embed_tokens.weight"] == t
        nodes = {n.name: n for n in tp.graph.nodes}
        for n in (head, loss):
            whole, mine = n.meta[COST], nodes[n.name].meta[COST]
            assert mine.fwd_flops == whole.fwd_flops / t and mine.output_bytes == whole.output_bytes / (1 if n is loss else t)
        # the head's matmuls and the fp32 loss: about a T-th each per rank, all-reduces included
        head_whole, head_mine = sum(dev.node_time(head.meta[COST], values)), sum(timed(nodes[head.name].meta[COST], values))
        assert head_mine < head_whole / (0.7 * t) * 1.5, (t, head_whole, head_mine)
        # the loss: its compute a T-th, plus one all-reduce of three fp32 values per token (a
        # latency-bound message, so it is taken out before the share is compared)
        tokens, hidden = values["B"] * values["S"], 256
        loss_whole, loss_mine = sum(dev.node_time(loss.meta[COST], values)), sum(timed(nodes[loss.name].meta[COST], values))
        loss_ring = ring_allreduce_s(3 * 4 * tokens, t, link)
        assert loss_mine - loss_ring < loss_whole / (0.7 * t), (t, loss_whole, loss_mine, loss_ring)
        # the lookup gains one all-reduce of its output (B x S x hidden)
        emb_whole, emb_mine = dev.node_time(emb.meta[COST], values), timed(nodes[emb.name].meta[COST], values)
        ring = ring_allreduce_s(tokens * hidden * emb.meta[DESC].dtype.itemsize, t, link)
        assert emb_mine[0] == pytest.approx(emb_whole[0] + ring, rel=1e-6)
        assert evaluate(sharded.fwd_allreduce[loss.name], values["B"], values["S"]) == 3 * 4 * tokens


def test_a_vocabulary_the_degree_does_not_divide_stays_whole() -> None:
    gm, _ = _lm()
    _, sharded = view(gm, 3)  # 8192 % 3
    assert not sharded.vocab.heads and "lm_head.weight" not in sharded.param_divisor
    assert "does not divide" in sharded.vocab.whole["lm_head.weight"]
