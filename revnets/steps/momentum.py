"""Momentum residual step (Sander et al., ICML 2021).

State ``(x, v)`` (position, velocity), both of the input's shape ``(B, ...)``:

    v_{n+1} = γ·v_n + (1 − γ)·f_n(x_n)
    x_{n+1} = x_n + v_{n+1}

Inverse (needs γ > 0): ``x_n = x_{n+1} − v_{n+1}``, then ``v_n = (v_{n+1} − (1 − γ)·f_n(x_n)) / γ``.
γ = 0 is a plain ResNet step; in the small-step limit the scheme is the second-order ODE
``ε·ẍ + ẋ = f(x)`` with ``ε = 1/(1 − γ)``.
"""

from __future__ import annotations

from .base import Scale, Step, Update


def momentum_step(gamma: Scale) -> Step:
    """The momentum layer with friction ``gamma`` (a float or a 0-dim tensor)."""
    return Step(
        (
            Update(1, lambda s, fns, a, k: fns[0](s[0], *a, **k), scale=gamma, gain=1 - gamma),
            Update.copy(0, 1),
        )
    )
