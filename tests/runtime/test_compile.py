"""Compiled stages (``compile=True``, CPU inductor) train like eager ones.

Tiny models on purpose: inductor compiles (and gcc builds) every stage's forward and
backward, which takes seconds per stage on a shared 2-core machine. Compiled and eager
are compared at ``RTOL``/``ATOL`` (float32: inductor may fuse and reorder elementwise
work, which changes rounding only).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

from partitioner import partition
from partitioner.runtime.errors import PipelineRuntimeError
from partitioner.runtime.launch import spawn
from tests.fixtures.models import FIXTURES
from tests.tools.helpers import MODELS, cli

RTOL, ATOL = 1e-5, 1e-6
TIMEOUT_S = 240.0


class TinyLM(nn.Module):
    """Token ids (B, S) -> logits (B, S, V): a sequence dimension that can change."""

    def __init__(self, vocab: int = 32, width: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.l1 = nn.Linear(width, width)
        self.l2 = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        h = h + torch.relu(self.l1(h))
        return self.head(h + torch.relu(self.l2(h)))


def lm_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.flatten(0, 1), y.flatten())


def _mlp(**kw: Any) -> tuple[nn.Module, Any]:
    torch.manual_seed(0)
    model = FIXTURES["mlp"].build()
    return model, partition(model, example_inputs=FIXTURES["mlp"].inputs(), n_gpus=2, **kw)


def _train(model: nn.Module, pipe: Any, x: torch.Tensor, y: torch.Tensor, loss_fn: Any, compile: Any,
           schedule: str = "1f1b", steps: int = 2, m: int = 4) -> tuple[list[float], dict[str, torch.Tensor]]:
    """``steps`` SGD steps of ``pipe.train_step`` from the model's current weights (restored after)."""
    init = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        losses.append(pipe.train_step(x, target=y, loss_fn=loss_fn, schedule=schedule, n_microbatches=m,
                                      compile=compile).item())
        opt.step()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.load_state_dict(init)
    return losses, params


def _assert_same(got: tuple[list[float], dict[str, torch.Tensor]], want: tuple[list[float], dict[str, torch.Tensor]]) -> None:
    assert got[0] == pytest.approx(want[0], rel=RTOL)
    assert got[1].keys() == want[1].keys() and got[1]
    for name, value in got[1].items():
        torch.testing.assert_close(value, want[1][name], rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_compiled_stages_train_like_eager_in_process(schedule: str) -> None:
    model, pipe = _mlp()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 32, generator=g), torch.randn(8, 10, generator=g)
    eager = _train(model, pipe, x, y, F.mse_loss, False, schedule)
    compiled = _train(model, pipe, x, y, F.mse_loss, True, schedule)
    _assert_same(compiled, eager)
    assert compiled[1]["head.weight"].ne(model.head.weight).any()  # the steps moved the weights


def test_recomputing_stages_compile_their_checkpoint_and_train_like_eager() -> None:
    from torch._inductor.compile_fx import compile_fx

    from partitioner.passes.recompute import RecomputeStage

    model, pipe = _mlp(recompute="full")
    assert all(isinstance(s, RecomputeStage) and s.regions() for s in pipe.stages)
    graphs: list[torch.fx.GraphModule] = []

    def inductor_seeing(gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
        graphs.append(gm)
        return compile_fx(gm, example_inputs)

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 32, generator=g), torch.randn(8, 10, generator=g)
    eager = _train(model, pipe, x, y, F.mse_loss, False)
    compiled = _train(model, pipe, x, y, F.mse_loss, {"backend": inductor_seeing})
    _assert_same(compiled, eager)
    assert len(graphs) == len(pipe.stages)  # one whole graph per stage: no graph break
    for gm in graphs:
        assert any(n.target is torch.ops.higher_order.tag_activation_checkpoint for n in gm.graph.nodes), \
            "dynamo did not keep the checkpointed regions"


class _Wide(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(8, 64), nn.Linear(64, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.gelu(self.up(x)))


def _kept_bytes(stage: Any, x: torch.Tensor, not_counted: set[int]) -> int:
    """Bytes of the storages a forward saves for backward, weights and the input aside."""
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in not_counted:
            kept[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        stage(x)
    return sum(kept.values())


def test_a_compiled_recomputing_stage_keeps_what_the_eager_one_keeps() -> None:
    from partitioner.runtime.compile import compiled_modules

    kept = {}
    for recompute in ("none", "full"):
        torch.manual_seed(0)
        model = nn.Sequential(*[_Wide() for _ in range(4)])
        pipe = partition(model, example_inputs=(torch.randn(32, 8),), n_gpus=2, recompute=recompute)
        x = torch.randn(32, 8, requires_grad=True)
        ignore = {p.untyped_storage().data_ptr() for p in model.parameters()} | {x.untyped_storage().data_ptr()}
        # inductor's partitioner (min-cut rematerialisation) without its code generation: faster
        compiled = compiled_modules(pipe, {1: pipe.stages[1]}, {"backend": "aot_eager_decomp_partition"})[1]
        kept[recompute] = (_kept_bytes(pipe.stages[1], x, ignore), _kept_bytes(compiled, x, ignore))
    (eager_none, compiled_none), (eager_full, compiled_full) = kept["none"], kept["full"]
    assert eager_full < eager_none / 2, kept  # the eager checkpoint keeps block inputs only
    assert compiled_full <= 1.25 * eager_full and compiled_full < compiled_none / 2, kept


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(self.lin(x))


def test_more_recomputing_stages_than_dynamos_recompile_limit_all_compile() -> None:
    # every recomputing stage has the same forward function; dynamo caches at most
    # recompile_limit (8) compilations per code object and runs the rest eagerly
    torch.manual_seed(0)
    model = nn.Sequential(*[_Block() for _ in range(10)])
    x, y = torch.randn(4, 8), torch.randn(4, 8)
    pipe = partition(model, example_inputs=(x,), n_gpus=10, recompute="full", schedule="gpipe")
    torch._dynamo.reset()
    counters.clear()
    compiled = _train(model, pipe, x, y, F.mse_loss, {"backend": "aot_eager"}, "gpipe", m=2)
    assert counters["stats"]["unique_graphs"] == 10, dict(counters["stats"])  # 8 when they shared one cache
    assert counters["frames"]["total"] == counters["frames"]["ok"], dict(counters["frames"])  # none fell back
    _assert_same(compiled, _train(model, pipe, x, y, F.mse_loss, False, "gpipe", m=2))


@pytest.mark.parametrize("schedule,kw", [("zb-h1", {}), ("zbv", dict(virtual_stages=2, schedule="zbv"))])
def test_split_backward_is_refused_compiled(schedule: str, kw: dict[str, Any]) -> None:
    model, pipe = _mlp(**kw)
    x, y = torch.randn(8, 32), torch.randn(8, 10)
    with pytest.raises(PipelineRuntimeError, match="splits each backward into I .* without compiling"):
        pipe.train_step(x, target=y, loss_fn=F.mse_loss, schedule=schedule, n_microbatches=4, compile=True)
    pipe.train_step(x, target=y, loss_fn=F.mse_loss, schedule=schedule, n_microbatches=4)  # eager still runs


def test_bad_compile_value_is_refused() -> None:
    model, pipe = _mlp()
    with pytest.raises(PipelineRuntimeError, match="compile= takes True, False or a dict"):
        pipe.train_step(torch.randn(8, 32), target=torch.randn(8, 10), loss_fn=F.mse_loss, compile="yes")
    with pytest.raises(PipelineRuntimeError, match="compile=.*'mode': 'fastest'.*torch.compile refused it"):
        pipe.train_step(torch.randn(8, 32), target=torch.randn(8, 10), loss_fn=F.mse_loss, compile={"mode": "fastest"})


def test_one_compilation_per_stage_serves_every_microbatch_and_a_new_length_recompiles_once() -> None:
    torch.manual_seed(0)
    model = TinyLM()
    pipe = partition(model, example_inputs=(torch.randint(0, 32, (8, 16)),), n_gpus=2)
    n = len(pipe.stages)
    torch._dynamo.reset()
    counters.clear()

    def data(seq: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seq)
        return torch.randint(0, 32, (8, seq), generator=g), torch.randint(0, 32, (8, seq), generator=g)

    x, y = data(16)
    _assert_same(_train(model, pipe, x, y, lm_loss, True, steps=3), _train(model, pipe, x, y, lm_loss, False, steps=3))
    # 3 steps x 4 micro-batches: one graph per stage, every later call a cache hit
    assert counters["stats"]["unique_graphs"] == n, dict(counters["stats"])
    x, y = data(12)  # another sequence length: one recompilation per stage, with S symbolic
    _assert_same(_train(model, pipe, x, y, lm_loss, True), _train(model, pipe, x, y, lm_loss, False))
    after_one_change = counters["stats"]["unique_graphs"]
    assert after_one_change <= 2 * n, dict(counters["stats"])
    for seq in (8, 20):  # and later lengths reuse it
        x, y = data(seq)
        _assert_same(_train(model, pipe, x, y, lm_loss, True), _train(model, pipe, x, y, lm_loss, False))
    assert counters["stats"]["unique_graphs"] == after_one_change, dict(counters["stats"])


def _ranks(rank: int, world: int, pipe: Any, x: torch.Tensor, y: torch.Tensor) -> Any:
    counters.clear()
    stage = pipe.build_stage(rank, "cpu", compile=True)
    params = stage.parameters()
    opt = torch.optim.SGD(params, lr=0.1)
    runner = stage.runner("1f1b", n_microbatches=4, loss_fn=F.mse_loss, batch_size=len(x))
    assert all(type(m).__name__ == "OptimizedModule" for m in runner.modules.values())
    losses = []
    for _ in range(2):
        for p in params:
            p.grad = None
        loss = runner.step(x if rank == 0 else None, target=y)
        losses.append(None if loss is None else loss.item())
        opt.step()
    with pytest.raises(PipelineRuntimeError, match="splits each backward"):
        stage.runner("zb-h1", n_microbatches=4, loss_fn=F.mse_loss, batch_size=len(x))
    return losses, {n: p.detach() for n, p in stage.named_parameters()}, counters["stats"]["unique_graphs"]


def test_ranks_compiled_over_gloo_train_like_eager() -> None:
    model, pipe = _mlp()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 32, generator=g), torch.randn(8, 10, generator=g)
    want = _train(model, pipe, x, y, F.mse_loss, False)
    results = spawn(_ranks, 2, pipe, x, y, timeout_s=TIMEOUT_S)
    assert results[1][0] == pytest.approx(want[0], rel=RTOL)
    got = {n: t for _, params, _ in results for n, t in params.items()}
    _assert_same((results[1][0], got), want)
    assert [graphs for _, _, graphs in results] == [1, 1]  # one stage per rank, compiled once for both steps


def test_cli_run_compile_trains_like_the_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.tools import tiny_models

    model, (x,) = tiny_models.mlp()  # what `partitioner run` trains: SGD lr 1e-3 on the mean square
    opt, want = torch.optim.SGD(model.parameters(), lr=1e-3), []
    for _ in range(2):
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        want.append(loss.item())
    monkeypatch.setenv("TORCH_TRACE", str(tmp_path))  # PyTorch's structured compile log, one file per rank
    out = cli("run", f"{MODELS}:mlp", "--gpus", "2", "--steps", "2", "--microbatches", "4", "--compile", timeout=240)
    assert out.returncode == 0, out.stderr
    assert [float(v) for v in re.findall(r"loss (\S+)", out.stdout)] == pytest.approx(want, abs=2e-6)  # 6 decimals
    for rank in (0, 1):  # each rank compiled its stage, once for both steps
        (log,) = tmp_path.glob(f"*rank_{rank}_*.log")
        assert log.read_text().count('"dynamo_start"') == 1, log
    monkeypatch.delenv("TORCH_TRACE")
    out = cli("run", f"{MODELS}:mlp", "--gpus", "2", "--schedule", "zb-h1", "--compile")
    assert out.returncode == 2 and "--compile: schedule 'zb-h1' splits each backward" in out.stderr


def _replica(rank: int, world: int, pipe: Any, x: torch.Tensor, y: torch.Tensor) -> Any:
    counters.clear()
    stage = pipe.build_stage(rank, "cpu", compile=True)
    stage.runner("1f1b", loss_fn=F.mse_loss).step(x, target=y)  # the global batch: each replica takes its half
    launches = [how for _, _, how in stage.grad_sync.launches]
    return {n: p.grad.clone() for n, p in stage.named_parameters()}, launches, counters["stats"]["unique_graphs"]


def test_replicas_compiled_average_their_gradients_like_one_process() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    x, y = torch.randn(8, 8), torch.randn(8, 4)
    pipe = partition(model, n_gpus=2, data_parallel=2, example_inputs=(x,), n_microbatches=2)
    F.mse_loss(model(x), y).backward()
    for grads, launches, graphs in spawn(_replica, 2, pipe, x, y, timeout_s=TIMEOUT_S):
        assert grads.keys() == dict(model.named_parameters()).keys()
        for name, p in model.named_parameters():
            torch.testing.assert_close(grads[name], p.grad, rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")
        assert launches == ["hook"] and graphs == 1  # launched inside the compiled backward; one compilation


def _compile_fresh(rank: int, world: int, scale: float) -> float:
    fn = torch.compile(lambda t: (t.sin() * scale + t.cos()).sum())
    return float(fn(torch.ones(7)))


def test_a_forked_rank_compiles_after_its_parent_has_compiled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A cold cache makes both processes really compile: the parent starts inductor's
    # worker pool, which a forked child inherits without its worker.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    expect = float((torch.ones(7).sin() * 2.0 + torch.ones(7).cos()).sum())
    assert _compile_fresh(0, 1, 2.0) == pytest.approx(expect)
    got = spawn(_compile_fresh, 1, 3.0, timeout_s=120.0)
    assert got == [pytest.approx(float((torch.ones(7).sin() * 3.0 + torch.ones(7).cos()).sum()))]
