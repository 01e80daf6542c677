"""Pipeline x data parallelism benchmark (issue 10): predicted step across D x P, planner vs Megatron-style defaults.

    .venv/bin/python benchmarks/dp_bench.py --out /tmp/dp.jsonl [--models 7b 70b] [--gpus 8 16 32 64] [--zero 0]
    .venv/bin/python benchmarks/dp_bench.py --render /tmp/dp.jsonl      # markdown tables

benchmarks/RESULTS.md, "Pipeline x data parallelism", keeps the last run's tables (zero=0 and zero=1) and notes.

Everything here is PREDICTED (the planner's cost model on simulated H100 SXM GPUs, 8 per node,
NVLink 4 inside a node, InfiniBand NDR 400 between nodes); nothing runs on a GPU.

Models: Llama-2-7B shape (32 layers, hidden 4096, ffn 11008, 32 heads, vocab 32000) and the
Llama-3-70B shape of ``memory_bench.py`` (80 layers, hidden 8192, ffn 28672, GQA 64/8, vocab
128256), both built on the meta device in bf16, trained bf16-mixed with Adam (16 B/param),
global batch 128 sequences x 4096 tokens, cuts only between decoder layers (``cut_at``), 1F1B.

Per (model, N GPUs):

- planner: ``partition(n_gpus=N, data_parallel="auto", gpus_per_node=8, recompute="auto")``.
  Its ``dp:`` notes list every candidate (D, P, m, placement, step, exposed all-reduce, bubble,
  peak memory) and the refused D; the picked plan gives the exact figures of the chosen point.
- Megatron-style defaults on the same costs: layers split evenly (``pinned_cuts`` at the first
  node of layer round(k L / P), pinned by node name: ``layer_starts``), recompute "none", else "full" (every layer) if that does not
  fit, D as large as memory allows: D is tried from the planner's largest feasible D downwards
  (a D the planner's own search cannot fit under any split and recompute is not tried), and
  the first D whose even split fits is taken. Placement is Megatron's rank order (pp outermost,
  the replicas of a stage on consecutive ranks: mesh ``("pp", "dp")``). Its step under that
  placement is re-priced here from the plan's own stage times with the library's functions
  (``simulator.simulate``, ``data_parallel.reduction_windows`` / ``price_replicas``: each rank's
  bucketed all-reduce overlapped with its stages' final backwards); the same re-pricing of the
  planner's chosen placement is checked against ``plan.prediction.step_time_s``.
  Micro-batches: the library's default for both (the largest divisor of the replica's batch
  up to 2 P), so the comparison is about D, the split and recompute only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GiB = 2**30
BATCH, SEQ, GPN = 128, 4096, 8
SHAPES = {
    "7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
               intermediate_size=11008, vocab_size=32000, max_position_embeddings=4096),
    "70b": dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                intermediate_size=28672, vocab_size=128256, max_position_embeddings=8192),
}
KW = dict(device="h100-sxm", link="nvlink4", precision="bf16-mixed", optimizer="adam", schedule="1f1b",
          gpus_per_node=GPN, inter_link="ib-ndr-400", cut_at="model.layers.*")


def build(name: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(use_cache=False, attn_implementation="sdpa", **SHAPES[name])
    with torch.device("meta"):
        return LlamaForCausalLM(cfg).to(torch.bfloat16)


def reprice(plan, dims: tuple[str, ...], sizes: dict[str, tuple[int, int]]) -> dict:
    """The plan's step under mesh ``dims``, from its own stage times (as layout.replicated prices
    it): ``sizes`` maps each trainable parameter name to (tensor id, gradient bytes)."""
    from dataclasses import replace

    from partitioner.cost_models.devices import LinkSpec
    from partitioner.data_parallel import price_replicas, reduction_windows
    from partitioner.schedule import build_schedule
    from partitioner.simulator import predict_plan

    p, m = plan.prediction, replace(plan.mesh, dims=dims)
    sched = build_schedule(p.schedule, m.pp, p.n_microbatches, plan.n_stages)
    sim = predict_plan(replace(plan, mesh=m), sched)  # each cut on the link it crosses under ``dims``
    if m.dp == 1:
        return {"step": sim.step_time, "exposed": 0.0, "bubble": sim.bubble_fraction, "allreduce": []}
    link = LinkSpec.from_dict(plan.link)
    inter = LinkSpec.from_dict(m.inter_link) if m.inter_link else link
    ranks = [sched.rank_of(s) for s in range(plan.n_stages)]
    # per stage, its trainable tensors once, in registration order (bf16 gradients = parameter bytes)
    params = [list(dict.fromkeys(sizes[n] for n in s.parameters if n in sizes)) for s in plan.stages]
    weights = [0] * m.pp
    for r in range(m.pp):
        weights[r] = sum(b for _, b in {k: b for s in plan.stages if ranks[s.index] == r for k, b in params[s.index]}.items())
    windows = reduction_windows(sim.events, ranks, params, m.pp)  # each stage's buckets over its final backward
    times, step = price_replicas(m, m.zero, link, inter, windows, weights, sim.step_time)
    return {"step": step, "exposed": step - sim.step_time, "bubble": sim.bubble_fraction, "allreduce": times}


def describe(plan, dims: tuple[str, ...]) -> str:
    from dataclasses import replace

    return replace(plan.mesh, dims=dims).describe()


def summary(plan, took: float, sizes: dict[str, tuple[int, int]]) -> dict:
    from partitioner.schedule import build_schedule
    from partitioner.simulator import predict_plan

    p, m = plan.prediction, plan.mesh
    own = reprice(plan, tuple(m.dims), sizes)
    timeline = predict_plan(plan, build_schedule(p.schedule, m.pp, p.n_microbatches, plan.n_stages)).step_time
    return {"dp": m.dp, "pp": m.pp, "m": p.n_microbatches, "micro": p.microbatch_size, "dims": list(m.dims),
            "placement": describe(plan, tuple(m.dims)), "step": p.step_time_s, "exposed": m.exposed_s,
            "allreduce": list(m.allreduce_s), "plan_bubble": p.bubble_fraction, "bubble": own["bubble"],
            "repriced_step": own["step"], "timeline_step": timeline,
            "peak": max(s.cost.memory_bytes for s in plan.stages),
            "recompute": [s.recompute for s in plan.stages], "took": took,
            "notes": [n for n in plan.notes if n.startswith("dp:")]}


NOTE = re.compile(r"dp: #(\d+) D=(\d+) P=(\d+) m=(\d+) (\S+)(?: \((.*)\))?: predicted step ([\d.e+]+) ms "
                  r"\(all-reduce exposed ([\d.e+]+) ms, bubble ([\d.]+)%\), peak memory ([\d.]+) (\w+)")


def candidates(notes: list[str]) -> tuple[list[dict], list[str]]:
    rows, refused = [], []
    for n in notes:
        if n.startswith("dp: --"):
            refused.append(n[len("dp: -- "):])
            continue
        g = NOTE.match(n)
        if g:
            unit = {"GiB": GiB, "MiB": 2**20, "TiB": 2**40}[g[11]]
            rows.append({"rank": int(g[1]), "dp": int(g[2]), "pp": int(g[3]), "m": int(g[4]),
                         "placement": g[6] or "one node", "step": float(g[7]) / 1e3, "exposed": float(g[8]) / 1e3,
                         "bubble": float(g[9]) / 100, "peak": float(g[10]) * unit})
    return rows, refused


def layer_starts(pipe, layers: int) -> dict[int, str]:
    """Per decoder layer k, the name of its first node in the solver's order (its input RMSNorm).

    Pinned by node name, not by module path: a module-path pin ("model.layers.k") resolves to
    the first node attributed to any submodule of layer k, and torch.export hoists each layer's
    rotary ``unsqueeze`` of cos/sin (attributed to ``model.layers.k.self_attn``) to the top of
    the graph, so every such pin lands before layer 0 (see the RESULTS section's notes)."""
    from partitioner.passes.meta import MODULE
    from partitioner.passes.split import compute_nodes

    order = compute_nodes(pipe.graph)
    return {k: next(n.name for n in order if str(n.meta.get(MODULE, "")) == f"model.layers.{k}.input_layernorm")
            for k in range(1, layers)}


def run(model_name: str, gpus: int, zero: int, out: Path) -> None:
    import torch

    from partitioner import PartitionError, partition

    model = build(model_name)
    sizes = {n: (id(t), t.numel() * t.element_size()) for n, t in model.named_parameters(remove_duplicate=False)
             if t.requires_grad}
    layers = SHAPES[model_name]["num_hidden_layers"]
    ids = {"input_ids": torch.zeros(BATCH, SEQ, dtype=torch.long)}

    def emit(rec: dict) -> None:
        rec.update(model=model_name, gpus=gpus, zero=zero)
        with out.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        print(json.dumps({k: v for k, v in rec.items() if k != "notes"})[:600], flush=True)

    t0 = time.perf_counter()
    try:
        pipe = partition(model, n_gpus=gpus, example_inputs=ids, data_parallel="auto", zero=zero,
                         recompute="auto", **KW)
    except PartitionError as e:
        emit({"kind": "planner", "error": " ".join(str(e).split()), "took": time.perf_counter() - t0})
        feasible = []
    else:
        rec = summary(pipe.plan, time.perf_counter() - t0, sizes)
        rec["kind"] = "planner"
        emit(rec)
        feasible = sorted({r["dp"] for r in candidates(rec["notes"])[0]}, reverse=True)
        starts = layer_starts(pipe, layers)
        del pipe
    tried = []
    for d in ([d for d in range(feasible[0], 0, -1) if gpus % d == 0] if feasible else []):
        pp = gpus // d
        if pp > layers:
            continue
        pins = [starts[round(k * layers / pp)] for k in range(1, pp)]
        for rc in ("none", "full"):
            t0 = time.perf_counter()
            try:
                pipe = partition(model, n_gpus=gpus, example_inputs=ids, data_parallel=d, zero=zero, recompute=rc,
                                 pinned_cuts=pins, **KW)
            except PartitionError as e:
                tried.append(f"D={d} P={pp} recompute={rc}: {' '.join(str(e).split())[:200]}")
                continue
            rec = summary(pipe.plan, time.perf_counter() - t0, sizes)
            meg = reprice(pipe.plan, ("pp", "dp"), sizes)
            rec.update(kind="megatron", recompute_mode=rc, refused=tried, even=layers % pp == 0,
                       megatron={**meg, "placement": describe(pipe.plan, ("pp", "dp"))})
            emit(rec)
            return
    emit({"kind": "megatron", "error": "no D fits with an even layer split", "refused": tried})


def pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def render(path: Path) -> None:
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    keys = sorted({(r["model"], r["gpus"], r["zero"]) for r in recs}, key=lambda k: (k[0] != "7b", k[2], k[1]))
    model_prev = None
    for model, gpus, zero in keys:
        if model != model_prev:
            print(f"\n### {model.upper()} Llama shape, Adam bf16-mixed, zero={zero}, global batch {BATCH} x {SEQ} "
                  f"tokens\n")
            model_prev = model
        plan = next((r for r in recs if (r["model"], r["gpus"], r["zero"], r["kind"]) == (model, gpus, zero, "planner")),
                    None)
        meg = next((r for r in recs if (r["model"], r["gpus"], r["zero"], r["kind"]) == (model, gpus, zero, "megatron")),
                   None)
        nodes = -(-gpus // GPN)
        print(f"**{gpus} GPUs ({nodes} node{'s' if nodes > 1 else ''})**\n")
        print("| | D | P | m | placement | predicted step | all-reduce exposed | bubble | peak memory |")
        print("|---|---|---|---|---|---|---|---|---|")
        if plan is None or "error" in plan:
            print(f"| planner | | | | | does not fit: {plan['error'][:150] + ' ...' if plan else 'not run'} | | | |")
        else:
            rows, refused = candidates(plan["notes"])
            for r in rows:
                if r["rank"] == 1:  # the picked plan's own figures (the notes round to 4 digits)
                    r.update(step=plan["step"], exposed=plan["exposed"], peak=plan["peak"], bubble=plan["bubble"])
                mark = "**chosen**" if r["rank"] == 1 else f"#{r['rank']}"
                print(f"| {mark} | {r['dp']} | {r['pp']} | {r['m']} | {r['placement']} | {r['step']:.3f} s | "
                      f"{r['exposed'] * 1e3:.3g} ms ({pct(r['exposed'] / r['step'])}) | {pct(r['bubble'])} | "
                      f"{r['peak'] / GiB:.1f} GiB |")
            for x in refused:
                d = re.match(r"D=(\d+) P=(\d+): (.*)", x)
                why = d[3] if d else x
                why = "no cut left (more stages than layers)" if "cut" in why and "stage" in why and "need" not in why \
                    else why.split(" + ")[0].split(" = ")[0]
                print(f"| -- | {d[1] if d else ''} | {d[2] if d else ''} | | | does not fit: {why[:110]} | | | |")
        if meg is not None and "error" not in meg:
            mg = meg["megatron"]
            rc = meg["recompute_mode"]
            print(f"| Megatron-style (even layers{'' if meg['even'] else ', L % P != 0'}, recompute {rc}) | "
                  f"{meg['dp']} | {meg['pp']} | {meg['m']} | {mg['placement']} | {mg['step']:.3f} s | "
                  f"{mg['exposed'] * 1e3:.3g} ms ({pct(mg['exposed'] / mg['step'])}) | {pct(mg['bubble'])} | "
                  f"{meg['peak'] / GiB:.1f} GiB |")
        elif meg is not None:
            print(f"| Megatron-style | | | | | {meg['error']} | | | |")
        print()
        if plan is not None and "error" not in plan:
            redo = sum(x != "none" for x in plan["recompute"])
            line = (f"Chosen: D={plan['dp']} P={plan['pp']}, {plan['placement']}, {redo} of {plan['pp']} stages "
                    f"recompute; step {plan['step']:.3f} s")
            if meg is not None and "error" not in meg:
                line += f", Megatron-style {meg['megatron']['step']:.3f} s ({meg['megatron']['step'] / plan['step']:.2f}x)"
            print(line + f"; planning {plan['took']:.0f} s.\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("/tmp/dp_bench.jsonl"))
    ap.add_argument("--models", nargs="+", default=["7b", "70b"], choices=list(SHAPES))
    ap.add_argument("--gpus", nargs="+", type=int, default=[8, 16, 32, 64])
    ap.add_argument("--zero", type=int, default=0, choices=(0, 1))
    ap.add_argument("--render", type=Path, help="print the markdown tables of a results file and exit")
    args = ap.parse_args()
    if args.render:
        render(args.render)
        return
    for name in args.models:
        for g in args.gpus:
            run(name, g, args.zero, args.out)


if __name__ == "__main__":
    main()
