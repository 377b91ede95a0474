"""Generated datasets from Sander et al. (2021)."""

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
