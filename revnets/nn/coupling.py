"""Two-stream additive couplings: RevNet (Gomez et al. 2017) and the Hamiltonian network (Chang et al. 2018)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from torch import Tensor

from ..steps.base import Step
from ..steps.coupling import coupling_step
from .base import MemoryKeywords, TwoStreamNet, as_module_list

if TYPE_CHECKING:
    from typing_extensions import Unpack


def check_step_size(h: float) -> float:
    """Validate a step size ``h``: a finite number > 0."""
    if isinstance(h, bool) or not isinstance(h, (int, float)) or not (math.isfinite(h) and h > 0):
        raise ValueError(f"h (the step size) must be a finite number > 0; got {h!r}")
    return float(h)


class _CouplingNet(TwoStreamNet):
    """``y ← y + a·F_j(z);  z ← z + b·G_j(y)`` on the two halves of dim 1."""

    def __init__(self, f_functions: Iterable[Callable[..., Tensor]], g_functions: Iterable[Callable[..., Tensor]],
                 coefficients: tuple[float, float], **memory: Unpack[MemoryKeywords]):
        super().__init__(**memory)
        self.f_functions = as_module_list(f_functions, "f_functions")
        self.g_functions = as_module_list(g_functions, "g_functions")
        if len(self.f_functions) != len(self.g_functions):
            raise ValueError(
                f"f_functions and g_functions must have the same length (one pair per layer); "
                f"got {len(self.f_functions)} and {len(self.g_functions)}"
            )
        self._coupling = coefficients

    def step(self) -> Step:
        return coupling_step(*self._coupling)

    def layers(self):
        return tuple(zip(self.f_functions, self.g_functions))


class RevNet(_CouplingNet):
    """RevNet additive coupling: ``y₁ = x₁ + F(x₂);  y₂ = x₂ + G(y₁)`` on the halves of dim 1.

    ``x`` of shape ``(B, C, ...)`` with even ``C``; ``F_j``, ``G_j`` map ``(B, C/2, ...)`` to the same
    shape. Volume preserving: it cannot contract.
    """

    def __init__(
        self,
        f_functions: Iterable[Callable[..., Tensor]],
        g_functions: Iterable[Callable[..., Tensor]],
        **memory: Unpack[MemoryKeywords],
    ):
        super().__init__(f_functions, g_functions, (1.0, 1.0), **memory)


class HamiltonianNet(_CouplingNet):
    """Chang et al.'s Hamiltonian network (Verlet scheme) on the halves ``(Y, Z)`` of dim 1:

        Y_{j+1} = Y_j + h·F_j(Z_j),    Z_{j+1} = Z_j − h·G_j(Y_{j+1}).

    With ``F = K₁ᵀσ(K₁·+b₁)`` and ``G = K₂ᵀσ(K₂·+b₂)`` (the paper's branches) the continuous system has a
    Jacobian with purely imaginary eigenvalues: stable forward and backward at any depth.
    """

    def __init__(
        self,
        f_functions: Iterable[Callable[..., Tensor]],
        g_functions: Iterable[Callable[..., Tensor]],
        *,
        h: float = 1.0,
        **memory: Unpack[MemoryKeywords],
    ):
        h = check_step_size(h)
        super().__init__(f_functions, g_functions, (h, -h), **memory)
        self.h = h

    def extra_repr(self) -> str:
        return f"h={self.h}, " + super().extra_repr()
