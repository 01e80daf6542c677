"""Model factories for the CLI tests: ``tests/tools/tiny_models.py:mlp`` and friends.

Small on purpose: every CLI test pays for a fresh process that traces the model.
"""

from __future__ import annotations

import os

import torch
from torch import nn

__all__ = ["mlp", "wide_mlp", "skip", "broken", "not_a_pair", "residual", "residual_200", "wrong_inputs", "branchy",
           "leafy", "reuse", "fails_in_step_2"]


class Skip(nn.Module):
    """A residual that crosses a cut: the stage in between passes it through unchanged."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.d(self.c(torch.relu(self.b(h))) + h)


def mlp() -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    layers = [m for _ in range(4) for m in (nn.Linear(16, 16), nn.ReLU())]
    return nn.Sequential(*layers, nn.Linear(16, 4)), (torch.randn(8, 16),)


def wide_mlp() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """The same shape of model, wider: a 'model change' for plan diffs."""
    torch.manual_seed(0)
    layers = [m for _ in range(4) for m in (nn.Linear(16, 16), nn.ReLU())]
    layers[4] = nn.Linear(16, 16)
    return nn.Sequential(*layers, nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4)), (torch.randn(8, 16),)


def skip() -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    return Skip(), (torch.randn(8, 16),)


def broken() -> tuple[nn.Module, tuple[torch.Tensor]]:
    raise RuntimeError("weights not found")


def not_a_pair() -> nn.Module:
    return nn.Linear(2, 2)


class ResidualMLP(nn.Module):
    """Residual blocks (x + relu(linear(x))), ``depth`` of them: skips cross every cut."""

    def __init__(self, depth: int = 6, width: int = 16) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.head = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + torch.relu(layer(x))
        return self.head(x)


def residual() -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    return ResidualMLP(6), (torch.randn(8, 16),)


class _Mismatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x)


def wrong_inputs() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """A forward that fails on its example inputs (8 features into a 16-feature layer)."""
    return _Mismatch(), (torch.randn(4, 8),)


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if h.sum() > 0:  # data-dependent control flow: neither fx nor export can capture it
            h = self.b(h)
        return h


def branchy() -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    return _Branchy(), (torch.randn(4, 16),)


def residual_200() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """200 residual blocks: the segmentation picture must fold them to a few boxes."""
    torch.manual_seed(0)
    return ResidualMLP(200, width=8), (torch.randn(4, 8),)


class _Router(nn.Module):
    """Branches on tensor data: untraceable unless treated as a leaf (--leaf-module router)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) if x.sum() > 0 else -self.lin(x)


class _Leafy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.router, self.b = nn.Linear(16, 16), _Router(), nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.router(self.a(x)))


def leafy() -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    return _Leafy(), (torch.randn(4, 16),)


class _Reuse(nn.Module):
    """One activation module called twice: fx names its calls ``act`` and ``act_1``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.act(self.fc2(self.act(self.fc1(x)))))


def reuse() -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    return _Reuse(), (torch.randn(4, 16),)


class _FailsLater(nn.Module):
    """Runs normally while planning; in a spawned rank, fails after ``calls`` forwards."""

    def __init__(self, calls: int) -> None:
        super().__init__()
        self.lin, self.calls, self.parent = nn.Linear(16, 16), calls, os.getpid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if os.getpid() != self.parent:
            self.calls -= 1
            if self.calls < 0:
                raise RuntimeError("the data loader ran dry")
        return self.lin(x)


def fails_in_step_2() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """Two micro-batches a step: step 1 trains, step 2 raises (run with --leaf-module flaky)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 16), _FailsLater(2), nn.Linear(16, 4)), (torch.randn(4, 16),)


def tiny_gpt() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """Token ids (4 x 8) to logits: the default loss is the next-token cross-entropy."""
    from partitioner.examples import gpt_example

    torch.manual_seed(0)
    model, inputs = gpt_example(batch=4, seq=8, n_layer=2, n_embd=16, n_head=2, block_size=8)
    return model, inputs
