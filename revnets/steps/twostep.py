"""Chang et al.'s two-step schemes (AAAI 2018): Midpoint and Leapfrog networks.

The state is two consecutive states of the discretised ODE, ``(Y_{j−1}, Y_j)``, each
``(B, C/2, ...)``: the network's input is split along dim 1 into these two halves, so the first
layer maps the input pair ``(Y_{−1}, Y_0)`` to ``(Y_0, Y_1)`` and no special starting step is needed
(feed ``cat([Y_0, Y_0])`` to start at rest, or ``cat([0, Y_0])`` for the paper's leapfrog start
``Y_1 = 2·Y_0 − h²·f_0(Y_0)``). Each layer ends by swapping the roles of the two halves.

* Midpoint:  ``Y_{j+1} = Y_{j−1} + 2h·f_j(Y_j)``;  inverse ``Y_{j−1} = Y_{j+1} − 2h·f_j(Y_j)``.
  Chang et al. use ``f = σ(K·+b)`` with an antisymmetric operator ``K − Kᵀ``.
* Leapfrog:  ``Y_{j+1} = 2·Y_j − Y_{j−1} − h²·f_j(Y_j)``;  inverse
  ``Y_{j−1} = 2·Y_j − Y_{j+1} − h²·f_j(Y_j)``. Chang et al. use ``f = Kᵀσ(K·+b)``.
"""

from __future__ import annotations

from .base import Step, Update

_SWAP = (1, 0)


def midpoint_step(h: float) -> Step:
    """``(Y_{j−1}, Y_j) -> (Y_j, Y_{j−1} + 2h·f(Y_j))``."""
    return Step((Update(0, lambda s, fns, a, k: fns[0](s[1], *a, **k), gain=2 * h),), order=_SWAP)


def leapfrog_step(h: float) -> Step:
    """``(Y_{j−1}, Y_j) -> (Y_j, 2·Y_j − Y_{j−1} − h²·f(Y_j))`` as two updates of ``Y_{j−1}``:
    ``−Y_{j−1} − h²·f(Y_j)`` (scale −1), then ``+ 2·Y_j``."""
    return Step(
        (
            Update(0, lambda s, fns, a, k: fns[0](s[1], *a, **k), scale=-1.0, gain=-h * h),
            Update.copy(0, 1, gain=2.0),
        ),
        order=_SWAP,
    )
