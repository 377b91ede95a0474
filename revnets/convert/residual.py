"""Residual functions cut out of existing blocks: ``f(x, ...) = block(x, ...) − x``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn


@contextlib.contextmanager
def fused_attention_fast_path_disabled() -> Iterator[None]:
    """Turn off PyTorch's fused Transformer/attention inference path inside the block.

    The fused path runs only without autograd, so a reversible forward (no graph) would take it while
    the backward's recomputation (with graph) would not: two different roundings of the same layer,
    and a reconstruction that drifts. With it off, both compute the layer's documented maths.
    """
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


class ResidualDifference(torch.autograd.Function):
    """``sign·(block(x) − x)`` whose gradient for the operand subtracted is ``−g`` as a negated view of the
    incoming gradient ``g`` rather than a new tensor: autograd holds ``x``'s gradient from the start of the
    block's backward until the block's own gradient for ``x`` is added to it at its end, and with ``sign=-1``
    the block's whole backward starts from ``−g``, so a materialised ``−g`` would be one tensor of the
    state's size more through the whole backward of the block (its peak). Where an op needs the values of
    a negated view it makes them for its own use; sums with it are ordinary tensors."""

    @staticmethod
    def forward(ctx, out: Tensor, x: Tensor, sign: int) -> Tensor:
        ctx.sign = sign
        return out - x if sign == 1 else x - out

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        negated = torch._neg_view(g)
        out_grad, x_grad = (g, negated) if ctx.sign == 1 else (negated, g)
        return (out_grad if ctx.needs_input_grad[0] else None, x_grad if ctx.needs_input_grad[1] else None, None)


class ResidualFunction(nn.Module):
    """``f(x, *args, **kwargs) = block(x, *args, **kwargs) − x`` for a block computing ``x + F(x)``
    (``sign=-1``: ``x − block(x)``, for a scheme that subtracts its function, such as Leapfrog).

    Plugged into a momentum step, ``γ = 0`` gives ``x + f(x) = block(x)``: the original block. The
    block's extra arguments (attention masks, encoder memory) are passed through. Shapes: ``x`` and
    ``block(x)`` must agree, which the engine checks at every layer.
    """

    def __init__(self, block: nn.Module, sign: int = 1):
        super().__init__()
        if sign not in (1, -1):
            raise ValueError(f"sign must be 1 or -1; got {sign!r}")
        self.block = block
        self.sign = sign

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        with fused_attention_fast_path_disabled():
            out = self.block(x, *args, **kwargs)
        if not isinstance(out, Tensor):
            raise TypeError(
                f"{type(self.block).__name__} returned {type(out).__name__}, not a tensor: only blocks that "
                "return their output tensor alone can be converted"
            )
        if torch.is_grad_enabled():
            return ResidualDifference.apply(out, x, self.sign)
        return out - x if self.sign == 1 else x - out
