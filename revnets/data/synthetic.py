"""Generated datasets from Sander et al. (2021): nested rings (classification) and x ↦ −x³ (regression)."""

from __future__ import annotations

import torch
from torch import Tensor


def nested_rings(
    n_points: int, *, n_rings: int = 4, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Points on ``n_rings`` concentric rings in the plane, labels alternating ring by ring (Fig. 1).

    Ring ``r`` (``r = 0 … n_rings−1``) has radius ``3·(ρ_r + 0.2·U[0, 1])`` with ``ρ_r = 0.5·(r + 1)``
    and label ``r mod 2``; angles are uniform.

    Returns:
        ``x`` of shape ``(n_points, 2)`` (float32) and ``y`` of shape ``(n_points,)`` (int64).
    """
    if n_points < 1 or n_rings < 1:
        raise ValueError(f"n_points and n_rings must be >= 1; got n_points={n_points}, n_rings={n_rings}")
    ring = torch.randint(n_rings, (n_points,), generator=generator)
    radius = 3 * (0.5 * (ring + 1) + 0.2 * torch.rand(n_points, generator=generator))
    angle = 2 * torch.pi * torch.rand(n_points, generator=generator)
    x = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)
    return x, ring % 2


def cubic_map(n_points: int, *, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """The 1-D regression task ``x ↦ −x³`` of Sander et al. (2021).

    ``x ~ U[−1, 1]`` and the target is ``y = −x³``. The map is decreasing: it reverses the order of
    the line, which the flow of a first-order ODE on ℝ (a ResNet in the continuous-depth limit)
    cannot do, since its trajectories cannot cross; a Momentum ResNet (a second-order ODE) can.

    Returns:
        ``x`` and ``y``, both of shape ``(n_points, 1)`` (float32).
    """
    if n_points < 1:
        raise ValueError(f"n_points must be >= 1; got {n_points}")
    x = 2 * torch.rand(n_points, 1, generator=generator) - 1
    return x, -(x**3)
