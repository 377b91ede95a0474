"""CIFAR ResNets (3×3 stride-1 stem, no max-pool) and their Momentum and RevNet counterparts.

* ``resnet{18,34,50,101}``: plain ResNets (He et al. 2016) with the CIFAR stem of Sander et al.
  (2021): 3×3 conv (64 ch) + BN + ReLU, four stages of 64/128/256/512 (×4 for bottlenecks) channels
  at strides 1, 2, 2, 2, global average pooling, linear head.
* ``momentum_resnet*``: the same network converted by :func:`revnets.convert_to_momentum`: each
  stage keeps its first block and runs the rest as one momentum stack with ``f(x) = block(x) − x``;
  ``init_velocity="learned"`` adds ``v₀ = φ(x₀)`` per stack, φ a fresh block of the stage's kind
  (again with the identity taken out), instead of ``v₀ = 0``.
* ``revnet*``: the same stages with the non-first blocks replaced by additive couplings (Gomez
  et al. 2017) on the two channel halves, ``F``/``G`` being the block's residual branch at half width
  (so about half the parameters of the plain block).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn

from ..autograd import checkpoint_call, memory_strategy
from ..convert.momentum import ConvertedStage, convert_to_momentum
from ..convert.residual import ResidualFunction
from ..nn.coupling import RevNet
from ..nn.momentum import MomentumNet
from .base import ZooModel
from .layers import BasicBlock, Bottleneck, Stage, conv3x3
from .registry import register_model

STAGE_CHANNELS = (64, 128, 256, 512)
STAGE_STRIDES = (1, 2, 2, 2)
CONFIGS: dict[int, tuple[type[nn.Module], tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
}


class CifarResNet(ZooModel):
    """A ResNet for 32×32 images: ``(B, in_channels, H, W) → (B, num_classes)``.

    Attributes ``layer1 … layer4`` are the stages (``nn.Sequential`` of blocks, torchvision's
    layout), so :func:`revnets.convert_to_momentum` converts this model like a torchvision one.
    """

    def __init__(self, block: type[nn.Module], blocks_per_stage: tuple[int, ...], num_classes: int = 10,
                 in_channels: int = 3):
        super().__init__(num_classes, STAGE_CHANNELS[-1] * block.expansion)
        self.stem = Stage(conv3x3(in_channels, STAGE_CHANNELS[0]), nn.BatchNorm2d(STAGE_CHANNELS[0]),
                          nn.ReLU(inplace=True), whole=True, reversible_checkpoints=True)
        channels_in = STAGE_CHANNELS[0]
        for index, (channels, stride, count) in enumerate(zip(STAGE_CHANNELS, STAGE_STRIDES, blocks_per_stage), 1):
            blocks = [block(channels_in, channels, stride)]
            channels_in = channels * block.expansion
            blocks += [block(channels_in, channels) for _ in range(count - 1)]
            setattr(self, f"layer{index}", Stage(*blocks))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.initialise_weights()

    def stages(self) -> list[nn.Module]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, in_channels, H, W)`` images to ``(B, num_features)`` pooled features.

        When the stem and a converted first stage both checkpoint (``"reversible"`` or ``"checkpoint"``
        mode, with grad), the stem and that stage's first block run as ONE checkpointed segment: it
        holds only the images until the backward, instead of the stem's ``(B, 64, H, W)`` output, which
        the first stage's reversible backward (the widest stage: the peak of the step) would otherwise
        have to keep alive. The stem keeps its own checkpoint inside the segment (it is evaluated once
        more, a 3×3 convolution of the images), so recomputing the segment holds no more than
        recomputing the block alone. Outputs and gradients are those of the separate calls.
        """
        stages = self.stages()
        first = stages[0]
        if (isinstance(first, ConvertedStage) and first.mode != "autograd" and self.stem.mode != "autograd"
                and torch.is_grad_enabled()):
            segment = nn.Sequential(self.stem, first[0])  # transient: registers nothing on the model
            x = first[1](checkpoint_call(segment, x))  # (B, C_1, H, W)
            stages = stages[1:]
        else:
            x = self.stem(x)  # (B, 64, H, W)
        for stage in stages:
            x = stage(x)  # (B, C_k, H/2^k, W/2^k)
        return torch.flatten(self.pool(x), 1)  # (B, num_features)


def resnet(depth: int, num_classes: int = 10, *, in_channels: int = 3) -> CifarResNet:
    """The plain CIFAR ResNet-``depth`` (18, 34, 50 or 101)."""
    block, counts = CONFIGS[depth]
    return CifarResNet(block, counts, num_classes, in_channels)


def momentum_resnet(
    depth: int, num_classes: int = 10, *, gamma: float = 0.9, init_velocity: str = "zero",
    mode: str = "reversible", exact: bool = False, in_channels: int = 3,
) -> CifarResNet:
    """The CIFAR Momentum ResNet-``depth``: :func:`resnet` converted with momentum ``gamma``.

    ``init_velocity``: ``"zero"`` (v₀ = 0) or ``"learned"`` (v₀ = φ(x₀), one fresh block per stack).
    """
    if init_velocity not in ("zero", "learned"):
        raise ValueError(f"init_velocity must be 'zero' or 'learned'; got {init_velocity!r}")
    block, _ = CONFIGS[depth]
    model = convert_to_momentum(resnet(depth, num_classes, in_channels=in_channels), gamma, mode=mode, exact=exact)
    if init_velocity == "learned":
        for stage, channels in zip(model.stages(), STAGE_CHANNELS):
            stack = stage[-1]
            if isinstance(stack, MomentumNet):
                stack.init_velocity = ResidualFunction(block(channels * block.expansion, channels))
    return model.set_mode(mode)


class _HalfWidthBranch(nn.Module):
    """The residual branch of ``block`` at half the stage's width: ``(B, C/2, H, W) → (B, C/2, H, W)``."""

    def __init__(self, block: type[nn.Module], channels: int):
        super().__init__()
        half = channels // 2
        self.block = block(half * block.expansion, half)

    def forward(self, x: Tensor) -> Tensor:
        return self.block.residual(x)


def revnet(depth: int, num_classes: int = 10, *, mode: str = "reversible", exact: bool = False,
           in_channels: int = 3) -> CifarResNet:
    """The RevNet counterpart of :func:`resnet`: each stage's first block, then one additive coupling
    per remaining block (``F``, ``G``: the block's residual branch at half width)."""
    block, _ = CONFIGS[depth]
    strategy = memory_strategy(mode, exact=exact)
    model = resnet(depth, num_classes, in_channels=in_channels)
    for index, (stage, channels) in enumerate(zip(model.stages(), STAGE_CHANNELS), 1):
        first, *rest = list(stage)
        if rest:
            couplings = RevNet(
                [_HalfWidthBranch(block, channels) for _ in rest], [_HalfWidthBranch(block, channels) for _ in rest],
                strategy=strategy,
            )
            setattr(model, f"layer{index}", ConvertedStage(first, couplings, mode=strategy.mode))
    model.initialise_weights()
    return model.set_mode(mode)


for _depth in CONFIGS:
    register_model(partial(resnet, _depth), name=f"resnet{_depth}", summary=f"The plain CIFAR ResNet-{_depth}.")
    register_model(partial(momentum_resnet, _depth), name=f"momentum_resnet{_depth}",
                   summary=f"The CIFAR Momentum ResNet-{_depth} (Sander et al. 2021): ResNet-{_depth} with its "
                   "residual blocks as momentum stacks (gamma = 0.9 by default).")
    register_model(partial(revnet, _depth), name=f"revnet{_depth}",
                   summary=f"The RevNet counterpart of ResNet-{_depth}: additive couplings of half-width blocks.")
