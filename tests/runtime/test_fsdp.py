"""FSDP2 inside pipeline stages (``zero=3``) on gloo: 4 ranks as 2 pipeline ranks x 2 shards
train like one process on the whole batch (SGD and AdamW, 1F1B and the split backward of
zb-h1, the GPT fixture's embedding tied across the two pipeline ranks), gradient clipping
equals ``torch.nn.utils.clip_grad_norm_`` on the whole model, refusals; and the planner's
pricing of ``zero=3`` (shards shrink with the replica count, the gathers and
reduce-scatters cost time)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from partitioner import partition
from partitioner.runtime.errors import PipelineRuntimeError
from partitioner.runtime.launch import spawn
from tests.fixtures.models import FIXTURES
from tests.runtime.helpers import LR, data, sgd_reference

TIMEOUT_S = 120.0
BATCH = 8
STEPS = 3
CLIP = 0.5  # below the fixture's gradient norm (about 3), so clipping changes every step
# fp32: the shards' reduce-scatter sums two replica gradients in another order than one
# backward over the whole batch (rounding only).
RTOL, ATOL = 1e-5, 1e-6

_PIPES: dict[tuple[str, int], tuple[torch.nn.Module, Any, dict[str, torch.Tensor]]] = {}


def _pipe(schedule: str = "1f1b", zero: int = 3) -> tuple[torch.nn.Module, Any]:
    key = (schedule, zero)
    if key not in _PIPES:
        torch.manual_seed(0)
        model = FIXTURES["gpt"].build()
        x, _, _ = data("gpt", BATCH)
        stages = {"pinned_cuts": ["transformer.h.1", "transformer.h.2", "transformer.h.3"], "virtual_stages": 2} \
            if schedule == "interleaved-1f1b" else {"pinned_cuts": ["transformer.h.2"]}
        pipe = partition(model, n_gpus=4, data_parallel=2, example_inputs=(x,), schedule=schedule, n_microbatches=2,
                         zero=zero, **stages)
        _PIPES[key] = (model, pipe, copy.deepcopy(model.state_dict()))
    model, pipe, init = _PIPES[key]
    model.load_state_dict(init)
    return model, pipe


OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, float]]] = {
    "sgd": (torch.optim.SGD, {"lr": LR}),
    # eps above rounding noise: attention's key bias has an exactly zero gradient, so with the
    # default eps (1e-8) Adam's step on it is rounding noise divided by itself (sign at random)
    "adamw": (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1, "eps": 1e-4})}


def _optimizer(kind: str, params: Any) -> torch.optim.Optimizer:
    cls, kw = OPTIMIZERS[kind]
    return cls(params, **kw)


def _reference(model: torch.nn.Module, kind: str, clip: bool) -> tuple[list[float], list[float],
                                                                      dict[str, torch.Tensor]]:
    """The unpartitioned model trained in one process: losses, gradient norms, parameters
    (test_hsdp and test_fsdp_step compare against it too)."""
    x, y, loss_fn = data("gpt", BATCH)
    ref = sgd_reference(model, x, y, loss_fn, steps=STEPS, max_norm=CLIP if clip else None,
                        remove_duplicate=False, optimizer=lambda params: _optimizer(kind, params))
    return ref.losses, ref.norms, ref.params


def _train(rank: int, world: int, pipe: Any, schedule: str, kind: str, clip: bool) -> dict[str, Any]:
    from torch.distributed.tensor import DTensor

    x, y, loss_fn = data("gpt", BATCH)
    stage = pipe.build_stage(rank, "cpu")
    sharded = {n: (type(p).__name__, tuple(p.to_local().shape)) for n, p in stage.named_parameters()
               if isinstance(p, DTensor)}
    cls, kw = OPTIMIZERS[kind]
    opt = stage.optimizer(cls, **kw)
    runner = stage.runner(schedule, loss_fn=loss_fn)
    losses, norms = [], []
    for _ in range(STEPS):
        stage.zero_grad()
        loss = runner.step(x if stage.is_first else None, target=y if stage.is_last else None,
                           loss_on_every_rank=True)
        losses.append(loss.item())
        if clip:
            norms.append(stage.clip_grad_norm_(CLIP).item())
        opt.step()
    params = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
              for n, p in stage.named_parameters(remove_duplicate=False)}
    from torch.distributed.fsdp import FSDPModule

    fsdp_units = sorted(n for mod in stage.modules.values() for n, m in mod.named_modules() if isinstance(m, FSDPModule))
    return {"dp": stage.dp_rank, "pp": stage.pp_rank, "losses": losses, "norms": norms, "opt": type(opt).__name__,
            "sharded": sharded, "params": params, "mode": stage.grad_sync.mode, "units": fsdp_units}


@pytest.mark.parametrize("schedule,kind,clip", [("1f1b", "sgd", False), ("1f1b", "adamw", True),
                                                ("zb-h1", "sgd", False), ("zb-h1", "adamw", True),
                                                # two stages (two FSDP roots) per rank, the tie across the ranks
                                                ("interleaved-1f1b", "sgd", True)])
def test_fsdp_in_two_stages_trains_like_one_process(schedule: str, kind: str, clip: bool) -> None:
    model, pipe = _pipe(schedule)
    assert pipe.plan.mesh.zero == 3 and pipe.plan.tied_parameters
    want_losses, want_norms, want = _reference(model, kind, clip)
    assert not clip or min(want_norms) > CLIP, "clipping should change every step"
    results = spawn(_train, 4, pipe, schedule, kind, clip, timeout_s=TIMEOUT_S)
    assert [(r["dp"], r["pp"]) for r in results] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert {r["opt"] for r in results} == {"SGD" if kind == "sgd" else "AdamW"}
    # per unit (reshard after forward, reduce per micro-batch) for 1f1b; once per step for a split backward
    assert {r["mode"] for r in results} == {"step" if schedule == "zb-h1" else "unit"}
    # each block's called leaves are one unit (the stage module the other), e.g. transformer.h.0's c_attn..c_proj
    assert "transformer.h.0.attn.c_attn" in results[0]["units"] and "" in results[0]["units"]
    assert "transformer.h.3.mlp.c_fc" in results[1]["units"]
    # the token and position embeddings one unit on the first pipeline rank, the head on the last: the tied weight's
    # copies are each their own unit there (sharded alike, so the tie sums still line up)
    assert {"transformer.wte", "transformer.wpe"} <= set(results[0]["units"]) and "lm_head" in results[1]["units"]
    assert len([u for u in results[0]["units"] if u == ""]) == pipe.plan.n_stages // 2  # a root per stage
    for r in results:  # every parameter is a shard: half of dim 0 (the GPT's dims are even)
        names = dict(model.named_parameters(remove_duplicate=False))
        assert r["sharded"] and set(r["sharded"]) == set(r["params"])
        for n, (_, shape) in r["sharded"].items():
            assert shape[0] * 2 == names[n].shape[0], n
        assert r["losses"] == pytest.approx(want_losses, rel=1e-5)
        assert r["norms"] == pytest.approx(want_norms, rel=1e-5)  # clip_grad_norm_ of the whole model
    for r in results:  # every rank ends with the one-process parameters (tied copies included)
        for n, v in r["params"].items():
            torch.testing.assert_close(v, want[n], rtol=RTOL, atol=ATOL, msg=lambda m, n=n: f"{n}: {m}")
    assert set().union(*(r["params"] for r in results)) == set(want)


def test_planner_units_are_the_runtime_units_with_the_tie_across_ranks() -> None:
    """The planner's units per stage (``ZeroShard.units``, as ``problem`` builds it) are the ones
    the runtime shards each stage module with (``memory.fsdp_units``): the embeddings and the
    head their own units on the ranks holding one side of the tie; a stage holding both (the
    whole model) keeps the tied weight in its own unit, as a stage graph holding both does."""
    from partitioner.data_parallel import ZeroShard
    from partitioner.memory import Static, fsdp_unit_at, fsdp_unit_of, fsdp_units
    from partitioner.passes.split import compute_nodes

    _, pipe = _pipe("1f1b")
    gm = pipe.graph
    order = compute_nodes(gm)
    static = Static(gm, order, 16, 4)
    numel = {id(p): p.numel() for p in gm.parameters()}
    shard = ZeroShard(static.uses, numel, 4, 8, 3, fsdp_unit_of(gm), False, fsdp_unit_at(gm, order))
    at = {n.name: i for i, n in enumerate(order)}
    names = list(gm.named_parameters(remove_duplicate=False))
    wte = dict(names)["transformer.wte.weight"]
    assert shard.units(0, len(order))[id(wte)] == ""  # embedding and head on one rank: the stage's unit
    for plan_stage, mod in zip(pipe.plan.stages, pipe.stages):
        pos = sorted(at[n] for n in plan_stage.nodes if n in at)
        planned = shard.units(pos[0], pos[-1] + 1)
        held = {n for n, _ in mod.named_parameters()}
        want = {n: planned[id(p)] for n, p in names if n in held}
        ran = {n: "" for n in held}
        ran.update({n: key for key, leaves in fsdp_units(mod) for leaf in leaves
                    for n, _ in mod.get_submodule(leaf).named_parameters(prefix=leaf)})
        assert ran == want
        assert {"transformer.wte.weight": "transformer.wte", "lm_head.weight": "lm_head"}.items() & ran.items()


def _build_and_step(rank: int, world: int, pipe: Any, schedule: str) -> None:
    x, y, loss_fn = data("gpt", BATCH)
    stage = pipe.build_stage(rank, "cpu")
    runner = stage.runner(schedule, loss_fn=loss_fn)
    runner.step(x if stage.is_first else None, target=y if stage.is_last else None)


def _partition(**kw: Any) -> Any:
    torch.manual_seed(0)
    model = FIXTURES["gpt"].build()
    x, _, _ = data("gpt", BATCH)
    return partition(model, n_gpus=4, data_parallel=2, example_inputs=(x,), n_microbatches=2, zero=3, **kw)


@pytest.mark.parametrize("case", ["tied-on-one-rank", "bf16", "split-runner-on-unit-plan"])
def test_fsdp_refuses_what_it_cannot_train_exactly(case: str) -> None:
    if case == "tied-on-one-rank":  # zbv's V puts the embedding's stage 0 and the head's stage 3 on rank 0
        pipe, schedule, want = _partition(schedule="zbv"), "zbv", "shared by stages 0 and 3"
    elif case == "bf16":  # pure bf16 steps bf16 weights: FSDP's fp32 shards would be other masters
        pipe, schedule, want = (_partition(schedule="1f1b", pinned_cuts=["transformer.h.2"], precision=case),
                                "1f1b", "fp32, bf16-mixed or fp16-mixed only; this plan's precision is 'bf16'")
    else:  # per-unit sharding for 1f1b; zb-h1's W would write gradients after FSDP reduced them
        pipe, schedule, want = _pipe("1f1b")[1], "zb-h1", "computed after FSDP reduced them"
    with pytest.raises(PipelineRuntimeError, match=want):
        spawn(_build_and_step, 4, pipe, schedule, timeout_s=TIMEOUT_S)


# Checkpoints of zero=3 stages (each replica writes its shards): tests/runtime/test_checkpoint_layouts.py


# -- pricing ---------------------------------------------------------------------------------

def _shard(zero: int, per_step: bool = False) -> Any:
    from partitioner.data_parallel import ZeroShard

    # three positions: an embedding (own unit, 1000 elements), two blocks of 400 each
    return ZeroShard(uses=[(1,), (2, 3), (4,)], numel={1: 1000, 2: 300, 3: 100, 4: 400}, grad_width=4,
                     optimizer_bytes=8, zero=zero, unit_of={2: "h.0", 3: "h.0", 4: "h.1"}, per_step=per_step)


def test_zero3_memory_is_the_shards_plus_what_is_gathered() -> None:
    n, full = 1800, 1800 * 16  # fp32 AdamW: weight 4 + gradient 4 + moments 8 bytes per element
    unit = _shard(3)
    for dp in (2, 4, 8):  # shards ÷ dp; per unit: own unit (1000) + the largest block twice + one full gradient
        assert unit.fsdp_static(0, 3, dp) == -(-full // dp) + 4 * (1000 + 2 * 400) + 4 * 1000
        assert unit.saving(0, 3, dp) == full - unit.fsdp_static(0, 3, dp)
    assert unit.fsdp_static(0, 3, 2) > unit.fsdp_static(0, 3, 4) > unit.fsdp_static(0, 3, 8)
    step = _shard(3, per_step=True)  # a split backward holds the whole stage gathered, weights and gradients
    assert step.fsdp_static(0, 3, 4) == full // 4 + 2 * 4 * n
    assert step.saving(0, 3, 2) == 0  # fp32 Adam at dp=2: 16/2 + 8 = 16 bytes per element, nothing saved
    # ZeRO-1 shards only the optimizer state; no ZeRO saving without replicas
    assert _shard(1).saving(0, 3, 4) == n * 8 - n * 8 // 4 and unit.saving(0, 3, 1) == 0
    # the solver's additive view: per position its shards (+ 2 w n per step); gathered units come in the exact check
    assert unit.additive([16_000, 6_400, 6_400], 4) == [4000, 1600, 1600]
    assert step.additive([16_000, 6_400, 6_400], 4) == [4000 + 8000, 1600 + 3200, 1600 + 3200]


def test_zero3_memory_prices_the_embedding_and_head_units_per_stage() -> None:
    """A weight tied between the embedding (position 0) and the head (position 2): a stage
    holding one of them shards it as that unit, a stage holding both keeps it in its own unit.
    Per unit the peak is the own unit plus the two neighbouring units gathered together."""
    from partitioner.data_parallel import ZeroShard

    # positions: the embedding reads the tied table 1 (1000 elements), a block reads 2 (400), the head reads 1 again
    shard = ZeroShard(uses=[(1,), (2,), (1,)], numel={1: 1000, 2: 400}, grad_width=4, optimizer_bytes=8, zero=3,
                      unit_of={2: "h.0"}, unit_at=[{1: "wte"}, {}, {1: "lm_head"}])
    assert shard.units(0, 2) == {1: "wte", 2: "h.0"} and shard.units(1, 3) == {2: "h.0", 1: "lm_head"}
    assert shard.units(0, 3) == {1: "", 2: "h.0"}  # both sides of the tie on one rank: the stage's own unit
    shards = -(-1400 * 16 // 2)
    # the embedding and the block gathered together (running and prefetched); the larger one's full gradient
    assert shard.fsdp_static(0, 2, 2) == shards + 4 * (1000 + 400) + 4 * 1000
    assert shard.fsdp_static(0, 3, 2) == shards + 4 * (1000 + 400) + 4 * 1000  # own 1000 + the block
    alone = ZeroShard(uses=[(1,), (2,), (3,)], numel={1: 1000, 2: 400, 3: 400}, grad_width=4, optimizer_bytes=8,
                      zero=3, unit_of={1: "wte", 2: "h.0", 3: "h.1"})
    # units in first-read order 1000, 400, 400: neighbours at most 1400 (not the largest twice, 2000)
    assert alone.fsdp_static(0, 3, 2) == -(-1800 * 16 // 2) + 4 * 1400 + 4 * 1000


def test_zero3_communication_per_unit_and_per_step() -> None:
    from partitioner.cost_models.devices import LINKS
    from partitioner.data_parallel import (
        OVERLAP_SLOWDOWN,
        Window,
        allgather_s,
        price_fsdp,
        price_replicas,
        reduce_scatter_s,
    )
    from partitioner.plan import Mesh

    link = next(iter(LINKS.values()))
    mesh = Mesh(4, 1, ("dp", "pp"), 0)
    nbytes, m = 8 * 2**20, 4
    ag, rs = allgather_s(nbytes, 4, link), reduce_scatter_s(nbytes, 4, link)
    fast = Window(1.0, 1.1, (nbytes,), fwd=1e-6, bwd=2e-6, m=m)  # compute far shorter than the traffic
    times, step = price_fsdp(mesh, link, link, [[fast]], pipeline_step=1.1)
    assert times == [pytest.approx(m * (2 * ag + rs))]  # every micro-batch gathers twice and reduce-scatters
    assert step == pytest.approx(1.1 + m * (2 * ag + rs - 3e-6) + rs)  # the excess over compute, then the tail
    slow = Window(1.0, 1.1, (nbytes,), fwd=1.0, bwd=2.0, m=m)  # compute hides the traffic but the last reduction
    assert price_fsdp(mesh, link, link, [[slow]], pipeline_step=1.1, slowdown=0.0)[1] == pytest.approx(1.1 + rs)
    # hidden, the traffic still slows the compute beside it (1 + OVERLAP_SLOWDOWN times for as long as it runs)
    stretched = OVERLAP_SLOWDOWN / (1 + OVERLAP_SLOWDOWN)
    assert price_fsdp(mesh, link, link, [[slow]], pipeline_step=1.1)[1] == pytest.approx(
        1.1 + m * stretched * (2 * ag + rs) + rs)
    split = Window(1.0, 1.1, (nbytes,), fwd=1.0, bwd=2.0, m=m, split=True)  # once per step
    times, step = price_fsdp(mesh, link, link, [[split]], pipeline_step=1.1, slowdown=0.0)
    assert times == [pytest.approx(ag + rs)] and step == pytest.approx(1.1 + rs)
    assert price_fsdp(mesh, link, link, [[split]], pipeline_step=1.1)[1] == pytest.approx(1.1 + stretched * ag + rs)
    # ZeRO-1 all-reduces (2 (dp-1) steps) and gathers the weights back ((dp-1) steps): 3 (dp-1) steps in all;
    # per unit ZeRO-3 moves m x 3 (dp-1) steps
    zero1, _ = price_replicas(mesh, 1, link, link, [[fast]], [nbytes], 1.1)
    assert zero1 == [pytest.approx(2 * ag + rs)] and times[0] < zero1[0] < price_fsdp(mesh, link, link, [[fast]], 1.1)[0][0]
    # gradients reduce-scattered at twice the gathered width (fp32 under bf16-mixed): the scatter moves twice the bytes
    rs32 = reduce_scatter_s(2 * nbytes, 4, link)
    times, step = price_fsdp(mesh, link, link, [[split]], pipeline_step=1.1, slowdown=0.0, reduce_scale=2.0)
    assert rs32 > rs and times == [pytest.approx(ag + rs32)] and step == pytest.approx(1.1 + rs32)


def test_bf16_mixed_fsdp_plan_prices_fp32_reduce_scatters() -> None:
    """The runtime's FSDP policy reduce-scatters fp32 gradients under bf16-mixed (and gathers
    bf16 weights): the plan prices the scatter at 4 bytes a parameter, the gather at 2."""
    from partitioner import partition
    from partitioner.data_parallel import price_fsdp
    from partitioner.examples import gpt_example

    model, (idx,) = gpt_example(batch=4, seq=8, n_layer=2)
    calls: list[float] = []
    real = price_fsdp

    def spy(*a, **k):  # type: ignore[no-untyped-def]
        calls.append(k.get("reduce_scale", 1.0))
        return real(*a, **k)

    with pytest.MonkeyPatch.context() as mp:
        import partitioner.data_parallel as dp

        mp.setattr(dp, "price_fsdp", spy)
        for precision, want in (("bf16-mixed", 2.0), ("fp32", 1.0)):
            calls.clear()
            partition(model, example_inputs=(idx,), n_gpus=2, data_parallel=2, zero=3, precision=precision,
                      optimizer="adamw")
            assert calls and set(calls) == {want}, (precision, calls)


def test_partition_prices_zero3_from_the_graph() -> None:
    from partitioner.plan import load_plan

    x, _, _ = data("gpt", BATCH)
    plans = {(3, 2, s): _pipe(s)[1].plan for s in ("1f1b", "zb-h1")}  # shared with the training tests
    for zero in (1, 3):
        torch.manual_seed(0)
        plans[zero, 4, "1f1b"] = partition(FIXTURES["gpt"].build(), n_gpus=8, data_parallel=4, example_inputs=(x,),
                                           n_microbatches=2, pinned_cuts=["transformer.h.2"], zero=zero).plan
    static = {k: [st.cost.static_bytes for st in p.stages] for k, p in plans.items()}
    for s in range(2):  # the shards shrink with the replicas; at dp=4 below ZeRO-1, which keeps whole weights
        assert static[3, 2, "1f1b"][s] > static[3, 4, "1f1b"][s]
        assert static[3, 4, "1f1b"][s] < static[1, 4, "1f1b"][s]
        assert static[3, 2, "zb-h1"][s] > static[3, 2, "1f1b"][s]  # a split backward holds the stage gathered
    comm = {k: p.mesh.allreduce_s for k, p in plans.items()}
    for r in range(2):  # ZeRO-1: an all-reduce (2 ring steps) + the weights' gather (1 step) per step; ZeRO-3
        # per unit: 2 micro-batches x (2 gathers + 1 reduce-scatter) = twice that; per step (zb-h1): 2 steps
        assert comm[3, 4, "1f1b"][r] == pytest.approx(2 * comm[1, 4, "1f1b"][r], rel=1e-6)
        assert comm[3, 2, "zb-h1"][r] == pytest.approx(comm[3, 2, "1f1b"][r] / 3, rel=1e-6)
    p = plans[3, 4, "1f1b"]
    assert p.mesh.zero == 3 and p.options["zero"] == 3 and 0 < p.mesh.exposed_s
    assert load_plan(p.to_json()).mesh.zero == 3  # the schema takes zero=3


def test_zero_must_be_0_1_or_3() -> None:
    from partitioner import PartitionError

    with pytest.raises(PartitionError, match=r"zero must be 0 or 1 \(ZeRO-1.*\) or 3 \(FSDP"):
        partition(FIXTURES["gpt"].build(), n_gpus=4, data_parallel=2, example_inputs=(data("gpt", BATCH)[0],), zero=2)


def _odd_train(rank: int, world: int, pipe: Any, schedule: str, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    from torch.distributed.tensor import DTensor

    stage = pipe.build_stage(rank, "cpu")
    opt = stage.optimizer(torch.optim.SGD, lr=LR)
    runner = stage.runner(schedule, loss_fn=torch.nn.functional.mse_loss)
    for _ in range(STEPS):
        stage.zero_grad()
        runner.step(x if stage.is_first else None, target=y if stage.is_last else None)
        stage.clip_grad_norm_(0.1)
        opt.step()
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for n, p in stage.named_parameters()}


@pytest.mark.parametrize("schedule", ["1f1b", "zb-h1"])
def test_uneven_shards_train_like_one_process(schedule: str) -> None:
    """Dims that do not divide by the replicas (7, 9, 5, a bias of 1): FSDP pads the last
    shard; the norm over local shards and the reduce-scatter must not count the padding."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, 9), torch.nn.Tanh(), torch.nn.Linear(9, 5), torch.nn.Tanh(),
                                torch.nn.Linear(5, 1))
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(BATCH, 7, generator=g), torch.randn(BATCH, 1, generator=g)
    pipe = partition(model, n_gpus=4, data_parallel=2, example_inputs=(x,), schedule=schedule, n_microbatches=2,
                     pinned_cuts=["2"], zero=3)
    want = sgd_reference(model, x, y, torch.nn.functional.mse_loss, steps=STEPS, max_norm=0.1).params
    got: dict[str, torch.Tensor] = {}
    for r in spawn(_odd_train, 4, pipe, schedule, x, y, timeout_s=TIMEOUT_S):
        got.update(r)
    assert set(got) == set(want)
    for n, v in got.items():
        torch.testing.assert_close(v, want[n], rtol=RTOL, atol=ATOL, msg=lambda m, n=n: f"{n}: {m}")


# -- mixed precision ---------------------------------------------------------------------------

def _mixed_reference(model: torch.nn.Module, dtype: torch.dtype, microbatches: int, growth_interval: int = 0,
                     init_scale: float = 2.0**16) -> dict[str, Any]:
    """One process under the recipe ``tests/runtime/test_precision.reference`` runs (the model
    cast to ``dtype`` under pricing's dtype swap, gradients accumulated over the micro-batches
    in ``dtype``, fp32 masters stepped by AdamW; with ``growth_interval``, fp16's
    ``torch.amp.GradScaler`` on the masters), with the masters' gradients clipped."""
    from partitioner.passes.shape_prop import OnDevice
    from tests.runtime import test_precision as tp

    ref = copy.deepcopy(model)
    x, y = tp._data()
    named = dict(ref.named_parameters())
    masters = {n: p.detach().to(torch.float32, copy=True) for n, p in named.items()}
    ref.to(dtype)
    opt = torch.optim.AdamW(list(masters.values()), lr=tp.LR)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=growth_interval) \
        if growth_interval else None
    losses, norms, scales = [], [], []
    for _ in range(tp.STEPS):
        for p in named.values():
            p.grad = None
        loss = torch.zeros(())
        for xs, ys in zip(x.chunk(microbatches), y.chunk(microbatches)):
            with OnDevice(torch.device("cpu"), (torch.float32, dtype)):
                out = ref(xs)
            part = tp.loss_fn(out, ys) / microbatches
            (scaler.scale(part) if scaler is not None else part).backward()
            loss = loss + part.detach()
        for n, p in named.items():
            masters[n].grad = p.grad.float()
        if scaler is not None:
            scaler.unscale_(opt)
        norms.append(torch.nn.utils.clip_grad_norm_(list(masters.values()), MIXED_CLIP).item())
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
            scales.append(scaler.get_scale())
        else:
            opt.step()
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(masters[n])
        losses.append(loss.item())
    by_name = dict(masters)
    for n, p in ref.named_parameters(remove_duplicate=False):  # tied names
        by_name.setdefault(n, next(masters[m] for m, q in named.items() if q is p))
    moments = {n: opt.state[masters[n]]["exp_avg"] for n in named if masters[n] in opt.state}
    return {"losses": losses, "norms": norms, "masters": by_name, "scales": scales, "exp_avg": moments}


MIXED_CLIP = 1.0  # below the tiny Llama's gradient norm (about 2.7 .. 4): every step is clipped


def _mixed_train(rank: int, world: int, pipe: Any, growth_interval: int = 0) -> dict[str, Any]:
    from torch.distributed.tensor import DTensor

    from tests.runtime import test_precision as tp

    x, y = tp._data()
    stage = pipe.build_stage(rank, "cpu")
    if growth_interval:
        stage.loss_scaler.growth_interval = growth_interval
    opt = stage.optimizer(torch.optim.AdamW, lr=tp.LR)
    scales, skipped = [], []
    runner = stage.runner("1f1b", loss_fn=tp.loss_fn)
    losses, norms = [], []
    for _ in range(tp.STEPS):
        opt.zero_grad()
        loss = runner.step(x if stage.is_first else None, target=y if stage.is_last else None,
                           loss_on_every_rank=True)
        losses.append(loss.item())
        norms.append(stage.clip_grad_norm_(MIXED_CLIP).item())
        opt.step()
        scales.append(getattr(opt, "scale", None))
        skipped.append(getattr(opt, "skipped", 0))
    state = opt.state
    moments = {n: state[p]["exp_avg"].full_tensor() for n, p in stage.named_parameters() if p in state}
    from partitioner.runtime.fsdp import _fsdp_params

    # the dtype FSDP gathers each parameter in for compute (None: its own)
    gathered = {str(fp.param_dtype) for mod in stage.modules.values() for fp in _fsdp_params(mod).values()}
    return {"losses": losses, "norms": norms, "opt": type(opt).__name__, "forward_dtypes": gathered,
            "scales": scales, "skipped": skipped, "exp_avg": moments,
            "held": {str(p.dtype) for p in stage.parameters()} | {str(p.grad.dtype) for p in stage.parameters()
                                                                  if p.grad is not None},
            "sharded": all(isinstance(p, DTensor) for p in stage.parameters()),
            "masters": {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
                        for n, p in stage.named_parameters(remove_duplicate=False)}}


def test_fsdp_bf16_mixed_trains_like_one_process_under_the_same_recipe() -> None:
    """PP2 x FSDP2, precision="bf16-mixed": FSDP's MixedPrecisionPolicy gathers the fp32
    shards (the masters) as bf16 and reduce-scatters the gradients in fp32. Against one
    process under the same recipe (tests/runtime/test_precision.py's, with clipping), with its
    tolerances: losses at rtol 1e-2 (norms 2e-2), the masters' mean absolute difference at most
    LR / 20 (LR / 4 per tensor); and against an fp32 run only loosely (losses at 5e-2)."""
    from tests.runtime import test_precision as tp

    torch.manual_seed(0)
    model = tp.TinyLlama()
    x, _ = tp._data()
    pipe = partition(model, n_gpus=4, data_parallel=2, zero=3, example_inputs=(x,), precision="bf16-mixed",
                     schedule="1f1b", n_microbatches=2, pinned_cuts=["blocks.2"], optimizer="adamw")
    assert pipe.plan.tied_parameters  # the embedding and head: a copy on each pipeline rank
    results = spawn(_mixed_train, 4, pipe, timeout_s=TIMEOUT_S)
    want = _mixed_reference(model, torch.bfloat16, microbatches=4)
    fp32 = _mixed_reference(model, torch.float32, microbatches=4)
    assert min(want["norms"]) > MIXED_CLIP
    for r in results:
        assert r["opt"] == "AdamW" and r["sharded"]  # an optimizer over the fp32 shards: no separate masters
        assert r["held"] == {"torch.float32"}  # shards and their gradients in fp32
        assert r["forward_dtypes"] == {"torch.bfloat16"}  # gathered for compute in bf16
        assert r["losses"] == pytest.approx(want["losses"], rel=1e-2)
        assert r["losses"] == pytest.approx(fp32["losses"], rel=5e-2)
        # AdamW moves elements whose gradient is at bf16's rounding level either way (see
        # test_precision), and FSDP sums the micro-batches' gradients in fp32 where the
        # reference sums them in bf16: by the third step the norms differ by about 1.2 %
        assert r["norms"] == pytest.approx(want["norms"], rel=2e-2)
        total, count = 0.0, 0
        for n, m in r["masters"].items():
            diff = (m - want["masters"][n]).abs()
            assert diff.mean().item() <= tp.LR / 4 and diff.max().item() <= 2 * tp.LR * tp.STEPS, n
            total, count = total + diff.sum().item(), count + diff.numel()
            if m.numel() > 64:
                assert not torch.equal(m, m.to(torch.bfloat16).float()), f"{n}: the master holds bf16 values only"
        assert total / count <= tp.LR / 20, total / count  # measured about LR / 30
        # nearer the same recipe than fp32 training (measured LR / 21 from fp32): it ran in bf16
        off32 = sum((m - fp32["masters"][n]).abs().sum().item() for n, m in r["masters"].items()) / count
        assert total / count < 0.8 * off32, (total / count, off32)
    assert set().union(*(r["masters"] for r in results)) == set(want["masters"])
    moved = max((want["masters"][n] - p.detach()).abs().max().item() for n, p in model.named_parameters())
    assert moved > 2 * tp.LR  # the masters moved: the comparison has teeth


def test_fsdp_fp16_mixed_scales_the_loss_like_grad_scaler_and_clips() -> None:
    """PP2 x FSDP2, precision="fp16-mixed": gathered in fp16, the fp32 shards' gradients
    carry the loss scale, which the optimizer takes out (one verdict for the job). The first
    step's fp16 gradients overflow at the initial scale (the embedding's): skipped on every
    rank, as GradScaler skips it in one process, the clipping norm inf on both sides; the scale
    halves, then doubles after each clean step (growth_interval=1), the clean steps' norms
    equal. Masters compared as in the bf16 test."""
    from tests.runtime import test_precision as tp

    torch.manual_seed(0)
    model = tp.TinyLlama()
    x, _ = tp._data()
    pipe = partition(model, n_gpus=4, data_parallel=2, zero=3, example_inputs=(x,), precision="fp16-mixed",
                     schedule="1f1b", n_microbatches=2, pinned_cuts=["blocks.2"], optimizer="adamw")
    results = spawn(_mixed_train, 4, pipe, 1, timeout_s=TIMEOUT_S)
    # Each replica's fp16 gradients are its own batch's mean, dp times the one-process share of
    # the global mean (the replicas average after the backward, as DDP does): the same values
    # in fp16, so the same overflows, come from the reference at dp times the scale.
    want = _mixed_reference(model, torch.float16, microbatches=4, growth_interval=1, init_scale=2.0**17)
    assert want["scales"] == [2.0**16, 2.0**17, 2.0**18]  # step 0 skipped, then two clean steps
    for r in results:
        assert r["opt"] == "MixedPrecisionOptimizer" and r["forward_dtypes"] == {"torch.float16"}
        assert r["held"] == {"torch.float32"}
        assert [2 * s for s in r["scales"]] == want["scales"] and r["skipped"] == [1, 1, 1]
        assert r["losses"] == pytest.approx(want["losses"], rel=1e-2)
        assert r["norms"][1:] == pytest.approx(want["norms"][1:], rel=1e-2)
        assert r["norms"][0] == want["norms"][0] == float("inf")
        # AdamW's step hardly depends on the gradients' scale, its first moment does: unscaled
        for n, v in r["exp_avg"].items():
            ref = want["exp_avg"][n if n in want["exp_avg"] else "emb.weight"]  # the tie's one tensor
            assert (v - ref).abs().mean() <= 0.1 * ref.abs().mean(), n
        total, count = 0.0, 0
        for n, m in r["masters"].items():
            diff = (m - want["masters"][n]).abs()
            assert diff.mean().item() <= tp.LR / 4 and diff.max().item() <= 2 * tp.LR * tp.STEPS, n
            total, count = total + diff.sum().item(), count + diff.numel()
        assert total / count <= tp.LR / 20, total / count
    assert set().union(*(r["masters"] for r in results)) == set(want["masters"])
