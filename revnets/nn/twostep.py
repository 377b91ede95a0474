"""Chang et al.'s two-step networks (AAAI 2018): Midpoint and Leapfrog.

The input ``x`` of shape ``(B, C, ...)`` (even ``C``) is split along dim 1 into two consecutive
states ``(Y_{−1}, Y_0)``; the first layer produces ``(Y_0, Y_1)`` and the output is ``cat(Y_{N−1}, Y_N)``.
So the first step is the scheme's own two-step update started from the given pair: pass
``cat([Y_0, Y_0])`` to start at rest, or ``cat([0, Y_0])`` for the leapfrog start
``Y_1 = 2·Y_0 − h²·f_0(Y_0)`` of the paper.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from torch import Tensor

from ..steps.base import Step
from ..steps.twostep import leapfrog_step, midpoint_step
from .base import MemoryKeywords, TwoStreamNet, as_module_list
from .coupling import check_step_size

if TYPE_CHECKING:
    from typing_extensions import Unpack


class _TwoStepNet(TwoStreamNet):
    _scheme: Callable[[float], Step]

    def __init__(self, functions: Iterable[Callable[..., Tensor]], *, h: float = 1.0,
                 **memory: Unpack[MemoryKeywords]):
        super().__init__(**memory)
        self.functions = as_module_list(functions, "functions")
        self.h = check_step_size(h)

    def step(self) -> Step:
        return type(self)._scheme(self.h)

    def layers(self):
        return tuple((f,) for f in self.functions)

    def extra_repr(self) -> str:
        return f"h={self.h}, " + super().extra_repr()


class MidpointNet(_TwoStepNet):
    """``Y_{j+1} = Y_{j−1} + 2h·f_j(Y_j)`` on the halves ``(Y_{j−1}, Y_j)`` of dim 1 (see module docs).

    Chang et al. use ``f = σ((K − Kᵀ)·+b)`` with an antisymmetric operator. ``f_j`` maps
    ``(B, C/2, ...)`` to the same shape.
    """

    _scheme = staticmethod(midpoint_step)



class LeapfrogNet(_TwoStepNet):
    """``Y_{j+1} = 2·Y_j − Y_{j−1} − h²·f_j(Y_j)`` on the halves ``(Y_{j−1}, Y_j)`` of dim 1 (see module docs).

    Chang et al. use ``f = Kᵀσ(K·+b)``. ``f_j`` maps ``(B, C/2, ...)`` to the same shape.
    """

    _scheme = staticmethod(leapfrog_step)

