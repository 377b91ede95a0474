"""The information buffer of exact mode (Maclaurin, Duvenaud & Adams 2015): an immutable per-element
store of arbitrarily many bits, into which a multiplication by ``n/d`` pushes the remainder it would
otherwise destroy, and from which its inverse pops it back.

Each element holds a *head* (an int64 below ``2^47``) that takes ``push(value, base)`` as
``head·base + value``; when a head would outgrow that range its low 32-bit word spills onto a persistent
stack of spilled words shared by all elements (packed masks say which elements spilled), so the buffer
grows as needed and never overflows silently.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_DENOMINATOR = 1 << 16
"""Largest ``|n|`` and ``d`` of a scale factor ``n/d`` and largest base of a buffer push or draw."""

_HEAD_LIMIT = 1 << 47  # heads stay in [0, 2^47): head · 2^16 + (2^16 − 1) ≤ 2^63 − 1
_WORD_BITS = 32  # granularity of a spill from a head to the stack
_WORD_MASK = (1 << _WORD_BITS) - 1
_SIGN_BIT = 1 << (_WORD_BITS - 1)


def packbits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool tensor (flattened, row-major) into uint8, 8 elements a byte, little-endian bits."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = -flat.numel() % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    shifts = torch.arange(8, dtype=torch.uint8, device=mask.device)
    return (flat.view(-1, 8) << shifts).sum(dim=1).to(torch.uint8)  # (ceil(numel / 8),)


def unpackbits(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of :func:`packbits`: the bool tensor of ``shape``."""
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
        check_base(base, "pop")
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
        check_base(base, "draw")
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
            mask, low = packbits(spilled), head[spilled] & _WORD_MASK
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
                spilled = unpackbits(top.mask, head.shape)
                head = head.masked_scatter(spilled, (head[spilled] << _WORD_BITS) | low)
            top = top.parent
        head, values = floor_divmod(head, base)
        return InformationBuffer(head, top, self.depth - 1), values

    def _draw(self, base: int) -> tuple[InformationBuffer, torch.Tensor]:
        head, values = floor_divmod(self.head, base)
        return InformationBuffer(head, self.top, self.depth), values

    def _undraw(self, values: torch.Tensor, base: int) -> InformationBuffer:
        return InformationBuffer(torch.add(values, self.head, alpha=base), self.top, self.depth)

    def _check_values(self, values: torch.Tensor, base: int, op: str) -> None:
        check_base(base, op)
        if values.dtype != torch.int64 or values.shape != self.head.shape:
            raise ValueError(
                f"{op}: values must be int64 of shape {tuple(self.head.shape)},"
                f" got {values.dtype} of shape {tuple(values.shape)}"
            )
        if values.numel() > 0:
            low, high = (int(v) for v in torch.aminmax(values))
            if low < 0 or high >= base:
                raise ValueError(f"{op}: values must lie in [0, {base}), got [{low}, {high}]")


def floor_divmod(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(⌊a / b⌋, a mod b)`` with the floor convention (remainder in ``[0, b)`` for ``b > 0``)."""
    quotient = torch.div(a, b, rounding_mode="floor")
    return quotient, torch.sub(a, quotient, alpha=b)


def check_base(base: int, op: str) -> None:
    if not isinstance(base, int) or not 1 <= base <= MAX_DENOMINATOR:
        raise ValueError(f"{op}: base must be an int in [1, {MAX_DENOMINATOR}], got {base!r}")

