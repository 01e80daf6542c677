"""Stages run attention as the plan priced it (``passes/attention.py``): the causal mask and the
K/V repeat that ``torch.export`` materialises in Hugging Face decoders become one fused
``scaled_dot_product_attention(is_causal=True, enable_gqa=True)`` call where the mask is
provably causal at the size at hand, and the captured computation elsewhere.

Every case compares the rewritten stages with the captured ones (deep copies, same weights):
outputs and input/parameter gradients within float32 rounding (the CPU kernels sum in another
order with and without a mask), and counts what is left in the graph.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import fx

pytest.importorskip("transformers", reason="the Hugging Face tests need `pip install transformers`")

from partitioner import partition  # noqa: E402
from partitioner.passes.attention import SDPA_TARGETS, FusedAttention, is_causal_mask, rewrite_attention  # noqa: E402
from partitioner.passes.meta import ATTENTION  # noqa: E402
from tests.fixtures.models import FIXTURES  # noqa: E402
from tests.hf import models as hf_models  # noqa: E402
from tests.hf import zoo  # noqa: E402
from tests.runtime.helpers import pipe_sgd_losses, sgd_reference  # noqa: E402

RTOL, ATOL = 1e-5, 1e-6
WINDOW = 8  # the Mistral case's sliding window, below the captured sequence length


def _mistral_window() -> torch.nn.Module:
    import transformers

    cfg = transformers.MistralConfig(**{**zoo._LLAMA_LIKE, "sliding_window": WINDOW})
    return transformers.MistralForCausalLM(cfg).eval()


# name -> (builder, batch, seq, cut, GQA?)
CASES: dict[str, tuple[Any, int, int, str, bool]] = {
    "llama": (lambda: hf_models.llama(2), 2, 16, "model.layers.1", True),
    "qwen2": (zoo.ZOO["qwen2"].build, 2, 16, "model.layers.1", True),
    "mistral-window": (_mistral_window, 2, 16, "model.layers.1", True),
    "gpt2": (lambda: hf_models.gpt2(2), 2, 16, "transformer.h.1", False),
}


@functools.cache
def _pipe(name: str, padded: bool = False) -> tuple[torch.nn.Module, Any]:
    build, b, s, cut, _ = CASES[name]
    torch.manual_seed(0)
    model = build()
    pipe = partition(model, 2, _inputs(name, b, s, padded), device="cpu", link="loopback", pinned_cuts=[cut])
    return model, pipe


def _inputs(name: str, b: int, s: int, padded: bool = False) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 100, (b, s), generator=torch.Generator().manual_seed(s))
    if not padded:
        return {"input_ids": ids}
    mask = torch.ones(b, s, dtype=torch.long)
    mask[0, s - 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _stages(name: str, padded: bool = False) -> tuple[Any, list[fx.GraphModule], list[fx.GraphModule]]:
    """(pipe, captured stage copies, rewritten stage copies); the pipe's own stages untouched."""
    _, pipe = _pipe(name, padded)
    captured = [copy.deepcopy(st) for st in pipe.stages]
    rewritten = [copy.deepcopy(st) for st in pipe.stages]
    for st in rewritten:
        rewrite_attention(st)
    return pipe, captured, rewritten


def _run(pipe: Any, stages: list[fx.GraphModule], inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """Output logits and every parameter's gradient of a sum-of-squares loss."""
    for st in stages:
        st.zero_grad(set_to_none=True)
    vals: Any = pipe.flatten_inputs((), inputs)
    for st in stages:
        vals = st(*vals)
    out = vals[0]
    (out.float() ** 2).mean().backward()
    grads = {f"{i}.{n}": p.grad.clone() for i, st in enumerate(stages) for n, p in st.named_parameters()
             if p.grad is not None}
    return out.detach(), grads


def _assert_same(a: tuple[torch.Tensor, dict], b: tuple[torch.Tensor, dict]) -> None:
    torch.testing.assert_close(a[0], b[0], rtol=RTOL, atol=ATOL)
    assert a[1].keys() == b[1].keys() and a[1]
    for k in a[1]:
        torch.testing.assert_close(a[1][k], b[1][k], rtol=RTOL, atol=ATOL, msg=lambda m: f"{k}: {m}")


def _sites(st: torch.nn.Module) -> list[FusedAttention]:
    return [m for m in st.modules() if isinstance(m, FusedAttention)]


def _masked_sdpa(st: fx.GraphModule) -> list[fx.Node]:
    return [n for n in st.graph.nodes if n.op == "call_function" and n.target in SDPA_TARGETS
            and (len(n.args) > 3 and n.args[3] is not None or n.kwargs.get("attn_mask") is not None)]


def _repeats(st: fx.GraphModule) -> list[fx.Node]:
    """``expand`` nodes with five dims (K/V heads x repeats): what repeat_kv leaves."""
    return [n for n in st.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.expand.default
            and len(n.args[1]) == 5]


def _square(n: fx.Node) -> bool:
    """Whether ``n``'s value ends in a symbolic S x S matrix (the materialised mask)."""
    val = n.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() < 2:
        return False
    a, b = val.shape[-2:]
    return not isinstance(a, int) and str(a) == str(b)


def _square_masks(st: fx.GraphModule) -> list[fx.Node]:
    """Compute nodes whose value ends in a symbolic S x S matrix (the materialised mask)."""
    return [n for n in st.graph.nodes if n.op == "call_function" and _square(n)]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2"])
def test_decoder_attention_runs_fused_and_equals_the_captured_graph(name: str) -> None:
    pipe, captured, rewritten = _stages(name)
    gqa = CASES[name][4]
    reports = [st.meta[ATTENTION] for st in rewritten]
    assert all(r["fused"] and not r["explicit"] for r in reports), reports
    for st in rewritten:
        assert not _masked_sdpa(st)  # no attention node takes a mask
        assert not _repeats(st)  # nor repeated K/V
        assert all(site.repeat == gqa and site.check_fn is not None for site in _sites(st))
    if gqa:
        assert all(_repeats(st) for st in captured)
    # no stage receives the mask: stage 1 makes it again from the sizes it receives, as stage 0
    # makes it; after the rewrite only the fused calls take it (for sizes that fall back), and
    # where one layer read it, it is gone: the fused call makes it for a fallback (``mask_fn``)
    for cap, st in zip(captured, rewritten):
        assert _square_masks(cap) and not [n for n in cap.graph.nodes if n.op == "placeholder" and _square(n)]
        made = _square_masks(st)
        assert all(u in made or u.op == "call_module" or "assert" in str(u.target) for n in made for u in n.users)
        assert made or all(site.mask_fn is not None for site in _sites(st))
    # the causal check ran for the example size and passed
    for b, s in [(2, 16), (1, 5)]:  # another batch and length: checked again, cached per size
        inputs = _inputs(name, b, s)
        _assert_same(_run(pipe, captured, inputs), _run(pipe, rewritten, inputs))
    for st in rewritten:
        for site in _sites(st):
            assert len(site.verdicts) == 2 and all(site.verdicts.values())


@pytest.mark.timeout(240)
def test_sliding_window_is_fused_below_the_window_and_falls_back_above_it() -> None:
    pipe, captured, rewritten = _stages("mistral-window")
    assert all(st.meta[ATTENTION]["fused"] for st in rewritten)
    for s in (WINDOW - 2, WINDOW, 16):
        inputs = _inputs("mistral-window", 2, s)
        _assert_same(_run(pipe, captured, inputs), _run(pipe, rewritten, inputs))
    for st in rewritten:
        for site in _sites(st):
            by_len = {key[1]: ok for key, ok in site.verdicts.items()}
            assert by_len == {WINDOW - 2: True, WINDOW: True, 16: False}, by_len


@pytest.mark.timeout(240)
def test_a_padding_mask_is_left_as_captured() -> None:
    pipe, captured, rewritten = _stages("llama", padded=True)
    for st in rewritten:
        report = st.meta[ATTENTION]
        assert report["explicit"] and not report["fused"] and not report["priced_fused"], report  # priced masked
        assert not _sites(st) and _masked_sdpa(st) and _repeats(st)
    inputs = _inputs("llama", 2, 16, padded=True)
    _assert_same(_run(pipe, captured, inputs), _run(pipe, rewritten, inputs))


def test_repository_fixtures_are_left_as_they_are() -> None:
    # the GPT and Llama examples call SDPA with is_causal=True and one K/V per head already
    for name in ("gpt", "llama"):
        torch.manual_seed(0)
        pipe = partition(FIXTURES[name].build(), example_inputs=FIXTURES[name].inputs(), n_gpus=1)
        before = [str(st.graph) for st in pipe.stages]
        reports = [rewrite_attention(st) for st in pipe.stages]
        assert reports == [{"fused": [], "explicit": [], "priced_fused": []}] * len(pipe.stages)
        assert [str(st.graph) for st in pipe.stages] == before


def test_the_causal_check_is_exact() -> None:
    s = 6
    tril = torch.ones(s, s, dtype=torch.bool).tril()
    assert is_causal_mask(tril, s, s) and is_causal_mask(tril.expand(2, 1, s, s), s, s)
    assert not is_causal_mask(tril, s, s + 1) and not is_causal_mask(tril[:-1], s - 1, s)
    assert not is_causal_mask(~tril, s, s) and not is_causal_mask(tril.T, s, s)
    window = tril & ~torch.ones(s, s, dtype=torch.bool).tril(-3)  # sliding window of 3
    assert not is_causal_mask(window, s, s)
    for fill in (float("-inf"), torch.finfo(torch.float32).min):
        f = torch.zeros(s, s).masked_fill(~tril, fill)
        assert is_causal_mask(f, s, s)
    half = torch.zeros(s, s, dtype=torch.float16).masked_fill(~tril, torch.finfo(torch.float16).min)
    assert is_causal_mask(half, s, s)
    alibi = torch.arange(s).float()[None, :] - torch.arange(s).float()[:, None]
    assert not is_causal_mask(alibi.masked_fill(~tril, float("-inf")), s, s)  # a bias on the diagonal's left
    assert not is_causal_mask(torch.zeros(s, s).masked_fill(~tril, -1e4), s, s)  # not a mask, a penalty


class _Toy(torch.nn.Module):
    """Attention whose mask the test chooses: built from sizes only, or read from an input."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.proj = torch.nn.Linear(8, 24)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.proj(x).view(b, s, 3, 2, 4).permute(2, 0, 3, 1, 4)
        i = torch.arange(s, device=x.device)
        causal = i[None, :] <= i[:, None]
        kw: dict[str, Any] = {}
        if self.kind == "alibi":  # shapes only, but other values than the causal mask
            mask = (i[None, :] - i[:, None]).float().masked_fill(~causal, float("-inf"))
        elif self.kind == "data":  # reads an input's values
            mask = causal & (bias[:, None, None, :] > 0)
        elif self.kind == "dropout":
            mask, kw = causal, {"dropout_p": 0.5}
        else:
            mask = causal
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kw)


@pytest.mark.parametrize("kind", ["causal", "alibi", "data", "dropout"])
def test_only_a_provably_causal_mask_is_fused(kind: str) -> None:
    torch.manual_seed(0)
    model = _Toy(kind)
    x, bias = torch.randn(2, 6, 8), torch.randn(2, 6)
    gm = torch.export.export(model, (x, bias)).module()
    ref = copy.deepcopy(gm)
    report = rewrite_attention(gm)
    sites = _sites(gm)
    if kind == "causal":
        assert report["fused"] and not report["explicit"]
    elif kind == "alibi":  # provably size-only: rewritten, but the check fails at every size
        assert report["fused"] and len(sites) == 1
    else:
        assert not report["fused"] and report["explicit"] and not sites
    if kind != "dropout":
        torch.testing.assert_close(gm(x, bias), ref(x, bias), rtol=RTOL, atol=ATOL)
    if kind == "alibi":
        assert list(sites[0].verdicts.values()) == [False]


def _loss(out: Any, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.logits.flatten(0, 1), y.flatten())


@pytest.mark.timeout(240)
def test_a_two_stage_pipeline_with_fused_attention_trains_like_one_process() -> None:
    build = CASES["llama"][0]
    torch.manual_seed(0)
    model = build()
    g = torch.Generator().manual_seed(3)
    inputs = {"input_ids": torch.randint(0, 256, (4, 16), generator=g)}
    y = torch.randint(0, 256, (4, 16), generator=g)
    init = copy.deepcopy(model.state_dict())
    pipe = partition(model, 2, inputs, device="cpu", link="loopback", pinned_cuts=["model.layers.1"])
    ref = sgd_reference(model, inputs, y, _loss, steps=3, lr=0.1, init=init)
    model.load_state_dict(init)
    losses = pipe_sgd_losses(pipe, model, inputs, y, _loss, steps=3, m=2, lr=0.1)
    # the runtime rewrote every stage's attention before running it
    assert all(st.meta[ATTENTION]["fused"] and _sites(st) for st in pipe.stages)
    assert losses == pytest.approx(ref.losses, rel=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), ref.params[n], rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")


@pytest.mark.timeout(240)
def test_blocks_outlined_for_fsdp_prove_the_mask_they_receive() -> None:
    # runtime.outline makes each decoder layer a call of its own graph: the mask becomes that
    # graph's input, which the rewrite records as made from sizes from the stage's graph
    from partitioner.runtime.outline import outline_blocks

    pipe, captured, _ = _stages("llama")
    outlined = [copy.deepcopy(st) for st in pipe.stages]
    for st in outlined:
        assert outline_blocks(st)
        report = rewrite_attention(st)
        assert len(report["fused"]) == 1 and not report["explicit"], report
        assert not any(isinstance(m, FusedAttention) for m in st.children())  # inside the layer's call
    for s in (16, 7):
        inputs = _inputs("llama", 2, s)
        _assert_same(_run(pipe, captured, inputs), _run(pipe, outlined, inputs))


class _FxToy(torch.nn.Module):
    """The fx route's view: the causal mask from ``x.size(1)``, optionally written in place
    with an input's data afterwards (the node the attention reads is the one made from sizes)."""

    def __init__(self, mutate: bool) -> None:
        super().__init__()
        self.mutate = mutate

    def forward(self, q: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        i = torch.arange(q.size(2))
        mask = i[:, None] >= i[None, :]
        if self.mutate:
            mask.logical_and_(keep)
        return F.scaled_dot_product_attention(q, q, q, attn_mask=mask)


@pytest.mark.parametrize("mutate", [False, True])
def test_a_mask_written_in_place_with_data_is_not_fused(mutate: bool) -> None:
    gm = fx.symbolic_trace(_FxToy(mutate))
    ref = copy.deepcopy(gm)
    report = rewrite_attention(gm)
    assert bool(report["fused"]) is not mutate and bool(report["explicit"]) is mutate
    q = torch.randn(2, 2, 5, 4)
    keep = torch.tensor([True, False, True, True, True])
    torch.testing.assert_close(gm(q, keep), ref(q, keep), rtol=RTOL, atol=ATOL)


class _BufferMask(torch.nn.Module):
    """A causal mask sliced from a registered buffer: no input's data reaches it, so the plan
    prices it as the fused causal kernel, but a buffer is state the proof does not read."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 24)
        self.register_buffer("tri", torch.ones(32, 32, dtype=torch.bool).tril())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.proj(x).view(b, s, 3, 2, 4).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.tri[:s, :s]).sum(1)


def test_a_mask_priced_fused_but_not_provable_is_reported() -> None:
    torch.manual_seed(0)
    model = _BufferMask()
    x = torch.randn(2, 6, 8)
    pipe = partition(model, example_inputs=(x,), n_gpus=1)
    (stage,) = pipe.stages
    ref = copy.deepcopy(stage)
    report = rewrite_attention(stage)
    assert not report["fused"] and report["explicit"] == report["priced_fused"] and report["explicit"], report
    torch.testing.assert_close(stage(x)[0], ref(x)[0], rtol=RTOL, atol=ATOL)
