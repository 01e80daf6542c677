"""The benchmark GPT's explicit (pre-FlashAttention) attention: same numbers as flash, priced with its S x S traffic."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))

from gpu_cost_bench import GPT, scaled_upper_triang_masked_softmax  # noqa: E402

from partitioner.api import partition  # noqa: E402
from partitioner.cost_models.devices import get_device  # noqa: E402


def test_fused_softmax_matches_masked_softmax_and_its_gradient() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64, requires_grad=True)  # 5 queries over 7 keys
    mask = torch.ones(5, 7, dtype=torch.bool).triu(1 + 7 - 5)
    ref = torch.softmax((0.7 * x).masked_fill(mask, float("-inf")), dim=-1)
    assert torch.equal(scaled_upper_triang_masked_softmax(x, 0.7), ref)
    assert torch.autograd.gradcheck(lambda t: scaled_upper_triang_masked_softmax(t, 0.7), (x,))


def test_explicit_attention_computes_what_flash_computes() -> None:
    """Same weights, same loss and gradients (float32): only the kernels differ."""
    ids = torch.randint(0, 50, (3, 16), generator=torch.Generator().manual_seed(1))
    models = []
    for attention in ("flash", "explicit"):
        torch.manual_seed(0)
        models.append(GPT(2, 32, 4, 16, vocab=50, per_head_qkv=True, attention=attention))
    losses = [m(ids, ids) for m in models]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_dropout_zero_builds_no_dropout_and_unknown_attention_is_refused() -> None:
    with pytest.raises(ValueError, match="attention must be"):
        GPT(1, 32, 4, 16, vocab=50, attention="sdpa")
    plain = str(torch.fx.symbolic_trace(GPT(1, 32, 4, 16, vocab=50)).graph)
    assert "dropout" not in plain
    assert "native_dropout" in str(torch.fx.symbolic_trace(GPT(1, 32, 4, 16, vocab=50, dropout=0.1)).graph)


def test_explicit_attention_is_priced_slower_than_flash_at_long_sequences() -> None:
    """The S x S scores (written, softmaxed, dropped out, read) cost what flash avoids."""
    steps = {}
    for attention, p in (("flash", 0.0), ("explicit", 0.0), ("explicit", 0.1)):
        with torch.device("meta"):
            model = GPT(1, 256, 4, 2048, vocab=512, per_head_qkv=True, attention=attention, dropout=p)
        ids = torch.zeros((4, 2048), dtype=torch.long, device="meta")
        pipe = partition(model, n_gpus=1, example_inputs=(ids, ids), device=get_device("a100-80gb"),
                         precision="fp16-mixed", memory_limit=10**15)
        steps[attention, p] = pipe.plan.prediction.step_time_s
    assert steps["flash", 0.0] < steps["explicit", 0.0] < steps["explicit", 0.1]
