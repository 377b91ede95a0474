"""Nested rings (Sander et al. 2021, Fig. 1): a Momentum ResNet separates them, a ResNet cannot.

Both networks map the plane to itself with ``f(x) = W₂ᵀ·tanh(W₁x + b)``, ``W ∈ ℝ^{16×2}``, the same
weights at each of the 15 steps; the final position is read as two logits. The ResNet is the
Momentum ResNet with γ = 0. A ResNet is the flow of a first-order ODE: trajectories cannot cross,
so nested rings with alternating labels cannot be pulled apart into two half-planes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..data.synthetic import nested_rings
from ..nn import MomentumNet


class TiedTanh(nn.Module):
    """``f(x) = W₂ᵀ·tanh(W₁x + b)`` on ``(B, 2)``, with ``W₁, W₂`` of shape ``(hidden, 2)``."""

    def __init__(self, width: int = 2, hidden: int = 16):
        super().__init__()
        self.inner = nn.Linear(width, hidden)
        self.outer = nn.Parameter(torch.randn(hidden, width) / hidden**0.5)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.inner(x)) @ self.outer


@dataclass(frozen=True)
class RingsResult:
    name: str
    gamma: float
    train_accuracy: float
    test_accuracy: float


def train_rings(
    gamma: float,
    *,
    steps: int = 500,
    batch_size: int = 2000,
    depth: int = 15,
    lr: float = 0.2,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> tuple[MomentumNet, RingsResult]:
    """Train a depth-``depth`` network with shared weights (γ = 0: ResNet) on fresh rings each step."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    f = TiedTanh()
    mode = "reversible" if gamma > 0 else "autograd"
    net = MomentumNet([f] * depth, gamma, mode=mode)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    for step in range(steps):
        x, y = nested_rings(batch_size, generator=generator)
        loss = nn.functional.cross_entropy(net(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if progress is not None:
            progress(step)
    with torch.no_grad():
        accuracies = []
        for _ in range(2):
            x, y = nested_rings(10_000, generator=generator)
            accuracies.append((net(x).argmax(1) == y).float().mean().item())
    name = "Momentum ResNet" if gamma > 0 else "ResNet"
    return net, RingsResult(name, gamma, *accuracies)
