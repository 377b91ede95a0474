"""Exact fixed-point arithmetic for bit-exact inversion of contracting layers.

Dividing by a scale factor ``γ < 1`` amplifies floating-point rounding by ``1/γ`` per layer, so a deep
reversible network with ``v ← γ v + (1 − γ) f(x)`` cannot be inverted from floats. Following Maclaurin,
Duvenaud & Adams (2015, "Gradient-based hyperparameter optimization through reversible learning") the
state is held as fixed-point integers ``q = round(x · 2^F)`` and multiplied by an exact rational
``γ = n/d`` whose rounding remainder is pushed into an :class:`InformationBuffer`; the inverse pops it
back. The buffer grows by ``log2(d/n)`` bits per element per multiplication (0.152 bits for ``γ = 9/10``),
the information the contraction destroys and so the floor for any exact scheme.

Every quantity here is an exact integer: ``int64`` tensors whose magnitudes are kept at most
:data:`SAFE_LIMIT` ``= 2^46``, so that products with factors at most :data:`MAX_DENOMINATOR` ``= 2^16``
stay below ``2^62`` and conversions to ``float64`` are exact. Any value outside that range raises
:class:`OverflowError`; nothing is ever rounded or wrapped silently.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import numbers
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import torch

__all__ = [
    "FRAC_BITS_DEFAULT",
    "MAX_DENOMINATOR",
    "SAFE_LIMIT",
    "InformationBuffer",
    "add_exact",
    "check_range",
    "dequantize",
    "exact_ratio",
    "quantize",
    "scale_add_exact",
    "scale_exact",
    "unscale_exact",
    "unscale_sub_exact",
]

FRAC_BITS_DEFAULT = 32
"""Default number of fractional bits ``F`` of the fixed-point representation ``q = round(x · 2^F)``."""

MAX_DENOMINATOR = 1 << 16
"""Largest ``|n|`` and ``d`` of a scale factor ``n/d`` and largest base of a buffer push or draw."""

SAFE_LIMIT = 1 << 46
"""Largest magnitude of a fixed-point integer: ``SAFE_LIMIT · MAX_DENOMINATOR = 2^62`` fits in int64."""

_HEAD_LIMIT = 1 << 47  # heads stay in [0, 2^47): head · 2^16 + (2^16 − 1) ≤ 2^63 − 1
_WORD_BITS = 32  # granularity of a spill from a head to the stack
_WORD_MASK = (1 << _WORD_BITS) - 1
_SIGN_BIT = 1 << (_WORD_BITS - 1)


def exact_ratio(
    value: float | int | Fraction | torch.Tensor, name: str = "scale"
) -> Fraction:
    """Return the scale factor ``value`` as an exact rational ``n/d`` with ``|n|, d ≤ 2^16``.

    A :class:`~fractions.Fraction` (or an integer) is kept as is. A float, or a one-element tensor read
    with ``.item()``, becomes ``Fraction(value).limit_denominator(2^16)``: the closest rational with
    denominator at most ``2^16``. When that rational does not round back to the same float a
    :class:`RuntimeWarning` states the value given, the rational used and their difference; ``0.9``
    gives ``9/10`` without a warning, because ``float(9/10) == 0.9``.

    Args:
        value: the scale factor.
        name: what ``value`` is called, for messages.

    Raises:
        ValueError: ``value`` is zero (not invertible), not finite, has several elements, or its
            rational has ``|n|`` or ``d`` above ``2^16``.
        TypeError: ``value`` is not a real number.
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a single number, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, numbers.Rational):
        ratio = Fraction(value.numerator, value.denominator)
    elif isinstance(value, numbers.Real):
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value!r}")
        if value == 0.0:
            raise ValueError(f"{name} = 0 is not invertible")
        ratio = Fraction(value).limit_denominator(MAX_DENOMINATOR)
        if ratio == 0:
            raise ValueError(
                f"{name} = {value!r} is below the smallest representable nonzero ratio 1/{MAX_DENOMINATOR}"
                " (not invertible)"
            )
        if float(ratio) != value:
            warnings.warn(
                f"{name} = {value!r} is not a rational with denominator <= {MAX_DENOMINATOR}; using "
                f"{ratio} = {float(ratio)!r} (difference {float(ratio - Fraction(value)):.3e})",
                RuntimeWarning,
                stacklevel=2,
            )
    else:
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if ratio == 0:
        raise ValueError(f"{name} = 0 is not invertible")
    if abs(ratio.numerator) > MAX_DENOMINATOR or ratio.denominator > MAX_DENOMINATOR:
        raise ValueError(
            f"{name} = {ratio} needs |numerator| and denominator <= {MAX_DENOMINATOR}"
            f" (got {ratio.numerator}/{ratio.denominator})"
        )
    return ratio


def check_range(q: torch.Tensor, *, what: str) -> None:
    """Raise :class:`OverflowError` unless every ``|q| ≤ SAFE_LIMIT = 2^46``.

    Args:
        q: integer tensor of any shape.
        what: what ``q`` holds, for the message.
    """
    if q.numel() == 0:
        return
    low, high = (int(v) for v in torch.aminmax(q))
    if low < -SAFE_LIMIT or high > SAFE_LIMIT:
        raise OverflowError(
            f"{what}: fixed-point magnitude {max(-low, high)} exceeds the limit {SAFE_LIMIT} = 2^46"
        )


def quantize(x: torch.Tensor, frac_bits: int, *, what: str = "value", gain: float = 1.0) -> torch.Tensor:
    """Return the fixed-point integers ``q = round(fl(gain · x) · 2^F)`` (int64, same shape and device as ``x``).

    ``x`` is multiplied once by ``gain · 2^F`` in its own precision (float32 or float64; float16 and
    bfloat16 are widened to float32 first, exactly): scaling by a power of two is exact, so this is
    ``fl(gain · x) · 2^F`` exactly, and then rounded half to even — the values of a float64
    computation, in one pass instead of three.

    Args:
        x: tensor of any shape.
        frac_bits: number of fractional bits ``F ≥ 0``.
        what: what ``x`` holds, for messages.
        gain: a number multiplying ``x`` first (1 by default).

    Raises:
        FloatingPointError: ``x`` holds NaN or infinity.
        OverflowError: some ``|q| > SAFE_LIMIT``, i.e. ``|gain · x|`` beyond ``±2^46 / 2^F``.
    """
    _check_frac_bits(frac_bits)
    work = x if x.dtype in (torch.float32, torch.float64) else x.to(torch.float32)
    scaled = work * (float(gain) * float(1 << frac_bits))
    if scaled.numel() > 0:
        low, high = (float(v) for v in torch.aminmax(scaled))  # one pass: NaN and inf propagate
        if not (math.isfinite(low) and math.isfinite(high)):
            if not bool(torch.isfinite(x).all()):
                raise FloatingPointError(f"{what}: cannot quantize non-finite values (NaN or infinity)")
            low, high = -math.inf, math.inf  # finite, but beyond the range once scaled
        if max(-low, high) > SAFE_LIMIT:
            raise OverflowError(
                f"{what}: magnitude {max(-low, high) / (1 << frac_bits)!r} is outside the representable range"
                f" ±{SAFE_LIMIT / (1 << frac_bits)!r} (= ±2^46 / 2^{frac_bits})"
            )
    return scaled.round_().to(torch.int64)


def dequantize(q: torch.Tensor, frac_bits: int, dtype: torch.dtype) -> torch.Tensor:
    """Return ``q / 2^F`` as ``dtype``, rounded once (deterministic): ``fl(fl(q)·2^-F)``, ``q`` rounded to
    ``dtype`` and multiplied by ``2^-F`` taken in ``dtype`` (exact unless it underflows). On a
    contiguous CPU tensor and float32 or float64, one pass of a compiled kernel (see :func:`_kernels`),
    with the same bits.

    Args:
        q: int64 fixed-point integers of any shape, ``|q| ≤ 2^53`` for an exact float64 step.
        frac_bits: number of fractional bits ``F ≥ 0``.
        dtype: floating dtype of the result.
    """
    _check_frac_bits(frac_bits)
    kernel = _integer_kernel("view", dtype, q)
    if kernel is not None:  # the same two steps in one pass
        view = torch.empty_like(q, dtype=dtype)
        kernel(q.numel(), q.data_ptr(), 2.0**-frac_bits, view.data_ptr())
        return view
    # Rounding to dtype commutes with the exact scaling by 2^-F: one rounding, as in float64 then dtype.
    return q.to(dtype).mul_(2.0**-frac_bits)


def _check_frac_bits(frac_bits: int) -> None:
    if not isinstance(frac_bits, int) or frac_bits < 0:
        raise ValueError(f"frac_bits must be a non-negative int, got {frac_bits!r}")


def _packbits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool tensor (flattened, row-major) into uint8, 8 elements a byte, little-endian bits."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = -flat.numel() % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    shifts = torch.arange(8, dtype=torch.uint8, device=mask.device)
    return (flat.view(-1, 8) << shifts).sum(dim=1).to(torch.uint8)  # (ceil(numel / 8),)


def _unpackbits(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of :func:`_packbits`: the bool tensor of ``shape``."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(1) >> shifts) & 1  # (ceil(numel / 8), 8)
    return bits.reshape(-1)[: shape.numel()].view(shape).bool()


@dataclass(frozen=True, eq=False, slots=True)
class _Spill:
    """One entry of the persistent stack of spilled words (a cons cell).

    Attributes:
        push_index: number of the push (1-based) that made this entry; its pop undoes it.
        mask: packed bits of the elements that spilled, or ``None`` when all of them did.
        words: int32 ``(k,)``, the low 32 bits of the ``k`` spilled heads (row-major), two's complement.
        parent: the entry below, or ``None``.
        stack_bits: bits held by this entry and all below: 32 per word plus 8 per mask byte.
    """

    push_index: int
    mask: torch.Tensor | None
    words: torch.Tensor
    parent: _Spill | None
    stack_bits: int


@dataclass(frozen=True, eq=False, slots=True)
class InformationBuffer:
    """Immutable per-element store of arbitrarily many bits, for exactly invertible arithmetic.

    Every element keeps a head ``h`` (a natural number ``< 2^47``) above a stack of 32-bit words.
    ``push(v, b)`` appends the base-``b`` digit ``v``: ``h ↦ h·b + v``; ``pop(b)`` removes it again.
    ``draw(b)`` takes the digit ``v = h mod b`` out of the head, ``h ↦ ⌊h / b⌋`` (``v = h``, ``h = 0``
    once the head is smaller than ``b``), and ``undraw(v, b)`` puts it back: ``h ↦ h·b + v``. Every
    operation returns a new buffer and never modifies the tensors of the old one, so a saved buffer can
    be replayed any number of times (e.g. a backward pass with ``retain_graph=True``).

    Spilling: when a push takes some head to ``2^47`` or beyond, every head ``≥ 2^32`` (each has a full
    word to give, so nothing is wasted) moves its low 32 bits to one new stack entry and shifts right by
    32; the entry keeps a packed bit mask of the elements concerned unless all of them are. Spilling
    every full head at once, rather than only those past ``2^47``, keeps heads of different sizes
    spilling together: at most one entry per 16 bits of growth and, in practice, no mask at all (one
    entry per element crossing costs a 1-bit mask per element; that alone would triple the buffer at
    ``γ = 9/10``). Each entry records the number of the push that made it, and the matching pop moves
    those words back first, so ``pop(b)`` is the exact inverse of ``push(·, b)``. ``draw``/``undraw``
    never touch the stack. Heads and words live on the state's device; the stack is a linked list of
    immutable entries, so push and pop cost O(1) in the number of entries.

    Operations must be undone in exactly the reverse order, with the same bases; the buffer counts
    pushes but does not record bases or draws, so that contract is the caller's
    (:func:`scale_exact`/:func:`unscale_exact` keep it).

    Attributes:
        head: int64 tensor of the state's shape, ``0 ≤ head < 2^47``.
        top: top entry of the stack of spilled words, or ``None``.
        depth: number of pushes not yet popped.
    """

    head: torch.Tensor
    top: _Spill | None = None
    depth: int = 0

    @classmethod
    def empty(cls, like: torch.Tensor) -> InformationBuffer:
        """Return a buffer holding nothing, with the shape and device of ``like``."""
        return cls(torch.zeros(like.shape, dtype=torch.int64, device=like.device))

    @property
    def numel(self) -> int:
        """Number of elements (of the state tensor the buffer belongs to)."""
        return self.head.numel()

    def bits(self) -> int:
        """Total bits held: 32 per spilled word, 8 per mask byte, and the bit length of every head."""
        head_bits = torch.frexp(self.head.double()).exponent.sum()  # exact: heads < 2^47 < 2^53
        return int(head_bits) + (self.top.stack_bits if self.top is not None else 0)

    def push(self, values: torch.Tensor, base: int) -> InformationBuffer:
        """Return the buffer with the digit ``values`` appended: ``h ↦ h·base + values``, then spill.

        Args:
            values: int64, the buffer's shape, ``0 ≤ values < base``.
            base: ``1 ≤ base ≤ 2^16``.
        """
        self._check_values(values, base, "push")
        return self._push(values, base)

    def pop(self, base: int) -> tuple[InformationBuffer, torch.Tensor]:
        """Inverse of :meth:`push`: return the buffer before the last push and the values it pushed.

        Args:
            base: the base of the last push.

        Returns:
            The buffer, and the int64 ``values`` of the buffer's shape that the last push appended.
        """
        _check_base(base, "pop")
        if self.depth == 0:
            raise ValueError("pop from an InformationBuffer with no push left to undo")
        return self._pop(base)

    def draw(self, base: int) -> tuple[InformationBuffer, torch.Tensor]:
        """Take ``values = h mod base`` out of the head, ``h ↦ ⌊h / base⌋`` (a zero head gives zeros).

        Args:
            base: ``1 ≤ base ≤ 2^16``.

        Returns:
            The buffer, and int64 ``values`` of the buffer's shape, ``0 ≤ values < base``.
        """
        _check_base(base, "draw")
        return self._draw(base)

    def undraw(self, values: torch.Tensor, base: int) -> InformationBuffer:
        """Inverse of :meth:`draw`: ``h ↦ h·base + values``, on the head only.

        Args:
            values: int64, the buffer's shape, ``0 ≤ values < base``.
            base: the base of the matching draw.

        Raises:
            OverflowError: a head would reach ``2^47``, i.e. this is not the inverse of a draw.
        """
        self._check_values(values, base, "undraw")
        buffer = self._undraw(values, base)
        if buffer.numel > 0 and int(buffer.head.max()) >= _HEAD_LIMIT:
            raise OverflowError("undraw: the head would exceed 2^47; undraw only what draw took out")
        return buffer

    # Unchecked implementations; scale_exact/unscale_exact guarantee their preconditions.

    def _push(self, values: torch.Tensor, base: int) -> InformationBuffer:
        head = torch.add(values, self.head, alpha=base)  # h·base + v < 2^47 · 2^16 ≤ 2^63 (fits int64)
        return self._pushed(head, int(head.max()) if head.numel() else 0)

    def _pushed(self, head: torch.Tensor, largest: int) -> InformationBuffer:
        """The buffer after a push that made the heads ``head`` (``h·base + v``), ``largest`` the largest
        of them (0 if none): spilled if it reached ``2^47``."""
        depth = self.depth + 1
        if largest < _HEAD_LIMIT:
            return InformationBuffer(head, self.top, depth)
        spilled = head > _WORD_MASK  # every head with a full word to give, not only those ≥ 2^47
        count = int(torch.count_nonzero(spilled))
        if count == head.numel():
            mask, low = None, head.reshape(-1) & _WORD_MASK
        else:
            mask, low = _packbits(spilled), head[spilled] & _WORD_MASK
        words = ((low ^ _SIGN_BIT) - _SIGN_BIT).to(torch.int32)  # low 32 bits, two's complement
        head = torch.where(spilled, head >> _WORD_BITS, head)
        below = self.top.stack_bits if self.top is not None else 0
        mask_bits = 8 * mask.numel() if mask is not None else 0
        top = _Spill(depth, mask, words, self.top, below + _WORD_BITS * count + mask_bits)
        return InformationBuffer(head, top, depth)

    def _pop(self, base: int) -> tuple[InformationBuffer, torch.Tensor]:
        head, top = self.head, self.top
        if top is not None and top.push_index == self.depth:
            low = top.words.to(torch.int64) & _WORD_MASK
            if top.mask is None:
                head = (head << _WORD_BITS) | low.view(head.shape)
            else:
                spilled = _unpackbits(top.mask, head.shape)
                head = head.masked_scatter(spilled, (head[spilled] << _WORD_BITS) | low)
            top = top.parent
        head, values = _floor_divmod(head, base)
        return InformationBuffer(head, top, self.depth - 1), values

    def _draw(self, base: int) -> tuple[InformationBuffer, torch.Tensor]:
        head, values = _floor_divmod(self.head, base)
        return InformationBuffer(head, self.top, self.depth), values

    def _undraw(self, values: torch.Tensor, base: int) -> InformationBuffer:
        return InformationBuffer(torch.add(values, self.head, alpha=base), self.top, self.depth)

    def _check_values(self, values: torch.Tensor, base: int, op: str) -> None:
        _check_base(base, op)
        if values.dtype != torch.int64 or values.shape != self.head.shape:
            raise ValueError(
                f"{op}: values must be int64 of shape {tuple(self.head.shape)},"
                f" got {values.dtype} of shape {tuple(values.shape)}"
            )
        if values.numel() > 0:
            low, high = (int(v) for v in torch.aminmax(values))
            if low < 0 or high >= base:
                raise ValueError(f"{op}: values must lie in [0, {base}), got [{low}, {high}]")


def _floor_divmod(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(⌊a / b⌋, a mod b)`` with the floor convention (remainder in ``[0, b)`` for ``b > 0``)."""
    quotient = torch.div(a, b, rounding_mode="floor")
    return quotient, torch.sub(a, quotient, alpha=b)


def _check_base(base: int, op: str) -> None:
    if not isinstance(base, int) or not 1 <= base <= MAX_DENOMINATOR:
        raise ValueError(f"{op}: base must be an int in [1, {MAX_DENOMINATOR}], got {base!r}")


def _ratio_parts(ratio: Fraction, q: torch.Tensor, buffer: InformationBuffer) -> tuple[int, int]:
    """Validate the operands of scale_exact/unscale_exact; return ``(n, d)`` of ``ratio``."""
    if not isinstance(ratio, Fraction):
        raise TypeError(f"ratio must be a Fraction (see exact_ratio), got {type(ratio).__name__}")
    n, d = ratio.numerator, ratio.denominator
    if n == 0 or abs(n) > MAX_DENOMINATOR or d > MAX_DENOMINATOR:
        raise ValueError(f"ratio {ratio} must be nonzero with |numerator|, denominator <= {MAX_DENOMINATOR}")
    if q.dtype != torch.int64 or q.shape != buffer.head.shape:
        raise ValueError(
            f"q must be int64 of the buffer's shape {tuple(buffer.head.shape)},"
            f" got {q.dtype} of shape {tuple(q.shape)}"
        )
    return n, d


def scale_exact(
    q: torch.Tensor, ratio: Fraction, buffer: InformationBuffer, *, input_in_range: bool = False
) -> tuple[torch.Tensor, InformationBuffer]:
    """Multiply fixed-point integers by ``ratio = n/d`` exactly invertibly (Maclaurin et al., 2015).

    With ``n > 0`` (a negative ``n`` first negates ``q``), floor division and floor modulo throughout::

        r  = h mod n,          h ↦ ⌊h / n⌋      (draw: reuse buffer bits)
        q' = q·n + r
        r2 = q' mod d,         q ↦ ⌊q' / d⌋
        h ↦ h·d + r2                            (push)

    so ``q ↦ ⌊(q·n + r) / d⌋ ≈ q·n/d`` for any sign of ``q``, and the buffer grows by about
    ``log2(d/n)`` bits per element (it shrinks, down to an empty head, when ``n > d``). The inverse
    recovers ``q = ⌊q' / n⌋`` because ``0 ≤ r < n``. ``|ratio| = 1`` returns the same buffer object.

    Args:
        q: int64 fixed-point integers, the buffer's shape, ``|q| ≤ 2^46``.
        ratio: ``n/d`` with ``0 < |n|, d ≤ 2^16`` (see :func:`exact_ratio`).
        buffer: the information buffer of ``q``; not modified.
        input_in_range: the caller has already checked ``|q| ≤ 2^46`` (the engine checks every state
            it makes), so the check of the input is skipped.

    Returns:
        The scaled integers (int64, same shape) and the new buffer.

    Raises:
        OverflowError: ``|q|`` or the result exceeds ``2^46``.
    """
    n, d = _ratio_parts(ratio, q, buffer)
    if not input_in_range:
        check_range(q, what="scale_exact input")
    if n < 0:
        q, n = -q, -n
    if n == d:
        return q, buffer
    buffer, r = buffer._draw(n)
    q, r2 = _floor_divmod(torch.add(r, q, alpha=n), d)  # q·n + r, |q·n| ≤ 2^62
    buffer = buffer._push(r2, d)
    if n > d:  # for n < d, |⌊(q·n + r) / d⌋| ≤ |q|: no new range check needed
        check_range(q, what="scale_exact result")
    return q, buffer


def unscale_exact(
    q: torch.Tensor, ratio: Fraction, buffer: InformationBuffer
) -> tuple[torch.Tensor, InformationBuffer]:
    """Exact inverse of :func:`scale_exact` with the same ``ratio = n/d``.

    With ``n > 0``::

        r2 = pop(d)                             (h ↦ ⌊h / d⌋ after unspilling)
        q' = q·d + r2
        r  = q' mod n,         q ↦ ⌊q' / n⌋
        h ↦ h·n + r                             (undraw)

    then negate ``q`` back if ``n < 0``. ``|ratio| = 1`` returns the same buffer object.

    Args:
        q: int64 fixed-point integers, the buffer's shape, ``|q| ≤ 2^46``.
        ratio: the ``n/d`` given to :func:`scale_exact`.
        buffer: the buffer :func:`scale_exact` returned; not modified.

    Returns:
        The integers and buffer that were given to :func:`scale_exact`.

    Raises:
        OverflowError: ``|q|`` or the result exceeds ``2^46``.
    """
    n, d = _ratio_parts(ratio, q, buffer)
    check_range(q, what="unscale_exact input")
    sign = -1 if n < 0 else 1
    n = abs(n)
    if n != d:
        if buffer.depth == 0:
            raise ValueError("unscale_exact: the buffer holds no push to undo")
        buffer, r2 = buffer._pop(d)
        q, r = _floor_divmod(torch.add(r2, q, alpha=d), n)  # q·d + r2, |q·d| ≤ 2^62
        buffer = buffer._undraw(r, n)
        if d > n:  # for d < n, |⌊(q·d + r2) / n⌋| ≤ |q|
            check_range(q, what="unscale_exact result")
    return (-q if sign < 0 else q), buffer


# --------------------------------------------------------------------------------------------------
# Fused CPU kernels: quantise, scale and add in one pass over memory; add and dequantise in one pass.

_KERNEL_SOURCE = r"""
#include <stdint.h>
#include <string.h>
typedef int64_t i64;
#define SAFE 70368744177664.0             /* 2^46 */
#define MAGIC 6755399441055744.0          /* 1.5 · 2^52: its ulp is 1 */
#define MAGIC_BITS 0x4338000000000000LL   /* the bits of MAGIC */

/* Exact conversions of integers |x| < 2^51: x sits in the mantissa of MAGIC + x. */
static inline double to_f64(i64 x) { i64 b = x + MAGIC_BITS; double r; memcpy(&r, &b, 8); return r - MAGIC; }
static inline i64 to_i64(double x) { double y = x + MAGIC; i64 b; memcpy(&b, &y, 8); return b - MAGIC_BITS; }
/* x rounded to an integer, half to even (the default rounding mode), |x| < 2^51. */
static inline double round_even(double x) { return (x + MAGIC) - MAGIC; }
/* floor(a / d) of integers |a| < 2^52, 1 <= d < 2^6, inv = fl(1/d), |a/d| < 2^50: a·inv is within 1/4 of
   a/d, so its nearest integer is floor(a/d) or one more; the remainder's sign tells which (exact products). */
static inline double floor_div(double a, double d, double inv) {
    double q = round_even(a * inv);
    return a - q * d < 0 ? q - 1 : q;
}

/* new = floor((old·sn + (h mod n)) / d) + round(fl(inc·factor)), h -> floor(h/n)·d + (that numerator mod d),
   n = |sn|. stats: [0] 1 if some |fl(inc·factor)| > 2^46 or NaN, [1] min and [2] max of new (and 0), [3] max head. */
#define APPLY(NAME, T) \
void NAME(i64 count, const i64 *old, const i64 *head, const T *inc, double factor, double sn, double d, \
          i64 *out, i64 *head_out, i64 *stats) { \
    const T f = (T)factor; const double n = sn < 0 ? -sn : sn, inv_n = 1.0 / n, inv_d = 1.0 / d; \
    i64 bad = 0, lo = 0, hi = 0, top = 0; \
    for (i64 i = 0; i < count; i++) { \
        double s = (double)(inc[i] * f), m = s < 0 ? -s : s; \
        i64 ok = m <= SAFE; bad |= ok ^ 1; double qi = round_even(ok ? s : 0); /* NaN: not ok */ \
        double h = to_f64(head[i]), hq = floor_div(h, n, inv_n); \
        double a = to_f64(old[i]) * sn + (h - hq * n), q = floor_div(a, d, inv_d); \
        double h2 = hq * d + (a - q * d), v = q + qi; \
        i64 vi = to_i64(v), hi_ = to_i64(h2); out[i] = vi; head_out[i] = hi_; \
        lo = vi < lo ? vi : lo; hi = vi > hi ? vi : hi; top = hi_ > top ? hi_ : top; \
    } \
    stats[0] = bad; stats[1] = lo; stats[2] = hi; stats[3] = top; \
}

/* a = (new - round(fl(inc·factor)))·d + (h mod d), old = sign(sn)·floor(a / n), h -> floor(h/d)·n + (a mod n).
   stats: [0] as above, [1] min and [2] max of new - round(fl(inc·factor)) (and 0), [3] min and [4] max of
   floor(a / n) (and 0). */
#define UNDO(NAME, T) \
void NAME(i64 count, const i64 *new_, const i64 *head, const T *inc, double factor, double sn, double d, \
          i64 *out, i64 *head_out, i64 *stats) { \
    const T f = (T)factor; const double n = sn < 0 ? -sn : sn, inv_n = 1.0 / n, inv_d = 1.0 / d; \
    const double sign = sn < 0 ? -1.0 : 1.0; \
    i64 bad = 0, lo = 0, hi = 0, lo2 = 0, hi2 = 0; \
    for (i64 i = 0; i < count; i++) { \
        double s = (double)(inc[i] * f), m = s < 0 ? -s : s; \
        i64 ok = m <= SAFE; bad |= ok ^ 1; double qi = round_even(ok ? s : 0); /* NaN: not ok */ \
        double o = to_f64(new_[i]) - qi; \
        double c = o > SAFE ? SAFE : o < -SAFE ? -SAFE : o; /* o itself is range-checked */ \
        double h = to_f64(head[i]), hq = floor_div(h, d, inv_d); \
        double a = c * d + (h - hq * d), q = floor_div(a, n, inv_n); \
        out[i] = to_i64(sign * q); head_out[i] = to_i64(hq * n + (a - q * n)); \
        i64 oi = to_i64(c == o ? o : c + c), qq = to_i64(q); /* beyond 2^46: twice the clamp, still beyond */ \
        lo = oi < lo ? oi : lo; hi = oi > hi ? oi : hi; lo2 = qq < lo2 ? qq : lo2; hi2 = qq > hi2 ? qq : hi2; \
    } \
    stats[0] = bad; stats[1] = lo; stats[2] = hi; stats[3] = lo2; stats[4] = hi2; \
}

/* new = old ± inc (wrapping, as torch's int64 arithmetic), view = (T)new · (T)scale: new rounded once to T,
   times the power of two scale in T (dequantize's two steps). stats: [0] min and [1] max of new (and 0). */
#define COMBINE(NAME, T, OP) \
void NAME(i64 count, const i64 *old, const i64 *inc, double scale, i64 *out, T *view, i64 *stats) { \
    const T s = (T)scale; i64 lo = 0, hi = 0; \
    for (i64 i = 0; i < count; i++) { \
        i64 v = (i64)((uint64_t)old[i] OP (uint64_t)inc[i]); out[i] = v; view[i] = (T)v * s; \
        lo = v < lo ? v : lo; hi = v > hi ? v : hi; \
    } \
    stats[0] = lo; stats[1] = hi; \
}

/* view = (T)q · (T)scale, as above. */
#define VIEW(NAME, T) \
void NAME(i64 count, const i64 *q, double scale, T *view) { \
    const T s = (T)scale; \
    for (i64 i = 0; i < count; i++) view[i] = (T)q[i] * s; \
}

APPLY(apply_f32, float)
APPLY(apply_f64, double)
UNDO(undo_f32, float)
UNDO(undo_f64, double)
COMBINE(add_f32, float, +)
COMBINE(add_f64, double, +)
COMBINE(sub_f32, float, -)
COMBINE(sub_f64, double, -)
VIEW(view_f32, float)
VIEW(view_f64, double)
"""

_KERNEL_SUFFIXES = {torch.float32: "f32", torch.float64: "f64"}  # the floating dtypes of the kernels
_KERNEL_SIGNATURES = {  # argument types of each kind of kernel, "<kind>_f32" and "<kind>_f64"
    "apply": ("n", "p", "p", "p", "r", "r", "r", "p", "p", "p"),
    "undo": ("n", "p", "p", "p", "r", "r", "r", "p", "p", "p"),
    "add": ("n", "p", "p", "r", "p", "p", "p"),
    "sub": ("n", "p", "p", "r", "p", "p", "p"),
    "view": ("n", "p", "r", "p"),
}
_KERNEL_MAX_DENOMINATOR = 63


def _cpu_identity() -> str:
    """The processor's model and instruction-set flags (from ``/proc/cpuinfo`` where there is one)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    keys = ("model name", "flags", "Features", "CPU part")
    return "\n".join(sorted({line for line in lines if line.split(":")[0].strip() in keys}))


@functools.cache
def _kernels() -> ctypes.CDLL | None:
    """The fused CPU kernels of :data:`_KERNEL_SOURCE`, or ``None`` where they cannot be built.

    Compiled once with the system C compiler (``cc``, ``gcc`` or ``clang``; ``-O3 -march=native``) into
    ``$XDG_CACHE_HOME/revnets`` (``~/.cache/revnets``), named by a hash of the source, the compiler and
    the processor (model and instruction-set flags), so that a shared cache never serves a library
    built for another processor. ``None`` when no compiler is found or building or loading fails:
    callers then run the same arithmetic as separate torch operations (the same bits, slower).
    """
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        return None
    flags = ("-O3", "-march=native", "-fno-trapping-math", "-ffp-contract=off", "-fPIC", "-shared")  # vectorised, no FMA
    key = hashlib.sha256("\0".join((_KERNEL_SOURCE, compiler, *flags, platform.machine(), _cpu_identity())).encode())
    key = key.hexdigest()
    directory = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "revnets"
    library = directory / f"exact-{key[:16]}.so"
    try:
        if not library.exists():
            directory.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=directory) as scratch:
                source, built = Path(scratch) / "exact.c", Path(scratch) / "exact.so"
                source.write_text(_KERNEL_SOURCE)
                subprocess.run([compiler, *flags, str(source), "-o", str(built)], check=True, capture_output=True,
                               timeout=120)
                os.replace(built, library)  # atomic: concurrent builds leave one complete library
        kernels = ctypes.CDLL(str(library))
    except (OSError, subprocess.SubprocessError):
        return None
    types = {"n": ctypes.c_int64, "p": ctypes.c_void_p, "r": ctypes.c_double}
    for kind, signature in _KERNEL_SIGNATURES.items():
        for suffix in ("f32", "f64"):
            function = getattr(kernels, f"{kind}_{suffix}")
            function.argtypes = tuple(types[t] for t in signature)
            function.restype = None
    return kernels


def _fused_kernel(kind: str, q: torch.Tensor, buffer: InformationBuffer, increment: torch.Tensor, n: int, d: int):
    """The kernel ``kind`` ("apply" or "undo") for these operands, or ``None`` where it does not apply.

    It needs contiguous non-empty CPU tensors, a float32 or float64 increment and a contraction
    ``0 < |n| < d ≤ 63`` with ``(⌊2^47/|n|⌋ + 1)·d ≤ 2^51`` (:func:`_kernel_ratio`).
    """
    suffix = _KERNEL_SUFFIXES.get(increment.dtype)
    if suffix is None or not _kernel_ratio(n, d) or not (q.is_cpu and increment.is_cpu and q.numel()):
        return None
    if increment.shape != q.shape or not (q.is_contiguous() and buffer.head.is_contiguous() and increment.is_contiguous()):
        return None
    kernels = _kernels()
    return None if kernels is None else getattr(kernels, f"{kind}_{suffix}")


@functools.cache
def _kernel_ratio(n: int, d: int) -> bool:
    """Whether the kernels of :func:`_fused_kernel` take the contraction ``n/d``: ``0 < |n| < d ≤ 63`` and
    ``(⌊2^47/|n|⌋ + 1)·d ≤ 2^51``, so that every intermediate of their float64 arithmetic is an integer
    below ``2^52`` (``|q·n|, |q·d| ≤ 2^46·63``, heads ``< 2^51``), exact."""
    return 0 < abs(n) < d <= _KERNEL_MAX_DENOMINATOR and ((1 << 47) // abs(n) + 1) * d <= 1 << 51


def _integer_kernel(kind: str, dtype: torch.dtype, q: torch.Tensor, other: torch.Tensor | None = None):
    """The kernel ``kind`` ("add", "sub" or "view") making a ``dtype`` view from int64 ``q`` (and ``other``),
    or ``None`` unless they are contiguous non-empty CPU tensors of one shape and ``dtype`` is float32
    or float64."""
    suffix = _KERNEL_SUFFIXES.get(dtype)
    if suffix is None or not (q.dtype == torch.int64 and q.is_cpu and q.is_contiguous() and q.numel()):
        return None
    if other is not None and not (other.dtype == torch.int64 and other.is_cpu and other.is_contiguous()
                                  and other.shape == q.shape):
        return None
    kernels = _kernels()
    return None if kernels is None else getattr(kernels, f"{kind}_{suffix}")


def add_exact(
    q: torch.Tensor, increment: torch.Tensor, frac_bits: int, dtype: torch.dtype, *, subtract: bool = False,
    what: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``q' = q + increment`` (``q − increment`` if ``subtract``) of int64 tensors, and its view
    ``dequantize(q', frac_bits, dtype)`` where it comes from the same pass.

    On contiguous CPU tensors of one shape and a float32 or float64 ``dtype`` one pass of a compiled
    kernel (see :func:`_kernels`) computes ``q'``, its view ``fl(fl(q')·2^-F)`` and its extremes;
    elsewhere the torch operation runs and the view is ``None`` (not computed). The same integers
    either way (wrapping as int64 arithmetic does).

    Args:
        q, increment: int64 tensors.
        frac_bits: number of fractional bits ``F`` of the view.
        dtype: floating dtype of the view.
        subtract: subtract ``increment`` instead of adding it.
        what: if given, what ``q'`` holds: it is then range-checked as :func:`check_range` does.

    Returns:
        ``q'``, and its view or ``None``.

    Raises:
        OverflowError: ``what`` is given and some ``|q'| > 2^46``.
    """
    kernel = _integer_kernel("sub" if subtract else "add", dtype, q, increment)
    if kernel is None:
        new = q - increment if subtract else q + increment
        if what is not None:
            check_range(new, what=what)
        return new, None
    new, view, stats = torch.empty_like(q), torch.empty_like(q, dtype=dtype), (ctypes.c_int64 * 2)()
    kernel(q.numel(), q.data_ptr(), increment.data_ptr(), 2.0**-frac_bits, new.data_ptr(), view.data_ptr(), stats)
    if what is not None and not (-SAFE_LIMIT <= stats[0] and stats[1] <= SAFE_LIMIT):
        check_range(new, what=what)  # raises, with its message
    return new, view


def _run_kernel(kernel, q: torch.Tensor, head: torch.Tensor, increment: torch.Tensor, factor: float, n: int, d: int,
                stat_count: int):
    out, head_out = torch.empty_like(q), torch.empty_like(head)
    stats = (ctypes.c_int64 * stat_count)()
    kernel(q.numel(), q.data_ptr(), head.data_ptr(), increment.data_ptr(), factor, float(n), float(d),
           out.data_ptr(), head_out.data_ptr(), stats)
    return out, head_out, tuple(stats)


def scale_add_exact(
    q: torch.Tensor, ratio: Fraction, buffer: InformationBuffer, increment: torch.Tensor, frac_bits: int, *,
    gain: float = 1.0, what: str = "increment", result: str = "result",
) -> tuple[torch.Tensor, InformationBuffer]:
    """``q' = scale_exact(q, ratio, buffer) + quantize(increment, frac_bits, gain=gain)``, range-checked.

    The same integers, buffer and errors as those operations one after the other. For a contraction
    ``0 < |n| < d`` on contiguous CPU tensors (float32 or float64 increment) it is one pass of a
    compiled kernel (see :func:`_kernels`): per element ``r = h mod n``, ``a = q·n + r``,
    ``q' = ⌊a/d⌋ + round(fl(gain·u)·2^F)``, ``h ↦ ⌊h/n⌋·d + (a mod d)``, with the range checks of
    :func:`quantize` and :func:`check_range` reduced in the same pass; elsewhere the separate torch
    operations run.

    Args:
        q: int64 fixed-point integers, the buffer's shape, ``|q| ≤ 2^46`` (not checked again: the
            caller's invariant, as ``scale_exact(..., input_in_range=True)``).
        ratio: ``n/d``, see :func:`scale_exact`.
        buffer: the information buffer of ``q``; not modified.
        increment: floating-point tensor of ``q``'s shape.
        frac_bits: number of fractional bits ``F``.
        gain: a number multiplying ``increment`` before quantisation.
        what: what ``increment`` holds, for messages.
        result: what ``q'`` holds, for messages.

    Raises:
        FloatingPointError: ``increment`` holds NaN or infinity.
        OverflowError: the quantised increment or ``q'`` is beyond ``±2^46``.
    """
    n, d = _ratio_parts(ratio, q, buffer)
    kernel = _fused_kernel("apply", q, buffer, increment, n, d)
    if kernel is not None:
        new, head, (bad, low, high, top) = _run_kernel(kernel, q, buffer.head, increment,
                                                       float(gain) * float(1 << frac_bits), n, d, 4)
        if not bad and -SAFE_LIMIT <= low and high <= SAFE_LIMIT:
            return new, buffer._pushed(head, top)
    # the separate operations: elsewhere, and to raise the error the kernel found, naming its cause
    scaled, buffer = scale_exact(q, ratio, buffer, input_in_range=True)
    new = scaled + quantize(increment, frac_bits, gain=gain, what=what)
    check_range(new, what=result)
    return new, buffer


def unscale_sub_exact(
    q: torch.Tensor, ratio: Fraction, buffer: InformationBuffer, increment: torch.Tensor, frac_bits: int, *,
    gain: float = 1.0, what: str = "increment",
) -> tuple[torch.Tensor, InformationBuffer]:
    """Exact inverse of :func:`scale_add_exact`: ``unscale_exact(q − quantize(increment, frac_bits, gain=gain),
    ratio, buffer)`` (for ``ratio = 1``, just the difference).

    The same integers, buffer and errors as those operations one after the other; for a contraction
    on contiguous CPU tensors whose last push spilled nothing, one pass of a compiled kernel: per
    element ``a = (q − round(fl(gain·u)·2^F))·d + (h mod d)``, ``q ↦ ⌊a/n⌋``,
    ``h ↦ ⌊h/d⌋·n + (a mod n)``, with the range checks of :func:`unscale_exact` reduced in the same pass.

    Args:
        q: int64 fixed-point integers, the buffer's shape, ``|q| ≤ 2^46`` (the caller's invariant).
        ratio: the ``n/d`` given to :func:`scale_add_exact`.
        buffer: the buffer :func:`scale_add_exact` returned; not modified.
        increment: the floating-point increment given to :func:`scale_add_exact`.
        frac_bits, gain, what: as given to :func:`scale_add_exact`.

    Raises:
        FloatingPointError: ``increment`` holds NaN or infinity.
        OverflowError: the quantised increment, the difference or the result is beyond ``±2^46``.
    """
    n, d = _ratio_parts(ratio, q, buffer)
    kernel = _fused_kernel("undo", q, buffer, increment, n, d)
    if kernel is not None and buffer.depth > 0 and (buffer.top is None or buffer.top.push_index != buffer.depth):
        old, head, (bad, *extremes) = _run_kernel(kernel, q, buffer.head, increment,
                                                  float(gain) * float(1 << frac_bits), n, d, 5)
        if not bad and -SAFE_LIMIT <= min(extremes) and max(extremes) <= SAFE_LIMIT:
            return old, InformationBuffer(head, buffer.top, buffer.depth - 1)
    old = q - quantize(increment, frac_bits, gain=gain, what=what)
    return (old, buffer) if ratio == 1 else unscale_exact(old, ratio, buffer)
