"""Packed sequences: several documents per row, position ids restarting at each document and
attention masked per document, as inputs to the pipeline at two sequence lengths."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from partitioner import partition
from partitioner.runtime.launch import spawn


class PackedLM(nn.Module):
    """Tokens, their position in their document and their document id: causal attention only
    inside a document (the mask is built from the document ids), learned positions."""

    def __init__(self, vocab: int = 64, dim: int = 32, layers: int = 4, max_pos: int = 64) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_pos, dim)
        self.blocks = nn.ModuleList(nn.ModuleDict({"norm": nn.LayerNorm(dim), "qkv": nn.Linear(dim, 3 * dim),
                                                   "out": nn.Linear(dim, dim)}) for _ in range(layers))
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids: torch.Tensor, position_ids: torch.Tensor, doc_ids: torch.Tensor) -> torch.Tensor:
        s = ids.shape[1]
        causal = torch.ones(s, s, dtype=torch.bool, device=ids.device).tril()
        mask = (doc_ids[:, :, None] == doc_ids[:, None, :]) & causal  # (B, S, S): same document, earlier token
        h = self.tok(ids) + self.pos(position_ids)
        for b in self.blocks:
            q, k, v = b["qkv"](b["norm"](h)).chunk(3, dim=-1)
            h = h + b["out"](F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None],
                                                            attn_mask=mask[:, None])[:, 0])
        return self.head(h)


def packed(batch: int, seq: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Rows of documents of random lengths; labels -100 at each document's last token."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (batch, seq), generator=g)
    pos = torch.zeros(batch, seq, dtype=torch.long)
    doc = torch.zeros(batch, seq, dtype=torch.long)
    for r in range(batch):
        t, d = 0, 0
        while t < seq:
            n = int(torch.randint(2, seq // 2 + 1, (1,), generator=g))
            pos[r, t:t + n] = torch.arange(min(n, seq - t))
            doc[r, t:t + n] = d
            t, d = t + n, d + 1
    y = torch.roll(ids, -1, dims=1)
    y[torch.roll(doc, -1, dims=1) != doc] = -100  # no target across a document boundary
    y[:, -1] = -100
    return ids, pos, doc, y


def ce_sum(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="sum")


def _model() -> PackedLM:
    torch.manual_seed(0)
    return PackedLM()


def _reference(model: nn.Module, batches: list[tuple[torch.Tensor, ...]]) -> list[dict[str, torch.Tensor]]:
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    out = []
    for ids, pos, doc, y in batches:
        opt.zero_grad()
        loss = ce_sum(ref(ids, pos, doc), y) / (y != -100).sum()
        loss.backward()
        opt.step()
        out.append({"loss": loss.detach(), **{n: p.detach().clone() for n, p in ref.named_parameters()}})
    return out


def _ranks(rank: int, world: int, pipe: Any, batches: list[tuple[torch.Tensor, ...]]) -> list[dict[str, Any]]:
    stage = pipe.build_stage(rank, "cpu")
    opt = torch.optim.SGD(stage.parameters(), lr=0.1)
    runner = stage.runner("1f1b", n_microbatches=2, loss_fn=ce_sum, normalize="tokens")
    out = []
    for ids, pos, doc, y in batches:
        stage.zero_grad()
        loss = runner.step(ids, pos, doc, target=y, seq_len=ids.shape[1], loss_on_every_rank=True)
        opt.step()
        out.append({"loss": loss, **{n: p.detach().clone() for n, p in stage.named_parameters()}})
    return out


def test_packed_sequences_train_like_one_process_at_two_lengths() -> None:
    model = _model()
    ids, pos, doc, _ = packed(4, 16, seed=0)
    pipe = partition(model, n_gpus=2, example_inputs=(ids, pos, doc), n_microbatches=2, pinned_cuts=["blocks.2"])
    batches = [packed(4, 16, seed=1), packed(4, 24, seed=2)]
    want = _reference(model, batches)
    got = spawn(_ranks, 2, pipe, batches, timeout_s=120)
    for step in range(2):
        for r in got:
            torch.testing.assert_close(r[step]["loss"], want[step]["loss"], rtol=1e-5, atol=1e-6)
            for name, value in r[step].items():
                if name != "loss":
                    torch.testing.assert_close(value, want[step][name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
