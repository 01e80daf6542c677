"""A fused q/k/v projection laid out per head (GPT-NeoX's ``query_key_value``: its output viewed
as (..., heads, 3 x head_dim) and chunked on the last dimension) shards as it is: ``Shard(0)``
gives each TP rank whole heads with their q, k and v, so the planner prices it split and the
runtime runs it split, and 2 TP ranks train like one process (gloo). A fused projection stacked
by output feature ([q; k; v], [gate; up]) stays whole in both (tests/partitioner/test_tp_agreement.py)."""

from __future__ import annotations

import copy
import functools
import os
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from partitioner import partition
from partitioner.runtime.launch import spawn
from partitioner.runtime.tensor_parallel import full_state

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = [pytest.mark.skipif(not os.environ.get("HF_HUB_OFFLINE"), reason="needs HF_HUB_OFFLINE=1"),
              pytest.mark.timeout(200)]
pytest.importorskip("transformers")

LR, STEPS, M = 0.1, 2, 2
RTOL, ATOL = 1e-5, 1e-6  # float32: a row-parallel linear sums two half dot products


def _model() -> torch.nn.Module:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, use_cache=False, hidden_dropout=0.0,
                        attention_dropout=0.0, rotary_pct=0.5, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return GPTNeoXForCausalLM(cfg)


def _data() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {"input_ids": torch.randint(0, 64, (4, 8), generator=g)}, torch.randint(0, 64, (4, 8), generator=g)


def _loss(out: Any, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.logits.flatten(0, 1), y.flatten())


@functools.cache
def _built() -> tuple[torch.nn.Module, Any, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = _model()
    init = copy.deepcopy(model.state_dict())
    pipe = partition(model, 2, _data()[0], device="cpu", link="loopback", tensor_parallel=2, n_microbatches=M)
    return model, pipe, init


def _train(rank: int, world: int, pipe: Any) -> dict[str, Any]:
    inputs, y = _data()
    stage = pipe.build_stage(rank, "cpu")
    opt = torch.optim.SGD(stage.parameters(), lr=LR)
    runner = stage.runner(loss_fn=_loss)
    losses = []
    for _ in range(STEPS):
        stage.zero_grad()
        loss = runner.step(**inputs, target=y)
        opt.step()
        losses.append(loss.item())
    plans = list(stage.tp_plans.values())
    return {"losses": losses, "column": set().union(*(p.column for p in plans)),
            "row": set().union(*(p.row for p in plans)), "params": full_state(stage.named_parameters())}


def test_gpt_neox_fused_qkv_is_priced_and_run_split_and_trains_like_one_process() -> None:
    model, pipe, init = _built()
    assert (pipe.plan.mesh.pp, pipe.plan.mesh.tp) == (1, 2)
    qkv = {f"gpt_neox.layers.{i}.attention.query_key_value.weight" for i in range(2)}
    dense = {f"gpt_neox.layers.{i}.attention.dense.weight" for i in range(2)}
    from partitioner.passes.tensor_parallel import shard

    priced = shard(pipe.graph, 2).param_divisor
    assert all(priced.get(w) == 2 for w in qkv | dense), priced
    model.load_state_dict(init)
    results = spawn(_train, 2, pipe, timeout_s=150.0)
    ref = copy.deepcopy(model)
    ref.load_state_dict(init)
    opt = torch.optim.SGD(ref.parameters(), lr=LR)
    inputs, y = _data()
    want = []
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        loss = _loss(ref(**inputs), y)
        loss.backward()
        opt.step()
        want.append(loss.item())
    for r in results:
        assert qkv <= r["column"] and dense <= r["row"]  # run split, as priced
        assert r["losses"] == pytest.approx(want, rel=RTOL)
        for n, p in ref.named_parameters():
            torch.testing.assert_close(r["params"][n], p.detach(), rtol=RTOL, atol=ATOL, msg=lambda m, n=n: f"{n}: {m}")
