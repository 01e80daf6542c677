"""A module-path pin cuts before the module's body, not before a piece torch.export hoisted
above the first layer (Llama's rotary ``unsqueeze``s of every layer sit before layer 0)."""

from __future__ import annotations

import torch
import transformers

from partitioner import partition


def test_a_layer_pin_cuts_between_the_layers_on_exported_llama() -> None:
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                                   intermediate_size=128, vocab_size=100, use_cache=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    ids = torch.randint(0, 100, (2, 16))
    pipe = partition(model, n_gpus=2, example_inputs={"input_ids": ids}, cut_at="model.layers.*",
                     pinned_cuts=["model.layers.2"], recompute="none", device="cpu")
    layers = [sorted({p.split(".")[2] for p in st.parameters if p.startswith("model.layers.")}) for st in pipe.plan.stages]
    assert layers == [["0", "1"], ["2", "3"]]
    torch.testing.assert_close(pipe(input_ids=ids).logits, model(input_ids=ids).logits)
