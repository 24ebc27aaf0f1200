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


def deep_mlp() -> nn.Module:
    """A Sequential of 7 layers: every boundary between two of them is a cut point."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 8)
    ).eval()


class _Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(x)))


class _Residual(nn.Module):
    """Residual blocks: inside a block two values cross (the skip), so no cut falls there."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(16, 32)
        self.blocks = nn.ModuleList(_Block(32) for _ in range(3))
        self.out = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        out: torch.Tensor = self.out(h)
        return out


def residual_net() -> nn.Module:
    torch.manual_seed(0)
    return _Residual().eval()


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            x = -x
        out: torch.Tensor = self.inner(x)
        return out


def data_dependent() -> nn.Module:
    """Python control flow on tensor values: torch.fx cannot trace it."""
    return _DataDependent().eval()


class _Guarded(nn.Module):
    """deep_mlp between two guards that torch.fx traces (`torch._assert`, raising AssertionError
    at run time): the first layer refuses a batch with an infinite input, the last a batch whose
    result holds NaN (a NaN input row gives one). Cut into stages, the first guard is in stage 0,
    the second in the last stage."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = deep_mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(~torch.isinf(x).any(), "an input row holds inf")
        y: torch.Tensor = self.inner(x)
        torch._assert(~torch.isnan(y).any(), "a result row is NaN")
        return y


def guarded_mlp() -> nn.Module:
    return _Guarded().eval()
