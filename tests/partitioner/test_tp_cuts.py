"""No stage boundary inside a tensor-parallel region: the runtime keeps a region whole when a
value between its column and row linears would leave the stage (``runtime.tensor_parallel``:
"its output leaves the stage"), so the planner does not cut there at T > 1
(``partitioner.tensor_parallel.region_cuts``) and what it prices split is what runs split. Before
this rule the solver could cut BART's decoder self-attention between q/k/v and out_proj and
price it split while the runtime ran it whole."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

from partitioner import PartitionError, partition
from partitioner.passes.tensor_parallel import shard
from partitioner.runtime.tensor_parallel import model_inputs, shard_plan

pytestmark = [pytest.mark.skipif(not os.environ.get("HF_HUB_OFFLINE"), reason="needs HF_HUB_OFFLINE=1"),
              pytest.mark.timeout(120)]
pytest.importorskip("transformers")


def _llama(layers: int) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=layers, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, vocab_size=64, max_position_embeddings=64, use_cache=False,
                      attn_implementation="sdpa", bos_token_id=0, eos_token_id=0, pad_token_id=0)
    ids = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(1))
    return LlamaForCausalLM(cfg), {"input_ids": ids}


def _split(pipe: Any, tp: int) -> tuple[set[str], set[str]]:
    """(the weights the planner priced split, those the runtime splits), by name."""
    sh = shard(pipe.graph, tp)
    weight = {n.name: str(a.target) for n in pipe.graph.graph.nodes for a in n.all_input_nodes[1:2]
              if a.op == "get_attr"}
    want = {weight[n.name] for r in sh.regions for n in (*r.columns, *r.rows)}
    got: set[str] = set()
    for s, st in enumerate(pipe.stages):
        plan = shard_plan(st, tp, last=s == len(pipe.stages) - 1, model_inputs=model_inputs(pipe.plan))
        got |= set(plan.column) | set(plan.row)
    return want, got


def test_a_cut_pinned_inside_an_attention_region_is_refused_naming_it() -> None:
    model, inputs = _llama(2)
    with pytest.raises(PartitionError, match=r"inside the tensor-parallel region"):
        partition(model, 4, inputs, device="cpu", link="loopback", tensor_parallel=2,
                  pinned_cuts=["model.layers.0.self_attn.o_proj"])
    # without tensor parallelism the same cut stands
    pipe = partition(model, 2, inputs, device="cpu", link="loopback", pinned_cuts=["model.layers.0.self_attn.o_proj"])
    assert pipe.plan.pp_ranks == 2


def test_many_stages_cut_between_the_regions_and_the_split_priced_is_the_split_run() -> None:
    # one layer on 4 pipeline ranks x 2 TP ranks: three cuts in a graph with two regions, which
    # a compute-balancing solver would otherwise put inside attention and the MLP
    model, inputs = _llama(1)
    pipe = partition(model, 8, inputs, device="cpu", link="loopback", tensor_parallel=2, n_microbatches=2)
    assert (pipe.plan.pp_ranks, pipe.plan.mesh.tp) == (4, 2)
    want, got = _split(pipe, 2)
    assert want and got == want, (sorted(want - got), sorted(got - want))
