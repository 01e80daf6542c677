"""A zoo of Hugging Face architectures, each built from a tiny config (random weights, never
downloaded): decoder LMs (dense, MoE, Mamba), encoder-decoders, encoders, vision, audio.

Every entry gives a builder (2 layers, dropout off, ``use_cache=False``), keyword inputs,
the compared output field, and an argument the example leaves out on purpose (``extra``):
calling the pipe with it must not be dropped silently (issue 9, item 1).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # configs only; nothing is fetched

VOCAB, HIDDEN, HEADS, FFN, LAYERS, POS = 128, 32, 2, 64, 2, 64
BATCH, SEQ = 2, 8


@dataclass(frozen=True)
class ZooCase:
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[], dict[str, Any]]
    output: str  # the ModelOutput field compared first
    family: str  # decoder / moe / ssm / enc-dec / encoder / vision / audio / multimodal
    extra: dict[str, Callable[[], Any]] = field(default_factory=dict)  # an argument not in the example
    route: str = "export"  # the capture route partition() takes (capture_route="auto")


def _ids(seed: int = 1, batch: int = BATCH, seq: int = SEQ) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _mask() -> torch.Tensor:
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[0, SEQ - 2:] = 0  # one padded row, so the mask is not a no-op
    return mask


def _pixels(size: int = 32, channels: int = 3) -> torch.Tensor:
    return torch.randn(BATCH, channels, size, size, generator=torch.Generator().manual_seed(3))


def _lm_inputs() -> dict[str, Any]:
    return {"input_ids": _ids(), "attention_mask": _mask()}


def _labels() -> torch.Tensor:
    return _ids(seed=7)


def _class_labels() -> torch.Tensor:
    return torch.tensor([0, 1])


def _build(config_cls: str, model_cls: str, **kw: Any) -> Callable[[], torch.nn.Module]:
    def make() -> torch.nn.Module:
        import transformers

        cfg = getattr(transformers, config_cls)(**kw)
        model = getattr(transformers, model_cls)(cfg)
        return model.eval()  # dropout off; batch norm on its running statistics

    return make


_DEC = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            intermediate_size=FFN, max_position_embeddings=POS, use_cache=False, bos_token_id=0,
            eos_token_id=0, pad_token_id=0)
_LLAMA_LIKE = dict(_DEC, num_key_value_heads=1, attn_implementation="sdpa")
_ENC = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            intermediate_size=FFN, max_position_embeddings=POS, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, pad_token_id=0)
_LM_EXTRA = {"labels": _labels}
_HIDDEN_EXTRA = {"output_hidden_states": lambda: True}

ZOO: dict[str, ZooCase] = {
    # decoder LMs
    "mistral": ZooCase(_build("MistralConfig", "MistralForCausalLM", **_LLAMA_LIKE), _lm_inputs, "logits", "decoder",
                       _LM_EXTRA),
    "qwen2": ZooCase(_build("Qwen2Config", "Qwen2ForCausalLM", **_LLAMA_LIKE), _lm_inputs, "logits", "decoder",
                     _LM_EXTRA),
    "qwen3": ZooCase(_build("Qwen3Config", "Qwen3ForCausalLM", **_LLAMA_LIKE, head_dim=16), _lm_inputs, "logits",
                     "decoder", _LM_EXTRA),
    "gemma": ZooCase(_build("GemmaConfig", "GemmaForCausalLM", **_LLAMA_LIKE, head_dim=16), _lm_inputs, "logits",
                     "decoder", _LM_EXTRA),
    "gemma2": ZooCase(_build("Gemma2Config", "Gemma2ForCausalLM", **{**_LLAMA_LIKE, "attn_implementation": "eager"},
                             head_dim=16, sliding_window=4), _lm_inputs, "logits", "decoder", _LM_EXTRA),
    "phi": ZooCase(_build("PhiConfig", "PhiForCausalLM", **_DEC, resid_pdrop=0.0, embd_pdrop=0.0), _lm_inputs,
                   "logits", "decoder", _LM_EXTRA),
    "phi3": ZooCase(_build("Phi3Config", "Phi3ForCausalLM", **_LLAMA_LIKE), _lm_inputs, "logits", "decoder",
                    _LM_EXTRA),
    "gpt_neox": ZooCase(_build("GPTNeoXConfig", "GPTNeoXForCausalLM", **_DEC, hidden_dropout=0.0,
                               attention_dropout=0.0), _lm_inputs, "logits", "decoder", _LM_EXTRA),
    "gptj": ZooCase(_build("GPTJConfig", "GPTJForCausalLM", vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS,
                           n_head=HEADS, rotary_dim=8, n_positions=POS, use_cache=False, resid_pdrop=0.0,
                           embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0),
                    _lm_inputs, "logits", "decoder", _LM_EXTRA),
    "opt": ZooCase(_build("OPTConfig", "OPTForCausalLM", vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                          num_attention_heads=HEADS, ffn_dim=FFN, word_embed_proj_dim=HIDDEN,
                          max_position_embeddings=POS, dropout=0.0, attention_dropout=0.0, use_cache=False,
                          bos_token_id=0, eos_token_id=0, pad_token_id=1),
                   _lm_inputs, "logits", "decoder", _LM_EXTRA),
    "bloom": ZooCase(_build("BloomConfig", "BloomForCausalLM", vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=LAYERS,
                            n_head=HEADS, hidden_dropout=0.0, attention_dropout=0.0, use_cache=False,
                            bos_token_id=0, eos_token_id=0, pad_token_id=0),
                     _lm_inputs, "logits", "decoder", _LM_EXTRA),
    "falcon": ZooCase(_build("FalconConfig", "FalconForCausalLM", vocab_size=VOCAB, hidden_size=HIDDEN,
                             num_hidden_layers=LAYERS, num_attention_heads=HEADS, hidden_dropout=0.0,
                             attention_dropout=0.0, use_cache=False, bos_token_id=0, eos_token_id=0),
                      _lm_inputs, "logits", "decoder", _LM_EXTRA),
    "gpt_bigcode": ZooCase(_build("GPTBigCodeConfig", "GPTBigCodeForCausalLM", vocab_size=VOCAB, n_embd=HIDDEN,
                                  n_layer=LAYERS, n_head=HEADS, n_positions=POS, resid_pdrop=0.0, embd_pdrop=0.0,
                                  attn_pdrop=0.0, use_cache=False, bos_token_id=0, eos_token_id=0),
                           _lm_inputs, "logits", "decoder", _LM_EXTRA),
    # MoE and state-space decoders
    "mixtral": ZooCase(_build("MixtralConfig", "MixtralForCausalLM", **_LLAMA_LIKE, num_local_experts=4,
                              num_experts_per_tok=2), _lm_inputs, "logits", "moe", _LM_EXTRA),
    "qwen2_moe": ZooCase(_build("Qwen2MoeConfig", "Qwen2MoeForCausalLM", **_LLAMA_LIKE, num_experts=4,
                                num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32),
                         _lm_inputs, "logits", "moe", _LM_EXTRA),
    "mamba": ZooCase(_build("MambaConfig", "MambaForCausalLM", vocab_size=VOCAB, hidden_size=HIDDEN,
                            num_hidden_layers=LAYERS, state_size=8, expand=2, conv_kernel=4, use_cache=False,
                            bos_token_id=0, eos_token_id=0, pad_token_id=0),
                     lambda: {"input_ids": _ids()}, "logits", "ssm", _LM_EXTRA),
    # hybrid and recurrent decoders: Jamba (Mamba + attention + MoE; its capture fixes S), RWKV
    "jamba": ZooCase(_build("JambaConfig", "JambaForCausalLM", **_LLAMA_LIKE, num_experts=4, num_experts_per_tok=2,
                            expert_layer_period=2, expert_layer_offset=1, attn_layer_period=2, attn_layer_offset=1,
                            mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=4),
                     _lm_inputs, "logits", "ssm", _LM_EXTRA),
    "rwkv": ZooCase(_build("RwkvConfig", "RwkvForCausalLM", vocab_size=VOCAB, hidden_size=HIDDEN,
                           num_hidden_layers=LAYERS, attention_hidden_size=HIDDEN, intermediate_size=FFN,
                           context_length=POS, use_cache=False, bos_token_id=0, eos_token_id=0),
                    lambda: {"input_ids": _ids()}, "logits", "ssm", _LM_EXTRA),
    # encoder-decoders
    "bart": ZooCase(_build("BartConfig", "BartForConditionalGeneration", vocab_size=VOCAB, d_model=HIDDEN,
                           encoder_layers=1, decoder_layers=1, encoder_attention_heads=HEADS,
                           decoder_attention_heads=HEADS, encoder_ffn_dim=FFN, decoder_ffn_dim=FFN,
                           max_position_embeddings=POS, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                           use_cache=False, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                           decoder_start_token_id=2, forced_eos_token_id=None),
                    lambda: {**_lm_inputs(), "decoder_input_ids": _ids(seed=2)}, "logits", "enc-dec", _LM_EXTRA),
    "whisper": ZooCase(_build("WhisperConfig", "WhisperForConditionalGeneration", vocab_size=VOCAB, d_model=HIDDEN,
                              encoder_layers=1, decoder_layers=1, encoder_attention_heads=HEADS,
                              decoder_attention_heads=HEADS, encoder_ffn_dim=FFN, decoder_ffn_dim=FFN,
                              num_mel_bins=8, max_source_positions=16, max_target_positions=POS, dropout=0.0,
                              attention_dropout=0.0, activation_dropout=0.0, use_cache=False, pad_token_id=0,
                              bos_token_id=0, eos_token_id=0, decoder_start_token_id=0,
                              suppress_tokens=None, begin_suppress_tokens=None),
                       lambda: {"input_features": torch.randn(BATCH, 8, 32, generator=torch.Generator().manual_seed(4)),
                                "decoder_input_ids": _ids(seed=2)},
                       "logits", "enc-dec", _LM_EXTRA),
    # encoders
    "distilbert": ZooCase(_build("DistilBertConfig", "DistilBertForSequenceClassification", vocab_size=VOCAB, dim=HIDDEN,
                                 n_layers=LAYERS, n_heads=HEADS, hidden_dim=FFN, max_position_embeddings=POS,
                                 dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0, pad_token_id=0),
                          _lm_inputs, "logits", "encoder", {"labels": _class_labels}),
    "roberta": ZooCase(_build("RobertaConfig", "RobertaForMaskedLM", **{**_ENC, "pad_token_id": 1}),
                       _lm_inputs, "logits", "encoder", _HIDDEN_EXTRA),
    "electra": ZooCase(_build("ElectraConfig", "ElectraForSequenceClassification", **_ENC, embedding_size=16),
                       _lm_inputs, "logits", "encoder", {"labels": _class_labels}),
    "deberta_v2": ZooCase(_build("DebertaV2Config", "DebertaV2ForMaskedLM", **_ENC, relative_attention=True,
                                 position_buckets=16, max_relative_positions=POS, pos_att_type=["p2c", "c2p"],
                                 type_vocab_size=0),
                          _lm_inputs, "logits", "encoder", _HIDDEN_EXTRA),
    "albert": ZooCase(_build("AlbertConfig", "AlbertForMaskedLM", **_ENC, embedding_size=16, classifier_dropout_prob=0.0),
                      _lm_inputs, "logits", "encoder", _HIDDEN_EXTRA),
    # MobileBERT pads a shifted slice (S - 1 + 1: symbolic only through the Python dispatcher);
    # Funnel pools the sequence (its capture fixes S) and writes in place into attention scores
    "mobilebert": ZooCase(_build("MobileBertConfig", "MobileBertForMaskedLM", **{**_ENC, "intermediate_size": HIDDEN},
                                 embedding_size=16, intra_bottleneck_size=16, true_hidden_size=16,
                                 num_feedforward_networks=2),
                          _lm_inputs, "logits", "encoder", _HIDDEN_EXTRA),
    "funnel": ZooCase(_build("FunnelConfig", "FunnelModel", vocab_size=VOCAB, block_sizes=[1, 1], block_repeats=None,
                             num_decoder_layers=1, d_model=HIDDEN, n_head=HEADS, d_head=16, d_inner=FFN,
                             hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=0),
                      _lm_inputs, "last_hidden_state", "encoder", _HIDDEN_EXTRA),
    # vision
    "vit": ZooCase(_build("ViTConfig", "ViTForImageClassification", hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                          num_attention_heads=HEADS, intermediate_size=FFN, image_size=32, patch_size=8,
                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3),
                   lambda: {"pixel_values": _pixels()}, "logits", "vision", {"labels": _class_labels}),
    "resnet": ZooCase(_build("ResNetConfig", "ResNetForImageClassification", embedding_size=8, hidden_sizes=[8, 16],
                             depths=[1, 1], layer_type="basic", num_labels=3),
                      lambda: {"pixel_values": _pixels()}, "logits", "vision", {"labels": _class_labels}),
    "convnext": ZooCase(_build("ConvNextConfig", "ConvNextForImageClassification", hidden_sizes=[8, 16], depths=[1, 1],
                               num_stages=2, num_labels=3, drop_path_rate=0.0),
                        lambda: {"pixel_values": _pixels()}, "logits", "vision", {"labels": _class_labels}),
    "swin": ZooCase(_build("SwinConfig", "SwinForImageClassification", image_size=32, patch_size=4, embed_dim=16,
                           depths=[1, 1], num_heads=[2, 2], window_size=4, mlp_ratio=2.0, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0, drop_path_rate=0.0, num_labels=3),
                    lambda: {"pixel_values": _pixels()}, "logits", "vision", {"labels": _class_labels}),
    "segformer": ZooCase(_build("SegformerConfig", "SegformerForSemanticSegmentation", num_encoder_blocks=2,
                                depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32], patch_sizes=[7, 3],
                                strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2], decoder_hidden_size=32,
                                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                classifier_dropout_prob=0.0, drop_path_rate=0.0, num_labels=3),
                         lambda: {"pixel_values": _pixels()}, "logits", "vision", _HIDDEN_EXTRA),
    # EfficientNet: fx traces it (depthwise padding reads sizes as ints); MobileViT: bilinear
    # upsampling whose backward has no symbolic meta kernel (priced through the Python dispatcher)
    "efficientnet": ZooCase(_build("EfficientNetConfig", "EfficientNetForImageClassification", image_size=32,
                                   width_coefficient=0.1, depth_coefficient=0.1, hidden_dim=128, num_labels=3,
                                   dropout_rate=0.0, drop_connect_rate=0.0),
                            lambda: {"pixel_values": _pixels()}, "logits", "vision", {"labels": _class_labels},
                            route="fx"),
    "mobilevit": ZooCase(_build("MobileViTConfig", "MobileViTForImageClassification", image_size=32, patch_size=2,
                                hidden_sizes=[16, 24, 32], neck_hidden_sizes=[8, 8, 16, 16, 24, 24, 32],
                                num_attention_heads=2, num_labels=3, hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0, classifier_dropout_prob=0.0),
                         lambda: {"pixel_values": _pixels()}, "logits", "vision", {"labels": _class_labels}),
    # multimodal and audio
    "clip": ZooCase(_build("CLIPConfig", "CLIPModel",
                           text_config=dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                            num_attention_heads=HEADS, intermediate_size=FFN,
                                            max_position_embeddings=POS, attention_dropout=0.0,
                                            bos_token_id=0, eos_token_id=2, pad_token_id=1),
                           vision_config=dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                              intermediate_size=FFN, image_size=32, patch_size=8,
                                              attention_dropout=0.0),
                           projection_dim=16),
                    lambda: {"input_ids": _ids(), "attention_mask": _mask(), "pixel_values": _pixels()},
                    "logits_per_image", "multimodal", {"return_loss": lambda: True}),
    "wav2vec2": ZooCase(_build("Wav2Vec2Config", "Wav2Vec2ForCTC", vocab_size=VOCAB, hidden_size=HIDDEN,
                               num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FFN,
                               conv_dim=(16, 16), conv_stride=(4, 2), conv_kernel=(8, 4), num_conv_pos_embeddings=8,
                               num_conv_pos_embedding_groups=2, hidden_dropout=0.0, attention_dropout=0.0,
                               activation_dropout=0.0, feat_proj_dropout=0.0, final_dropout=0.0, layerdrop=0.0,
                               mask_time_prob=0.0, do_stable_layer_norm=True, pad_token_id=0),
                        lambda: {"input_values": torch.randn(BATCH, 400, generator=torch.Generator().manual_seed(5))},
                        "logits", "audio", _HIDDEN_EXTRA),
}


def main_output(out: Any, name: str) -> torch.Tensor:
    if hasattr(out, name):
        return getattr(out, name)
    if isinstance(out, dict):
        return out[name]
    raise TypeError(f"{type(out).__name__} has no field {name!r}")
