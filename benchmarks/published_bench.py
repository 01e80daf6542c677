"""Predicted against measured on published training runs the GPU cost model was not fitted on.

``benchmarks/gpu_cost_bench.py`` checks the efficiency model on the 24 Zero Bubble runs its one
fitted number (``Efficiency.fit``) was fitted to. This benchmark plans runs from other sources
with the same helpers (``gpu_cost_bench.GPT``, ``plan_layout``): each run's model built on the
meta device, its layout pinned (pipeline, tensor- and data-parallel degrees, blocks per stage,
micro-batch size and count, schedule, recompute), and compares the predicted iteration (the
plan's simulated step plus the slowest rank's Adam step) with the measured one.

Sources (cited per row):

[VP]  M. T. Yeung, P. Qi, M. Lin, X. Wan, "Balancing Pipeline Parallelism with Vocabulary
      Parallelism" (arXiv 2411.05288, MLSys 2025); its artifact, github.com/sail-sg/
      VocabularyParallelism: ``artifact/README.md`` (settings: GPT of 32 layers, 24 heads, hidden
      3072, FFN 12288, sequence 2048/4096, micro-batch 1, 128 micro-batches, vocabulary
      32k-256k, one server of 8 A100 GPUs, pipeline of 8, Megatron-LM), ``artifact/
      example-results/full-exp.txt`` (the MFU of each method; the README says they "roughly
      match" the paper's Table 5 rows for 8 GPUs), ``artifact/show_result_full_exp.py`` (the MFU
      formula: ``3 (2bshv + l (8bsh^2 + 4bs^2h + 4bsh f)) / 8 / 312 TFLOP/s / iteration``, inverted
      here to the iteration time), ``artifact/exp_one_host.csv`` (each run's last-stage layer
      count: 4 for the baseline, 0-4 for "redis") and ``pretrain_gpt.sh`` (fp16, flash attention,
      untied embeddings, no dropout, LayerNorm + GELU, learned positions). Layout: Megatron's
      ``get_num_layers_to_build`` (``megatron/core/transformer/transformer_block.py``): 32 / 8 = 4
      blocks per stage for the baseline; with layer redistribution the last stage gets
      ``final_stage_num_layers`` and the remaining blocks are spread over the others, the extra
      ones on the stages just before the last. The embedding sits on the first stage, the final
      norm, output layer and loss on the last. Only the baseline and "redis" (1F1B, whole
      output layer on the last stage) are planned: the vocabulary-parallel methods (vocab-1,
      vocab-2, interlaced) split the output layer over every stage, which this planner cannot
      represent (no vocabulary-parallel head).
[N21] D. Narayanan et al., "Efficient Large-Scale Language Model Training on GPU Clusters Using
      Megatron-LM" (SC21, arXiv 2104.04473), Table 1 (weak scaling, A100 80GB, Selene: DGX A100
      nodes, 8 x HDR InfiniBand per node; sequence 2048, vocabulary 51200; achieved TFLOP/s per
      GPU), equation (3) (FLOPs per iteration with activation recomputation:
      ``96 B s l h^2 (1 + s / (6h) + V / (16 l h))``, inverted here to the iteration time) and its
      scripts (``examples/academic_paper_scripts/sc21/run_table_1.sh`` in Megatron-LM: micro-batch
      size, global batch, "--activations-checkpoint-method uniform" (full recompute) for every
      row, the interleaved schedule's blocks per virtual stage, fp16). Only the first and last
      rows of Table 1 (1.7B: 137 TFLOP/s; 1008B: 163 TFLOP/s) could be read from a source here
      (a description of the table's image quoting those two rows); the other eight rows are not
      used rather than recalled. Attention as it ran: the scripts' container (``SRUN.sh``:
      nvcr.io pytorch 20.12) predates FlashAttention, so Megatron computed attention explicitly,
      and ``CONFIG.sh`` leaves dropout at Megatron's defaults (attention and hidden 0.1): the
      TP = 1 row is built with ``GPT(attention="explicit", dropout=0.1)`` (``--flash``: as
      before, flash and no dropout). The TP rows keep flash (``N21_ATTENTION``).

Not checkable here (said in RESULTS.md): Korthikanti et al. 2022 ("Reducing Activation
Recomputation", sequence parallelism and selective recompute: the planner has no sequence
parallelism); the vocabulary-parallel rows of [VP]; [N21] Table 1's other rows and Figures
12-13, and Megatron-LM's README throughput table (GPT 2B-462B on H100), all images
(``images/cases_april2021.png``, ``images/model_table.png``) with no readable copy found;
torchtitan's H100 rows (Float8, or TP with sequence parallelism); BPipe (no table found).

Run: ``python benchmarks/published_bench.py [--quick] [--flash]`` (meta device, CPU only;
--quick: the [VP] rows at sequence 2048 only, no 1T row). Prints one row per run, the layout ratios and
the error summary.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from gpu_cost_bench import GPT, plan_layout  # noqa: E402

from partitioner.cost_models.devices import LINKS, get_device  # noqa: E402

A100_PEAK = 312e12  # dense fp16/bf16 FLOP/s: the peak both sources' utilisations are relative to


@dataclass(frozen=True)
class Published:
    """One measured run: model shape, layout, and the measured iteration seconds."""

    source: str
    name: str
    layers: int
    hidden: int
    heads: int
    seq: int
    vocab: int
    pp: int
    tp: int
    dp: int
    micro: int  # micro-batch size
    m: int  # micro-batches per pipeline per iteration
    counts: tuple[int, ...]  # blocks per (virtual) stage
    schedule: str
    recompute: str
    measured_s: float
    note: str = ""
    virtual: int | None = None
    #: the vocabulary the benchmark model is built with, when not ``vocab`` (diagnostic rows only)
    model_vocab: int | None = None
    #: the attention the run used (``gpu_cost_bench.Block``): "flash", or "explicit" for the
    #: runs before FlashAttention (S x S scores, Megatron's fused scale-mask-softmax)
    attention: str = "flash"
    #: Megatron-LM's --attention-dropout / --hidden-dropout of the run (0: none)
    dropout: float = 0.0

    @property
    def gpus(self) -> int:
        return self.pp * self.tp * self.dp


# -- [VP] ------------------------------------------------------------------------------------
#: artifact/example-results/full-exp.txt: MFU (%) of the baseline and of "redis", per (sequence, vocabulary)
_VP_MFU = {
    (2048, 32000): (47.52, 47.52), (2048, 64000): (40.82, 49.15),
    (2048, 128000): (33.70, 44.12), (2048, 256000): (17.29, 38.21),
    (4096, 32000): (52.82, 52.81), (4096, 64000): (45.78, 53.81),
    (4096, 128000): (37.13, 49.56), (4096, 256000): (27.63, 42.45),
}
#: artifact/exp_one_host.csv, column 12: blocks on the last stage under layer redistribution
_VP_REDIS_LAST = {32000: 4, 64000: 3, 128000: 2, 256000: 0}


def vp_iteration_s(seq: int, vocab: int, mfu_pct: float) -> float:
    """[VP]'s MFU back to seconds (artifact/show_result_full_exp.py: b=128, h=3072, f=12288, l=32, 8 GPUs)."""
    b, h, f, layers = 128, 3072, 12288, 32
    flop = 3 * (2 * b * seq * h * vocab + layers * (8 * b * seq * h * h + 4 * b * seq * seq * h + 4 * b * seq * h * f))
    return flop / 8 / (A100_PEAK * mfu_pct / 100)


def megatron_layers(layers: int, stages: int, last: int | None = None) -> tuple[int, ...]:
    """Megatron-LM's ``get_num_layers_to_build`` ([VP]'s fork): an even split, remainders on the
    stages just before the last; with ``last`` (layer redistribution) the last stage gets
    ``last`` blocks and the others share the rest the same way."""
    if last is None:
        counts = [layers // stages] * stages
        rest, first_extra = layers % stages, stages - 2
    else:
        counts = [(layers - last) // (stages - 1)] * stages
        rest, first_extra = (layers - last) % (stages - 1), stages - 2
        counts[-1] = last
    for r in range(first_extra, first_extra - rest, -1):
        counts[r] += 1
    return tuple(counts)


def vp_runs() -> list[Published]:
    out = []
    for (seq, vocab), (base, redis) in _VP_MFU.items():
        for label, mfu, counts in (("baseline", base, megatron_layers(32, 8)),
                                   ("redis", redis, megatron_layers(32, 8, _VP_REDIS_LAST[vocab]))):
            out.append(Published("VP", label, 32, 3072, 24, seq, vocab, 8, 1, 1, 1, 128, counts, "1f1b", "none",
                                 vp_iteration_s(seq, vocab, mfu)))
    return out


# -- [N21] -----------------------------------------------------------------------------------
def n21_iteration_s(batch: int, seq: int, layers: int, hidden: int, vocab: int, gpus: int, tflops: float) -> float:
    """[N21] equation (3) (FLOPs with full recompute) over the GPUs' measured rate."""
    flop = 96 * batch * seq * layers * hidden**2 * (1 + seq / (6 * hidden) + vocab / (16 * layers * hidden))
    return flop / (gpus * tflops * 1e12)


#: [N21]'s runs predate FlashAttention (2022): SRUN.sh runs them in the nvcr.io pytorch:20.12
#: container, whose Megatron-LM computed attention explicitly (S x S scores, fused scale-mask-
#: softmax, dropout); CONFIG.sh sets no --attention-dropout / --hidden-dropout, so Megatron's
#: defaults (0.1 each, ``_add_regularization_args``) ran. Planned with ``attention="explicit"``.
N21_ATTENTION, N21_DROPOUT = "explicit", 0.1


def n21_runs(large: bool = True) -> list[Published]:
    v = 51200
    rows = [  # run_table_1.sh: 1.7B TP=1 PP=1 MBS=16 GBS=512, 32 GPUs (4 nodes); Table 1: 137 TFLOP/s
        Published("N21", "1.7B", 24, 2304, 24, 2048, v, 1, 1, 32, 16, 1, (24,), "1f1b", "full",
                  n21_iteration_s(512, 2048, 24, 2304, v, 32, 137), "DP only",
                  attention=N21_ATTENTION, dropout=N21_DROPOUT),
    ]
    # The TP rows keep flash attention (not what ran): the planner's region finder does not
    # shard explicit attention (heads merged into the bmm's batch dimension), and replicating
    # it over the TP group would misprice them far more than the missing S x S traffic
    # (RESULTS.md: ~1 ms of ~25 ms per block and micro-batch at 1T).
    if large:  # 1T: TP=8 PP=64 MBS=1 GBS=3072, 3072 GPUs -> DP=6, 512 micro-batches per pipeline; 163 TFLOP/s
        measured = n21_iteration_s(3072, 2048, 128, 25600, v, 3072, 163)
        rows.append(Published("N21", "1008B", 128, 25600, 160, 2048, v, 64, 8, 6, 1, 512, (2,) * 64, "1f1b", "full",
                              measured))
        # diagnostic, not a prediction: the output layer and loss built over V / 8, what one rank of
        # Megatron's vocabulary-parallel output layer computes (the planner replicates the head
        # over the tensor-parallel group: it has no vocabulary-parallel head)
        rows.append(Published("N21", "1008B head/8", 128, 25600, 160, 2048, v, 64, 8, 6, 1, 512, (2,) * 64, "1f1b",
                              "full", measured, "diagnostic", model_vocab=v // 8))
    return rows


def predict(run: Published, as_run: bool = True) -> float:
    """Predicted iteration seconds: pipeline step + the slowest rank's Adam step. ``as_run``
    False builds every run with flash attention and no dropout (the model before each run's
    attention was represented, for the before/after comparison)."""
    a100 = get_device("a100-80gb")
    attention, dropout = (run.attention, run.dropout) if as_run else ("flash", 0.0)
    with torch.device("meta"):
        model = GPT(run.layers, run.hidden, run.heads, run.seq, vocab=run.model_vocab or run.vocab, per_head_qkv=True,
                    attention=attention, dropout=dropout)
    nodes = run.gpus > 8
    step, opt = plan_layout(model, run.counts, pp=run.pp, batch=run.micro * run.m * run.dp, seq=run.seq, m=run.m,
                            schedule=run.schedule, dev=a100, link=LINKS["nvlink3"],
                            inter=LINKS["ib-hdr-200"] if nodes else None, gpus_per_node=8 if nodes else None,
                            tp=run.tp, dp=run.dp, recompute=run.recompute, precision="fp16-mixed",
                            virtual=run.virtual)
    return step + opt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="[VP] at sequence 2048 and [N21] 1.7B only")
    ap.add_argument("--source", choices=("VP", "N21"), help="one source's rows only")
    ap.add_argument("--flash", action="store_true",
                    help="every run with flash attention and no dropout (before each run's attention was represented)")
    args = ap.parse_args()
    runs = [r for r in vp_runs() if not args.quick or r.seq == 2048] + n21_runs(large=not args.quick)
    runs = [r for r in runs if args.source in (None, r.source)]
    print("| source | run | seq | vocab | TP x PP x DP | mbs | m | blocks per stage | recompute | attention | "
          "measured s | predicted s | pred/meas |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    res: dict[tuple[str, str, int, int], tuple[float, float]] = {}
    t0 = time.perf_counter()
    for r in runs:
        pred = predict(r, as_run=not args.flash)
        att = "flash" if args.flash else r.attention + (f", dropout {r.dropout}" if r.dropout else "")
        res[r.source, r.name, r.seq, r.vocab] = (r.measured_s, pred)
        counts = "-".join(map(str, r.counts)) if len(set(r.counts)) > 1 else f"{r.counts[0]} x {len(r.counts)}"
        print(f"| {r.source} | {r.name} | {r.seq} | {r.vocab // 1000}k | {r.tp} x {r.pp} x {r.dp} | {r.micro} | {r.m} | "
              f"{counts} | {r.recompute} | {att} | {r.measured_s:.3f} | {pred:.3f} | {pred / r.measured_s:.2f} |", flush=True)
    print()
    print("| seq | vocab | measured redis/baseline | predicted | error |")
    print("|---|---|---|---|---|")
    ratio_errs = []
    for (src, name, seq, vocab), (meas, pred) in res.items():
        if src != "VP" or name != "redis":
            continue
        bm, bp = res[src, "baseline", seq, vocab]
        mr, pr = meas / bm, pred / bp
        ratio_errs.append(abs(pr / mr - 1))
        print(f"| {seq} | {vocab // 1000}k | {mr:.3f} | {pr:.3f} | {100 * (pr / mr - 1):+.1f} % |")
    print()
    for label, keep in (("all rows", lambda k: True), ("[VP]", lambda k: k[0] == "VP"),
                        ("[N21]", lambda k: k[0] == "N21")):
        errs = [abs(p / m - 1) for k, (m, p) in res.items() if keep(k) and "head/8" not in k[1]]
        if errs:
            print(f"{label} (diagnostic rows left out): {len(errs)} rows, max |error| {100 * max(errs):.1f} %, "
                  f"mean {100 * sum(errs) / len(errs):.1f} %, {sum(e <= 0.10 for e in errs)} within 10 %")
    print(f"layout ratios (redis / baseline): max |error| {100 * max(ratio_errs, default=0):.1f} % "
          f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
