"""The residual function of a ResNet block with a lean backward: ``f(x) = relu(bn(conv(h(x))) + x) − x``.

A converted stack re-evaluates ``f`` and takes its vector-Jacobian product once per layer in the backward
(Sander et al. 2021, Sec. 3); at the widest stage of an ImageNet ResNet (``(B, 256, 56, 56)``) that
product, not the stack's state, sets the training step's peak. Through autograd, ``block(x) − x`` holds
the last convolution's output (for the BatchNorm backward), the ReLU output and, while differentiating,
the gradients of the ReLU, of the BatchNorm and of ``−x`` besides the accumulating gradient of ``x``:
five tensors of the block's output size, and the first convolution's input gradient besides.
:class:`ResidualBlockFunction` computes ``f`` in one :class:`torch.autograd.Function` that keeps ``x``,
the (4× narrower in a Bottleneck) middle of the block and the last BatchNorm's statistics, and
differentiates the tail ``relu(bn(conv(h)) + x) − x`` group of output channels by group, recomputing
``conv(h)`` for each, and the first convolution group of input channels by group: one tensor of the
output size (the gradient of ``x``) instead of five or six. The values are those of ``block(x) − x``, bit for bit (same
kernels in the same order), so a reversible stack inverts the same numbers in either form.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

CHANNEL_GROUPS = 8
"""How many output-channel groups the tail's backward recomputes one at a time: its working set is about
``4 / CHANNEL_GROUPS`` of a tensor of the block's output size."""

_LAYOUTS = {  # class (module, name) -> (head (conv, bn) pairs, tail (conv, bn))
    ("torchvision.models.resnet", "BasicBlock"): ((("conv1", "bn1"),), ("conv2", "bn2")),
    ("torchvision.models.resnet", "Bottleneck"): ((("conv1", "bn1"), ("conv2", "bn2")), ("conv3", "bn3")),
    ("revnets.models.layers", "BasicBlock"): ((("conv1", "bn1"),), ("conv2", "bn2")),
    ("revnets.models.layers", "Bottleneck"): ((("conv1", "bn1"), ("conv2", "bn2")), ("conv3", "bn3")),
}


def block_layout(block: nn.Module) -> tuple[tuple[tuple[str, str], ...], tuple[str, str]] | None:
    """``(head, tail)`` names of a torchvision or zoo ``BasicBlock``/``Bottleneck`` that keeps the shape
    (``downsample is None``): ``relu(tail_bn(tail_conv(h)) + x)`` with ``h = relu(bn(conv(·)))`` over the
    head pairs; ``None`` for any other block."""
    layout = _LAYOUTS.get((type(block).__module__, type(block).__name__))
    if layout is None or getattr(block, "downsample", None) is not None or not isinstance(block.relu, nn.ReLU):
        return None
    return layout


class BlockResidual(nn.Module):
    """``f(x) = block(x) − x`` for a block of :func:`block_layout`, through :class:`ResidualBlockFunction`
    when a graph is recorded. ``x``: ``(B, C, H, W)``; ``f(x)`` of the same shape.

    Holds the block as ``self.block``, like :class:`~revnets.convert.residual.ResidualFunction`, so the
    parameter names are the same.
    """

    def __init__(self, block: nn.Module):
        super().__init__()
        layout = block_layout(block)
        if layout is None:
            raise ValueError(f"{type(block).__name__} is not a shape-keeping torchvision/zoo BasicBlock or Bottleneck")
        self.block = block
        self.head, self.tail = layout

    def first_conv(self) -> nn.Module:
        return getattr(self.block, self.head[0][0])

    def middle(self, c: Tensor) -> Tensor:
        """The head after its first convolution: ``relu(bn1(c))``, then ``relu(bn(conv(·)))`` for the others."""
        block = self.block
        h = block.relu(getattr(block, self.head[0][1])(c))
        for conv, bn in self.head[1:]:
            h = block.relu(getattr(block, bn)(getattr(block, conv)(h)))  # (B, C', H, W)
        return h

    def forward(self, x: Tensor) -> Tensor:
        conv, bn = (getattr(self.block, name) for name in self.tail)
        if _lean_backward_applies(x, (self.first_conv(), conv), bn):
            return ResidualBlockFunction.apply(x, self, *self.block.parameters())
        out = bn(conv(self.middle(self.first_conv()(x))))
        out += x
        return self.block.relu(out) - x


def _lean_backward_applies(x: Tensor, convs: tuple[nn.Module, ...], bn: nn.Module) -> bool:
    """A graph is recorded, the first and last convolutions are plain 1-group ``Conv2d``, the last BN a plain
    ``BatchNorm2d``, none with hooks, and neither autocast nor a compiler is active (else the plain path
    runs, with the same values)."""
    plain = (all(type(c) is nn.Conv2d and c.groups == 1 and c.padding_mode == "zeros" for c in convs)
             and type(bn) is nn.BatchNorm2d and not any(m._forward_hooks or m._forward_pre_hooks for m in (*convs, bn)))
    return (plain and torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and not torch.is_autocast_enabled(x.device.type))


def _statistics(bn: nn.BatchNorm2d, c: Tensor) -> tuple[Tensor, Tensor, bool]:
    """``(mean, var, batch)`` (``(C,)`` each) that ``bn`` normalises ``c`` ``(B, C, H, W)`` with: the
    batch's (biased variance; ``batch``) in training or without running statistics, else (copies of) the
    running ones."""
    batch = bn.training or bn.running_mean is None
    if batch:
        var, mean = torch.var_mean(c, dim=(0, 2, 3), correction=0)
        return mean, var, True
    return bn.running_mean.clone(), bn.running_var.clone(), False


class ResidualBlockFunction(torch.autograd.Function):
    """``f = relu(bn(conv(m(conv1(x)))) + x) − x`` for a :class:`BlockResidual` (``m``: its ``middle``);
    ``x`` and ``f`` ``(B, C, H, W)``, the parameters of the block after ``x`` (their gradients returned).

    Forward: the block's own modules, in its order (BatchNorm's running statistics updated once); it keeps
    ``x``, an autograd graph of ``h = m(c1)`` from a detached ``c1 = conv1(x)`` (``(B, C', H, W)`` tensors,
    ``C' = C/4`` in a Bottleneck), and the last BatchNorm's ``(mean, var)`` (``(C,)``); not ``conv(h)`` nor
    the ReLU's output. Backward, for each group ``S`` of output channels (:func:`_tail_group_backward`):
    ``c_S = conv_S(h)`` recomputed, ``m = [bn(c)_S + x_S > 0]``, ``g_r = m·g_S``, ``∂x_S = g_r − g_S``, then
    the BatchNorm and convolution backward of ``g_r`` (``∂h`` summed over the groups); then ``∂c1`` through
    the kept graph; then ``conv1``'s input gradient, group by group of input channels, added into ``∂x``
    in place. The only tensor of ``x``'s size it creates is ``∂x``.
    """

    @staticmethod
    def forward(ctx, x, residual: BlockResidual, *params):
        c1 = residual.first_conv()(x)
        with torch.enable_grad():
            c1_leaf = c1.detach().requires_grad_()
            h = residual.middle(c1_leaf)
        conv, bn = (getattr(residual.block, name) for name in residual.tail)
        c = conv(h.detach())
        mean, var, batch = _statistics(bn, c)
        out = bn(c)
        del c
        out += x
        out.relu_()
        out -= x
        ctx.residual, ctx.graph, ctx.eps, ctx.batch = residual, (c1_leaf, h), bn.eps, batch
        ctx.save_for_backward(x, h.detach(), mean, var)
        ctx.set_materialize_grads(False)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        residual = ctx.residual
        block_params = tuple(residual.block.parameters())
        if grad is None:
            return (None, None, *(None for _ in block_params))
        x, h, mean, var = ctx.saved_tensors
        (c1_leaf, h_graph), ctx.graph = ctx.graph, None
        conv, bn = (getattr(residual.block, name) for name in residual.tail)
        grads: dict[int, Tensor] = {}
        g_x, g_h = torch.empty_like(x), torch.zeros_like(h)
        tail = _Tail(conv, bn, h, x, mean, var, ctx.eps, ctx.batch)
        size = -(-conv.out_channels // CHANNEL_GROUPS)
        for start in range(0, conv.out_channels, size):
            _tail_group_backward(tail, slice(start, min(start + size, conv.out_channels)), grad, g_x, g_h, grads)
        del h
        middle_params = [p for p in _middle_parameters(residual) if p.requires_grad]
        g_c1, *middle_grads = torch.autograd.grad(h_graph, [c1_leaf, *middle_params], g_h, allow_unused=True)
        del h_graph, c1_leaf, g_h
        grads.update((id(p), g) for p, g in zip(middle_params, middle_grads))
        _first_conv_backward(residual.first_conv(), x, g_c1, g_x, grads)
        return (g_x, None, *(grads.get(id(p)) if p.requires_grad else None for p in block_params))


class _Tail(NamedTuple):
    """What the backward of the block's tail ``relu(bn(conv(h)) + x) − x`` reads."""

    conv: nn.Conv2d
    bn: nn.BatchNorm2d
    h: Tensor
    x: Tensor
    mean: Tensor
    var: Tensor
    eps: float
    batch: bool


def _tail_group_backward(tail: _Tail, group: slice, grad: Tensor, g_x: Tensor, g_h: Tensor, grads: dict) -> None:
    """The tail's backward for the output channels ``group``: writes ``∂x`` of those channels into ``g_x``
    and the gradients of ``conv``'s and ``bn``'s parameters (rows ``group``) into ``grads`` (by ``id``,
    created on first use), and adds their part of ``∂h`` into ``g_h``."""
    conv, bn, h, x, eps, batch = tail.conv, tail.bn, tail.h, tail.x, tail.eps, tail.batch
    bias = None if conv.bias is None else conv.bias[group]
    weight, mean, var = conv.weight[group], tail.mean[group], tail.var[group]
    gamma, beta = (None, None) if bn.weight is None else (bn.weight[group], bn.bias[group])
    c = F.conv2d(h, weight, bias, conv.stride, conv.padding, conv.dilation)  # (B, |S|, H, W)
    invstd = (var + eps).rsqrt()
    scale = invstd if gamma is None else invstd * gamma
    shift = -mean * scale if beta is None else beta - mean * scale
    y = torch.addcmul(shift[:, None, None], c, scale[:, None, None])
    y += x[:, group]
    g = grad[:, group]
    g_r = torch.where(y > 0, g, 0)  # through the ReLU
    del y
    g_x[:, group] = g_r - g  # ∂x of the tail: the ReLU's identity input, minus the −x
    g_c, g_gamma, g_beta = torch.ops.aten.native_batch_norm_backward(
        g_r, c, gamma, None if batch else mean, None if batch else var, mean if batch else None,
        invstd if batch else None, batch, eps, [True, gamma is not None, beta is not None])
    del g_r, c
    g_in, g_weight, g_bias = torch.ops.aten.convolution_backward(
        g_c, h, weight, None if bias is None else [bias.shape[0]], conv.stride, conv.padding, conv.dilation,
        False, [0] * len(conv.stride), 1, [True, True, bias is not None])
    g_h += g_in
    for parameter, value in ((conv.weight, g_weight), (conv.bias, g_bias), (bn.weight, g_gamma), (bn.bias, g_beta)):
        if parameter is not None and parameter.requires_grad:
            grads.setdefault(id(parameter), torch.empty_like(parameter))[group] = value


def _middle_parameters(residual: BlockResidual) -> list[Tensor]:
    """The parameters of the head after its first convolution (BN, then conv/BN pairs)."""
    block, head = residual.block, residual.head
    modules = [getattr(block, head[0][1])] + [getattr(block, name) for pair in head[1:] for name in pair]
    return [p for m in modules for p in m.parameters()]


def _first_conv_backward(conv: nn.Conv2d, x: Tensor, g_c: Tensor, g_x: Tensor, grads: dict) -> None:
    """``conv``'s parameter gradients into ``grads``, and its input gradient added into ``g_x``, a group of
    input channels at a time (``∂x_S = conv_Sᵀ(∂c)`` uses the weight columns ``S`` only)."""
    needs_weight, needs_bias = conv.weight.requires_grad, conv.bias is not None and conv.bias.requires_grad
    if needs_weight or needs_bias:
        _, g_weight, g_bias = torch.ops.aten.convolution_backward(
            g_c, x, conv.weight, None if conv.bias is None else [conv.bias.shape[0]], conv.stride, conv.padding,
            conv.dilation, False, [0] * len(conv.stride), 1, [False, needs_weight, needs_bias])
        grads.update((id(p), g) for p, g, needed in ((conv.weight, g_weight, needs_weight),
                                                     (conv.bias, g_bias, needs_bias)) if needed)
    size = -(-conv.in_channels // CHANNEL_GROUPS)
    for start in range(0, conv.in_channels, size):
        group = slice(start, min(start + size, conv.in_channels))
        g_in = torch.ops.aten.convolution_backward(
            g_c, x[:, group], conv.weight[:, group], None, conv.stride, conv.padding, conv.dilation, False,
            [0] * len(conv.stride), 1, [True, False, False])[0]
        g_x[:, group] += g_in
