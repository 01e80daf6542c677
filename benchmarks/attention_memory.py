"""Memory of one pipeline stage before vs after the attention rewrite (``passes/attention.py``),
measured on the CPU, beside what the plan priced for that stage.

A tiny Hugging Face Llama with grouped-query attention (8 query heads, 2 K/V heads: each K/V
head repeated 4 times by the captured ``repeat_kv``) is cut into two stages. Each stage runs
one forward and backward twice, on deep copies with the same weights: as captured, and with
its attention rewritten. Per stage:

- ``saved``: the storages autograd keeps for backward (``partitioner.memory.measure_saved``);
- ``peak``: the peak of live tensor storages over forward and backward
  (``partitioner.memory.measure_peak``), received inputs held throughout;
- the plan's ``saved_bytes`` and its kept + working set (``recompute_bytes``) at (B, S).

CPU-measured bytes: the CPU kernels' choices (the flash kernel for both, the mask or
``is_causal``, GQA in the kernel) decide what is kept; no GPU was used.

    PYTHONPATH=. .venv/bin/python benchmarks/attention_memory.py [--seq 256] [--batch 2]
"""

from __future__ import annotations

import argparse
import copy
import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from partitioner import partition, poly  # noqa: E402
from partitioner.memory import measure_peak, measure_saved  # noqa: E402
from partitioner.passes.attention import rewrite_attention  # noqa: E402


def _llama(heads: int, kv_heads: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=128, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      intermediate_size=344, vocab_size=512, max_position_embeddings=4096, use_cache=False,
                      attn_implementation="sdpa", bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg)


def _run(stage: torch.nn.Module, values: list, last: bool, params: list, peak: bool) -> tuple[int, list]:
    def step() -> list:
        res = stage(*values)
        res = list(res) if isinstance(res, (tuple, list)) else [res]
        ts = [t for t in res if isinstance(t, torch.Tensor) and t.requires_grad]
        if last:
            ts = [sum((t.float() ** 2).mean() for t in ts)]
        torch.autograd.backward(ts, [torch.ones_like(t) for t in ts])
        return [t.detach() if isinstance(t, torch.Tensor) else t for t in res]

    if peak:
        return measure_peak(step, holds=[v for v in values if isinstance(v, torch.Tensor)], exclude=params)
    return measure_saved(lambda: stage(*values), exclude=params)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    args = ap.parse_args()
    b, s = args.batch, args.seq
    model = _llama(args.heads, args.kv_heads)
    ids = torch.randint(0, 512, (b, s), generator=torch.Generator().manual_seed(1))
    pipe = partition(model, 2, {"input_ids": ids}, device="cpu", link="loopback", n_microbatches=1,
                     pinned_cuts=["model.layers.1"])
    params = list(model.parameters())
    for p in params:
        p.grad = torch.zeros_like(p)
    print(f"Llama, 2 layers, hidden 128, {args.heads} heads / {args.kv_heads} K/V heads, B={b}, S={s}, fp32, CPU")
    print("| stage | what | captured | rewritten | plan |")
    print("|---|---|---:|---:|---:|")
    variants = {"captured": [copy.deepcopy(st) for st in pipe.stages],
                "rewritten": [copy.deepcopy(st) for st in pipe.stages]}
    for st in variants["rewritten"]:
        rewrite_attention(st)
    inputs = {k: pipe.flatten_inputs((), {"input_ids": ids}) for k in variants}
    for i in range(len(pipe.stages)):
        cost = pipe.plan.stages[i].cost
        kept = int(poly.evaluate(poly.from_text(cost.saved_bytes), b, s))
        work = int(poly.evaluate(poly.from_text(cost.recompute_bytes), b, s))
        row: dict[str, dict[str, int]] = {"saved": {}, "peak": {}}
        for name, stages in variants.items():
            sparams = [p for st in stages for p in st.parameters()]
            for p in sparams:
                p.grad = torch.zeros_like(p)
            vals = inputs[name]
            if i:
                grads = [v.requires_grad for v in pipe.plan.boundaries[i - 1].values]
                vals = [v.detach().requires_grad_(g) if isinstance(v, torch.Tensor) else v for v, g in zip(vals, grads)]
            last = i == len(pipe.stages) - 1
            row["saved"][name], _ = _run(stages[i], vals, last, sparams, peak=False)
            row["peak"][name], out = _run(stages[i], vals, last, sparams, peak=True)
            inputs[name] = out
        print(f"| {i} | saved for backward | {row['saved']['captured']:,} | {row['saved']['rewritten']:,} | {kept:,} |")
        print(f"| {i} | peak (fwd + bwd) | {row['peak']['captured']:,} | {row['peak']['rewritten']:,} | "
              f"{kept + work:,} |")


if __name__ == "__main__":
    main()
