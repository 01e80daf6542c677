"""The training loop as people write it, each part equal to one process on the whole batch:
a token-mean loss with ignored labels spread unevenly over the micro-batches
(``normalize="tokens"``), gradient clipping over the pipeline (``stage.clip_grad_norm_``),
evaluation (``eval_step``), two sequence lengths on one plan (``step(seq_len=...)``) and
the loss on every rank. Ranks are forked by ``spawn`` (gloo, CPU) and inherit the pipes
built here.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from partitioner.runtime.errors import PipelineRuntimeError
from partitioner.runtime.launch import spawn
from tests.runtime.helpers import fresh

TIMEOUT_S = 120.0
BATCH, M, SEQ, SHORT = 8, 4, 16, 8
MAX_NORM = 0.5


def ce_sum(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="sum")


def ce_mean(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.flatten(0, 1), y.flatten())  # ignore_index=-100 by default


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and labels whose valid (not -100) labels per micro-batch of 2 rows are 4, 32, 24, 32."""
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 128, (BATCH, SEQ), generator=g)
    y = torch.randint(0, 128, (BATCH, SEQ), generator=g)
    y[0:2, 2:] = -100
    y[4:6, 12:] = -100
    return x, y


def reference(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """One process, the whole batch: the token-mean loss's gradients clipped to MAX_NORM,
    the evaluation of the clipped-but-unstepped model, and a step at the short length."""
    ref = copy.deepcopy(model)
    loss = ce_mean(ref(x), y)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), MAX_NORM)
    grads = {n: p.grad.clone() for n, p in ref.named_parameters(remove_duplicate=False)}
    with torch.no_grad():
        out = ref(x)
        eval_loss = ce_mean(out, y)
    ref.zero_grad()
    short = ce_mean(ref(x[:, :SHORT]), y[:, :SHORT])
    short.backward()
    return {"loss": loss.item(), "norm": norm.item(), "grads": grads, "eval": eval_loss.item(), "out": out,
            "short": short.item(),
            "short_grads": {n: p.grad.clone() for n, p in ref.named_parameters(remove_duplicate=False)}}


def _loop(rank: int, world: int, layout: str, schedule: str, p2p: str) -> dict[str, Any]:
    _, pipe = fresh(layout)
    x, y = batch()
    stage = pipe.build_stage(rank, "cpu")
    runner = stage.runner(schedule, n_microbatches=M, loss_fn=ce_sum, batch_size=BATCH, normalize="tokens", p2p=p2p)
    first, last = stage.is_first, stage.is_last
    loss = runner.step(x if first else None, target=y if last else None, loss_on_every_rank=True)
    unclipped = stage.grad_norm()
    norm = stage.clip_grad_norm_(MAX_NORM)
    grads = {n: p.grad.clone() for n, p in stage.named_parameters(remove_duplicate=False)}
    ev = runner.eval_step(x if first else None, target=y if last else None, return_outputs=True)
    untouched = all(torch.equal(p.grad, grads[n]) for n, p in stage.named_parameters(remove_duplicate=False))
    stage.zero_grad()
    short = runner.step(x[:, :SHORT] if first else None, target=y[:, :SHORT] if last else None, seq_len=SHORT,
                        loss_on_every_rank=True)
    return {"loss": loss.item(), "norm": norm.item(), "unclipped": unclipped.item(), "grads": grads,
            "eval": None if ev[0] is None else ev[0].item(), "out": ev[1], "untouched": untouched,
            "short": short.item(), "last": last,
            "short_grads": {n: p.grad.clone() for n, p in stage.named_parameters(remove_duplicate=False)
                            if p.grad is not None}}


def _close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got
    for n, g in got.items():
        torch.testing.assert_close(g, want[n], rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("layout,schedule,p2p", [("gpt-2", "1f1b", "auto"), ("gpt-2", "zb-h1", "ordered"),
                                                  ("gpt-2x2", "interleaved-1f1b", "auto")])
def test_the_training_loop_on_two_ranks_equals_one_process(layout: str, schedule: str, p2p: str) -> None:
    model, pipe = fresh(layout)
    x, y = batch()
    want = reference(model, x, y)
    assert want["norm"] > 2 * MAX_NORM, "the test should clip"
    results = spawn(_loop, 2, layout, schedule, p2p, timeout_s=TIMEOUT_S)
    for r in results:
        assert r["loss"] == pytest.approx(want["loss"], rel=1e-5)  # on every rank
        assert r["unclipped"] == r["norm"] == pytest.approx(want["norm"], rel=1e-5)
        _close(r["grads"], want["grads"])  # tied embedding copies on both ranks alike
        assert r["untouched"], "eval_step changed a gradient"
        assert r["short"] == pytest.approx(want["short"], rel=1e-5)
        _close(r["short_grads"], want["short_grads"])
    assert set().union(*(r["grads"] for r in results)) == set(want["grads"])
    last = next(r for r in results if r["last"])
    assert last["eval"] == pytest.approx(want["eval"], rel=1e-5)
    torch.testing.assert_close(last["out"], want["out"], rtol=1e-5, atol=1e-5)
    assert all(r["eval"] is None and r["out"] is None for r in results if not r["last"])


def test_the_default_mean_differs_and_tokens_equals_in_process() -> None:
    """What ``normalize="mean"`` computes for a token mean with uneven ignored labels (the
    mean of micro-batch means) and that ``"tokens"`` gives the full batch's."""
    model, pipe = fresh("gpt-2")
    x, y = batch()
    want = reference(model, x, y)
    model.zero_grad()
    mean = pipe.train_step(x, target=y, loss_fn=ce_mean, schedule="1f1b", n_microbatches=M)
    with torch.no_grad():
        per_mb = [ce_mean(model(x[i:i + 2]), y[i:i + 2]).item() for i in range(0, BATCH, 2)]
    assert mean.item() == pytest.approx(sum(per_mb) / M, rel=1e-5)
    assert abs(mean.item() - want["loss"]) > 0.01, "the uneven batch should tell the two apart"
    model.zero_grad()
    tokens = pipe.train_step(x, target=y, loss_fn=ce_sum, schedule="1f1b", n_microbatches=M, normalize="tokens")
    assert tokens.item() == pytest.approx(want["loss"], rel=1e-5)
    torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
    _close({n: p.grad for n, p in model.named_parameters(remove_duplicate=False)}, want["grads"])
    model.zero_grad()
    loss, out = pipe.eval_step(x, target=y, loss_fn=ce_sum, schedule="zb-h1", n_microbatches=M, normalize="tokens",
                               return_outputs=True, comm="nccl")  # NCCL's matching rules, in one process
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(out, model(x))
        assert loss.item() == pytest.approx(ce_mean(model(x), y).item(), rel=1e-5)
    with pytest.raises(PipelineRuntimeError, match="normalize='median'"):
        pipe.train_step(x, target=y, loss_fn=ce_sum, normalize="median")
    with pytest.raises(PipelineRuntimeError, match="no element to average"):
        pipe.train_step(x, target=torch.full_like(y, -100), loss_fn=ce_sum, normalize="tokens")


def _wrong_length(rank: int, world: int) -> None:
    _, pipe = fresh("gpt-2")
    x, y = batch()
    stage = pipe.build_stage(rank, "cpu")
    runner = stage.runner("1f1b", n_microbatches=M, loss_fn=ce_mean, batch_size=BATCH)
    runner.step(x[:, :SHORT] if rank == 0 else None, target=y[:, :SHORT] if rank == 1 else None)


def test_another_length_without_seq_len_says_what_to_pass() -> None:
    fresh("gpt-2")
    with pytest.raises(PipelineRuntimeError, match=r"sequence length 8, the plan's is 16: pass step\(\.\.\., "
                                                    r"seq_len=8\) on every rank"):
        spawn(_wrong_length, 2, timeout_s=TIMEOUT_S)


def _static(rank: int, world: int) -> None:
    import dataclasses

    from partitioner.plan import STATIC_SHAPES_NOTE

    _, pipe = fresh("gpt-2")
    pipe = copy.copy(pipe)  # this rank's view of the plan, marked as planned with static shapes
    pipe.plan = dataclasses.replace(pipe.plan, notes=(*pipe.plan.notes, f"{STATIC_SHAPES_NOTE}: (test)"))
    x, y = batch()
    runner = pipe.build_stage(rank, "cpu").runner("1f1b", n_microbatches=M, loss_fn=ce_mean, batch_size=BATCH)
    runner.step(x[:, :SHORT] if rank == 0 else None, target=y[:, :SHORT] if rank == 1 else None, seq_len=SHORT)


def test_a_static_shapes_plan_refuses_another_length_saying_why() -> None:
    fresh("gpt-2")
    with pytest.raises(PipelineRuntimeError, match=r"seq_len=8\) on a plan whose shapes are static .* re-partition"):
        spawn(_static, 2, timeout_s=TIMEOUT_S)


def _replicas(rank: int, world: int, pipe: Any) -> dict[str, Any]:
    x, y = batch()
    stage = pipe.build_stage(rank, "cpu")
    opt = stage.optimizer(torch.optim.SGD, lr=0.1)  # ZeRO-1: each replica keeps half the optimizer state
    runner = stage.runner("1f1b", n_microbatches=2, loss_fn=ce_sum, batch_size=BATCH, normalize="tokens")
    first, last = stage.is_first, stage.is_last
    loss = runner.step(x if first else None, target=y if last else None, loss_on_every_rank=True)
    norm = stage.clip_grad_norm_(MAX_NORM)
    grads = {n: p.grad.clone() for n, p in stage.named_parameters(remove_duplicate=False)}
    ev = runner.eval_step(x if first else None, target=y if last else None, loss_on_every_rank=True)
    opt.step()
    return {"loss": loss.item(), "norm": norm.item(), "grads": grads, "eval": ev.item(), "zero": type(opt).__name__}


def test_two_replicas_of_two_ranks_equal_one_process() -> None:
    """Replicas see 36 and 56 valid labels: the count is summed over them before any
    gradient is scaled, so the averaged gradients are the full batch's; the norm is the
    whole model's under ZeRO-1."""
    from partitioner import partition
    from tests.fixtures.models import FIXTURES

    torch.manual_seed(0)
    model = FIXTURES["gpt"].build()
    x, y = batch()
    pipe = partition(model, n_gpus=4, data_parallel=2, example_inputs=(x,), schedule="1f1b", n_microbatches=2,
                     pinned_cuts=["transformer.h.2"], zero=1)
    want = reference(model, x, y)
    results = spawn(_replicas, 4, pipe, timeout_s=TIMEOUT_S)
    assert {r["zero"] for r in results} == {"ZeroRedundancyOptimizer"}
    for r in results:
        assert r["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert r["eval"] == pytest.approx(want["eval"], rel=1e-5)
        assert r["norm"] == pytest.approx(want["norm"], rel=1e-5)
        _close(r["grads"], want["grads"])


def _fp16_clip(rank: int, world: int, pipe: Any, max_norm: float) -> dict[str, Any]:
    from tests.runtime.test_precision import _data, loss_fn

    x, y = _data()
    stage = pipe.build_stage(rank, "cpu")
    opt = stage.optimizer(torch.optim.SGD, lr=1.0)
    runner = stage.runner("1f1b", n_microbatches=2, loss_fn=loss_fn)
    runner.step(x if stage.is_first else None, target=y if stage.is_last else None)
    before = {n: m.clone() for n, m in stage.masters.items()}
    norm = stage.clip_grad_norm_(max_norm)
    opt.step()
    return {"norm": norm.item(), "scale": opt.scale, "skipped": opt.skipped,
            "update": {n: before[n] - m for n, m in stage.masters.items()}}


def test_fp16_gradients_are_unscaled_before_clipping() -> None:
    """Under fp16-mixed the gradients carry the loss scale (2**16): the norm is the unscaled
    one, and the step the optimizer takes (SGD, lr 1) is the clipped gradient, of norm max_norm."""
    from tests.runtime.test_precision import _data, _planned, loss_fn

    model, pipe = _planned("fp16-mixed")
    x, y = _data()
    ref = copy.deepcopy(model)
    loss_fn(ref(x), y).backward()
    want = torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()]).item()
    results = spawn(_fp16_clip, 2, pipe, want / 4, timeout_s=TIMEOUT_S)
    unique = dict(model.named_parameters())  # a tied weight once
    update = {n: u for r in results for n, u in r["update"].items() if n in unique}
    assert set(update) == set(unique)
    for r in results:
        assert r["scale"] == 2.0**16 and r["skipped"] == 0
        assert r["norm"] == pytest.approx(want, rel=2e-2)
    assert torch.nn.utils.get_total_norm(list(update.values())).item() == pytest.approx(want / 4, rel=2e-2)


def _example(rank: int, world: int, argv: list[str], pipe: Any) -> None:
    from partitioner.examples.train_hf import main

    main(argv, pipe)


def test_the_hf_example_stopped_and_resumed_equals_one_process(tmp_path: Any) -> None:
    """``partitioner/examples/train_hf.py`` on 2 ranks: 3 steps, a checkpoint, then 3 more
    resumed from it; losses, gradient norms and evaluations equal the same loop in one
    process (AdamW + cosine, clipping, padded token mean)."""
    pytest.importorskip("transformers")
    import json

    from partitioner.examples import train_hf

    argv = ["--steps", "6", "--eval-every", "2", "--save-every", "3", "--ckpt", str(tmp_path / "ckpt"),
            "--out", str(tmp_path / "out"), "--layers", "2", "--seq", "16"]
    args = train_hf.parser().parse_args(argv)
    pipe = train_hf.plan(args, 2)  # planned once here: the ranks inherit it (the example plans on each rank)
    spawn(_example, 2, [*argv, "--stop-at", "3"], pipe, timeout_s=TIMEOUT_S)
    spawn(_example, 2, [*argv, "--resume"], pipe, timeout_s=TIMEOUT_S)
    log = json.loads((tmp_path / "out" / "log.json").read_text())

    model = train_hf.build_model(args)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, train_hf.lr_lambda(args))
    ex, ey = train_hf.batch(-1, args)
    losses, norms, evals = [], [], []
    for step in range(args.steps):
        ids, labels = train_hf.batch(step, args)
        opt.zero_grad()
        loss = F.cross_entropy(model(input_ids=ids).logits.flatten(0, 1), labels.flatten())
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip).item())
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % args.eval_every == 0:
            with torch.no_grad():
                evals.append([step + 1, F.cross_entropy(model(input_ids=ex).logits.flatten(0, 1), ey.flatten()).item()])
    assert log["loss"] == pytest.approx(losses, rel=1e-4)
    assert log["norm"] == pytest.approx(norms, rel=1e-3)
    assert [e[0] for e in log["eval"]] == [2, 4, 6]
    assert [e[1] for e in log["eval"]] == pytest.approx([e[1] for e in evals], rel=1e-4)
