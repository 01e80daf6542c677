"""The modelled Llama 3 step at each tensor-parallel degree, with and without sequence parallelism.

For the Llama 3 8B shape (and 70B with ``--only 70b``), built from its config on the meta device
(bf16, sequence 8192), on 8 H100 SXM GPUs in one node (NVLink 4), the planner is run as
``partitioner plan hf:<config> --gpus 8 --gpus-per-node 8 --tp auto --seq 8192 --batch 8
[--sequence-parallel]`` runs it (schedule, micro-batches and replicas "auto"): the ``tp``
ranking gives the best layout and predicted step per degree T, once without and once with
``sequence_parallel=True``. Beside them, the per-micro-batch prices of one layer on one rank
(``partitioner.tensor_parallel.view`` + ``node_time`` on the H100 profile): compute of the
regions, of what lies between them, the collectives, and the activations one layer keeps.

    PYTHONPATH=. .venv/bin/python benchmarks/sp_bench.py [--only 8b 70b] [--batch 8] [--layers-only] [--sp-only]

Every figure is the cost model's, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from typing import Any

if __package__ in (None, ""):  # run as a script: the repository root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from layout_bench import CONFIGS as LAYOUT_CONFIGS  # noqa: E402
from layout_bench import SEQ  # noqa: E402

from partitioner import partition  # noqa: E402
from partitioner.cost_models.cost import evaluate  # noqa: E402
from partitioner.cost_models.devices import get_device, get_link  # noqa: E402
from partitioner.passes.meta import COST, TP  # noqa: E402
from partitioner.tools.hf_model import load_hf  # noqa: E402

# the Llama 3 shapes layout_bench plans (8B and 70B here)
CONFIGS = {k: v for k, v in LAYOUT_CONFIGS.items() if k in ("8b", "70b")}
COMMON = dict(device="h100-sxm", link="nvlink4", gpus_per_node=8, schedule="auto", n_microbatches="auto",
              data_parallel="auto", tensor_parallel="auto")


def layer_prices(gm: Any, layer: int, micro: int) -> list[dict[str, Any]]:
    """Per degree and SP setting, one rank's seconds (forward + backward) for layer ``layer`` at
    ``micro`` sequences: split regions, the ops between them, collectives; and its activations."""
    from partitioner.tensor_parallel import node_time, view

    dev, lnk = get_device("h100-sxm"), get_link("nvlink4")
    values = {"B": micro, "S": SEQ}

    def base(cost: Any, vals: Any) -> tuple[float, float]:
        return dev.node_time(cost, vals, "bfloat16")

    prefix = f"model.layers.{layer}"
    rows = []
    for t in (1, 2, 4, 8):
        for sp in ((False, True) if t > 1 else (False,)):
            g, sharded = view(gm, t, sequence_parallel=sp) if t > 1 else (gm, None)
            regions = {n.name for r in (sharded.regions if sharded else []) for n in (*r.columns, *r.inner, *r.rows)}
            comm_only = node_time(lambda c, v: (0.0, 0.0), g, lnk)
            split = between = comm = act = 0.0
            for n in g.graph.nodes:
                if COST not in n.meta or not _in_layer(n, prefix):
                    continue
                f, b = base(n.meta[COST], values)
                cf, cb = comm_only(n.meta[COST], values)
                if n.name in regions:
                    split += f + b
                else:
                    between += f + b
                comm += cf + cb
                act += evaluate(n.meta[COST].saved_bytes, micro, SEQ)
            rows.append(dict(t=t, sp=sp, split_ms=1e3 * split, between_ms=1e3 * between, comm_ms=1e3 * comm,
                             act_gib=act / 2**30))
    return rows


def _in_layer(node: Any, prefix: str) -> bool:
    """Whether the export capture recorded ``node`` inside module ``prefix`` (a decoder layer)."""
    stack = node.meta.get("nn_module_stack") or {}
    paths = [str(v[0] if isinstance(v, tuple) else v) for v in stack.values()]
    return any(p == prefix or p.startswith(prefix + ".") for p in paths)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", default=["8b"], choices=list(CONFIGS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--layers-only", action="store_true", help="only the per-layer prices (no planner runs)")
    ap.add_argument("--sp-only", action="store_true", help="plan only with sequence parallelism (half the time)")
    args = ap.parse_args()
    for name in args.only:
        folder = tempfile.mkdtemp()
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(CONFIGS[name], f)
        model, inputs = load_hf(f"hf:{folder}", SEQ, args.batch)
        results: dict[bool, Any] = {}
        for sp in (() if args.layers_only else (True,) if args.sp_only else (False, True)):
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pipe = partition(model, 8, inputs, sequence_parallel=sp, **COMMON)
            results[sp] = pipe
            print(f"{name} sequence_parallel={sp}: planned in {time.perf_counter() - t0:.0f} s", flush=True)
            for r in pipe.plan.rankings.get("tp", []):
                print(f"  {r['label']}: {r['step_s'] * 1e3 if r['step_s'] else float('nan'):.0f} ms"
                      + (" (picked)" if r["picked"] else "") + (f" refused: {r['refused']}" if r["refused"] else ""),
                      flush=True)
        # the annotated graph, whole (a plan that picked T > 1 holds one rank's view: not that)
        gm = next((p.graph for p in results.values() if TP not in p.graph.meta), None)
        if gm is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                gm = partition(model, 1, inputs, device="h100-sxm", link="nvlink4", memory_limit=2**50).graph
        print(f"{name}: one layer, one rank, micro-batch of 1 x {SEQ} tokens (forward + backward)")
        print("T | SP | split regions | between regions | TP collectives | activations saved")
        for r in layer_prices(gm, 1, 1):
            print(f"{r['t']} | {'on' if r['sp'] else 'off'} | {r['split_ms']:.2f} ms | {r['between_ms']:.2f} ms | "
                  f"{r['comm_ms']:.2f} ms | {r['act_gib']:.2f} GiB", flush=True)


if __name__ == "__main__":
    main()
