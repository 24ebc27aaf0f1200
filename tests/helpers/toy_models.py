"""PyTorch models with seeded random weights for tests: `toy_models:mlp` etc."""

from __future__ import annotations

import os
import time

import torch
from torch import nn


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8)).eval()


class _Slow(nn.Module):
    """An MLP that sleeps per batch, so a test can kill a worker mid-job."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = mlp()
        self.delay = float(os.environ.get("TOY_DELAY_S", "0.05"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.delay)
        out: torch.Tensor = self.inner(x)
        return out


def slow_mlp() -> nn.Module:
    return _Slow().eval()


class _TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = mlp()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.inner(x)
        return y, y.sum(dim=1)


def two_heads() -> nn.Module:
    return _TwoHeads().eval()


def not_a_module() -> int:
    return 3


def very_slow_mlp() -> nn.Module:
    """0.25 s per batch whatever the environment (Ray workers do not see a test's env vars)."""
    model = _Slow()
    model.delay = 0.25
    return model.eval()
