"""The table of published H100 runs in ``benchmarks/h100_published.py`` is well-formed.

Every row cites a source, its layout multiplies to its GPU count, its shape gives the cited
parameter count within 3 %, and (rows from llm-foundry's table) its global batch and MFU are
what the source prints, recomputed from the row: a mistyped figure fails here. No planning.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))

import h100_published as hp  # noqa: E402


def test_every_published_row_is_well_formed() -> None:
    rows = hp.runs()
    assert len(rows) >= 50
    assert {r.source for r in rows} == set(hp.SOURCES)
    assert {r: hp.problems(r) for r in rows if hp.problems(r)} == {}
    for src, what, why in hp.SKIPPED:  # every run read and not priced says why
        assert src and what and why


def test_mpt_rows_match_the_printed_global_batch() -> None:
    table = hp.mpt_table()
    assert len(table) == len(hp.mpt_runs()) == 52
    for (model, seq, gpus, _mfu, mbs, ga, gbs, *_), run in zip(table, hp.mpt_runs()):
        assert run.global_batch == gbs == mbs * ga * gpus, (model, seq, gpus)


def test_a_wrong_figure_is_caught() -> None:
    """Each check can fail: a layout that does not multiply, a shape off by a layer, a throughput
    that does not give the printed MFU, an uncited source."""
    run = hp.mpt_runs()[20]  # mpt-7b, S = 2048, 8 GPUs
    assert hp.problems(run) == []
    assert any("GPUs" in e for e in hp.problems(replace(run, dp=4)))
    assert any("parameters" in e for e in hp.problems(replace(run, layers=run.layers - 2)))
    assert any("MFU" in e for e in hp.problems(replace(run, tokens_per_gpu_s=run.tokens_per_gpu_s * 1.05)))
    assert any("source" in e for e in hp.problems(replace(run, source="nowhere")))


def test_the_built_model_has_the_counted_parameters() -> None:
    """``Run.params`` counts what ``build`` makes: the MPT head tied to the embedding, counted once."""
    run = next(r for r in hp.mpt_runs() if r.name == "mpt-760m" and r.seq == 512)
    model, (ids, _) = hp.build(run)
    assert sum(p.numel() for p in model.parameters()) == run.params() == run.cited_params
    assert model.head.weight is model.wte.weight and ids.shape == (run.global_batch, 512)
    assert next(model.parameters()).device == torch.device("meta")


def test_each_source_is_priced_on_the_kernel_it_ran() -> None:
    """[MPT]'s 2023 table ran llm-foundry's Triton kernel, torchtitan SDPA's flash backend (FA2)."""
    from partitioner.cost_models.devices import DEVICES

    assert set(hp.DEVICES_BY_SOURCE) == set(hp.SOURCES)
    kernels = {src: DEVICES[name].efficiency.attn_kernel for src, name in hp.DEVICES_BY_SOURCE.items()}  # type: ignore[union-attr]
    assert kernels == {"MPT": "triton-fa1", "TT": "fa2"}
    assert {hp.device_for(r) for r in hp.runs() if r.source == "MPT"} == {"h100-sxm-triton"}


def test_the_triton_share_is_fitted_on_held_out_rows_only() -> None:
    """19 one-node rows of three models fit it; the other 35 rows (every model's others, all
    multi-node rows, torchtitan) are scored without it having seen them."""
    fit = [r for r in hp.runs() if hp.in_triton_fit(r)]
    assert len(fit) == 19 and {r.name for r in fit} == set(hp.TRITON_FIT_MODELS)
    assert all(r.gpus == 8 and r.source == "MPT" for r in fit)
    held = [r for r in hp.runs() if not hp.in_triton_fit(r)]
    assert len(held) == 35 and {r.name for r in held} >= {"mpt-1b", "mpt-7b", "mpt-30b", "mpt-70b"}


def test_fit_triton_share_finds_the_slowdown_that_closes_the_gap() -> None:
    """Rows priced with FlashAttention-2 that measured 1 + 0.4 a of its forward and 1 + a of its
    backward more: the fit recovers a; with no gap it returns 0."""
    rows = [dict(predicted=10.0, attn_fwd=f, attn_bwd=2.5 * f, measured_s=10.0 + 0.4 * 0.6 * f + 0.6 * 2.5 * f)
            for f in (0.5, 1.0, 3.0, 6.0)]
    a, scores = hp.fit_triton_share(rows)
    assert a == pytest.approx(0.6) and min(e for _, e in scores) < 1e-12
    same = [dict(r, measured_s=r["predicted"]) for r in rows]
    assert hp.fit_triton_share(same)[0] == 0.0
