"""Example models bundled with the package (no downloads): used by the quick start and tests."""

import torch

from partitioner.examples.gpt import GPT, GPTConfig, gpt_example

__all__ = ["GPT", "GPTConfig", "gpt_example"]


def quickstart() -> tuple[GPT, tuple]:
    """The README's model: an 8-layer GPT (tied embeddings) and a batch of 8 x 64 tokens."""
    torch.manual_seed(0)
    return gpt_example(batch=8, seq=64, n_layer=8, n_embd=128, n_head=4, vocab_size=2048, block_size=64)


__all__ += ["quickstart"]
