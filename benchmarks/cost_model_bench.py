"""Does the cost model predict what a stage costs on this CPU? Predicted vs measured.

Run: ``.venv/bin/python benchmarks/cost_model_bench.py`` (about 2 minutes on 2 cores;
needs ``pip install transformers``). Writes the "Cost model" section of
``benchmarks/RESULTS.md``.

The device is calibrated first (median of 5 ``DeviceSpec.measure_local()`` runs: fp32 matmul FLOP/s and
copy bandwidth, one thread), then per model with ``calibrate_device`` (one short measured
forward + backward of the whole model sets the absolute level). Each model (the balance benchmark's GPT-2 and Llama) is
partitioned into 4 stages twice, with our cuts and with uniform block cuts, and every
stage's predicted forward and backward time (``plan.stages[i].cost``, roofline of its
nodes) is set against the stage timed alone (median of 7 interleaved rounds, same micro-batch).

"error" is (predicted - measured) / measured. "share error" compares each stage's share of
the total (predicted share / measured share - 1): a cost model that is off by the same
factor on every stage still balances perfectly, and this is the figure the cuts depend on.
"""

from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._models import (  # noqa: E402
    BENCHES,
    MICRO,
    N_STAGES,
    SEQ,
    M,
    bounds_to_pins,
    interleaved_times,
    markdown_table,
    replace_section,
    stage_entries,
)
from benchmarks.balance_bench import PREAMBLE, RESULTS, uniform_bounds  # noqa: E402
from partitioner import DeviceSpec, calibrate_device, partition  # noqa: E402

REPEAT = 7


def calibrate(n: int = 5) -> DeviceSpec:
    """Median of ``n`` short ``measure_local`` runs: one 0.5 s run on a shared 2-core machine
    swings by 20 %, and every predicted time scales with it."""
    runs = [DeviceSpec.measure_local() for _ in range(n)]
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return DeviceSpec("local", med([d.peak_flops for d in runs]), med([d.peak_flops_lowp for d in runs]),
                      med([d.mem_bandwidth for d in runs]), runs[0].memory_bytes)


def main() -> None:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    base = calibrate()
    out = [
        f"Device: the median of 5 `DeviceSpec.measure_local()` runs at one thread ({base.peak_flops / 1e9:.0f} GFLOP/s fp32 "
        f"matmul (512x512), {base.mem_bandwidth / 1e9:.0f} GB/s copy), then `calibrate_device(model, micro-batch)`: its "
        f"rates scaled by predicted / measured for one real forward + backward of the whole model (median of 5). Micro-batch {MICRO} x {SEQ} tokens; times "
        f"in ms; measured = median of {REPEAT} interleaved rounds, each stage alone. error = predicted/measured - 1; "
        "share error = (predicted share of the total) / (measured share) - 1.\n",
    ]
    worst_abs, worst_share = 0.0, 0.0
    for name in BENCHES:
        bench = BENCHES[name]()
        dev = calibrate_device(bench.model, bench.inputs(MICRO), device=base, repeats=5)
        print(f"  {name}: calibration scale {dev.peak_flops / base.peak_flops:.3f}", flush=True)
        kw = dict(n_microbatches=M, device=dev, link="nvlink4")
        pipes = {
            "ours": partition(bench.model, N_STAGES, bench.inputs(MICRO * M), cut_at=bench.blocks, **kw),
            "uniform": partition(bench.model, N_STAGES, bench.inputs(MICRO * M),
                                 pinned_cuts=bounds_to_pins(bench, uniform_bounds(bench)), **kw),
        }
        entries = [(k, e) for k, p in pipes.items() for e in stage_entries(p, bench.inputs(MICRO))]
        times = interleaved_times([e for _, e in entries], REPEAT)
        rows = []
        for split, pipe in pipes.items():
            measured = [t for (k, _), t in zip(entries, times) if k == split]
            pred = [(st.cost.fwd_time_s, st.cost.fwd_time_s + st.cost.bwd_time_s) for st in pipe.plan.stages]
            total_p, total_m = sum(b for _, b in pred), sum(b for _, b in measured)
            for i, ((pf, pb), (mf, mb)) in enumerate(zip(pred, measured)):
                err_f, err_b = pf / mf - 1, pb / mb - 1
                share = (pb / total_p) / (mb / total_m) - 1
                worst_abs, worst_share = max(worst_abs, abs(err_b)), max(worst_share, abs(share))
                # skip export's pseudo-module "_empty_nn_module_stack_from_metadata_hook" (a known bug)
                first = next(m for m in pipe.plan.stages[i].modules if not m.startswith("_"))
                rows.append([split, i, first + " ..",
                             f"{pf * 1e3:.1f}", f"{mf * 1e3:.1f}", f"{err_f:+.0%}",
                             f"{pb * 1e3:.1f}", f"{mb * 1e3:.1f}", f"{err_b:+.0%}", f"{share:+.1%}"])
                print(f"  {name} {split:7s} stage {i}: fwd {pf * 1e3:6.1f} vs {mf * 1e3:6.1f} ({err_f:+.0%}), "
                      f"fwd+bwd {pb * 1e3:6.1f} vs {mb * 1e3:6.1f} ({err_b:+.0%}), share {share:+.1%}", flush=True)
        out.append(f"### {name}\n")
        out.append(markdown_table(["split", "stage", "starts at", "fwd pred", "fwd meas", "fwd err",
                                   "fwd+bwd pred", "fwd+bwd meas", "fwd+bwd err", "share err"], rows) + "\n")
    out.append(f"Worst |error| of fwd+bwd: {worst_abs:.0%}; worst |share error|: {worst_share:.1%}. "
               f"Benchmark wall time: {time.perf_counter() - t0:.0f} s.\n")
    replace_section(RESULTS, "Cost model: predicted vs measured stage time", "\n".join(out), PREAMBLE)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
