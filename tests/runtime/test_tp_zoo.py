"""Tensor parallelism on architectures the runtime was not written against: Mistral, Qwen2, Qwen3,
Gemma and Gemma 2 (grouped-query attention: 4 query heads, 2 key/value heads), GPT-J and BLOOM
as 2 pipeline stages x 2 tensor-parallel ranks on gloo train under 1F1B like one process on the whole batch (losses,
gradient norms with clipping, parameters after the steps), with attention, MLP and
vocabulary split (each row-parallel linear and split table checked by placement)."""

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
from partitioner.runtime.tensor_parallel import full_state, with_tensor_parallel
from tests.runtime.helpers import dtensor_meshes, sgd_reference

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")

TIMEOUT_S = 150.0
LR, STEPS, M, MAX_NORM = 0.1, 3, 2, 1.0
# float32: the row-parallel linears' all-reduces sum in another order (rounding only)
RTOL, ATOL = 1e-5, 1e-6
VOCAB = 64

#: config class, model class, extra config: GQA (4 query heads over 2 key/value heads) everywhere
ARCHS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),  # q, k, v with biases: split with their weights
    # an RMSNorm over each head's features (q_norm, k_norm) between the projections and attention
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 8}),  # tied embedding and output layer
    # tied too, and its logits soft-capped (tanh) before the loss: the output layer stays whole,
    # so the tied embedding on the other pipeline rank stays whole too (as the planner prices it)
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 8, "attn_implementation": "eager"}),
    # no GQA in these two: GPT-J's rotary stacks (-x2, x1) on the heads' shards; BLOOM's fused
    # q/k/v stays whole (its attention merges batch and heads for ALiBi), its MLP and vocabulary split
    "gptj": ("GPTJConfig", "GPTJForCausalLM", {"n_embd": 32, "n_layer": 2, "n_head": 4, "rotary_dim": 4,
                                               "n_positions": 64, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
                                               "attn_pdrop": 0.0, "attn_implementation": "eager"}),
    "bloom": ("BloomConfig", "BloomForCausalLM", {"n_layer": 2, "n_head": 4, "hidden_dropout": 0.0,
                                                  "attention_dropout": 0.0, "attn_implementation": "eager"}),
}
#: per architecture: its layers' prefix, and weight -> (placement, local shape) on PP2 x TP2
SPLIT: dict[str, tuple[str, dict[str, tuple[str, tuple[int, ...]]]]] = {
    "gptj": ("transformer.h.", {"attn.q_proj.weight": ("Shard(dim=0)", (16, 32)),
                                "attn.out_proj.weight": ("Shard(dim=1)", (32, 16)),
                                "mlp.fc_in.weight": ("Shard(dim=0)", (64, 32)),
                                "mlp.fc_out.weight": ("Shard(dim=1)", (32, 64))}),
    "bloom": ("transformer.h.", {"self_attention.query_key_value.weight": ("Replicate()", (96, 32)),
                                 "mlp.dense_h_to_4h.weight": ("Shard(dim=0)", (64, 32)),
                                 "mlp.dense_4h_to_h.weight": ("Shard(dim=1)", (32, 64))}),
}


def _model(name: str) -> torch.nn.Module:
    import transformers

    cfg_cls, model_cls, extra = ARCHS[name]
    kw: dict[str, Any] = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                              intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64, use_cache=False,
                              attn_implementation="sdpa", bos_token_id=0, eos_token_id=0, pad_token_id=0)
    cfg = getattr(transformers, cfg_cls)(**{**kw, **extra})
    return getattr(transformers, model_cls)(cfg)


def _data() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {"input_ids": torch.randint(0, VOCAB, (4, 8), generator=g)}, torch.randint(0, VOCAB, (4, 8), generator=g)


def _loss(out: Any, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.logits.flatten(0, 1), y.flatten())


@functools.cache
def _built(name: str) -> tuple[torch.nn.Module, Any, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = _model(name)
    inputs, _ = _data()
    pipe = partition(model, 2, inputs, device="cpu", link="loopback", pinned_cuts=[SPLIT.get(name, ("model.layers.",))[0] + "1"],
                     n_microbatches=M)
    return model, pipe, copy.deepcopy(model.state_dict())


def _train(rank: int, world: int, pipe: Any) -> dict[str, Any]:
    inputs, y = _data()
    stage = pipe.build_stage(rank, "cpu")
    opt = torch.optim.SGD(stage.parameters(), lr=LR)
    runner = stage.runner("1f1b", loss_fn=_loss)
    losses, norms = [], []
    for _ in range(STEPS):
        stage.zero_grad()
        loss = runner.step(**(inputs if stage.is_first else {}), target=y if stage.is_last else None)
        norms.append(stage.clip_grad_norm_(MAX_NORM).item())
        opt.step()
        losses.append(None if loss is None else loss.item())
    return {"pp": stage.pp_rank, "tp": stage.tp_rank, "losses": losses, "norms": norms,
            "meshes": dtensor_meshes(stage), "params": full_state(stage.named_parameters())}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", list(ARCHS))
def test_pp2_tp2_trains_like_one_process(name: str) -> None:
    model, pipe, init = _built(name)
    inputs, y = _data()
    # every name of a tied tensor (Gemma's embedding is its output layer, held by both pipeline ranks)
    ref = sgd_reference(model, inputs, y, _loss, steps=STEPS, lr=LR, max_norm=MAX_NORM, init=init)
    assert min(ref.norms) > MAX_NORM, "clipping should change every step"
    results = spawn(_train, 4, with_tensor_parallel(pipe, 2), timeout_s=TIMEOUT_S)
    assert [(r["pp"], r["tp"]) for r in results] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for r in results[2:]:
        assert r["losses"] == pytest.approx(ref.losses, rel=RTOL)
    for r in results:
        assert r["norms"] == pytest.approx(ref.norms, rel=RTOL)
        for n, v in r["params"].items():
            torch.testing.assert_close(v, ref.params[n], rtol=RTOL, atol=ATOL, msg=lambda m, n=n: f"{n}: {m}")
    assert set().union(*(r["params"] for r in results)) == set(ref.params)
    got = {k: (v[1], v[2]) for r in (results[0], results[2]) for k, v in r["meshes"].items()}
    if name in SPLIT:
        prefix, want = SPLIT[name]
        for layer in (0, 1):
            for w, (where, shape) in want.items():
                assert got[f"{prefix}{layer}.{w}"] == ((where,), shape), (w, got[f"{prefix}{layer}.{w}"])
        return
    for layer in (0, 1):  # 4 query heads x 8 and 2 key/value heads x 8 by rows; o and down by columns
        p = f"model.layers.{layer}."
        assert got[p + "self_attn.q_proj.weight"] == (("Shard(dim=0)",), (16, 32)), got
        assert got[p + "self_attn.k_proj.weight"] == (("Shard(dim=0)",), (8, 32))
        assert got[p + "self_attn.v_proj.weight"] == (("Shard(dim=0)",), (8, 32))
        assert got[p + "self_attn.o_proj.weight"] == (("Shard(dim=1)",), (32, 16))
        assert got[p + "mlp.down_proj.weight"] == (("Shard(dim=1)",), (32, 32))
        if name == "qwen2":
            assert got[p + "self_attn.k_proj.bias"] == (("Shard(dim=0)",), (8,))
    vocab = (("Replicate()",), (64, 32)) if name == "gemma2" else (("Shard(dim=0)",), (32, 32))
    assert got["model.embed_tokens.weight"] == vocab and got["lm_head.weight"] == vocab, got
    if name in ("gemma", "gemma2"):  # tied across the pipeline ranks: both copies the same shard, summed shard by shard
        assert model.lm_head.weight is model.model.embed_tokens.weight
        torch.testing.assert_close(results[0]["params"]["model.embed_tokens.weight"], results[2]["params"]["lm_head.weight"])
