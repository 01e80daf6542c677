"""Example models bundled with the package (no downloads): used by the quick start and tests."""

from partitioner.examples.gpt import GPT, GPTConfig, gpt_example

__all__ = ["GPT", "GPTConfig", "gpt_example"]
