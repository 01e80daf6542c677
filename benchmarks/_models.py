"""Shared set-up for the balance and cost-model benchmarks.

Two Hugging Face decoders built from configs (random weights, nothing downloaded), each
seen as one *layer sequence*: embeddings, block 0 .. L-1, head (final norm + LM head).
Every partitioning method's answer is expressed as cut positions on that sequence, the
stages are then built by ``partition(..., pinned_cuts=...)`` and timed one at a time on
this CPU, the same way for every method.
"""

from __future__ import annotations

import os
import random
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SEQ, MICRO, M, N_STAGES = 128, 2, 8, 4  # tokens, micro-batch, micro-batches per step, stages


@dataclass
class Bench:
    name: str
    model: nn.Module
    layers: list[str]  # module path of each layer's first module: pins for partition()
    blocks: str  # glob of the blocks (cut_at)
    sequential: nn.Sequential  # the same layers as an nn.Sequential (torchgpipe's view)
    vocab: int

    def inputs(self, batch: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        return {"input_ids": torch.randint(0, self.vocab, (batch, SEQ), generator=g)}

    def layer_params(self) -> list[int]:
        """Parameter count per layer, a tied weight counted in each layer that uses it
        (as PiPPy counts a call_module's parameters and DeepSpeed a layer's)."""
        return [sum(p.numel() for p in layer.parameters()) for layer in self.sequential]


class _GPT2Embed(nn.Module):
    def __init__(self, tr: nn.Module) -> None:
        super().__init__()
        self.wte, self.wpe = tr.wte, tr.wpe

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.wte(ids) + self.wpe(torch.arange(ids.shape[1]))


class _Head(nn.Module):
    def __init__(self, norm: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.norm, self.head = norm, head

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(h))


class _LlamaBlock(nn.Module):
    """A decoder layer that computes its own rotary table (a few hundred FLOPs per token)."""

    def __init__(self, layer: nn.Module, rotary: nn.Module) -> None:
        super().__init__()
        self.layer, self.rotary = layer, rotary

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(h.shape[1]).unsqueeze(0)
        return self.layer(h, position_embeddings=self.rotary(h, pos))


class _Call(nn.Module):
    def __init__(self, mod: nn.Module) -> None:
        super().__init__()
        self.mod = mod

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.mod(h)


def gpt2(n_layers: int = 12, hidden: int = 384, vocab: int = 16384) -> Bench:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=n_layers, n_embd=hidden, n_head=hidden // 64, vocab_size=vocab, n_positions=SEQ,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False, bos_token_id=0,
                     eos_token_id=0)
    model = GPT2LMHeadModel(cfg)
    tr = model.transformer
    seq = nn.Sequential(_GPT2Embed(tr), *(_Call(b) for b in tr.h), _Head(tr.ln_f, model.lm_head))
    layers = ["transformer.wte", *(f"transformer.h.{i}" for i in range(n_layers)), "transformer.ln_f"]
    return Bench("gpt2", model, layers, "transformer.h.*", seq, vocab)


def llama(n_layers: int = 12, hidden: int = 384, vocab: int = 16384) -> Bench:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=n_layers, hidden_size=hidden, num_attention_heads=hidden // 64,
                      num_key_value_heads=hidden // 128, intermediate_size=1024, vocab_size=vocab,
                      max_position_embeddings=SEQ, use_cache=False, attn_implementation="sdpa",
                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = LlamaForCausalLM(cfg)
    inner = model.model
    seq = nn.Sequential(_Call(inner.embed_tokens), *(_LlamaBlock(b, inner.rotary_emb) for b in inner.layers),
                        _Head(inner.norm, model.lm_head))
    layers = ["model.embed_tokens", *(f"model.layers.{i}" for i in range(n_layers)), "model.norm"]
    return Bench("llama", model, layers, "model.layers.*", seq, vocab)


BENCHES: dict[str, Callable[[], Bench]] = {"gpt2": gpt2, "llama": llama}


# -- cuts <-> stages -------------------------------------------------------------------

def bounds_to_pins(bench: Bench, bounds: Sequence[int]) -> list[str]:
    """Layer-sequence boundaries [0, c1, .., n] → module paths to pin (cut before each)."""
    return [bench.layers[c] for c in bounds[1:-1]]


def plan_bounds(bench: Bench, plan: Any) -> list[int]:
    """Where a plan's cuts fall on the layer sequence (cuts at block boundaries only)."""
    index = {path: i for i, path in enumerate(bench.layers)}
    out = [0]
    for st in plan.stages[1:]:
        layers = [_layer_prefix(bench, m) for m in st.modules]
        first = next((index[p] for p in layers if p is not None), None)
        if first is None:
            raise ValueError(f"stage {st.index} starts inside no known layer: {st.modules[:3]}")
        out.append(first)
    return [*out, len(bench.layers)]


def _layer_prefix(bench: Bench, path: str) -> str | None:
    best = None
    for layer in bench.layers:
        if path == layer or path.startswith(layer + "."):
            best = layer
    if best is None and bench.name == "gpt2" and path in ("transformer.wpe", "lm_head"):
        best = "transformer.wte" if path == "transformer.wpe" else "transformer.ln_f"
    if best is None and bench.name == "llama" and path in ("model.rotary_emb", "lm_head"):
        best = "model.embed_tokens" if path == "model.rotary_emb" else "model.norm"
    return best


# -- timing ------------------------------------------------------------------------------

def stage_inputs(pipe: Any, inputs: dict[str, torch.Tensor]) -> list[list[Any]]:
    """The flat values each stage receives, from one pass of the whole pipe."""
    values: Sequence[Any] = pipe.flatten_inputs((), inputs)
    seen = []
    with torch.no_grad():
        for stage in pipe.stages:
            seen.append(list(values))
            values = stage(*values)
    return seen


def _prepare(values: list[Any]) -> list[Any]:
    return [v.detach().requires_grad_(v.is_floating_point()) if isinstance(v, torch.Tensor) else v for v in values]


def _once(fn: Callable[..., Any], values: list[Any], backward: bool) -> float:
    args = _prepare(values)
    t = time.perf_counter()
    out = fn(*args)
    if backward:
        outs = [o for o in (out if isinstance(out, (tuple, list)) else [out])
                if isinstance(o, torch.Tensor) and o.requires_grad]
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    return time.perf_counter() - t


def interleaved_times(entries: Sequence[tuple[nn.Module, list[Any]]], rounds: int = 7,
                      seed: int = 0) -> list[tuple[float, float]]:
    """Median (forward, forward+backward) seconds of each ``fn(*values)``, one thread.

    Every round times every entry once, in a shuffled order, so a burst of load from
    another process lands on all methods alike instead of on whichever ran then."""
    rng = random.Random(seed)
    for fn, values in entries:  # warm up: allocator, thread pool, lazy kernels
        _once(fn, values, True)
    fwd: list[list[float]] = [[] for _ in entries]
    both: list[list[float]] = [[] for _ in entries]
    for _ in range(rounds):
        idx = list(range(len(entries)))
        rng.shuffle(idx)
        for i in idx:
            fn, values = entries[i]
            fwd[i].append(_once(fn, values, False))
            both[i].append(_once(fn, values, True))
    for fn, _ in entries:
        for p in fn.parameters():
            p.grad = None
    return [(statistics.median(f), statistics.median(b)) for f, b in zip(fwd, both)]


def stage_entries(pipe: Any, inputs: dict[str, torch.Tensor]) -> list[tuple[nn.Module, list[Any]]]:
    return list(zip(pipe.stages, stage_inputs(pipe, inputs)))


def time_stages(pipe: Any, inputs: dict[str, torch.Tensor], rounds: int = 7) -> list[tuple[float, float]]:
    return interleaved_times(stage_entries(pipe, inputs), rounds)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def replace_section(path: str, title: str, body: str, preamble: str) -> None:
    """Write ``body`` under ``## title`` in ``path``, keeping the other sections."""
    text = open(path).read() if os.path.exists(path) else preamble
    head = f"## {title}\n"
    start = text.find(head)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + head + body.rstrip("\n") + "\n"
    else:
        nxt = text.find("\n## ", start + len(head))
        text = text[:start] + head + body.rstrip("\n") + "\n" + (text[nxt:] if nxt >= 0 else "")
    with open(path, "w") as f:
        f.write(text)
