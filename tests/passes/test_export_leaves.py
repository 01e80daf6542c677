"""Data-dependent blocks through torch.export with ``leaf_modules``: the leaf runs eagerly as
one ``call_module`` node (output shapes from one real run on the example's sizes, static),
priced from one real run with ``FlopCounterMode``, with warnings naming it; the pipe trains
like the model in one process (n_microbatches=1: the leaf's shapes are the example's).

Two tiny blocks with the patterns of Hugging Face's DBRX (a loop over the experts a
``nonzero()`` found) and Longformer (``.any().item()`` branches, padding to the attention
window), which torch.export alone refuses with ``GuardOnDataDependentSymNode``.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from partitioner import load_plan, partition
from partitioner.cost_models.errors import PartitionError
from partitioner.passes.annotate import REAL_RUN
from partitioner.passes.meta import COST

D, E = 16, 4


class Experts(nn.Module):
    """DBRX's pattern: only the experts some token was routed to run (``nonzero()``)."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(E, D, 2 * D) * 0.1)
        self.w2 = nn.Parameter(torch.randn(E, 2 * D, D) * 0.1)

    def forward(self, x: torch.Tensor, top_idx: torch.Tensor, top_w: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        mask = F.one_hot(top_idx, E).permute(2, 1, 0)
        for hit in torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero():
            e = int(hit[0])
            slot, tok = torch.where(mask[e])
            h = F.gelu(x[tok] @ self.w1[e]) @ self.w2[e]
            out = out.index_add(0, tok, h * top_w[tok, slot, None])
        return out


class MoE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.router = nn.Linear(D, E)
        self.experts = Experts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        flat = x.reshape(-1, d)
        top_w, top_idx = self.router(flat).softmax(-1).topk(2, dim=-1)
        return x + self.experts(flat, top_idx, top_w).reshape(b, s, d)


class DbrxLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(D, D)
        self.blocks = nn.ModuleList(MoE() for _ in range(2))
        self.head = nn.Linear(D, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class WindowAttention(nn.Module):
    """Longformer's pattern: masks only when some token is padding, pads to the window."""

    def __init__(self, window: int = 4) -> None:
        super().__init__()
        self.window = window
        self.qkv = nn.Linear(D, 3 * D)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if (mask == 0).any().item():
            x = x * mask[..., None].to(x.dtype)
        s = x.shape[1]
        pad = (-s) % self.window
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
        q, k, v = self.qkv(x).chunk(3, -1)
        b, n, d = q.shape
        q, k, v = (t.reshape(b, n // self.window, self.window, d) for t in (q, k, v))
        att = (q @ k.transpose(-1, -2) / d ** 0.5).softmax(-1)
        return (att @ v).reshape(b, n, d)[:, :s]


class LongformerLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(32, D)
        self.layers = nn.ModuleList(WindowAttention() for _ in range(2))
        self.ffn = nn.ModuleList(nn.Linear(D, D) for _ in range(2))
        self.head = nn.Linear(D, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.emb(input_ids)
        for att, ffn in zip(self.layers, self.ffn):
            x = x + att(x, attention_mask)
            x = x + torch.relu(ffn(x))
        return self.head(x)


def _dbrx() -> tuple[nn.Module, dict[str, Any], type]:
    return DbrxLike(), {"x": torch.randn(4, 6, D)}, Experts


def _longformer() -> tuple[nn.Module, dict[str, Any], type]:
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[0, 4:] = 0  # one padded row: the masking branch runs
    return LongformerLike(), {"input_ids": torch.randint(0, 32, (4, 6)), "attention_mask": mask}, WindowAttention


CASES: dict[str, Callable[[], tuple[nn.Module, dict[str, Any], type]]] = {"dbrx": _dbrx, "longformer": _longformer}


@pytest.mark.parametrize("name", sorted(CASES))
def test_torch_export_alone_refuses_and_names_the_leaf_to_pass(name: str) -> None:
    torch.manual_seed(0)
    model, inputs, leaf = CASES[name]()
    with pytest.raises(PartitionError, match=rf"GuardOnDataDependentSymNode.*leaf_modules=\[{leaf.__name__}\]"):
        partition(model, 2, inputs, device="cpu", link="loopback", capture_route="export")


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_data_dependent_leaf_on_the_export_route_trains_like_one_process(name: str) -> None:
    torch.manual_seed(0)
    model, inputs, leaf = CASES[name]()
    ref = copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        pipe = partition(model, 2, inputs, device="cpu", link="loopback", capture_route="export",
                         leaf_modules=[leaf])
    said = " ".join(str(w.message) for w in seen)
    paths = [p for p, m in model.named_modules() if isinstance(m, leaf)]
    assert pipe.plan.capture == "export"
    assert all(f"{p!r}" in said for p in paths) and "run eagerly as one node" in said
    assert "priced from one real run" in said
    leaves = [n for n in pipe.graph.graph.nodes if n.op == "call_module" and str(n.target) in paths]
    assert [str(n.target) for n in leaves] == paths  # each leaf one node, no export op left behind
    assert not any("opaque_leaf" in str(n.target) for n in pipe.graph.graph.nodes)
    cost = leaves[0].meta[COST]
    assert cost.ops == (REAL_RUN,) and cost.fwd_flops > 0 and cost.bwd_flops > 0

    torch.testing.assert_close(pipe(**inputs), ref(**inputs))
    target = torch.randint(0, 3, (4, 6))

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.reshape(-1, 3), y.reshape(-1))

    loss = pipe.train_step(target=target, loss_fn=loss_fn, n_microbatches=1, **inputs)
    want = loss_fn(ref(**inputs), target)
    want.backward()
    torch.testing.assert_close(loss, want.detach())
    for (fqn, p), q in zip(model.named_parameters(), ref.parameters()):
        assert p.grad is not None and q.grad is not None, fqn
        torch.testing.assert_close(p.grad, q.grad, msg=lambda m: f"{fqn}: {m}")
    # the model is its own again: no forward left shadowed by the capture
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_a_plan_with_export_route_leaves_reapplies_byte_identical() -> None:
    """The plan stores the leaf's type as text; applying it captures the same leaf again."""
    torch.manual_seed(0)
    model, inputs, leaf = _dbrx()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = partition(model, 2, inputs, device="cpu", link="loopback", capture_route="export",
                         leaf_modules=[leaf])
        again = load_plan(pipe.plan.to_json()).apply(model, inputs)
    assert again.plan.to_json() == pipe.plan.to_json()
    torch.testing.assert_close(again(**inputs), model(**inputs))


class _Flagged(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, x: torch.Tensor, flag: bool) -> torch.Tensor:
        return self.b(x) if flag else self.a(x)


class _ComputesTheFlag(nn.Module):
    """Longformer's encoder pattern: the flag comes from ``.item()`` before the block."""

    def __init__(self, branch_here: bool = False) -> None:
        super().__init__()
        self.inp = nn.Linear(D, D)
        self.block = _Flagged()
        self.branch_here = branch_here

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        flag = (h > 0).any().item()
        if self.branch_here and flag:  # the model's own forward branches on data
            h = h * 2
        return self.block(h, flag)


def test_a_leaf_passed_a_value_from_tensor_data_is_refused_naming_its_callers() -> None:
    with pytest.raises(PartitionError, match=r"leaf module 'block' \(_Flagged\) is passed flag, a value computed "
                                             r"from tensor data.*make the module that computes it a leaf"):
        partition(_ComputesTheFlag(), 2, (torch.randn(4, D),), device="cpu", link="loopback",
                  capture_route="export", leaf_modules=[_Flagged])


def test_a_branch_in_the_models_own_forward_says_no_leaf_helps() -> None:
    with pytest.raises(PartitionError, match=r"in _ComputesTheFlag.forward itself, which no leaf module can cover"):
        partition(_ComputesTheFlag(branch_here=True), 2, (torch.randn(4, D),), device="cpu", link="loopback",
                  capture_route="export", leaf_modules=[_Flagged])
