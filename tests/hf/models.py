"""Tiny Hugging Face models built from configs (random weights, never downloaded).

Each entry gives the model, keyword inputs for ``model(**inputs)``, the glob of its
repeated blocks (what a torchtitan or Megatron user would cut at), the output field
whose value is compared, and the input holding the sequence dimension.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # configs only; nothing is fetched

VOCAB, HIDDEN, HEADS, BATCH, SEQ = 256, 64, 4, 4, 16


@dataclass(frozen=True)
class HFCase:
    build: Callable[[int], torch.nn.Module]  # n_layers -> model (dropout off, use_cache off)
    inputs: Callable[[int, int], dict[str, torch.Tensor]]  # (batch, seq) -> kwargs
    blocks: str  # glob of the repeated blocks, for cut_at
    block_prefix: str  # "transformer.h." : blocks are block_prefix + index
    output: str  # the ModelOutput field compared


def _ids(batch: int, seq: int, *, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _mask(batch: int, seq: int) -> torch.Tensor:
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, seq - 3:] = 0  # one padded row, so the mask is not a no-op
    return mask


def gpt2(n_layers: int = 4) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=n_layers, n_embd=HIDDEN, n_head=HEADS, vocab_size=VOCAB, n_positions=128,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)  # lm_head.weight is transformer.wte.weight (tied)


def bert(n_layers: int = 4) -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(num_hidden_layers=n_layers, hidden_size=HIDDEN, num_attention_heads=HEADS,
                     intermediate_size=4 * HIDDEN, vocab_size=VOCAB, max_position_embeddings=128,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, use_cache=False)
    return BertModel(cfg)


def t5(n_layers: int = 2) -> torch.nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(num_layers=n_layers, num_decoder_layers=n_layers, d_model=HIDDEN, d_kv=HIDDEN // HEADS,
                   d_ff=4 * HIDDEN, num_heads=HEADS, vocab_size=VOCAB, dropout_rate=0.0, use_cache=False,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5ForConditionalGeneration(cfg)


def llama(n_layers: int = 4) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(num_hidden_layers=n_layers, hidden_size=HIDDEN, num_attention_heads=HEADS,
                      num_key_value_heads=HEADS // 2, intermediate_size=172, vocab_size=VOCAB,
                      max_position_embeddings=128, use_cache=False, attn_implementation="sdpa",
                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg)


CASES: dict[str, HFCase] = {
    "gpt2": HFCase(gpt2, lambda b, s: {"input_ids": _ids(b, s)}, "transformer.h.*", "transformer.h.", "logits"),
    "bert": HFCase(bert, lambda b, s: {"input_ids": _ids(b, s), "attention_mask": _mask(b, s)},
                   "encoder.layer.*", "encoder.layer.", "last_hidden_state"),
    "t5": HFCase(t5, lambda b, s: {"input_ids": _ids(b, s), "attention_mask": _mask(b, s),
                                   "decoder_input_ids": _ids(b, s, seed=2)},
                 "*.block.*", "decoder.block.", "logits"),
    "llama": HFCase(llama, lambda b, s: {"input_ids": _ids(b, s), "attention_mask": _mask(b, s)},
                    "model.layers.*", "model.layers.", "logits"),
}


def main_output(out: Any, field: str) -> torch.Tensor:
    """The compared tensor of a ModelOutput (or of the plain tuple/dict it flattens to)."""
    if hasattr(out, field):
        return getattr(out, field)
    if isinstance(out, dict):
        return out[field]
    raise TypeError(f"{type(out).__name__} has no field {field!r}")
