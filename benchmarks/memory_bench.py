"""Memory benchmark: the plan's memory against the truth and the published formula.

    .venv/bin/python benchmarks/memory_bench.py [--quick] [--skip-70b]

1. Predicted vs measured activation bytes: Hugging Face GPT-2, Llama, BERT and T5 (2 layers,
   small hidden sizes) at 3 sequence lengths, fp32 and bf16, on the CPU target. Measured:
   ``partitioner.memory.measure_saved`` (saved-tensor hooks on the eager model, each
   storage once, parameters left out). Predicted: ``plan.stages[0].cost.saved_bytes`` of a
   one-stage plan.
2. Per-layer activations of a Llama-3-70B-shaped model (bf16, 1 x 4096 tokens, H100
   target: flash attention) against the analytic formula of Korthikanti et al. 2022
   adapted to SwiGLU, RMSNorm and GQA (derivation in the docstring of ``formula``).
3. The 70B table: 80 layers, 8 GPUs without optimizer; 32 and 64 GPUs with Adam in
   bf16-mixed under recompute "none", "full" and "auto", beside the peers' rules on the
   same costs (the uniform split, Megatron-style full recompute everywhere).

``--titan [8 64]``: torchtitan's Llama 3 8B run instead (seq 8192, local batch 2, H100 target):
per layer, what each recompute mode keeps (a 2-layer model of the 8B shape: layers are alike),
the storages one layer keeps without recompute, the head and loss; then layout_bench's pinned
torchtitan rows (FSDP 8 on 8 GPUs, FSDP 64 on 64) priced per recompute mode, each split into
static and activation bytes. "selective (before)" prices the attention-core-only regions
without the K/V repeat, as this repository did before the repeat moved into the region.

Prints markdown; benchmarks/RESULTS.md keeps the last run's output.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from partitioner import partition, poly  # noqa: E402
from partitioner.memory import Activations, measure_saved  # noqa: E402
from partitioner.passes.split import compute_nodes  # noqa: E402
from partitioner.pricing import Evaluator  # noqa: E402

GiB = 2**30


def part1(seqs: list[int]) -> None:
    from tests.hf.models import CASES

    print("## Activation bytes: predicted vs measured (CPU, saved-tensor hooks, storages once)\n")
    print("| model | dtype | seq | measured | predicted | ratio |")
    print("|---|---|---|---|---|---|")
    worst = 0.0
    for name in ("gpt2", "llama", "bert", "t5"):
        for dtype in (torch.float32, torch.bfloat16):
            for seq in seqs:
                case = CASES[name]
                torch.manual_seed(0)
                model = case.build(2).to(dtype)
                inputs = case.inputs(2, seq)
                measured, _ = measure_saved(lambda: model(**inputs), exclude=list(model.parameters()))
                pipe = partition(model, n_gpus=1, example_inputs=inputs, device="cpu", recompute="none")
                predicted = poly.evaluate(poly.from_text(pipe.plan.stages[0].cost.saved_bytes), 2, seq)
                ratio = predicted / measured
                worst = max(worst, abs(ratio - 1))
                print(f"| {name} | {str(dtype)[6:]} | {seq} | {measured:,} | {predicted:,} | {ratio:.3f} |")
    print(f"\nWorst deviation: {100 * worst:.1f} %.\n")


def llama70b(layers: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=8192, num_hidden_layers=layers, num_attention_heads=64, num_key_value_heads=8,
                      intermediate_size=28672, vocab_size=128256, max_position_embeddings=8192, use_cache=False,
                      attn_implementation="sdpa")
    with torch.device("meta"):
        return LlamaForCausalLM(cfg).to(torch.bfloat16)


def formula(s: int, b: int, h: int, f: int, a: int, g: int, *, hf_norm: bool) -> dict[str, int]:
    """Bytes one Llama layer keeps for backward per micro-batch, bf16 (2 bytes), flash attention.

    Korthikanti et al. 2022 (section 4.1) count, per GPT layer, 11sbh + 5as^2b (attention)
    + 19sbh (MLP) + 4sbh (two LayerNorms) = sbh(34 + 5as/h) bytes. Adapted:
    - flash attention keeps no s x s matrix (the 5as^2b term goes) but its log-sum-exp,
      4sab bytes (fp32 per row and head), and q, k, v and its output;
    - GQA: k and v have g of the a heads: 2 x 2sbh g/a;
    - no dropout (Llama trains without): the 1-byte masks go;
    - SwiGLU with ffn width f instead of GELU with 4h: the gate and up projections share
      their input (2sbh), SiLU keeps its input (2sbf), the product keeps both factors
      (4sbf), the down projection keeps the product (2sbf): 2sbh + 8sbf;
    - attention: the projections' shared input 2sbh, q 2sbh, k and v 4sbh g/a, the
      kernel's output 2sbh, the output projection's (contiguous) input 2sbh;
    - RMSNorm, twice per layer. A fused kernel keeps its input (2sbh) and 1/rms (4sb).
      Hugging Face's eager RMSNorm (``hf_norm``) computes in fp32: it keeps the fp32 copy
      of its input (4sbh), 1/rms (4sb), and the normalised bf16 tensor the weight
      multiplies (2sbh).
    """
    per = {
        "attention (q, k, v, out, lse, projections' inputs)": 2 * s * b * h * 4 + 4 * s * b * h * g // a + 4 * s * a * b,
        "mlp (SwiGLU)": 2 * s * b * h + 8 * s * b * f,
    }
    norm = (4 * s * b * h + 4 * s * b + 2 * s * b * h) if hf_norm else (2 * s * b * h + 4 * s * b)
    per["two RMSNorms"] = 2 * norm
    per["total"] = sum(per.values())
    return per


def part2() -> None:
    print("## 70B-shaped Llama: activations per layer, H100 target (flash attention)\n")
    model = llama70b(4)
    ids = torch.zeros(1, 4096, dtype=torch.long)
    pipe = partition(model, n_gpus=1, example_inputs={"input_ids": ids}, device="h100-sxm", recompute="none",
                     optimizer="none", memory_limit=2**50)
    order = compute_nodes(pipe.graph)
    acts = Activations(pipe.graph, order, target="gpu")
    ev = Evaluator(1, 4096)
    spans = acts.regions["full"].spans
    s, e = spans[len(spans) // 2]
    layer = ev(acts.stage_saved(s, e, "none", ev)[0])
    hf = formula(4096, 1, 8192, 28672, 64, 8, hf_norm=True)
    fused = formula(4096, 1, 8192, 28672, 64, 8, hf_norm=False)
    print("| | bytes per layer | GiB |")
    print("|---|---|---|")
    print(f"| planner (one middle layer of the captured HF graph) | {layer:,} | {layer / GiB:.3f} |")
    for k, v in hf.items():
        print(f"| formula, HF eager RMSNorm: {k} | {v:,} | {v / GiB:.3f} |")
    print(f"| formula, fused RMSNorm: total | {fused['total']:,} | {fused['total'] / GiB:.3f} |")
    print(f"\nPlanner / formula (HF RMSNorm): {layer / hf['total']:.3f}; "
          f"planner / formula (fused RMSNorm): {layer / fused['total']:.3f}.\n")


def part3() -> None:
    print("## 70B table: Llama-3-70B shape, 80 layers, bf16, 1 x 4096 tokens per micro-batch, H100 80 GB\n")
    model = llama70b(80)
    rows: list[tuple[int, str, str, str, int, bool]] = [(8, "none", "bf16-mixed", "none", 1, False),
                                                         (8, "none", "bf16-mixed", "auto", 1, False)]
    for gpus in (32, 64):
        for rc in ("none", "full", "auto"):
            rows.append((gpus, "adam", "bf16-mixed", rc, 2 * gpus, False))
        rows.append((gpus, "adam", "bf16-mixed", "full", 2 * gpus, True))  # Megatron's rule: uniform layers
    print("| GPUs | optimizer | split | recompute | micro-batches | feasible | stages recomputing | predicted step | "
          "peak memory/stage | planning time |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for gpus, opt, prec, rc, m, uniform in rows:
        batch = torch.zeros(m, 4096, dtype=torch.long)
        pins = [f"model.layers.{round(k * 80 / gpus)}" for k in range(1, gpus)] if uniform else []
        split = "uniform layers (Megatron)" if uniform else "solver"
        t0 = time.perf_counter()
        try:
            pipe = partition(model, n_gpus=gpus, example_inputs={"input_ids": batch}, optimizer=opt, precision=prec,
                             recompute=rc, n_microbatches=m, cut_at="model.layers.*", pinned_cuts=pins)
        except Exception as e:  # noqa: BLE001 - the table reports the refusal
            took = time.perf_counter() - t0
            first = str(e).split(";")[0]
            print(f"| {gpus} | {opt} | {split} | {rc} | {m} | no: {first} | | | | {took:.0f} s |")
            continue
        took = time.perf_counter() - t0
        plan = pipe.plan
        redo = sum(st.recompute != "none" for st in plan.stages)
        peak = max(st.cost.memory_bytes for st in plan.stages)
        print(f"| {gpus} | {opt} | {split} | {rc} | {m} | yes | {redo} of {gpus} | {plan.prediction.step_time_s:.2f} s | "
              f"{peak / GiB:.1f} GiB | {took:.0f} s |")
    print()


TITAN_MODES = ("none", "selective", "selective-op", "full")


def _titan_model(layers: int, batch: int) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    import json
    import tempfile

    import layout_bench

    from partitioner.tools.hf_model import load_hf

    folder = tempfile.mkdtemp()
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(dict(layout_bench.CONFIGS["8b"], num_hidden_layers=layers), f)
    return load_hf(f"hf:{folder}", layout_bench.SEQ, batch)


def _old_selective(acts: Activations) -> None:
    """The selective regions as they were: each attention core alone (its K/V repeat outside)."""
    from partitioner.memory import Regions

    acts.regions["selective (before)"] = Regions("selective", tuple(
        (i, i + 1) for i, a in enumerate(acts.attention) if a))


def titan_layer() -> None:
    """Per layer of the 8B shape at 2 x 8192 tokens: bytes kept per recompute mode, and the
    storages one layer keeps without recompute, by the node that keeps them."""
    import warnings

    import layout_bench

    from partitioner import api
    from partitioner.memory import _instance, _name
    from partitioner.passes.meta import DESC, MODULE

    layout_bench.install()
    model, inputs = _titan_model(2, 2)
    layout_bench.shared_key[0] = ("8b-2", 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, solved = api.partition(model, 1, inputs, **layout_bench.COMMON, data_parallel=1, tensor_parallel=1,
                                  zero=0, schedule="1f1b", n_microbatches=1, recompute="none",
                                  memory_limit=2**50)
    prob = solved[0]
    acts, ev = prob.acts, prob.ev
    _old_selective(acts)
    spans = acts.regions["full"].spans
    s, e = spans[-1]  # the last layer (the first also holds the rotary tables' first use)
    n = len(acts.order)
    print("## Llama 3 8B shape, one layer, 2 x 8192 tokens, bf16, H100 target\n")
    print("| recompute | kept per layer | working set (the transient included) | kept outside the layers (embedding, head, loss) |")
    print("|---|---|---|---|")
    for mode in (*TITAN_MODES, "selective (before)"):
        kept, extra = (ev(x) for x in acts.stage_saved(s, e, mode, ev))
        whole = ev(acts.stage_saved(0, n, mode, ev)[0])
        layers = sum(ev(acts.stage_saved(a, b, mode, ev)[0]) for a, b in spans)
        print(f"| {mode} | {kept / GiB:.3f} GiB | {extra / GiB:.3f} GiB | {(whole - layers) / GiB:.3f} GiB |")
    saves, _, internal, sizes, _ = acts._resolve(0, n)
    print("\n| node keeping it (recompute none) | module | storage | shape | dtype | MiB |")
    print("|---|---|---|---|---|---|")
    seen: set = set()
    names = {nd.name: nd for nd in acts.order}
    for p in range(n):
        node = acts.order[p]
        inside = s <= p < e
        for r in saves[p]:
            if r in seen:
                continue
            seen.add(r)
            src = names.get(r[0])
            desc = src.meta.get(DESC) if src is not None else None
            shape, dtype = (tuple(str(d) for d in desc.shape), str(desc.dtype)[6:]) if hasattr(desc, "shape") else ("", "")
            if inside or _instance(str(node.meta.get(MODULE, "")), acts.blocks) is None:
                print(f"| {node.name} ({_name(node.target)}) | {node.meta.get(MODULE, '')} | {r[0]} | "
                      f"{' x '.join(shape)} | {dtype} | {ev(sizes[r]) / 2**20:,.1f} |")
        x = ev(internal[p])
        if x and (inside or _instance(str(node.meta.get(MODULE, "")), acts.blocks) is None):
            print(f"| {node.name} ({_name(node.target)}) | {node.meta.get(MODULE, '')} | (its own) | | | "
                  f"{x / 2**20:,.1f} |")
    print()


def titan_rows(gpus: list[int], modes: Sequence[str] = ("selective", "selective-op", "none", "full",
                                                        "selective (before)")) -> None:
    """layout_bench's pinned torchtitan rows for 8B, priced per recompute mode: the fullest
    rank's static, activations kept, the recompute transient, the working set (the largest
    forward or backward one over the stage, the transient included, on top of what is kept)
    and the node where it peaks."""
    import warnings

    import layout_bench

    from partitioner import api

    layout_bench.install()
    print("## torchtitan's 8B rows (layout_bench, pinned), per GPU, H100 target\n")
    print("| GPUs (local batch 2) | recompute | static | activations | transient | working set (peaks at) | peak "
          "| step | tokens/s/GPU |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n_gpus in gpus:
        kw = next(dict(k) for m, g, _, k, *_ in layout_bench.PUBLISHED if (m, g) == ("8b", n_gpus))
        batch = layout_bench.batch_for("8b", n_gpus)
        layout_bench.shared_key[0] = ("8b", batch)
        model, inputs = _titan_model(32, batch)
        for mode in modes:
            run = mode if mode != "selective (before)" else "selective"
            kw["recompute"] = run
            t = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ctx, solved = api.partition(model, n_gpus, inputs, **layout_bench.COMMON, **kw, memory_limit=2**50)
            prob, sol = solved[0], solved[1]
            row = layout_bench.price_row(ctx, solved, n_gpus, layout_bench.CONFIGS["8b"], time.perf_counter() - t)
            if mode == "selective (before)":
                _old_selective(prob.acts)
            fits = prob.exact(sol.cuts, [mode] * len(solved[2]))
            i = max(range(len(fits)), key=lambda j: prob.need(j, fits[j]))
            f = fits[i]
            acts = prob.sin.inflight[i] * f.kept
            bounds = [0, *sol.cuts, len(prob.acts.order)]
            a, b = bounds[i], bounds[i + 1]
            transient = prob.ev(prob.acts._stage(a, b, f.mode, prob.ev)[1])
            work = prob.acts.working(a, b, f.mode, prob.ev)
            at = prob.acts.order[a + max(range(len(work)), key=work.__getitem__)]
            step = f"{row['step_s']:.2f} s | {row['tps_gpu']:,.0f}" if mode != "selective (before)" else "| "
            print(f"| {n_gpus} | {mode} | {f.static / GiB:.1f} GiB | {acts / GiB:.1f} GiB | {transient / GiB:.1f} GiB | "
                  f"{f.extra / GiB:.1f} GiB ({at.name}) | {prob.need(i, f) / GiB:.1f} GiB | {step} |", flush=True)
        layout_bench._shared.clear()
    print()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="one sequence length in part 1")
    ap.add_argument("--skip-70b", action="store_true")
    ap.add_argument("--titan", nargs="*", type=int, default=None,
                    help="torchtitan's 8B: the per-layer table, then its pinned rows on these GPU counts (8, 64)")
    ap.add_argument("--modes", nargs="+", default=None, help="--titan rows: only these recompute modes")
    ap.add_argument("--rows-only", action="store_true", help="--titan: skip the per-layer table")
    args = ap.parse_args()
    if args.titan is not None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))  # layout_bench
        if not args.rows_only:
            titan_layer()
        if args.titan:
            titan_rows(args.titan, *([args.modes] if args.modes else []))
        return
    part1([32] if args.quick else [16, 64, 128])
    if not args.skip_70b:
        part2()
        part3()


if __name__ == "__main__":
    main()
