"""Chang et al.'s two-step networks (AAAI 2018): Midpoint and Leapfrog.

The input ``x`` of shape ``(B, C, ...)`` (even ``C``) is split along dim 1 into two consecutive
states ``(Y_{−1}, Y_0)``; the first layer produces ``(Y_0, Y_1)`` and the output is ``cat(Y_{N−1}, Y_N)``.
So the first step is the scheme's own two-step update started from the given pair: pass
``cat([Y_0, Y_0])`` to start at rest, or ``cat([0, Y_0])`` for the leapfrog start
``Y_1 = 2·Y_0 − h²·f_0(Y_0)`` of the paper.

With ``start="rest"`` the input is ``Y_0`` itself, of any shape, the state starts at rest
(``Y_{−1} = Y_0``) and the output is ``Y_N``: a drop-in replacement of a residual stack, as the
converters build from a Transformer's layer list (``f(Y) = layer(Y) − Y``; Chang et al.'s schemes for
pretrained language models are studied by Gal, Haber et al., 2025).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from torch import Tensor

from ..steps.base import State, Step
from ..steps.twostep import leapfrog_step, midpoint_step
from .base import MemoryKeywords, TwoStreamNet, as_module_list
from .coupling import check_step_size

if TYPE_CHECKING:
    from typing_extensions import Unpack


STARTS = ("pair", "rest")


class _TwoStepNet(TwoStreamNet):
    _scheme: Callable[[float], Step]

    def __init__(self, functions: Iterable[Callable[..., Tensor]], *, h: float = 1.0, start: str = "pair",
                 **memory: Unpack[MemoryKeywords]):
        super().__init__(**memory)
        self.functions = as_module_list(functions, "functions")
        self.h = check_step_size(h)
        if start not in STARTS:
            raise ValueError(f"start must be 'pair' (the input holds (Y_-1, Y_0) on the halves of dim 1) or "
                             f"'rest' (the input is Y_0, and Y_-1 = Y_0); got {start!r}")
        self.start = start

    def init_state(self, x: Tensor) -> State:
        """``(Y_{−1}, Y_0)``: the halves of ``x`` along dim 1, or ``(x, x)`` with ``start="rest"``."""
        return (x, x) if self.start == "rest" else super().init_state(x)

    def output(self, state: State) -> Tensor:
        """``cat(Y_{N−1}, Y_N)`` along dim 1, or ``Y_N`` with ``start="rest"``."""
        return state[1] if self.start == "rest" else super().output(state)

    def inverse(self, y: Tensor, *args, **kwargs) -> Tensor:
        if self.start == "rest":
            raise ValueError("with start='rest' the output Y_N alone does not determine the input: invert the state "
                             "(Y_{N-1}, Y_N) with inverse_state")
        return super().inverse(y, *args, **kwargs)

    def step(self) -> Step:
        return type(self)._scheme(self.h)

    def layers(self):
        return tuple((f,) for f in self.functions)

    def extra_repr(self) -> str:
        start = ", start='rest'" if self.start == "rest" else ""
        return f"h={self.h}{start}, " + super().extra_repr()


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

