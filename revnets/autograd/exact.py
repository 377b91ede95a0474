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

import math
import numbers
import warnings
from fractions import Fraction

import torch

from .buffer import MAX_DENOMINATOR, InformationBuffer, floor_divmod
from .kernels import fused_kernel, integer_kernel

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

SAFE_LIMIT = 1 << 46
"""Largest magnitude of a fixed-point integer: ``SAFE_LIMIT · MAX_DENOMINATOR = 2^62`` fits in int64."""


def exact_ratio(
    value: float | Fraction | torch.Tensor, name: str = "scale"
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
    contiguous CPU tensor and float32 or float64, one pass of a compiled operator
    (``torch.ops.revnets.exact_view``, see :func:`~revnets.autograd.kernels.cpu_kernels`), with the same bits.

    Args:
        q: int64 fixed-point integers of any shape, ``|q| ≤ 2^53`` for an exact float64 step.
        frac_bits: number of fractional bits ``F ≥ 0``.
        dtype: floating dtype of the result.
    """
    _check_frac_bits(frac_bits)
    kernel = integer_kernel("view", dtype, q)
    if kernel is not None:  # the same two steps in one pass
        return kernel(q, 2.0**-frac_bits, dtype)
    # Rounding to dtype commutes with the exact scaling by 2^-F: one rounding, as in float64 then dtype.
    return q.to(dtype).mul_(2.0**-frac_bits)


def _check_frac_bits(frac_bits: int) -> None:
    if not isinstance(frac_bits, int) or frac_bits < 0:
        raise ValueError(f"frac_bits must be a non-negative int, got {frac_bits!r}")


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
    q, r2 = floor_divmod(torch.add(r, q, alpha=n), d)  # q·n + r, |q·n| ≤ 2^62
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
        q, r = floor_divmod(torch.add(r2, q, alpha=d), n)  # q·d + r2, |q·d| ≤ 2^62
        buffer = buffer._undraw(r, n)
        if d > n:  # for d < n, |⌊(q·d + r2) / n⌋| ≤ |q|
            check_range(q, what="unscale_exact result")
    return (-q if sign < 0 else q), buffer

def add_exact(
    q: torch.Tensor, increment: torch.Tensor, frac_bits: int, dtype: torch.dtype, *, subtract: bool = False,
    what: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``q' = q + increment`` (``q − increment`` if ``subtract``) of int64 tensors, and its view
    ``dequantize(q', frac_bits, dtype)`` where it comes from the same pass.

    On contiguous CPU tensors of one shape and a float32 or float64 ``dtype`` one pass of a compiled
    operator (``torch.ops.revnets.exact_add``, see :func:`~revnets.autograd.kernels.cpu_kernels`)
    computes ``q'``, its view ``fl(fl(q')·2^-F)`` and its extremes; elsewhere the torch operation runs
    and the view is ``None`` (not computed). The same integers either way (wrapping as int64 arithmetic does).

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
    kernel = integer_kernel("add", dtype, q, increment)
    if kernel is None:
        new = q - increment if subtract else q + increment
        if what is not None:
            check_range(new, what=what)
        return new, None
    new, view, stats = kernel(q, increment, 2.0**-frac_bits, subtract, dtype)
    low, high = stats.tolist()
    if what is not None and not (-SAFE_LIMIT <= low and high <= SAFE_LIMIT):
        check_range(new, what=what)  # raises, with its message
    return new, view


def scale_add_exact(
    q: torch.Tensor, ratio: Fraction, buffer: InformationBuffer, increment: torch.Tensor, frac_bits: int, *,
    gain: float = 1.0, what: str = "increment", result: str = "result",
) -> tuple[torch.Tensor, InformationBuffer]:
    """``q' = scale_exact(q, ratio, buffer) + quantize(increment, frac_bits, gain=gain)``, range-checked.

    The same integers, buffer and errors as those operations one after the other. For a contraction
    ``0 < |n| < d`` on contiguous CPU tensors (float32 or float64 increment) it is one pass of a
    compiled operator (``torch.ops.revnets.exact_scale_add``, see
    :func:`~revnets.autograd.kernels.cpu_kernels`): per element ``r = h mod n``, ``a = q·n + r``,
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
    kernel = fused_kernel("apply", q, buffer.head, increment, n, d)
    if kernel is not None:
        new, head, stats = kernel(q, buffer.head, increment, float(gain) * float(1 << frac_bits), n, d)
        bad, low, high, top = stats.tolist()
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
    on contiguous CPU tensors whose last push spilled nothing, one pass of a compiled operator
    (``torch.ops.revnets.exact_unscale_sub``): per
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
    kernel = fused_kernel("undo", q, buffer.head, increment, n, d)
    if kernel is not None and buffer.depth > 0 and (buffer.top is None or buffer.top.push_index != buffer.depth):
        old, head, stats = kernel(q, buffer.head, increment, float(gain) * float(1 << frac_bits), n, d)
        bad, *extremes = stats.tolist()
        if not bad and -SAFE_LIMIT <= min(extremes) and max(extremes) <= SAFE_LIMIT:
            return old, InformationBuffer(head, buffer.top, buffer.depth - 1)
    old = q - quantize(increment, frac_bits, gain=gain, what=what)
    return (old, buffer) if ratio == 1 else unscale_exact(old, ratio, buffer)

