"""How an update is applied to, and removed from, a state component: in floating point
(:class:`FloatArithmetic`) or in fixed point with an information buffer (:class:`FixedPointArithmetic`,
Maclaurin et al. 2015), and the fixed-point state a stack can be run and inverted on (:class:`ExactState`).

An arithmetic gives the engine's loops five operations: the floating-point ``view`` of a component (what
the functions see), the increment of an update that copies a component, ``apply`` (``s' = a·s + c·u``),
``undo`` (``s = (s' − c·u)/a``) and the finiteness checks of a reconstructed state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Protocol

import torch
from torch import Tensor

from ..steps.base import State, Step, Update
from .exact import (
    InformationBuffer,
    add_exact,
    dequantize,
    exact_ratio,
    quantize,
    scale_add_exact,
    scale_exact,
    unscale_exact,
    unscale_sub_exact,
)


class Arithmetic(Protocol):
    """What the engine's loops ask of an arithmetic (see the module docs)."""

    def view(self, component: Tensor) -> Tensor: ...

    def copy_increment(self, update: Update, tensors: tuple[Tensor, ...]) -> Tensor: ...

    def apply(self, j: int, update: Update, old: Tensor, buffer, increment: Tensor, where: str) -> tuple: ...

    def undo(self, j: int, update: Update, new: Tensor, buffer, increment: Tensor, where: str) -> tuple: ...

    def all_finite(self, tensors: tuple[Tensor, ...]) -> bool: ...

    def check_finite(self, tensors: tuple[Tensor, ...], increments: list[Tensor], where: str, during: str) -> None: ...


class FloatArithmetic:
    """Floating-point state: ``a·s + u`` and ``(s' − u)/a``."""

    @staticmethod
    def view(component: Tensor) -> Tensor:
        return component

    @staticmethod
    def copy_increment(update: Update, tensors: tuple[Tensor, ...]) -> Tensor:
        """The increment of an update that adds a component (``Update.copy``): that component."""
        return tensors[update.source]

    @staticmethod
    def apply(j: int, update: Update, old: Tensor, buffer: None, increment: Tensor, where: str):
        return update.combine(old, increment), buffer

    @staticmethod
    def undo(j: int, update: Update, new: Tensor, buffer: None, increment: Tensor, where: str):
        return update.uncombine(new, increment), buffer

    @staticmethod
    def all_finite(tensors: tuple[Tensor, ...]) -> bool:
        """Whether every component is free of NaN/inf: one float32 sum per component and one
        synchronisation (an exact per-element test only if the sum overflowed)."""
        total = tensors[0].sum()
        for component in tensors[1:]:
            total = total + component.sum()
        return bool(torch.isfinite(total)) or all(bool(torch.isfinite(c).all()) for c in tensors)

    @classmethod
    def check_finite(cls, tensors: tuple[Tensor, ...], increments: list[Tensor], where: str, during: str) -> None:
        """Raise if a reconstructed state holds NaN or inf, saying why.

        ``increments``: the function values the reconstruction used; if one of them is non-finite, the
        function returned it (on finite inputs, since the state was finite one layer earlier), otherwise
        the reconstruction itself was amplified to overflow. ``during``: "while inverting" or
        "when re-evaluated in the backward".
        """
        if cls.all_finite(tensors):
            return
        if any(not torch.isfinite(u).all() for u in increments):
            raise FloatingPointError(
                f"{where}: a function returned a non-finite value (NaN/inf) {during}, on a finite input"
                + ("" if during == "while inverting" else " although the forward's values were finite")
                + ": it is not deterministic (randomness from outside torch's generators, state changed since the "
                "forward, a different path in eval mode) or it overflows on this input"
            )
        raise FloatingPointError(
            f"non-finite value met while inverting {where}: the reconstruction was amplified until it overflowed "
            "(inverting an update divides by its scale, so a scale close to 0, such as a small γ, amplifies rounding "
            "errors exponentially with depth); use a larger γ, fewer layers or float64, or exact=True, which "
            "inverts bit for bit"
        )


@dataclass(frozen=True)
class FixedPointArithmetic:
    """Fixed-point state: ``q' = scale_exact(q, n/d) + round(c·u·2^F)`` and its exact inverse.

    An update adding a component (``x ← x + v``) makes the floating-point view of its result in the same
    pass (:func:`~revnets.autograd.exact.add_exact`); the arithmetic keeps the last such view and hands it
    out once, to the next :meth:`view` of that very tensor (the engine never modifies a state tensor in
    place: every update makes new ones), instead of dequantising again.
    """

    frac_bits: int
    dtype: torch.dtype
    ratios: tuple[Fraction, ...]
    _made_view: list = field(default_factory=lambda: [None, None], init=False, compare=False, repr=False)
    """``[tensor, view]``: the view an update made of its result ``tensor``, until handed out."""

    @classmethod
    def for_step(cls, step: Step, frac_bits: int, dtype: torch.dtype) -> FixedPointArithmetic:
        return cls(frac_bits, dtype,
                   tuple(exact_ratio(u.scale, name="the update's scale (γ for MomentumNet)") for u in step.updates))

    def view(self, component: Tensor) -> Tensor:
        """``dequantize(component)``: the view the last update made of it if that is ``component``, once."""
        made = self._made_view
        if made[0] is component:
            view, made[:] = made[1], (None, None)
            return view
        return dequantize(component, self.frac_bits, self.dtype)

    def _keep_view(self, tensor: Tensor, view: Tensor | None) -> None:
        self._made_view[:] = (tensor, view) if view is not None else (None, None)

    def copy_increment(self, update: Update, tensors: tuple[Tensor, ...]) -> Tensor:
        """The increment of an update that adds a component (``Update.copy``): with an integer gain, the
        fixed-point integers themselves times the gain (exact, no dequantise/quantise round trip);
        otherwise the component's floating-point view, quantised with the gain as any increment."""
        gain = update.gain
        if not isinstance(gain, Tensor) and float(gain).is_integer():
            source = tensors[update.source]
            return source if gain == 1 else source * int(gain)
        return self.view(tensors[update.source])

    def apply(self, j: int, update: Update, old: Tensor, buffer: InformationBuffer, increment: Tensor, where: str):
        if increment.dtype != torch.int64:  # a function's output: quantised, in one pass where possible
            return scale_add_exact(old, self.ratios[j], buffer, increment.detach().to(self.dtype), self.frac_bits,
                                   gain=update.gain, what=f"the output of a function at {where}",
                                   result=f"the state after {where}")  # every state is checked: old too
        if self.ratios[j] != 1:  # copy_increment: already exact
            old, buffer = scale_exact(old, self.ratios[j], buffer, input_in_range=True)
        new, view = add_exact(old, increment, self.frac_bits, self.dtype, what=f"the state after {where}")
        self._keep_view(new, view)
        return new, buffer

    def undo(self, j: int, update: Update, new: Tensor, buffer: InformationBuffer, increment: Tensor, where: str):
        if increment.dtype != torch.int64:
            return unscale_sub_exact(new, self.ratios[j], buffer, increment.detach().to(self.dtype), self.frac_bits,
                                     gain=update.gain, what=f"the output of a function at {where}")
        if self.ratios[j] != 1:
            return unscale_exact(new - increment, self.ratios[j], buffer)
        old, view = add_exact(new, increment, self.frac_bits, self.dtype, subtract=True)
        self._keep_view(old, view)
        return old, buffer

    @staticmethod
    def all_finite(tensors: tuple[Tensor, ...]) -> bool:
        """Integers are always finite; non-finite increments are caught by :func:`quantize`."""
        return True

    @staticmethod
    def check_finite(tensors: tuple[Tensor, ...], increments: list[Tensor], where: str, during: str) -> None:
        """Integers are always finite; non-finite increments are caught by :func:`quantize`."""


@dataclass(frozen=True)
class ExactState:
    """A state in fixed point, with everything needed to invert it bit for bit.

    Attributes:
        tensors: int64 tensors ``q = round(s·2^frac_bits)``, one per state component.
        buffers: the information buffer of each component (bits pushed out by scales ``|n/d| ≠ 1``).
        frac_bits: number of fractional bits ``F``.
        dtype: floating dtype in which the functions are evaluated.
    """

    tensors: tuple[Tensor, ...]
    buffers: tuple[InformationBuffer, ...]
    frac_bits: int
    dtype: torch.dtype

    @classmethod
    def from_float(cls, state: State, frac_bits: int) -> ExactState:
        """Quantise a floating-point state (empty buffers)."""
        dtype = state[0].dtype
        tensors = tuple(quantize(s.detach(), frac_bits, what="the input state") for s in state)
        return cls(tensors, tuple(InformationBuffer.empty(q) for q in tensors), frac_bits, dtype)

    def to_float(self) -> State:
        """Dequantise to the functions' dtype."""
        return tuple(dequantize(q, self.frac_bits, self.dtype) for q in self.tensors)

    def buffer_bits(self) -> int:
        """Total number of bits held in the information buffers."""
        return sum(b.bits() for b in self.buffers)

    def equal(self, other: ExactState) -> bool:
        """Bit-for-bit equality of the fixed-point tensors."""
        return all(torch.equal(a, b) for a, b in zip(self.tensors, other.tensors, strict=True))


# --------------------------------------------------------------------------------------------------
# The three loops every mode is made of.
