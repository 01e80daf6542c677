"""Tensor-parallel regions: found from dataflow on both capture routes, refused where a split
would compute something else, and priced per rank (FLOPs, parameters, all-reduce bytes)."""

from __future__ import annotations

import os

import pytest
import sympy
import torch
import torch.nn.functional as F
from torch import fx, nn

from partitioner.cost_models.cost import BATCH, SEQ, NodeCost
from partitioner.passes.annotate import AnnotateCosts
from partitioner.passes.meta import COST
from partitioner.passes.shape_prop import ShapeProp, default_specs
from partitioner.passes.tensor_parallel import find_regions, shard
from tests.fixtures.models import FIXTURES


def _annotated(model: nn.Module, *inputs: torch.Tensor) -> fx.GraphModule:
    gm = fx.symbolic_trace(model)
    return AnnotateCosts().run(ShapeProp(inputs=default_specs(list(inputs))).run(gm))


def _names(nodes: tuple[fx.Node, ...]) -> list[str]:
    return [n.name for n in nodes]


class Block(nn.Module):
    """Pre-norm attention + MLP, written as people write it (fx captures it)."""

    def __init__(self, h: int = 32, heads: int = 4, inner: int = 64) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(h), nn.LayerNorm(h)
        self.q, self.k, self.v, self.o = (nn.Linear(h, h) for _ in range(4))
        self.up, self.down = nn.Linear(h, inner), nn.Linear(inner, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        y = self.norm1(x)
        q, k, v = (p(y).view(b, s, self.heads, h // self.heads).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, s, h))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


def test_attention_and_mlp_are_found_on_the_fx_route() -> None:
    gm = _annotated(Block(), torch.randn(2, 8, 32))
    regions = find_regions(gm)
    assert [(_names(r.columns), _names(r.rows)) for r in regions] == [(["q", "k", "v"], ["o"]), (["up"], ["down"])]
    attn, mlp = regions
    assert attn.degrees(8) == [1, 2, 4]  # 4 heads
    assert mlp.degrees(8) == [1, 2, 4, 8]  # 64 inner features
    assert ("q.weight", 0) in attn.params and ("o.weight", 1) in attn.params and ("q.bias", 0) in attn.params
    assert attn.replicated == ("o.bias",)  # added once, after the sum


class NormBetween(nn.Module):
    """A norm over the hidden size between two linears: a split there would normalise a slice."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.norm, self.b = nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.norm(self.a(x)))


class FullOperand(nn.Module):
    """The split value meets a tensor that spans the split features (a residual of the same width)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(32, 32), nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x) + x)


class ScaledFeatures(nn.Module):
    """A per-feature scale on the split value would need splitting too: not a carry."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 16)
        self.scale = nn.Parameter(torch.ones(32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x) * self.scale)


class Broadcast(nn.Module):
    """A tensor that broadcasts over the split features (one value per position) is fine."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = x.mean(-1, keepdim=True)
        return self.b(torch.relu(self.a(x)) * gate)


@pytest.mark.parametrize("model", [NormBetween, FullOperand, ScaledFeatures])
def test_a_split_that_would_change_the_result_is_not_a_region(model: type[nn.Module]) -> None:
    assert find_regions(_annotated(model(), torch.randn(4, 16 if model is not FullOperand else 32))) == []


def test_an_operand_that_broadcasts_over_the_split_is_carried() -> None:
    (r,) = find_regions(_annotated(Broadcast(), torch.randn(4, 16)))
    assert _names(r.columns) == ["a"] and _names(r.rows) == ["b"]


def _at(expr: sympy.Expr, b: int = 2, s: int = 8) -> float:
    return float(sympy.sympify(expr).subs({BATCH: b, SEQ: s}))


def test_one_rank_does_a_degree_th_of_each_region() -> None:
    gm = _annotated(Block(), torch.randn(2, 8, 32))
    regions = find_regions(gm)
    sharded = shard(gm, 2, regions)
    assert not sharded.skipped
    inside = {n.name for r in regions for n in (*r.columns, *r.inner, *r.rows)}
    for node in gm.graph.nodes:
        cost: NodeCost = node.meta.get(COST, NodeCost())
        mine = sharded.costs.get(node.name)
        if node.name in inside:
            assert mine is not None and _at(mine.fwd_flops) == pytest.approx(_at(cost.fwd_flops) / 2), node.name
            assert _at(mine.bwd_flops) == pytest.approx(_at(cost.bwd_flops) / 2), node.name
        else:
            assert mine is None, node.name
    # the row linears' outputs are whole on every rank; the columns' are split
    assert _at(sharded.costs["o"].output_bytes) == _at(gm.graph.find_nodes(op="call_module", target="o")[0]
                                                        .meta[COST].output_bytes)
    assert sharded.costs["q"].shape[2] == 16  # N / T of the (M, K, N) matmul
    # one all-reduce of (B, S, 32) fp32 per region each way
    assert {k: _at(v) for k, v in sharded.fwd_allreduce.items()} == {"o": 2 * 8 * 32 * 4, "down": 2 * 8 * 32 * 4}
    assert {k: _at(v) for k, v in sharded.bwd_allreduce.items()} == {"q": 2 * 8 * 32 * 4, "up": 2 * 8 * 32 * 4}
    assert sharded.param_divisor == {n: 2 for n in ("q.weight", "q.bias", "k.weight", "k.bias", "v.weight",
                                                     "v.bias", "o.weight", "up.weight", "up.bias", "down.weight")}


def test_a_degree_the_heads_do_not_divide_is_refused_as_the_runtime_refuses_it() -> None:
    # pricing attention whole at T=4 would not be what runs: the runtime refuses 2 heads over
    # 4 ranks (runtime.tensor_parallel.shard_plan), so the rank view says why and prices nothing
    gm = _annotated(Block(heads=2), torch.randn(2, 8, 32))
    sharded = shard(gm, 4)
    assert sharded.refused is not None and "which tp=4 does not divide" in sharded.refused
    assert not sharded.regions and not sharded.param_divisor
    assert shard(gm, 2).refused is None and len(shard(gm, 2).regions) == 2


def test_the_fixture_transformers_shard_every_layer() -> None:
    # gpt's attention is one fused c_attn split into q, k, v on its features: whole (a Shard(0)
    # weight would give rank 0 all of q), so one region per layer, its MLP
    for name, per_layer in (("gpt", 1), ("llama", 2)):
        f = FIXTURES[name]
        model = f.build()
        gm = _annotated(model, *f.inputs())
        regions = find_regions(gm)
        n_layers = sum(1 for m in model.modules() if type(m).__name__ in ("Block", "TransformerBlock", "Layer"))
        assert n_layers > 0 and len(regions) == per_layer * n_layers, (name, len(regions))
        assert all(2 in r.degrees(2) for r in regions), name


@pytest.mark.skipif(not os.environ.get("HF_HUB_OFFLINE"), reason="needs HF_HUB_OFFLINE=1 (as scripts/test.sh sets)")
def test_a_hugging_face_llama_through_export_with_grouped_kv_heads() -> None:
    pytest.importorskip("transformers")
    from partitioner import partition
    from tests.hf.models import _ids, llama

    pipe = partition(llama(2), n_gpus=1, example_inputs={"input_ids": _ids(2, 8)})
    regions = find_regions(pipe.graph)
    assert len(regions) == 4  # attention and MLP of each of 2 layers
    attn, mlp = regions[:2]
    assert [c.meta.get("pp.module") for c in attn.columns] == [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    assert [r.meta.get("pp.module") for r in mlp.rows] == ["model.layers.0.mlp.down_proj"]
    assert attn.degrees(8) == [1, 2]  # 2 key/value heads: a degree of 4 would split a head
    assert 4 in mlp.degrees(8)
