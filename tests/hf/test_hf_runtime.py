"""Hugging Face GPT-2 trained on 2 ranks (gloo, CPU) equals the unpartitioned model.

The word embedding is tied to the LM head and the cut puts them on different ranks,
so each step's tied-gradient all-reduce is exercised on a real model.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers", reason="the Hugging Face tests need `pip install transformers`")

from partitioner import Pipe, partition  # noqa: E402
from partitioner.runtime.launch import spawn  # noqa: E402
from tests.hf.models import CASES, SEQ, VOCAB  # noqa: E402
from tests.runtime.helpers import sgd_reference  # noqa: E402

BATCH, STEPS, LR, M = 8, 3, 0.1, 4
TIMEOUT_S = 120.0


def _loss(out: Any, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.logits.flatten(0, 1), y.flatten())


def _data() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {"input_ids": torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)}, torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)


@functools.cache
def _built(recompute: str = "none") -> tuple[torch.nn.Module, Pipe, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = CASES["gpt2"].build(4)
    inputs, _ = _data()
    pipe = partition(model, 2, inputs, device="cpu", link="loopback", pinned_cuts=["transformer.h.2"],
                     recompute=recompute)
    assert [st.recompute for st in pipe.plan.stages] == [recompute] * 2
    return model, pipe, copy.deepcopy(model.state_dict())


def _train(rank: int, world: int, recompute: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    _, pipe, _ = _built(recompute)
    inputs, y = _data()
    stage = pipe.build_stage(rank, "cpu")
    opt = torch.optim.SGD(stage.parameters(), lr=LR)
    runner = stage.runner("1f1b", n_microbatches=M, loss_fn=_loss, batch_size=BATCH)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        loss = runner.step(**(inputs if rank == 0 else {}), target=y)
        losses.append(float("nan") if loss is None else loss.item())
        opt.step()
    return losses, {n: p.detach().clone() for n, p in stage.named_parameters(remove_duplicate=False)}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("recompute", ["none", "full"])  # export route, recomputing stages on gloo
def test_gpt2_on_two_ranks_trains_like_the_unpartitioned_model(recompute: str) -> None:
    model, pipe, init = _built(recompute)
    model.load_state_dict(init)
    assert [st.rank for st in pipe.plan.stages] == [0, 1]
    assert pipe.plan.tied_parameters  # embedding on rank 0, head on rank 1

    inputs, y = _data()
    ref = sgd_reference(model, inputs, y, _loss, steps=STEPS, lr=LR)
    want_losses, want = ref.losses, ref.params

    results = spawn(_train, 2, recompute, timeout_s=TIMEOUT_S)
    assert results[1][0] == pytest.approx(want_losses, rel=1e-5)
    for _, params in results:
        assert params
        for name, p in params.items():
            torch.testing.assert_close(p, want[name].detach(), rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    # the tied tensor ends equal on both ranks (the all-reduce kept the copies in step); each
    # rank knows it by its own module's name, as a checkpoint does
    torch.testing.assert_close(results[0][1]["transformer.wte.weight"], results[1][1]["lm_head.weight"])
