"""Additive coupling on two streams: RevNet (Gomez et al. 2017) and the Hamiltonian network
(Chang et al., AAAI 2018), which is the same update with step sizes ``±h``.

State ``(y, z)``, the two halves of the input along dim 1, each ``(B, C/2, ...)``:

    y_{j+1} = y_j + a·F_j(z_j)
    z_{j+1} = z_j + b·G_j(y_{j+1})

Inverse: ``z_j = z_{j+1} − b·G_j(y_{j+1})``, then ``y_j = y_{j+1} − a·F_j(z_j)``.

* RevNet: ``a = b = 1``.
* Hamiltonian (Verlet discretisation of ``ẏ = F(z), ż = −G(y)``): ``a = h``, ``b = −h``. With
  ``F = K₁ᵀσ(K₁·)`` and ``G = K₂ᵀσ(K₂·)`` the Jacobian of the continuous system has purely imaginary
  eigenvalues, so signals neither explode nor vanish with depth.
"""

from __future__ import annotations

from .base import Step, Update


def coupling_step(first_gain: float = 1.0, second_gain: float = 1.0) -> Step:
    """Two additive half-steps; the layer's functions are ``(F, G)``."""
    return Step(
        (
            Update(0, lambda s, fns, a, k: fns[0](s[1], *a, **k), gain=first_gain),
            Update(1, lambda s, fns, a, k: fns[1](s[0], *a, **k), gain=second_gain),
        )
    )
