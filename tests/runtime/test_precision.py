"""Mixed precision as the plan prices it, on gloo ranks (``runtime.precision``).

An fp32 Llama-like model (Hugging Face-style norms that cast to float32 and back, a block
output cast with ``.float()``, rotary tables as fp32 buffers, tied embedding and head) is
planned with ``precision="bf16-mixed"`` / ``"fp16-mixed"``; its ranks train like ONE
PROCESS UNDER THE SAME RECIPE: the whole model cast to the compute dtype and run under the
pricing's own dtype swap (``partitioner.passes.shape_prop.OnDevice(retype=...)``: every float32 in the
ops' arguments becomes the compute dtype), fp32 master weights stepped by AdamW from the
low-precision gradients and copied back (fp16: ``torch.amp.GradScaler`` on the masters).

Tolerances: the reference accumulates its gradients over the same micro-batches in the
same dtype, but the tied weight's two gradients (embedding, head) are summed in another
order (per micro-batch in one process, per rank then across ranks in the pipeline), and
replicas average in bf16: sums that differ by rounding in the low-precision dtype (bf16:
2**-8 relative). Losses are compared at ``rtol=1e-2``. AdamW's update is about ``lr`` per
step whatever the gradient's size, so a rounding difference moves a master by a fraction of
``lr``, except where a gradient component is itself at the rounding level and its sign can
flip (then that element moves by up to ``2 * lr`` the other way), and a difference in one
step changes the next steps' gradients a little everywhere. So the fp32 masters after 3
steps (each moved about ``1.8 * LR`` on average from its start) are compared by their mean
absolute difference from the reference's: at most ``LR / 20`` over each rank's elements
(measured: bf16 about ``LR / 35``, fp16 ``LR / 180``), ``LR / 4`` per tensor, and no element
beyond ``2 * LR * STEPS``; a missed, doubled or un-mastered update is off by about ``LR``
per step. The masters must also hold fp32 detail (not low-precision values) and the
low-precision parameters must be exactly their masters cast.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from partitioner import PipelineRuntimeError, partition
from partitioner.passes.shape_prop import OnDevice
from partitioner.runtime.launch import spawn
from partitioner.runtime.precision import retype_graph

TIMEOUT_S = 90.0
LR = 1e-2
STEPS = 3
BATCH = 8
SEQ = 16
V, D = 64, 32


class Norm(nn.Module):
    """RMSNorm as Hugging Face writes it: statistics in float32, cast back to the input's dtype."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)
        return self.weight * h.to(x.dtype)


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.n1, self.n2 = Norm(d), Norm(d)
        self.qkv, self.o = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.up, self.down = nn.Linear(d, 2 * d, bias=False), nn.Linear(2 * d, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (z.transpose(1, 2) for z in self.qkv(self.n1(x)).view(b, t, 3, 2, d // 2).unbind(2))
        q, k = q * cos + q.flip(-1) * sin, k * cos + k.flip(-1) * sin
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.o(y)
        x = x + self.down(F.silu(self.up(self.n2(x))))
        return x.float()  # a residual stream kept "in fp32": bf16 under the plan's precision


class TinyLlama(nn.Module):
    def __init__(self, n_layers: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.blocks = nn.ModuleList(Block(D) for _ in range(n_layers))
        self.norm = Norm(D)
        self.head = nn.Linear(D, V, bias=False)
        self.head.weight = self.emb.weight  # tied: a copy on the first and on the last rank
        with torch.no_grad():
            self.emb.weight.mul_(0.1)
        angles = torch.outer(torch.arange(SEQ, dtype=torch.float32), torch.linspace(0.1, 1.0, D // 2))
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.size(1)
        cos, sin = self.cos[:t], self.sin[:t]
        h = self.emb(tokens)
        for block in self.blocks:
            h = block(h, cos, sin)
        return self.head(self.norm(h))


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.flatten(0, 1).float(), y.flatten())


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, V, (BATCH, SEQ), generator=g), torch.randint(0, V, (BATCH, SEQ), generator=g)


@functools.cache
def _planned(precision: str, n_gpus: int = 2, dp: int = 1, zero: int = 0) -> tuple[nn.Module, Any]:
    torch.manual_seed(0)
    model = TinyLlama()
    x, _ = _data()
    pipe = partition(model, n_gpus=n_gpus, data_parallel=dp, zero=zero, example_inputs=(x,), precision=precision,
                     schedule="1f1b", n_microbatches=2, pinned_cuts=["blocks.2"], optimizer="adamw")
    return model, pipe


def reference(model: nn.Module, dtype: torch.dtype, scaled: bool = False, poison: int | None = None,
              microbatches: int = 2, pure: bool = False, data: tuple[torch.Tensor, torch.Tensor] | None = None,
              loss_fn: Any = loss_fn, growth_interval: int = 2000) -> dict[str, Any]:
    """One process, the same recipe: the model cast to ``dtype`` under pricing's dtype swap
    (floating inputs cast too), fp32 masters, AdamW; with ``scaled``, ``torch.amp.GradScaler``
    on the masters."""
    ref = copy.deepcopy(model)
    x, y = data if data is not None else _data()
    if x.is_floating_point():
        x = x.to(dtype)
    named = dict(ref.named_parameters())
    masters = {n: p.detach().to(torch.float32, copy=True) for n, p in named.items()}
    ref.to(dtype)
    if pure:  # "bf16": no masters, the optimizer steps the bf16 parameters
        masters = named
    opt = torch.optim.AdamW(list(masters.values()), lr=LR)
    scaler = torch.amp.GradScaler("cpu", growth_interval=growth_interval) if scaled else None
    losses, scales = [], []
    for step in range(STEPS):
        for p in named.values():
            p.grad = None
        loss = torch.zeros(())
        for xs, ys in zip(x.chunk(microbatches), y.chunk(microbatches)):  # gradients accumulate in `dtype`
            with OnDevice(torch.device("cpu"), (torch.float32, dtype)):
                out = ref(xs)
            part = loss_fn(out, ys) / microbatches
            (scaler.scale(part) if scaler is not None else part).backward()
            loss = loss + part.detach()
        for n, p in named.items():
            if not pure:
                masters[n].grad = p.grad.float()
        if step == poison:
            masters["blocks.3.up.weight"].grad[0, 0] = float("inf")
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
            scales.append(scaler.get_scale())
        else:
            opt.step()
        with torch.no_grad():
            for n, p in named.items():
                if not pure:
                    p.copy_(masters[n])
        losses.append(loss.item())
    by_name = {n: masters[n].detach().clone() for n in masters}
    for n, p in ref.named_parameters(remove_duplicate=False):  # tied names
        by_name.setdefault(n, next(masters[m] for m, q in named.items() if q is p))
    return {"losses": losses, "masters": by_name, "scales": scales}


def _held_bytes(stage: Any, opt: Any) -> dict[str, int]:
    """What the rank holds, each storage once: parameters, gradients, fp32 masters, the
    optimizer's per-parameter state (AdamW's moments; its 0-dim step counters, one per
    tensor, are not per-parameter bytes and not priced), and buffers apart."""
    seen: set[int] = set()

    def size(ts: Any) -> int:
        total = 0
        for t in ts:
            st = t.untyped_storage()
            if st.data_ptr() not in seen:
                seen.add(st.data_ptr())
                total += st.nbytes()
        return total

    params = stage.parameters()
    out = {"params": size(params), "grads": size(p.grad for p in params if p.grad is not None),
           "masters": size(stage.masters.values()),
           "state": size(v for s in opt.state.values() for v in s.values()
                         if isinstance(v, torch.Tensor) and v.dim() > 0),
           "buffers": size(stage.buffers())}
    return out


def _train(rank: int, world: int, pipe: Any, poison: int | None = None, ckpt: str | None = None,
           data: tuple[torch.Tensor, torch.Tensor] | None = None, loss: Any = loss_fn,
           growth_interval: int | None = None) -> dict[str, Any]:
    x, y = data if data is not None else _data()
    stage = pipe.build_stage(rank, "cpu")
    if growth_interval is not None:
        stage.loss_scaler.growth_interval = growth_interval
    opt = stage.optimizer(torch.optim.AdamW, lr=LR)
    runner = stage.runner("1f1b", loss_fn=loss)
    losses, scales, skipped, held, before = [], [], [], None, None
    for step in range(STEPS):
        opt.zero_grad()
        loss = runner.step(x if stage.is_first else None, target=y if stage.is_last else None)
        if step == poison and stage.is_last and stage.dp_rank == 0:  # one rank of the job overflows
            dict(stage.named_parameters())["blocks.3.up.weight"].grad[0, 0] = float("inf")
        if step == poison:
            before = {n: p.detach().clone() for n, p in stage.named_parameters()}
        opt.step()
        if step == poison:
            assert before is not None
            changed = [n for n, p in stage.named_parameters() if not torch.equal(p, before[n])]
            before = {"changed": changed}
        if step == 0:
            held = _held_bytes(stage, opt)
        losses.append(None if loss is None else loss.item())
        scales.append(getattr(opt, "scale", None))
        skipped.append(getattr(opt, "skipped", 0))
    if ckpt is not None:
        stage.save_checkpoint(ckpt, opt)
    plan_stage = next(st for st in pipe.plan.stages if st.rank == stage.pp_rank)
    by_master = {id(m): n for n, m in stage.masters.items()}
    return {"rank": rank, "dp": stage.dp_rank, "last": stage.is_last, "losses": losses, "scales": scales,
            "skipped": skipped, "held": held, "poisoned": before, "opt": type(opt).__name__,
            "static": plan_stage.cost.static_bytes, "buffer_bytes": plan_stage.cost.buffer_bytes,
            "dtypes": {str(p.dtype) for p in stage.parameters()},
            "masters": {n: m.clone() for n, m in stage.masters.items()},
            "exp_avg": {by_master[id(k)]: v["exp_avg"].clone() for k, v in opt.state.items() if id(k) in by_master},
            "params": {n: p.detach().clone() for n, p in stage.named_parameters(remove_duplicate=False)}}


def _load(rank: int, world: int, pipe: Any, path: str) -> dict[str, Any]:
    """A fresh stage of ``pipe`` and its optimizer, loaded from ``path``."""
    stage = pipe.build_stage(rank, "cpu")
    opt = stage.optimizer(torch.optim.AdamW, lr=LR)
    stage.load_checkpoint(path, opt)
    assert {t.dtype for n, t in stage.state_dict().items() if n in stage.masters} == {torch.float32}
    by_master = {id(m): n for n, m in stage.masters.items()}
    return {"masters": {n: m.clone() for n, m in stage.masters.items()},
            "params": {n: p.detach().clone() for n, p in stage.named_parameters(remove_duplicate=False)},
            "exp_avg": {by_master[id(k)]: v["exp_avg"].clone() for k, v in opt.state.items() if id(k) in by_master}}


def _assert_loaded(loaded: list[dict[str, Any]], masters: dict[str, torch.Tensor],
                   exp_avg: dict[str, torch.Tensor]) -> None:
    """Each loaded rank holds the saved fp32 masters, their bf16 copies and fp32 AdamW state."""
    got = set()
    for r in loaded:
        assert r["masters"] and r["exp_avg"]
        for n, m in r["masters"].items():
            assert torch.equal(m, masters[n]), n
        for n, p in r["params"].items():
            assert torch.equal(p, masters[n].to(torch.bfloat16)), n
        for n, v in r["exp_avg"].items():
            assert v.dtype == torch.float32 and torch.equal(v, exp_avg[n]), n
        got |= set(r["exp_avg"])
    assert got == set(exp_avg)


@functools.cache
def _bf16_run() -> list[dict[str, Any]]:
    _, pipe = _planned("bf16-mixed")
    return spawn(_train, 2, pipe, timeout_s=TIMEOUT_S)


def _compare(results: list[dict[str, Any]], want: dict[str, Any], dtype: torch.dtype) -> None:
    last = [r["losses"] for r in results if r["last"]]
    for got in last:
        assert got == pytest.approx(want["losses"], rel=1e-2)
    names: set[str] = set()
    for r in results:
        assert r["dtypes"] == {str(dtype)}
        total, count = 0.0, 0
        for n, m in r["masters"].items():
            assert m.dtype == torch.float32
            diff = (m - want["masters"][n]).abs()
            assert diff.mean().item() <= LR / 4 and diff.max().item() <= 2 * LR * STEPS, \
                (n, diff.mean().item(), diff.max().item())
            total, count = total + diff.sum().item(), count + diff.numel()
            assert torch.equal(r["params"][n], m.to(dtype)), n  # the low-precision copy of its master
            if m.numel() > 64:
                assert not torch.equal(m, m.to(dtype).float()), f"{n}: the master holds {dtype} values only"
        assert total / count <= LR / 20, f"rank {r['rank']}: masters off by {total / count:.3g} on average"
        names |= set(r["masters"])
    assert names == set(want["masters"])


def test_bf16_mixed_on_two_ranks_trains_like_one_process_under_the_same_recipe() -> None:
    model, pipe = _planned("bf16-mixed")
    assert pipe.plan.options["precision"] == "bf16-mixed"
    # the plan priced bf16 values at every cut, the fp32 casts of the graph included
    assert {v.dtype for b in pipe.plan.boundaries for v in b.values if v.kind == "tensor"} == {"bfloat16"}
    results = _bf16_run()
    assert [r["opt"] for r in results] == ["MixedPrecisionOptimizer"] * 2
    want = reference(model, torch.bfloat16)
    _compare(results, want, torch.bfloat16)
    # the masters moved (3 steps of about LR each), so the comparison above has teeth
    moved = max((want["masters"][n] - p.detach()).abs().max().item() for n, p in model.named_parameters())
    assert moved > 2 * LR


def test_each_rank_holds_the_plans_static_bytes() -> None:
    """Weights (2 B) + gradients (2 B) + fp32 masters (4 B) + AdamW moments (8 B) per
    parameter, measured after a step, equal the plan's static bytes less its buffers; the
    plan prices buffers at the model's dtype (fp32) while the rank holds them in bf16."""
    results = _bf16_run()
    for r in results:
        held = r["held"]
        n = held["params"] // 2
        assert (held["grads"], held["masters"], held["state"]) == (2 * n, 4 * n, 8 * n), held
        assert held["params"] + held["grads"] + held["masters"] + held["state"] == r["static"] - r["buffer_bytes"]
        assert 2 * held["buffers"] == r["buffer_bytes"]


def test_bf16_mixed_with_two_replicas_trains_like_one_process() -> None:
    model, pipe = _planned("bf16-mixed", n_gpus=4, dp=2)
    results = spawn(_train, 4, pipe, timeout_s=TIMEOUT_S)
    last = [r["losses"] for r in results if r["last"]]
    assert len(last) == 2
    mean = [(a + b) / 2 for a, b in zip(*last)]
    want = reference(model, torch.bfloat16, microbatches=4)
    assert mean == pytest.approx(want["losses"], rel=1e-2)
    for r in results:
        r["last"] = False  # losses compared as the replicas' mean above
    _compare(results, want, torch.bfloat16)
    for r in results:
        held = r["held"]  # gradients averaged in bf16: one flat bucket of 2 B per parameter
        assert held["params"] + held["grads"] + held["masters"] + held["state"] == r["static"] - r["buffer_bytes"]


def test_fp16_mixed_scales_the_loss_like_grad_scaler() -> None:
    """The scale grows after every clean step here (growth_interval=1), as GradScaler's does,
    until the third step's gradients overflow at 2**18: that step is skipped, the scale halves."""
    model, pipe = _planned("fp16-mixed")
    results = spawn(_train, 2, pipe, None, None, None, loss_fn, 1, timeout_s=TIMEOUT_S)
    want = reference(model, torch.float16, scaled=True, growth_interval=1)
    _compare(results, want, torch.float16)
    assert want["scales"] == [2.0**17, 2.0**18, 2.0**17]
    for r in results:  # the same scales and skips on every rank, as GradScaler's in one process
        assert r["scales"] == want["scales"] and r["skipped"] == [0, 0, 1]


def test_an_fp16_overflow_on_one_rank_skips_the_step_on_every_rank() -> None:
    model, pipe = _planned("fp16-mixed")
    results = spawn(_train, 2, pipe, 1, timeout_s=TIMEOUT_S)  # step 1: an inf gradient on the last rank only
    want = reference(model, torch.float16, scaled=True, poison=1)
    clean = reference(model, torch.float16, scaled=True)
    for r in results:
        assert r["poisoned"] == {"changed": []}, f"rank {r['rank']} stepped through the overflow"
        assert r["skipped"][1] == r["skipped"][0] + 1
        assert r["scales"][1] == r["scales"][0] / 2 == want["scales"][1]
        assert r["scales"] == want["scales"] != clean["scales"]
    _compare(results, want, torch.float16)


def test_a_mixed_checkpoint_holds_the_fp32_masters_and_loads_back(tmp_path: Any) -> None:
    import torch.distributed.checkpoint as dcp

    path = str(tmp_path / "ckpt")
    model, pipe = _planned("bf16-mixed")
    results = spawn(_train, 2, pipe, None, path, timeout_s=TIMEOUT_S)
    masters = {n: m for r in results for n, m in r["masters"].items()}
    # the fp32 model reads it as its own state (no process group, no pipeline)
    state = {f"model.{n}": torch.empty_like(p) for n, p in model.state_dict().items()}
    dcp.load(state, checkpoint_id=path, no_dist=True)
    for n, m in masters.items():
        assert state[f"model.{n}"].dtype == torch.float32
        assert torch.equal(state[f"model.{n}"], m), n
    exp_avg = {n: v for r in results for n, v in r["exp_avg"].items()}
    _assert_loaded(spawn(_load, 2, pipe, path, timeout_s=TIMEOUT_S), masters, exp_avg)


def test_pure_bf16_steps_the_bf16_parameters_and_holds_the_plans_bytes() -> None:
    """precision="bf16": no masters; AdamW over the bf16 parameters, its moments in bf16:
    2 + 2 + 4 bytes per parameter, the plan's."""
    model, pipe = _planned("bf16")
    results = spawn(_train, 2, pipe, timeout_s=TIMEOUT_S)
    want = reference(model, torch.bfloat16, pure=True)
    for r in results:
        assert r["opt"] == "AdamW" and r["masters"] == {} and r["dtypes"] == {"torch.bfloat16"}
        held = r["held"]
        n = held["params"] // 2
        assert (held["grads"], held["masters"], held["state"]) == (2 * n, 0, 4 * n), held
        assert held["params"] + held["grads"] + held["state"] == r["static"] - r["buffer_bytes"]
        if r["last"]:
            assert r["losses"] == pytest.approx(want["losses"], rel=1e-2)
        diffs = [(p.float() - want["masters"][n].float()).abs().mean().item() for n, p in r["params"].items()]
        assert max(diffs) <= LR / 4, max(diffs)


def test_an_optimizer_over_the_low_precision_copies_is_warned_and_its_checkpoint_refused(tmp_path: Any) -> None:
    _, pipe = _planned("bf16-mixed")
    x, y = _data()

    def wrong(rank: int, world: int) -> None:
        stage = pipe.build_stage(rank, "cpu")
        opt = torch.optim.AdamW(stage.parameters(), lr=LR)  # steps the bf16 copies, never the masters
        runner = stage.runner("1f1b", loss_fn=loss_fn)
        with pytest.warns(UserWarning, match=r"stage.optimizer"):
            runner.step(x if stage.is_first else None, target=y if stage.is_last else None)
        opt.step()
        stage.save_checkpoint(str(tmp_path / "stale"), opt)

    with pytest.raises(PipelineRuntimeError, match=r"not their fp32 masters .* stage.optimizer"):
        spawn(wrong, 2, timeout_s=TIMEOUT_S)
    assert not (tmp_path / "stale").exists()


def test_bf16_mixed_with_zero1_shards_the_masters_and_trains_like_one_process(tmp_path: Any) -> None:
    """ZeRO-1: each replica keeps the masters and AdamW state of its shard only (the plan
    shards both: 2 + 2 + 12 / dp bytes per parameter), steps them, and the replicas
    broadcast their shards of the bf16 weights; a checkpoint gathers every fp32 master."""
    import torch.distributed.checkpoint as dcp

    model, pipe = _planned("bf16-mixed", n_gpus=4, dp=2, zero=1)
    path = str(tmp_path / "ckpt")
    results = spawn(_train, 4, pipe, None, path, timeout_s=TIMEOUT_S)
    want = reference(model, torch.bfloat16, microbatches=4)
    last = [r["losses"] for r in results if r["last"]]
    assert [(a + b) / 2 for a, b in zip(*last)] == pytest.approx(want["losses"], rel=1e-2)
    assert {r["opt"] for r in results} == {"MixedPrecisionOptimizer"}
    for pp in (0, 1):
        replicas = [r for r in results if r["rank"] % 2 == pp]  # rank = dp * 2 + pp
        n = replicas[0]["held"]["params"] // 2
        sharded = [r["held"]["masters"] + r["held"]["state"] for r in replicas]
        assert all(0 < b < 12 * n for b in sharded) and sum(sharded) == 12 * n, sharded  # 4 + 8 B, split
        assert sum(r["held"]["params"] + r["held"]["grads"] for r in replicas) == 2 * 4 * n
        assert sum(sum(r["held"][k] for k in ("params", "grads", "masters", "state")) for r in replicas) == \
            2 * (replicas[0]["static"] - replicas[0]["buffer_bytes"])
        masters = {k: v for r in replicas for k, v in r["masters"].items()}  # the shards' union
        for r in replicas:  # every replica's bf16 weights are the masters, whoever holds them
            assert not set(r["masters"]) & set(next(q for q in replicas if q is not r)["masters"])
            for k, v in r["params"].items():
                assert torch.equal(v, masters[k].to(torch.bfloat16)), k
        for k, m in masters.items():
            diff = (m - want["masters"][k]).abs()
            assert diff.mean().item() <= LR / 4 and diff.max().item() <= 2 * LR * STEPS, k
    state = {f"model.{n}": torch.empty_like(p) for n, p in model.state_dict().items()}
    dcp.load(state, checkpoint_id=path, no_dist=True)
    everything = {k: v for r in results for k, v in r["masters"].items()}
    assert set(everything) == {n for n, _ in model.named_parameters(remove_duplicate=False)}
    for k, m in everything.items():
        assert torch.equal(state[f"model.{k}"], m), k
    # it resumes under ZeRO-1 (each replica reading its shard) and on a pipeline without replicas
    exp_avg = {n: v for r in results for n, v in r["exp_avg"].items()}
    _assert_loaded(spawn(_load, 4, pipe, path, timeout_s=TIMEOUT_S), everything, exp_avg)
    _assert_loaded(spawn(_load, 2, _planned("bf16-mixed")[1], path, timeout_s=TIMEOUT_S), everything, exp_avg)


def test_float_inputs_are_cast_on_entry_as_priced_under_recomputation() -> None:
    """An MLP takes fp32 inputs: the plan records them as given (fp32) and prices the stage in
    bf16; stage 0 casts them on entry. Every stage recomputes its blocks (checkpointed regions)."""
    from tests.fixtures.models import FIXTURES

    torch.manual_seed(0)
    model = FIXTURES["mlp"].build()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(BATCH, 32, generator=g), torch.randn(BATCH, 10, generator=g)
    pipe = partition(model, n_gpus=2, example_inputs=(x,), precision="bf16-mixed", schedule="1f1b",
                     n_microbatches=2, recompute="full")
    assert pipe.plan.inputs[0]["dtype"] == "float32"
    assert {st.recompute for st in pipe.plan.stages} == {"full"}

    def mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(out.float(), target)

    results = spawn(_train, 2, pipe, None, None, (x, y), mse, timeout_s=TIMEOUT_S)
    _compare(results, reference(model, torch.bfloat16, data=(x, y), loss_fn=mse), torch.bfloat16)


def test_retype_graph_makes_the_swap_pricing_makes() -> None:
    """An fx graph (``.float()``, ``.to(torch.float32)``, ``dtype=torch.float32``) retyped
    computes what the original computes under pricing's dispatch-level swap."""

    class Casts(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = x.float().softmax(-1, dtype=torch.float32)
            return (h + torch.ones(3, dtype=torch.float32)).to(torch.float32) * torch.finfo(torch.float32).eps

    gm = torch.fx.symbolic_trace(Casts())
    x = torch.randn(2, 3).to(torch.bfloat16)
    with OnDevice(torch.device("cpu"), (torch.float32, torch.bfloat16)):
        want = Casts()(x)
    assert torch.fx.symbolic_trace(Casts())(x).dtype == torch.float32  # not retyped: fp32
    assert retype_graph(gm, torch.float32, torch.bfloat16)
    got = gm(x)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_the_in_process_train_step_keeps_the_models_dtypes() -> None:
    """``pipe.train_step`` shares the user's fp32 parameters: it does not run a plan
    priced at another precision (the cuts' dtypes differ), and says so."""
    _, pipe = _planned("bf16-mixed")
    x, y = _data()
    with pytest.raises(PipelineRuntimeError, match=r"expected shape .* bfloat16, got .* float32"):
        pipe.train_step(x, target=y, loss_fn=loss_fn, schedule="1f1b")

