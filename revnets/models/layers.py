"""Building blocks of the CIFAR ResNets (torchvision's block layout, so the converters treat both alike)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..autograd import check_mode, checkpoint_call


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


def projection(in_channels: int, out_channels: int, stride: int) -> nn.Sequential | None:
    """The shortcut of a shape-changing block (1×1 conv + BN), ``None`` when the block keeps the shape."""
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels))


class ResidualBlock(nn.Module):
    """``relu(residual(x) + shortcut(x))``; the shortcut is the identity or the ``downsample`` projection."""

    downsample: nn.Module | None

    def residual(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(self.residual(x) + shortcut)


class BasicBlock(ResidualBlock):
    """``relu(x' + bn2(conv2(relu(bn1(conv1(x))))))``, ``x'`` = x or its projection:
    ``(B, C_in, H, W) → (B, C, H/s, W/s)``."""

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv3x3(in_channels, channels, stride)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = conv3x3(channels, channels)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = projection(in_channels, channels, stride)
        self.stride = stride

    def residual(self, x: Tensor) -> Tensor:
        return self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))


class Bottleneck(ResidualBlock):
    """1×1 (C_in → C) → 3×3 (stride s) → 1×1 (C → 4C), added to ``x`` or its projection, then ReLU."""

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        out_channels = channels * self.expansion
        self.conv1 = conv1x1(in_channels, channels)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = conv3x3(channels, channels, stride)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv3 = conv1x1(channels, out_channels)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = projection(in_channels, out_channels, stride)
        self.stride = stride

    def residual(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))


class Stage(nn.Sequential):
    """Plain (non-invertible) blocks with a memory strategy: ``mode="checkpoint"`` recomputes each block
    in the backward (:func:`revnets.autograd.checkpoint_call`: BatchNorm running statistics
    updated once per step, dropout replayed).

    ``whole=True`` checkpoints the sequence as one unit (a stem: conv, BN, ReLU) instead of block by
    block. ``mode="reversible"`` is refused unless ``reversible_checkpoints``: a plain ResNet stage is
    not invertible (convert the model with :func:`revnets.convert_to_momentum` instead), while a stem,
    never invertible, runs under checkpointing in reversible mode too, holding only its input until the
    backward (in a plain ResNet, whose stages refuse reversible mode, that never happens).
    """

    def __init__(self, *blocks: nn.Module, whole: bool = False, reversible_checkpoints: bool = False):
        super().__init__(*blocks)
        self.whole = whole
        self.reversible_checkpoints = reversible_checkpoints
        self.mode = "autograd"

    def check_mode_allowed(self, mode: str) -> None:
        check_mode(mode)
        if mode == "reversible" and not self.reversible_checkpoints:
            raise ValueError(
                "mode='reversible' needs invertible blocks; a plain ResNet stage has none: use its "
                "momentum_/revnet counterpart or revnets.convert_to_momentum(model), or mode='checkpoint'"
            )

    def set_mode(self, mode: str) -> Stage:
        self.check_mode_allowed(mode)
        self.mode = mode
        return self

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "autograd" or not torch.is_grad_enabled():
            return super().forward(x)
        if self.whole:
            return checkpoint_call(self, x, forward=super().forward)
        for block in self:
            x = checkpoint_call(block, x)
        return x
