"""Vocabulary parallelism under tensor parallelism, on gloo against one process on the whole
batch: a tiny Llama whose loss is inside the captured graph (labels given: the cross-entropy
runs on logits split by vocabulary under ``loss_parallel``) as 2 pipeline stages x 2 TP ranks
under 1F1B; a GPT-2 whose embedding and output layer share one weight, split the same way on
each rank of one stage; a loss the split logits do not suit, which gets them gathered; and the
weight tied across pipeline ranks, each copy split alike and summed shard by shard."""

from __future__ import annotations

import contextlib
import copy
import functools
import os
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from partitioner import partition
from partitioner.passes.tensor_parallel import find_vocab
from partitioner.runtime.launch import spawn
from partitioner.runtime.tensor_parallel import full_state, shard_plan, with_tensor_parallel
from tests.runtime.helpers import sgd_reference
from tests.runtime.test_tensor_parallel import _NoModuleTracking

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")

TIMEOUT_S = 150.0
LR, STEPS, M = 0.1, 2, 2
# float32: the split lookup sums one non-zero row with zeros, the split loss sums T partial
# sums of exponentials where one process sums one: rounding only
RTOL, ATOL = 1e-5, 1e-6
VOCAB = 64


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64, use_cache=False,
                      attn_implementation="sdpa", bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg)


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=64, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)  # lm_head.weight is transformer.wte.weight


def _ids(seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, 8), generator=torch.Generator().manual_seed(seed))


def _in_graph_loss(out: Any, y: Any) -> torch.Tensor:
    return out.loss


def _logits_loss(out: Any, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.logits.flatten(0, 1), y.flatten())


def _mse_loss(out: Any, y: torch.Tensor) -> torch.Tensor:  # not a cross-entropy: the logits are gathered for it
    return F.mse_loss(out.logits, F.one_hot(y, VOCAB).float())


CASES: dict[str, Any] = {
    # name: (model, inputs, target, loss_fn, n_gpus, pinned cuts)
    "llama-labels": (_llama, {"input_ids": _ids(1), "labels": _ids(2)}, _ids(2), _in_graph_loss, 2, ["model.layers.1"]),
    "gpt2-tied": (_gpt2, {"input_ids": _ids(1)}, _ids(2), _logits_loss, 1, []),
    "gpt2-mse": (_gpt2, {"input_ids": _ids(1)}, _ids(2), _mse_loss, 1, []),
    "gpt2-two-stages": (_gpt2, {"input_ids": _ids(1)}, _ids(2), _logits_loss, 2, ["transformer.h.1"]),
}


@functools.cache
def _built(name: str) -> tuple[nn.Module, Any, dict[str, torch.Tensor]]:
    make, inputs, _, _, n_gpus, cuts = CASES[name]
    torch.manual_seed(0)
    model = make()
    pipe = partition(model, n_gpus, inputs, device="cpu", link="loopback", pinned_cuts=cuts, n_microbatches=M)
    return model, pipe, copy.deepcopy(model.state_dict())


def _reference(name: str) -> tuple[list[float], dict[str, torch.Tensor], torch.Tensor]:
    model, _, init = _built(name)
    _, inputs, y, loss_fn, _, _ = CASES[name]
    ref = copy.deepcopy(model)
    ref.load_state_dict(init)
    with torch.no_grad():
        logits = ref(**inputs).logits
    run = sgd_reference(model, inputs, y, loss_fn, steps=STEPS, lr=LR, init=init, remove_duplicate=True)
    return run.losses, run.params, logits


def _train(rank: int, world: int, name: str, pipe: Any) -> dict[str, Any]:
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.debug import CommDebugMode

    _, inputs, y, loss_fn, _, _ = CASES[name]
    stage = pipe.build_stage(rank, "cpu")
    opt = torch.optim.SGD(stage.parameters(), lr=LR)
    runner = stage.runner("1f1b", loss_fn=loss_fn)
    kw = inputs if stage.is_first else {}
    target = y if stage.is_last else None
    _, outputs = runner.eval_step(**kw, target=target, return_outputs=True)  # type: ignore[misc]
    logits = outputs.logits if outputs is not None else None
    losses, gathers = [], 0
    for i in range(STEPS):
        stage.zero_grad()
        comm = CommDebugMode()
        comm.advanced_module_tracker = _NoModuleTracking()  # type: ignore[assignment]
        with comm if i == 0 else contextlib.nullcontext():
            loss = runner.step(**kw, target=target)
        if i == 0:
            # not the transport's all-gather of boundary messages (``c10d._allgather_base_``, runtime.dist)
            gathers = sum(v for k, v in comm.get_comm_counts().items()
                          if "gather" in str(k) and "_allgather_base" not in str(k))
        opt.step()
        losses.append(None if loss is None else loss.item())
    placements = {n: (repr(p.placements[0]), tuple(p.to_local().shape)) for n, p in
                  stage.named_parameters(remove_duplicate=False) if isinstance(p, DTensor)}
    tied = [m for m in stage.modules.values()
            if hasattr(m, "lm_head") and hasattr(getattr(m, "transformer", None), "wte")]  # both uses in one stage
    same = bool(tied) and tied[0].lm_head.weight is tied[0].transformer.wte.weight
    return {"losses": losses, "logits": logits, "placements": placements, "same": same,
            "params": full_state(stage.named_parameters()), "last": stage.is_last, "gathers": gathers}


def _check(name: str, results: list[dict[str, Any]]) -> None:
    want_losses, want, logits = _reference(name)
    for r in results:
        if r["last"]:  # the eval's outputs come back whole, the model's
            assert isinstance(r["logits"], torch.Tensor) and type(r["logits"]) is torch.Tensor
            torch.testing.assert_close(r["logits"], logits, rtol=RTOL, atol=ATOL)
            assert r["losses"] == pytest.approx(want_losses, rel=RTOL)
        for n, v in r["params"].items():
            torch.testing.assert_close(v, want[n], rtol=RTOL, atol=ATOL, msg=lambda m, n=n: f"{n}: {m}")
    assert set().union(*(r["params"] for r in results)) == set(want)


@pytest.mark.timeout(240)
def test_a_llama_with_its_loss_in_the_graph_trains_like_one_process_on_split_logits() -> None:
    _, pipe, _ = _built("llama-labels")
    last = shard_plan(pipe.stages[1], 2)
    # the output layer by vocabulary; the in-graph cross-entropy on the split logits, which
    # also leave the stage split (gathered only when asked for)
    assert last.heads == {"lm_head.weight": last.heads["lm_head.weight"]} and last.losses == ("cross_entropy_loss",)
    assert last.split_outputs and shard_plan(pipe.stages[0], 2).embeddings.keys() == {"model.embed_tokens.weight"}
    results = spawn(_train, 4, "llama-labels", with_tensor_parallel(pipe, 2), timeout_s=TIMEOUT_S)
    _check("llama-labels", results)
    assert [r["gathers"] for r in results] == [0, 0, 0, 0]  # a training step never gathers the logits
    assert results[0]["placements"]["model.embed_tokens.weight"] == ("Shard(dim=0)", (32, 32))
    assert results[2]["placements"]["lm_head.weight"] == ("Shard(dim=0)", (32, 32))


@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", ["gpt2-tied", "gpt2-mse"])
def test_a_tied_embedding_and_output_layer_split_alike_in_one_stage(name: str) -> None:
    _, pipe, _ = _built(name)
    plan = shard_plan(pipe.stages[0], 2)
    assert set(plan.embeddings) == {"transformer.wte.weight"} and set(plan.heads) == {"lm_head.weight"}
    assert plan.placements["transformer.wte.weight"] == plan.placements["lm_head.weight"] == "Shard(0)"
    assert "transformer.wpe.weight" not in plan.embeddings  # positions made inside the model: whole
    results = spawn(_train, 2, name, with_tensor_parallel(pipe, 2), timeout_s=TIMEOUT_S)
    _check(name, results)
    # the cross-entropy runs on the shards; a loss it does not suit gets the logits gathered
    assert [r["gathers"] > 0 for r in results] == [name == "gpt2-mse"] * 2
    for r in results:  # one weight, one DTensor: the lookup and the output layer share its shard
        assert r["same"]
        assert r["placements"]["transformer.wte.weight"] == ("Shard(dim=0)", (32, 32))


@pytest.mark.timeout(240)
def test_a_weight_tied_across_pipeline_ranks_trains_like_one_process() -> None:
    """GPT-2's embedding on pipeline rank 0 and its output layer on rank 1 share one weight:
    both copies split by vocabulary alike (TP rank t holds rows t V / T .. (t + 1) V / T of each),
    and the tie's gradient sum runs shard by shard between the same TP rank of each pipeline rank."""
    _, pipe, _ = _built("gpt2-two-stages")
    assert find_vocab(pipe.stages[0], model_outputs=False).embeddings
    results = spawn(_train, 4, "gpt2-two-stages", with_tensor_parallel(pipe, 2), timeout_s=TIMEOUT_S)
    want_losses, want, logits = _reference("gpt2-two-stages")
    for r in results[2:]:
        torch.testing.assert_close(r["logits"], logits, rtol=RTOL, atol=ATOL)
        assert r["losses"] == pytest.approx(want_losses, rel=RTOL)
    for r in results:
        for n, v in r["params"].items():  # the output layer's copy is the embedding's weight
            ref = want["transformer.wte.weight" if n == "lm_head.weight" else n]
            torch.testing.assert_close(v, ref, rtol=RTOL, atol=ATOL, msg=lambda m, n=n: f"{n}: {m}")
    assert set().union(*(r["params"] for r in results)) == set(want) | {"lm_head.weight"}
    assert results[0]["placements"]["transformer.wte.weight"] == ("Shard(dim=0)", (32, 32))
    assert results[2]["placements"]["lm_head.weight"] == ("Shard(dim=0)", (32, 32))
