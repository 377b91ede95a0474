"""Building blocks of the CIFAR ResNets (torchvision's block layout, so the converters treat both alike)."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..autograd.engine import check_mode
from ..autograd.replay import preserved_running_stats, running_stat_modules


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
    """``relu(x' + bn2(conv2(relu(bn1(conv1(x))))))``, ``x'`` = x or its projection: ``(B, C_in, H, W) → (B, C, H/s, W/s)``."""

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
    """A plain stage of residual blocks; ``mode="checkpoint"`` recomputes each block in the backward.

    ``mode="reversible"`` is refused: plain residual blocks are not invertible (convert the model
    with :func:`revnets.convert_to_momentum` instead). Recomputation leaves BatchNorm running
    statistics as the forward left them (updated once per step).
    """

    def __init__(self, *blocks: nn.Module):
        super().__init__(*blocks)
        self.mode = "autograd"

    def check_mode_allowed(self, mode: str) -> None:
        check_mode(mode)
        if mode == "reversible":
            raise ValueError(
                "mode='reversible' needs invertible blocks; a plain ResNet stage has none: use its "
                "momentum_/revnet counterpart or revnets.convert_to_momentum(model), or mode='checkpoint'"
            )

    def set_mode(self, mode: str) -> Stage:
        self.check_mode_allowed(mode)
        self.mode = mode
        return self

    def forward(self, x: Tensor) -> Tensor:
        checkpointing = self.mode == "checkpoint" and torch.is_grad_enabled()
        for block in self:
            if checkpointing:
                norms = running_stat_modules([block])
                x = checkpoint(
                    block, x, use_reentrant=False,
                    context_fn=lambda norms=norms: (contextlib.nullcontext(), preserved_running_stats(norms)),
                )
            else:
                x = block(x)
        return x
