"""FSDP units on stages captured with ``torch.export`` (a tiny Hugging Face Llama, 4 decoder
layers): 4 gloo ranks as 2 pipeline ranks x 2 shards train 3 steps like one process on the
whole batch, under 1F1B (per-unit mode, and its DCP checkpoint is the unsharded model's) and zb-h1
(per-step mode, the split backward's ``W``);
each decoder layer is its own FSDP unit (the block outlined into one call,
``partitioner.runtime.outline``) with the model's parameter names, and so are the token
embedding and the output head; per unit no more than the stage's own unit (the final norm) and
two neighbouring units are gathered at once, while the per-step mode holds the whole stage; and
the planner's units are the runtime's."""

from __future__ import annotations

import copy
import functools
from typing import Any

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers", reason="the Hugging Face tests need `pip install transformers`")

from partitioner import Pipe, partition  # noqa: E402
from partitioner.runtime.launch import spawn  # noqa: E402
from tests.hf.models import SEQ, VOCAB, llama  # noqa: E402
from tests.runtime.helpers import sgd_reference  # noqa: E402

TIMEOUT_S = 120.0
BATCH, M, STEPS, LR = 8, 2, 3, 0.1
# fp32: the shards' reduce-scatter sums two replica gradients in another order than one
# backward over the whole batch (rounding only)
RTOL, ATOL = 1e-5, 1e-6
LAYERS = [f"model.layers.{i}" for i in range(4)]
EMBED, HEAD = "model.embed_tokens", "lm_head"  # units of their own (untied: Llama's default)


def _data() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return ({"input_ids": torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)},
            torch.randint(0, VOCAB, (BATCH, SEQ), generator=g))


def _loss(out: Any, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.logits.flatten(0, 1), y.flatten())


@functools.cache
def _built(schedule: str) -> tuple[torch.nn.Module, Pipe, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = llama(4)
    inputs, _ = _data()
    pipe = partition(model, 4, inputs, device="cpu", link="loopback", data_parallel=2, zero=3, schedule=schedule,
                     n_microbatches=M, pinned_cuts=["model.layers.2"])
    assert pipe.plan.capture == "export"
    return model, pipe, copy.deepcopy(model.state_dict())


def _reference(model: torch.nn.Module) -> tuple[list[float], dict[str, torch.Tensor]]:
    inputs, y = _data()
    run = sgd_reference(model, inputs, y, _loss, steps=STEPS, lr=LR, remove_duplicate=True)
    return run.losses, run.params


def _watch_gathers(stage: Any, peak: list[int]) -> None:
    """Record the most parameter elements held gathered at once: after every wait for a
    unit's all-gather (forward, backward and prefetches), the sum over the stage's units."""
    from torch.distributed.fsdp._fully_shard._fsdp_param import ShardedState
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

    from partitioner.runtime.fsdp import _fsdp_params

    wait = FSDPParamGroup.wait_for_unshard

    def watched(self: Any) -> Any:
        out = wait(self)
        # FSDP lists a root's units at its first forward (lazy init), so look them up here
        params = [fp for root in stage.grad_sync.roots for fp in _fsdp_params(root).values()]
        peak[0] = max(peak[0], sum(fp._orig_size.numel() for fp in params
                                   if fp.sharded_state == ShardedState.UNSHARDED))
        return out

    FSDPParamGroup.wait_for_unshard = watched  # type: ignore[method-assign]


def _train(rank: int, world: int, schedule: str, path: str | None = None) -> dict[str, Any]:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    _, pipe, _ = _built(schedule)
    inputs, y = _data()
    stage = pipe.build_stage(rank, "cpu")
    units = sorted(n for mod in stage.modules.values() for n, m in mod.named_modules() if isinstance(m, FSDPModule))
    sizes = {n: p.numel() for n, p in stage.named_parameters()}  # DTensors: the whole tensor's count
    peak = [0]
    _watch_gathers(stage, peak)
    opt = stage.optimizer(torch.optim.SGD, lr=LR)
    runner = stage.runner(schedule, n_microbatches=M, loss_fn=_loss, batch_size=BATCH)
    losses = []
    for _ in range(STEPS):
        stage.zero_grad()
        loss = runner.step(**(inputs if stage.is_first else {}), target=y if stage.is_last else None,
                           loss_on_every_rank=True)
        losses.append(loss.item())
        opt.step()
    params = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
              for n, p in stage.named_parameters()}
    if path is not None:  # one DCP save of the job, each shard under its whole tensor's (the model's) key
        stage.save_checkpoint(path)
    return {"pp": stage.pp_rank, "units": units, "sizes": sizes, "peak": peak[0], "losses": losses,
            "params": params, "mode": stage.grad_sync.mode,
            "state_dict": sorted(k for mod in stage.modules.values() for k in mod.state_dict())}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("schedule,mode", [("1f1b", "unit"), ("zb-h1", "step")])
def test_export_stages_shard_per_decoder_layer_and_train_like_one_process(schedule: str, mode: str,
                                                                          tmp_path: Any) -> None:
    model, pipe, init = _built(schedule)
    model.load_state_dict(init)
    want_losses, want = _reference(model)
    path = str(tmp_path / "dcp") if mode == "unit" else None
    results = spawn(_train, 4, schedule, path, timeout_s=TIMEOUT_S)
    if path is not None:  # the checkpoint is the unsharded model's, by the model's names
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        dcp_to_torch_save(path, str(tmp_path / "whole.pt"))
        # keys are ``model.<FQN>`` (runtime.checkpoint), the model's FQN after the prefix
        saved = {k.removeprefix("model."): v for k, v in torch.load(tmp_path / "whole.pt", weights_only=True).items()}
        assert set(want) <= set(saved) <= set(init)
        for n, v in want.items():
            torch.testing.assert_close(saved[n], v, rtol=RTOL, atol=ATOL, msg=lambda m, n=n: f"{n}: {m}")
    for r in results:
        assert r["mode"] == mode
        mine = LAYERS[:2] if r["pp"] == 0 else LAYERS[2:]
        role = EMBED if r["pp"] == 0 else HEAD  # the embedding on the first stage, the head on the last
        # one unit per decoder layer besides the stage's own, not one unit; the embedding and the head their own
        assert r["units"] == sorted(["", role, *mine])
        # the model's names: state dict keys (what DCP writes) and parameters are the unsharded model's
        assert set(r["params"]) <= set(want) and set(r["state_dict"]) <= set(init)
        whole = sum(r["sizes"].values())
        layer = max(sum(v for n, v in r["sizes"].items() if n.startswith(b + ".")) for b in mine)
        own = whole - sum(v for n, v in r["sizes"].items() if n.startswith(tuple(b + "." for b in [*mine, role])))
        table = r["sizes"][role + ".weight"]  # VOCAB x HIDDEN: what the stage's own unit held before
        assert own < table  # the final norm (last stage) or nothing (first stage) stays in the stage's unit
        if mode == "unit":  # the stage's own unit and at most two layers (running, prefetched) at once: the
            # embedding / head table is no longer gathered through the whole stage
            assert 0 < r["peak"] <= own + 2 * layer and r["peak"] < whole, (r["peak"], own, layer, whole)
            # measured (units counted once their gather was waited for: the unit before is freed by then): the
            # own unit and one layer; with the table in the stage's unit it is own + table + layer
            # (test_embedding_and_head_units_take_their_table_off_the_peak)
            assert r["peak"] == own + layer, (r["peak"], own, layer)
        else:  # gathered once per step: the whole stage from the first forward to the step's reduction
            assert r["peak"] == whole
        assert r["losses"] == pytest.approx(want_losses, rel=1e-5)
    got: dict[str, torch.Tensor] = {}
    for r in results:
        got.update(r["params"])
    assert set(got) == set(want)
    for n, v in got.items():
        torch.testing.assert_close(v, want[n], rtol=RTOL, atol=ATOL, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.timeout(240)
def test_embedding_and_head_units_take_their_table_off_the_peak(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same 1F1B run with the embedding and the head left in the stage's unit (the rule's
    embedding/head part switched off): the peak gathered is larger by exactly the table
    (VOCAB x HIDDEN elements), the embedding's on the first stage and the head's on the last."""
    import partitioner.memory as memory

    monkeypatch.setattr(memory, "_roles", lambda gm, strict=True: [])  # the ranks fork: they see the switch
    for r in spawn(_train, 4, "1f1b", timeout_s=TIMEOUT_S):
        mine = LAYERS[:2] if r["pp"] == 0 else LAYERS[2:]
        role = EMBED if r["pp"] == 0 else HEAD
        assert r["units"] == ["", *mine]
        layer = max(sum(v for n, v in r["sizes"].items() if n.startswith(b + ".")) for b in mine)
        own = sum(r["sizes"].values()) - sum(v for n, v in r["sizes"].items() if n.startswith(tuple(b + "." for b in mine)))
        table = r["sizes"][role + ".weight"]
        assert r["peak"] == own + layer and own - table < table, (r["peak"], own, table, layer)


def test_planner_units_are_the_runtime_units_on_an_export_capture() -> None:
    from partitioner.memory import fsdp_unit_of, fsdp_units
    from partitioner.runtime.outline import outline_blocks

    _, pipe, _ = _built("1f1b")
    gm = pipe.graph
    names = {id(p): n for n, p in gm.named_parameters()}
    planned = {names[i]: unit for i, unit in fsdp_unit_of(gm).items()}
    assert set(planned.values()) == {*LAYERS, EMBED, HEAD}  # every decoder layer, the embedding, the head
    ran: dict[str, str] = {}
    for st in pipe.stages:
        before = fsdp_units(st)
        stage = copy.deepcopy(st)  # what a rank builds, then shards (runtime.fsdp.shard_stage)
        assert outline_blocks(stage) == [p for _, paths in before for p in paths]
        assert fsdp_units(stage) == before  # the rule reads the outlined graph the same way
        assert [n for n, _ in stage.named_parameters()] == [n for n, _ in st.named_parameters()]
        ran.update({n: block for block, leaves in fsdp_units(stage) for leaf in leaves
                    for n, _ in stage.get_submodule(leaf).named_parameters(prefix=leaf)})
    assert ran == planned


def test_outlined_stage_computes_what_the_flat_stage_does() -> None:
    from partitioner.runtime.outline import outline_blocks

    _, pipe, _ = _built("1f1b")
    inputs, _ = _data()
    stage = copy.deepcopy(pipe.stages[0])
    assert outline_blocks(stage) == [EMBED, *LAYERS[:2]]
    assert outline_blocks(stage) == []  # already outlined: nothing left to do
    want, got = pipe.stages[0](inputs["input_ids"]), stage(inputs["input_ids"])
    for a, b in zip(want, got):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)  # the same operations in the same order: bitwise equal
    assert not any(n.op == "get_attr" and str(n.target).startswith(("model.layers.", EMBED)) for n in stage.graph.nodes)


def test_planner_prices_the_export_stage_per_layer() -> None:
    """Per unit, a stage's static memory is its shards plus its own unit and the largest layer
    gathered; per step the whole stage: with the stage as one unit the two were equal."""
    unit, step = _built("1f1b")[1].plan, _built("zb-h1")[1].plan
    for a, b in zip(unit.stages, step.stages):
        assert a.cost.static_bytes < b.cost.static_bytes


def _mixed(rank: int, world: int, pipe: Pipe) -> tuple[list[float], dict[str, torch.Tensor], list[str]]:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    inputs, y = _data()
    stage = pipe.build_stage(rank, "cpu")
    units = sorted(n for mod in stage.modules.values() for n, m in mod.named_modules() if isinstance(m, FSDPModule))
    opt = stage.optimizer(torch.optim.SGD, lr=LR)
    runner = stage.runner("1f1b", n_microbatches=M, loss_fn=_loss, batch_size=BATCH)
    losses = []
    for _ in range(2):
        stage.zero_grad()
        losses.append(runner.step(**(inputs if stage.is_first else {}), target=y if stage.is_last else None,
                                  loss_on_every_rank=True).item())
        opt.step()
    return losses, {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
                    for n, p in stage.named_parameters()}, units


def test_bf16_mixed_outlined_layers_compute_what_the_one_unit_stage_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """precision="bf16-mixed": FSDP gathers each layer in bf16; an outlined layer takes its
    inputs as the graph made them (not cast on entry), so training equals the stage sharded
    as one unit (outlining switched off), bitwise."""
    import partitioner.runtime.fsdp as fsdp

    torch.manual_seed(0)
    model = llama(4)
    inputs, _ = _data()
    pipe = partition(model, 4, inputs, device="cpu", link="loopback", data_parallel=2, zero=3, schedule="1f1b",
                     n_microbatches=M, pinned_cuts=["model.layers.2"], precision="bf16-mixed")
    outlined = spawn(_mixed, 4, pipe, timeout_s=TIMEOUT_S)
    monkeypatch.setattr(fsdp, "outline_blocks", lambda gm: [])  # the ranks fork: they see the switch
    whole = spawn(_mixed, 4, pipe, timeout_s=TIMEOUT_S)
    for (losses, params, units), (want_losses, want, want_units) in zip(outlined, whole):
        assert len(units) == 4 and want_units == [""]  # the stage's unit, two layers and embedding/head, vs one
        assert losses == want_losses
        for n, v in params.items():
            assert torch.equal(v, want[n]), n


@pytest.mark.parametrize("recompute", ["full", "selective", "partial"])
def test_outlined_layers_keep_the_stage_recomputation(recompute: str, caplog: pytest.LogCaptureFixture) -> None:
    """A recomputed region covering a layer checkpoints the layer's call; regions inside a layer
    (selective: the attention core) are checkpointed inside it; a region overlapping a layer's
    span in part leaves the layer flat (in the stage's unit), said in the log. Outputs and
    gradients are the flat stage's."""
    from partitioner.passes.meta import MODULE
    from partitioner.passes.recompute import REGION, RecomputeStage, with_recompute
    from partitioner.passes.split import compute_nodes
    from partitioner.runtime.outline import outline_blocks

    _, pipe, _ = _built("1f1b")
    inputs, _ = _data()
    # the regions recompute= gives (passes/recompute.py): each layer's nodes, or each attention core
    nodes = compute_nodes(pipe.stages[0])
    if recompute in ("full", "partial"):  # "partial": without the layer's own nodes (its residual adds)
        inner = recompute == "partial"
        regions = [[n.name for n in nodes if str(n.meta.get(MODULE, "")).startswith(b + ".")
                    or (not inner and n.meta.get(MODULE) == b)] for b in LAYERS[:2]]
    else:
        regions = [[n.name] for n in nodes if "scaled_dot_product_attention" in str(n.target)]
    assert len(regions) == 2 and all(regions)
    flat = with_recompute(copy.deepcopy(pipe.stages[0]), regions, "full" if recompute == "partial" else recompute)
    stage = copy.deepcopy(flat)
    if recompute == "partial":
        with caplog.at_level("WARNING", logger="partitioner.runtime"):
            assert outline_blocks(stage) == [EMBED]  # outside the layers' regions
        assert "block model.layers.0 is not outlined: a recomputed region overlaps it only in part" in caplog.text
        return
    assert outline_blocks(stage) == [EMBED, *LAYERS[:2]]
    calls = [n for n in stage.graph.nodes if n.op == "call_module" and n.target != EMBED]
    layers = [stage.get_submodule(b) for b in LAYERS[:2]]
    if recompute == "full":
        assert all(REGION in n.meta for n in calls) and not any(isinstance(m, RecomputeStage) for m in layers)
    else:
        assert not any(REGION in n.meta for n in calls)
        assert all(isinstance(m, RecomputeStage) and len(m.regions()) == 1 for m in layers)
    grads = []
    for mod in (flat, stage):
        out = [t for t in mod(inputs["input_ids"]) if isinstance(t, torch.Tensor) and t.is_floating_point()]
        sum(t.square().sum() for t in out).backward()
        grads.append(({n: p.grad.clone() for n, p in mod.named_parameters()}, out))
    (want, want_out), (got, got_out) = grads
    assert set(got) == set(want)
    for a, b in zip(want_out, got_out):
        assert torch.equal(a, b)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-6, atol=1e-7, msg=lambda m, n=n: f"{n}: {m}")


def test_planner_units_under_tensor_parallelism_are_the_runtime_ones() -> None:
    """One TP rank's view of the graph (what the planner prices at T=2): the vocabulary-parallel
    embedding is no unit (the runtime reads it through ``embedding_on_shards``), the head and
    the layers are, as ``test_fsdp_over_tensor_parallel_layers_trains_like_one_process`` runs them."""
    from partitioner.memory import fsdp_unit_of
    from partitioner.passes.tensor_parallel import param_divisor
    from partitioner.tensor_parallel import view

    tp_view, _ = view(_built("1f1b")[1].graph, 2)
    assert param_divisor(tp_view)[EMBED + ".weight"] == 2  # split by vocabulary
    assert set(fsdp_unit_of(tp_view).values()) == {*LAYERS, HEAD}


def _tp_train(rank: int, world: int, pipe: Pipe) -> tuple[list[float], dict[str, torch.Tensor], list[str]]:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    inputs, y = _data()
    stage = pipe.build_stage(rank, "cpu")
    units = sorted(n for mod in stage.modules.values() for n, m in mod.named_modules() if isinstance(m, FSDPModule))
    opt = stage.optimizer(torch.optim.SGD, lr=LR)
    runner = stage.runner("1f1b", n_microbatches=M, loss_fn=_loss, batch_size=BATCH)
    losses = []
    for _ in range(STEPS):
        stage.zero_grad()
        losses.append(runner.step(**inputs, target=y, loss_on_every_rank=True).item())
        opt.step()
    return losses, {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
                    for n, p in stage.named_parameters()}, units


@pytest.mark.timeout(240)
def test_fsdp_over_tensor_parallel_layers_trains_like_one_process() -> None:
    """FSDP2 x TP2 (one pipeline stage, 4 ranks): the layers and the head are still units
    (the TP rewrite reads its mesh from a stage attribute, not from a layer's weight, so nothing ties
    them to the stage's unit), each a 2-D
    DTensor, and the run equals one process."""
    from partitioner.runtime.tensor_parallel import with_tensor_parallel

    torch.manual_seed(0)
    model = llama(4)
    init = copy.deepcopy(model.state_dict())
    inputs, _ = _data()
    pipe = partition(model, 2, inputs, device="cpu", link="loopback", data_parallel=2, zero=3, schedule="1f1b",
                     n_microbatches=M)
    assert (pipe.plan.mesh.dp, pipe.plan.pp_ranks) == (2, 1)
    results = spawn(_tp_train, 4, with_tensor_parallel(pipe, 2), timeout_s=TIMEOUT_S)
    model.load_state_dict(init)
    want_losses, want = _reference(model)
    for losses, params, units in results:
        # the head too; the vocabulary-parallel embedding (runtime.tensor_parallel's embedding_on_shards, no
        # aten.embedding) stays in the stage's unit
        assert units == ["", HEAD, *LAYERS]
        assert losses == pytest.approx(want_losses, rel=1e-5)
        assert set(params) == set(want)
        for n, v in params.items():
            torch.testing.assert_close(v, want[n], rtol=RTOL, atol=ATOL, msg=lambda m, n=n: f"{n}: {m}")
