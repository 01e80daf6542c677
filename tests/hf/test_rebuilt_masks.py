"""A tensor made from sizes alone crosses no cut: the stage that uses it rebuilds it.

A Hugging Face decoder captured with ``torch.export`` builds its causal mask, a (B, 1, S, S)
bool tensor, from the input's sizes. Every stage after the first used to receive it
(B * S^2 bytes per cut and micro-batch); now the split copies the nodes that make it into each
stage that reads it, and the integer sizes cross instead (``passes.liveness.rebuilt_values``).

Each case is planned twice, as it is now and with nothing rebuilt (``_sent``: what earlier
plans did), and compared: the plan's boundaries and routes lose exactly the mask, the priced
bytes drop by B * S^2 per cut and equal what the runtime sends, the pipeline trains like the
unpartitioned model, and a plan written before still loads and runs. A mask that reads data
(BERT's or Llama's padding ``attention_mask``) and the rotary tables (read from a buffer) are
still sent.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable, Iterator

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers", reason="the Hugging Face tests need `pip install transformers`")

from partitioner import partition  # noqa: E402
from partitioner.passes import liveness  # noqa: E402
from partitioner.passes.meta import ATTENTION  # noqa: E402
from partitioner.plan import load_plan  # noqa: E402
from partitioner.runtime import local  # noqa: E402
from partitioner.simulator import boundary_bytes  # noqa: E402
from tests.hf import models as hf_models  # noqa: E402
from tests.hf import zoo  # noqa: E402
from tests.runtime.helpers import pipe_sgd_losses, sgd_reference  # noqa: E402

BATCH, SEQ, M = 4, 16, 2
VOCAB = min(hf_models.VOCAB, zoo.VOCAB)  # token ids every case embeds

# name -> (builder, pinned cuts): GQA (Llama 2 K/V heads of 4, Qwen2 1 of 4) and GPT-2 (no GQA)
CASES: dict[str, tuple[Callable[[], torch.nn.Module], list[str]]] = {
    "llama": (lambda: hf_models.llama(2), ["model.layers.1"]),
    "llama-3": (lambda: hf_models.llama(3), ["model.layers.1", "model.layers.2"]),
    "qwen2": (zoo.ZOO["qwen2"].build, ["model.layers.1"]),
    "gpt2": (lambda: hf_models.gpt2(2), ["transformer.h.1"]),
}


@contextlib.contextmanager
def _sent() -> Iterator[None]:
    """Plan as before: every value crossing a cut is sent, none rebuilt."""
    real = liveness.rebuilt_values
    liveness.rebuilt_values = lambda gm: {}  # type: ignore[assignment]
    try:
        yield
    finally:
        liveness.rebuilt_values = real  # type: ignore[assignment]


def _data() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return ({"input_ids": torch.randint(3, VOCAB, (BATCH, SEQ), generator=g)},
            torch.randint(3, VOCAB, (BATCH, SEQ), generator=g))


def _loss(out: Any, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.logits.flatten(0, 1), y.flatten())


def _plan(name: str, sent: bool = False, inputs: dict[str, torch.Tensor] | None = None) -> tuple[torch.nn.Module, Any]:
    build, cuts = CASES[name]
    torch.manual_seed(0)
    model = build()
    with _sent() if sent else contextlib.nullcontext():
        pipe = partition(model, len(cuts) + 1, inputs or _data()[0], device="cpu", link="loopback",
                         pinned_cuts=cuts, n_microbatches=M)
    return model, pipe


def _square(shape: tuple[Any, ...]) -> bool:
    """A plan's shape ending in S x S."""
    return len(shape) >= 2 and tuple(shape[-2:]) == ("S", "S")


def _square_val(node: Any) -> bool:
    """A graph value ending in a symbolic S x S matrix."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() < 2:
        return False
    a, b = val.shape[-2:]
    return not isinstance(a, int) and str(a) == str(b)


def _sent_bytes(pipe: Any, inputs: dict[str, torch.Tensor], y: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> int:
    """Bytes the in-process runtime moves in one training step (activations and gradients)."""
    made: list[Any] = []
    real = local._transport

    def spy(comm: str, n_ranks: int) -> Any:
        made.append(real(comm, n_ranks))
        return made[-1]

    monkeypatch.setattr(local, "_transport", spy)
    pipe.train_step(**inputs, target=y, loss_fn=_loss, n_microbatches=M)
    monkeypatch.undo()
    assert len(made) == 1
    return int(made[0].bytes_sent)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(CASES))
def test_the_causal_mask_is_rebuilt_by_the_stage_that_uses_it_not_sent(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model, pipe = _plan(name)
    _, before = _plan(name, sent=True)
    plan, old = pipe.plan, before.plan
    micro = plan.prediction.microbatch_size
    assert old.prediction.microbatch_size == micro == BATCH // M
    # before: every cut carried the (B, 1, S, S) bool mask; now none does, nor any route
    masks = [[v for v in b.values if _square(v.shape)] for b in old.boundaries]
    assert all(len(m) == 1 and m[0].dtype == "bool" and m[0].bytes == "B*S^2" for m in masks), masks
    assert not [v.name for b in plan.boundaries for v in b.values if _square(v.shape)]
    assert not [r.name for r in plan.routes if _square(r.shape)]
    assert any(_square(r.shape) for r in old.routes)
    for s, st in enumerate(plan.stages):
        assert not [n for n in st.inputs + st.outputs if n in {m[0].name for m in masks}]
        assert st.nodes == old.stages[s].nodes  # the same cuts
    # what else crosses is unchanged: the sizes it is made from crossed already (the layers'
    # reshapes read them), the rotary tables (made from a buffer) are still sent
    for a, b, m in zip(old.boundaries, plan.boundaries, masks):
        assert [v for v in a.values if v.name != m[0].name] == list(b.values)
        assert any(v.kind == "int" for v in b.values)
        # the price drops by one bool per query-key pair: B * S^2 at the micro-batch size
        assert a.bytes - b.bytes == micro * SEQ * SEQ
    if name.startswith(("llama", "qwen2")):
        assert all(sum(v.kind == "tensor" and not v.requires_grad and v.shape[0] == 1 for v in b.values) == 2
                   for b in plan.boundaries)  # cos and sin, (1, S, head_dim), from inv_freq
    # each later stage makes the mask again from the sizes it receives
    for s in range(1, len(pipe.stages)):
        g = pipe.stages[s].graph
        assert not [n for n in g.nodes if n.op == "placeholder" and _square_val(n)]
        assert [n for n in before.stages[s].graph.nodes if n.op == "placeholder" and _square_val(n)]
        made = [n for n in g.nodes if n.op == "call_function" and n.name in {m[0].name for m in masks}]
        assert len(made) == 1 and _square_val(made[0]) and made[0].name not in plan.stages[s].nodes
        # made up front, right after the inputs (outside every layer: recompute regions and FSDP's
        # outlining take a layer's nodes as one run)
        ops = [n for n in g.nodes if n.op not in ("placeholder", "get_attr", "output")]
        again = [i for i, n in enumerate(ops) if n.name not in set(plan.stages[s].nodes)]
        assert again == list(range(len(again))) and ops[len(again) - 1] is made[0], [n.name for n in ops[:60]]
    # the price is what the runtime sends: the plan's boundary bytes (and gradients) per
    # micro-batch, each value once to each stage that uses it; before, the masks besides
    inputs, y = _data()
    fwd, grad = boundary_bytes(plan.boundaries, micro, SEQ)
    sent = _sent_bytes(pipe, inputs, y, monkeypatch)
    assert sent == M * (sum(fwd) + sum(grad)), (sent, fwd, grad)
    assert _sent_bytes(before, inputs, y, monkeypatch) - sent == M * len(masks) * micro * SEQ * SEQ


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ["llama-3", "qwen2", "gpt2"])
def test_a_pipeline_rebuilding_the_mask_trains_like_the_unpartitioned_model(name: str) -> None:
    model, pipe = _plan(name)
    assert not [v for b in pipe.plan.boundaries for v in b.values if _square(v.shape)]
    init = copy.deepcopy(model.state_dict())
    inputs, y = _data()
    ref = sgd_reference(model, inputs, y, _loss, steps=3, lr=0.1, init=init)
    model.load_state_dict(init)
    losses = pipe_sgd_losses(pipe, model, inputs, y, _loss, steps=3, m=M, lr=0.1)
    # every stage proved the mask it made causal and runs the fused kernel
    assert all(st.meta[ATTENTION]["fused"] and not st.meta[ATTENTION]["explicit"] for st in pipe.stages)
    assert losses == pytest.approx(ref.losses, rel=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), ref.params[n], rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")


@pytest.mark.timeout(300)
def test_a_plan_that_sends_the_mask_still_loads_and_runs() -> None:
    # a plan written before masks were rebuilt lists the mask in its boundaries and routes
    model, before = _plan("llama", sent=True)
    old = load_plan(before.plan.to_json())
    mask = [v.name for v in old.boundaries[0].values if _square(v.shape)]
    assert len(mask) == 1 and mask[0] in old.stages[1].inputs and mask[0] in {r.name for r in old.routes}
    init = copy.deepcopy(model.state_dict())
    inputs, y = _data()
    ref = sgd_reference(model, inputs, y, _loss, steps=2, lr=0.1, init=init)
    # its own stages (which receive the mask) still run: the receiving stage proves it causal
    # from the function of sizes recorded on its input (``mark_size_only``)
    for pipe in (before, old.apply(model)):
        model.load_state_dict(init)
        losses = pipe_sgd_losses(pipe, model, inputs, y, _loss, steps=2, m=M, lr=0.1)
        assert losses == pytest.approx(ref.losses, rel=1e-5)
        assert all(st.meta[ATTENTION]["fused"] for st in pipe.stages)
    # re-applied, it is planned as today: the same cuts, the mask rebuilt
    assert [st.nodes for st in pipe.plan.stages] == [st.nodes for st in old.stages]
    assert not [v for b in pipe.plan.boundaries for v in b.values if _square(v.shape)]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ["bert", "llama"])
def test_a_padding_mask_reads_data_and_is_still_sent(name: str) -> None:
    torch.manual_seed(0)
    case = hf_models.CASES[name]
    model = case.build(2)
    inputs = case.inputs(2, SEQ)
    assert "attention_mask" in inputs
    cut = [f"{case.block_prefix}1"]
    pipe = partition(model, 2, inputs, device="cpu", link="loopback", pinned_cuts=cut)
    with _sent():
        before = partition(model, 2, inputs, device="cpu", link="loopback", pinned_cuts=cut)
    assert pipe.plan.boundaries == before.plan.boundaries and pipe.plan.routes == before.plan.routes
    assert [v.name for v in pipe.plan.boundaries[0].values if _square(v.shape)]
