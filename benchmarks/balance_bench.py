"""How balanced are the stages, measured? Ours against four published splitters.

Run: ``.venv/bin/python benchmarks/balance_bench.py`` (about 3 minutes on 2 cores; needs
``pip install transformers deepspeed torchgpipe``, deepspeed with ``DS_BUILD_OPS=0``).
Writes the "Balance" section of ``benchmarks/RESULTS.md``.

For a Hugging Face GPT-2 and a Llama-style model (12 blocks, hidden 384, vocab 16k, so
the LM head weighs as much as three blocks; sequence 128, micro-batch 2) into 4 stages:

(a) ours: ``partition`` priced on ``DeviceSpec.measure_local()``, cuts at block boundaries;
    also "ours, any node": the same without ``cut_at``;
(b) PiPPy ``split_into_equal_size``: parameter+buffer elements per stage under
    ``total // n``, greedy (pippy/ModelSplit.py, no longer shipped with torch 2.13), its
    rule re-implemented line for line on our captured graph (get_attr users), cuts pinned
    by node name;
(c) DeepSpeed ``partition_balanced`` on parameter counts per layer (PipelineModule's
    ``partition_method="parameters"``);
(d) torchgpipe ``balance_by_time`` on an nn.Sequential view of the same layers (CPU);
(e) uniform: blocks evenly, embeddings on the first stage, head on the last
    (Megatron-LM / torchtitan default).

Every answer becomes a ``partition(..., pinned_cuts=...)``, and each stage is timed alone
(forward, and forward+backward against a gradient of ones; one thread; median of 7) on
the same micro-batch. The table shows max/mean of fwd+bwd stage time (1.00 is perfect)
and the 1F1B step with 8 micro-batches that ``partitioner.simulator`` predicts from the
measured per-stage forward and backward times.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._models import (  # noqa: E402
    BENCHES,
    MICRO,
    N_STAGES,
    SEQ,
    Bench,
    M,
    bounds_to_pins,
    interleaved_times,
    markdown_table,
    plan_bounds,
    replace_section,
    stage_entries,
)
from partitioner import DeviceSpec, partition  # noqa: E402
from partitioner.passes.split import compute_nodes  # noqa: E402
from partitioner.schedule import build_schedule  # noqa: E402
from partitioner.simulator import simulate  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
PREAMBLE = """# Benchmark results

Regenerate (each script rewrites only its own section):

```
.venv/bin/python benchmarks/balance_bench.py
.venv/bin/python benchmarks/cost_model_bench.py
```
"""
REPEAT = 7


def pippy_equal_size(gm: torch.fx.GraphModule, nstages: int) -> list[str]:
    """PiPPy's split_into_equal_size: node names to cut before (pippy/ModelSplit.py).

    Kept as written there: a call_function's get_attr parameters count once per bucket, a
    call_module's count whole, a node alone over the threshold becomes its own stage, and
    split points past ``nstages - 1`` are dropped (so the last stage takes the rest)."""
    state = gm.state_dict(keep_vars=True)
    total = sum(p.numel() for p in gm.parameters()) + sum(b.numel() for b in gm.buffers())
    threshold = total // nstages
    sizes: dict[torch.fx.Node, dict[str, int]] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target in state:
            for user in node.users:
                sizes.setdefault(user, {}).setdefault(str(node.target), state[node.target].numel())
        if node.op == "call_module":
            mod = gm.get_submodule(str(node.target))
            found = {n: p.numel() for n, p in mod.named_parameters()}
            if found:
                sizes.setdefault(node, found)
    before: list[torch.fx.Node] = []
    acc, acc_params = 0, set()
    for node in gm.graph.nodes:
        if node not in sizes:
            continue
        new = {k: v for k, v in sizes[node].items() if node.op == "call_module" or k not in acc_params}
        rep = {k: v for k, v in sizes[node].items() if node.op != "call_module" and k in acc_params}
        new_size, rep_size = sum(new.values()), sum(rep.values())
        if acc + new_size <= threshold:
            acc += new_size
            acc_params |= set(new)
        elif acc == 0 and new_size > threshold:
            before.append(node.next)
        else:
            before.append(node)
            acc = rep_size + new_size
            acc_params = set(rep) | set(new)
    names = [n.name for n in before[: nstages - 1]]
    if len(names) != nstages - 1:  # PiPPy asserts here
        raise RuntimeError(f"PiPPy's rule made {len(names) + 1} stages, not {nstages}")
    return names


def deepspeed_bounds(bench: Bench) -> list[int]:
    from deepspeed.runtime.utils import partition_balanced

    return [int(b) for b in partition_balanced(bench.layer_params(), N_STAGES)]


def torchgpipe_bounds(bench: Bench) -> list[int]:
    from torchgpipe.balance import balance_by_time

    sample = bench.inputs(MICRO)["input_ids"]
    balance = balance_by_time(N_STAGES, bench.sequential, sample, timeout=4.0, device=torch.device("cpu"))
    out = [0]
    for n in balance:
        out.append(out[-1] + n)
    return out


def uniform_bounds(bench: Bench) -> list[int]:
    n_blocks = len(bench.layers) - 2
    per, extra = divmod(n_blocks, N_STAGES)
    out, at = [0], 1  # the embedding (layer 0) joins the first stage
    for s in range(N_STAGES - 1):
        at += per + (1 if s < extra else 0)
        out.append(at)
    return [*out, len(bench.layers)]


def build(bench: Bench, dev: DeviceSpec, pins: list[str]) -> Any:
    return partition(bench.model, N_STAGES, bench.inputs(MICRO * M), n_microbatches=M, device=dev,
                     link="nvlink4", pinned_cuts=pins)


def summarize(pipe: Any, times: list[tuple[float, float]]) -> dict[str, Any]:
    fwd = [f for f, _ in times]
    bwd = [max(fb - f, 0.0) for f, fb in times]
    both = [f + b for f, b in zip(fwd, bwd)]
    sim = simulate(build_schedule("1f1b", N_STAGES, M), fwd, bwd)
    return {"cuts": pipe.plan.cuts, "both": both, "ratio": max(both) / (sum(both) / len(both)),
            "step": sim.step_time, "pipe": pipe}


def run(name: str, dev: DeviceSpec) -> tuple[str, list[list[Any]]]:
    bench = BENCHES[name]()
    t0 = time.perf_counter()
    ours = partition(bench.model, N_STAGES, bench.inputs(MICRO * M), n_microbatches=M, device=dev,
                     link="nvlink4", cut_at=bench.blocks)
    free = partition(bench.model, N_STAGES, bench.inputs(MICRO * M), n_microbatches=M, device=dev,
                     link="nvlink4")
    assert ours.plan.capture == "export"
    order = [n.name for n in compute_nodes(ours.graph)]
    methods: dict[str, tuple[list[str], str]] = {
        "ours (cut_at blocks)": (bounds_to_pins(bench, plan_bounds(bench, ours.plan)), "layers"),
        "ours (any node)": ([order[i] for i in _node_cuts(free)], "nodes"),
        "PiPPy split_into_equal_size": (pippy_equal_size(ours.graph, N_STAGES), "nodes"),
        "DeepSpeed partition_balanced (params)": (bounds_to_pins(bench, deepspeed_bounds(bench)), "layers"),
        "torchgpipe balance_by_time": (bounds_to_pins(bench, torchgpipe_bounds(bench)), "layers"),
        "uniform blocks (Megatron/torchtitan)": (bounds_to_pins(bench, uniform_bounds(bench)), "layers"),
    }
    pipes: dict[tuple[str, ...], Any] = {}
    for pins, _ in methods.values():
        if tuple(pins) not in pipes:
            pipes[tuple(pins)] = build(bench, dev, pins)
    # all stages of all methods timed together, interleaved round by round
    entries = [(key, s, e) for key, pipe in pipes.items() for s, e in enumerate(stage_entries(pipe, bench.inputs(MICRO)))]
    times = interleaved_times([e for _, _, e in entries], REPEAT)
    per: dict[tuple[str, ...], list[tuple[float, float]]] = {k: [] for k in pipes}
    for (key, _, _), t in zip(entries, times):
        per[key].append(t)
    rows, cache = [], {k: summarize(pipes[k], per[k]) for k in pipes}
    for label, (pins, _) in methods.items():
        r = cache[tuple(pins)]
        stages = " / ".join(f"{t * 1e3:.0f}" for t in r["both"])
        rows.append([label, "; ".join(r["cuts"]), stages, f"{r['ratio']:.3f}", f"{r['step'] * 1e3:.0f}"])
        print(f"  {name:6s} {label:40s} max/mean {r['ratio']:.3f}  step {r['step'] * 1e3:.0f} ms  [{stages}]",
              flush=True)
    print(f"  {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    return name, rows


def _node_cuts(pipe: Any) -> list[int]:
    order = [n.name for n in compute_nodes(pipe.graph)]
    return [order.index(st.nodes[0]) for st in pipe.plan.stages[1:]]


def main() -> None:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    dev = DeviceSpec.measure_local()
    sections = [
        f"Measured {time.strftime('%Y-%m-%d')} on this machine ({os.cpu_count()} CPU cores, torch "
        f"{torch.__version__}, one thread; `measure_local`: {dev.peak_flops / 1e9:.0f} GFLOP/s fp32 matmul, "
        f"{dev.mem_bandwidth / 1e9:.0f} GB/s copy). 4 stages, micro-batch {MICRO} x {SEQ} tokens; "
        f"stage times are forward+backward in ms, each stage alone, median of {REPEAT}; "
        f"max/mean 1.00 is perfect balance; step = simulated 1F1B, {M} micro-batches, from the measured "
        "per-stage forward and backward times (no communication).\n",
    ]
    for name in BENCHES:
        _, rows = run(name, dev)
        sections.append(f"### {name}: 12 blocks, hidden 384, vocab 16384\n")
        sections.append(markdown_table(["method", "cuts", "stage fwd+bwd (ms)", "max/mean", "1F1B m=8 step (ms)"],
                                       rows) + "\n")
    sections.append(f"Benchmark wall time: {time.perf_counter() - t0:.0f} s.\n")
    replace_section(RESULTS, "Balance: measured stage times", "\n".join(sections), PREAMBLE)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
