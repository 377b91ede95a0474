"""Momentum ResNets (Sander, Ablin, Blondel, Peyré, ICML 2021)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from fractions import Fraction
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..autograd.exact import exact_ratio
from ..steps.base import State, Step
from ..steps.momentum import momentum_step
from .base import MemoryKeywords, ReversibleNet, as_module_list

if TYPE_CHECKING:
    from typing_extensions import Unpack


class MomentumNet(ReversibleNet):
    """A Momentum ResNet: ``v ← γ·v + (1 − γ)·f_n(x);  x ← x + v`` for ``n = 0 … N−1``.

    The input ``x`` of shape ``(B, ...)`` is the initial position; the initial velocity is
    ``v₀ = 0`` or ``v₀ = φ(x)`` with ``init_velocity=φ``. The output is the final position
    ``x_N``, of the input's shape. Each ``f_n`` maps a tensor of that shape to one of the same shape
    and receives the extra ``*args, **kwargs`` of :meth:`forward`.

    Args:
        functions: the residual functions ``f_0 … f_{N−1}`` (modules or callables; a module may be
            repeated to share weights). An empty list is the identity (depth 0), as an empty
            ``nn.Sequential`` is: a converted ResNet stage of one block keeps an empty stack.
        gamma: the momentum term γ ∈ [0, 1] (γ = 0 is a plain ResNet and cannot be inverted, so it
            needs ``mode="autograd"`` or ``"checkpoint"``). A :class:`fractions.Fraction` is used
            exactly by ``exact=True``; a float is converted to the nearest fraction with a
            denominator ≤ 2^16 and a warning reports the value used if it differs.
        init_velocity: optional module φ with ``v₀ = φ(x₀)`` (same shape as ``x₀``).
        learn_gamma: make γ a learnable parameter, ``γ = sigmoid(θ)``, kept inside (0, 1).
        memory: the memory strategy (:class:`~revnets.nn.base.MemoryKeywords`, see :class:`ReversibleNet`):
            ``mode`` (``"reversible"``, ``"autograd"`` or ``"checkpoint"``), ``exact`` (fixed-point state
            and information buffer: bit-exact inversion at any depth and γ), ``frac_bits``,
            ``memory_budget``, or a ready ``strategy``.
    """

    def __init__(
        self,
        functions: Iterable[Callable[..., Tensor]],
        gamma: float | Fraction = 0.9,
        *,
        init_velocity: nn.Module | None = None,
        learn_gamma: bool = False,
        **memory: Unpack[MemoryKeywords],
    ):
        super().__init__(**memory)
        exact = self.exact
        self.functions = as_module_list(functions, "functions")
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float, Fraction)):
            raise TypeError(f"gamma must be a number in [0, 1]; got {type(gamma).__name__}")
        if not (math.isfinite(gamma) and 0 <= gamma <= 1):
            raise ValueError(f"gamma must be in [0, 1] (0: plain ResNet, 1: no friction); got {gamma!r}")
        self.learn_gamma = learn_gamma
        if learn_gamma:
            if not 0 < gamma < 1:
                raise ValueError(f"learn_gamma=True keeps gamma inside the open interval (0, 1); got gamma={gamma!r}")
            if exact:
                raise ValueError("learn_gamma=True is not supported with exact=True: "
                                 "exact inversion needs a fixed rational gamma")
            self.gamma_logit = nn.Parameter(torch.logit(torch.tensor(float(gamma), dtype=torch.get_default_dtype())))
        else:
            # Exact mode multiplies by the rational n/d that exact_ratio returns (it warns if that is not
            # gamma itself); the gain 1 − γ then uses the same value, so the scheme is one consistent γ.
            self._gamma = float(exact_ratio(gamma, name="gamma")) if exact else gamma
        if init_velocity is not None and not isinstance(init_velocity, nn.Module):
            raise TypeError(f"init_velocity must be an nn.Module or None; got {type(init_velocity).__name__}")
        self.init_velocity = init_velocity
        self.validate_mode(self.mode)

    @property
    def gamma(self) -> float | Tensor:
        """γ as used: a float (with ``exact=True``, the rational n/d in use), or a 0-dim tensor with
        gradient when ``learn_gamma=True``."""
        return torch.sigmoid(self.gamma_logit) if self.learn_gamma else self._gamma

    def validate_mode(self, mode: str) -> None:
        if mode == "reversible" and not self.learn_gamma and self._gamma == 0:
            raise ValueError(
                "gamma=0 is a plain ResNet and is not invertible: mode='reversible' needs gamma in (0, 1]; "
                "use mode='autograd' or mode='checkpoint' for gamma=0"
            )

    def step(self) -> Step:
        gamma = self.gamma
        return momentum_step(gamma if isinstance(gamma, Tensor) else float(gamma))

    def layers(self):
        return tuple((f,) for f in self.functions)

    def coefficients(self) -> tuple[Tensor, ...]:
        return (self.gamma_logit,) if self.learn_gamma else ()

    def init_state(self, x: Tensor) -> State:
        if self.init_velocity is None:
            return x, torch.zeros_like(x)
        v = self.init_velocity(x)
        if not isinstance(v, Tensor) or v.shape != x.shape:
            got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise ValueError(f"init_velocity must return a tensor of the input's shape {tuple(x.shape)}; got {got}")
        return x, v

    def output(self, state: State) -> Tensor:
        return state[0]

    def inverse(self, x: Tensor, v: Tensor, *args, **kwargs) -> Tensor:
        """Reconstruct the input ``x₀`` from the final position ``x`` and velocity ``v``.

        ``(x, v) = self.forward_state(self.init_state(x₀))``; the network's output is ``x`` alone, so
        the final velocity is needed to invert.
        """
        return self.inverse_state((x, v), *args, **kwargs)[0]

    def extra_repr(self) -> str:
        gamma = "learned" if self.learn_gamma else repr(self._gamma)
        return f"gamma={gamma}, " + super().extra_repr()
