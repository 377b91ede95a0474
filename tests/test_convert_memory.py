"""Converted ImageNet ResNets: the lean residual function of a block (same values, same gradients, running
statistics updated once), the checkpointed stem, and the per-sample peak of a training step at most a
third of the original's (Sander et al. 2021, Fig. 8: the Momentum ResNet fits larger batches)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from revnets import convert_to_momentum, set_mode
from revnets.convert.blocks import BlockResidual
from revnets.convert.momentum import CheckpointedStem
from revnets.convert.residual import ResidualFunction
from revnets.models import layers
from revnets.training.step import sgd_step_peak

torchvision = pytest.importorskip("torchvision")
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet  # noqa: E402

BLOCKS = {
    "torchvision-bottleneck": lambda: Bottleneck(32, 8),
    "torchvision-basic": lambda: BasicBlock(16, 16),
    "zoo-bottleneck": lambda: layers.Bottleneck(32, 8),
    "zoo-basic": lambda: layers.BasicBlock(8, 8),
}


def _randomised(block: nn.Module) -> nn.Module:
    block = block.double()
    for module in block.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_()
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
    return block


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("frozen_head", [False, True], ids=["", "frozen-head"])
@pytest.mark.parametrize("name", list(BLOCKS))
def test_block_residual_matches_block_minus_identity(name, training, frozen_head):
    torch.manual_seed(0)
    block = _randomised(BLOCKS[name]()).train(training)
    if frozen_head:
        block.conv1.requires_grad_(False)
        block.bn1.requires_grad_(False)
    lean = copy.deepcopy(block)
    x = torch.randn(3, block.conv1.in_channels, 6, 6, dtype=torch.float64, requires_grad=True)
    x_lean = x.detach().clone().requires_grad_()
    reference, value = ResidualFunction(block)(x), BlockResidual(lean)(x_lean)
    assert torch.equal(reference, value)  # bit for bit: a reversible stack inverts the same numbers
    grad = torch.randn_like(reference)
    reference.backward(grad)
    value.backward(grad)
    torch.testing.assert_close(x_lean.grad, x.grad)
    for p, q in zip(block.parameters(), lean.parameters()):
        assert (p.grad is None) == (q.grad is None)
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad)
    for a, b in zip(block.buffers(), lean.buffers()):
        assert torch.equal(a, b)  # running statistics (and the batch count) updated once, as by the block


def test_converted_resnet_runs_its_stem_checkpointed_and_keeps_gradients():
    torch.manual_seed(0)
    model = ResNet(Bottleneck, [3, 2, 2, 2], num_classes=5).double()
    converted = convert_to_momentum(model, 0.9)
    assert isinstance(converted.conv1, CheckpointedStem) and isinstance(converted.maxpool, nn.Identity)
    assert isinstance(converted.layer1[1].functions[0], BlockResidual)
    x, y = torch.randn(4, 3, 64, 64, dtype=torch.float64), torch.randint(5, (4,))
    reference = copy.deepcopy(converted)
    set_mode(reference, "autograd")
    assert reference.conv1.mode == "autograd"
    for net in (converted, reference):
        nn.functional.cross_entropy(net(x), y).backward()
    for (name, p), q in zip(converted.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-8, msg=name)
    for a, b in zip(converted.buffers(), reference.buffers()):
        torch.testing.assert_close(a, b)


def _per_sample_peak(model: nn.Module, size: int) -> float:
    peaks = []
    for batch in (2, 4):
        torch.manual_seed(0)
        peaks.append(sgd_step_peak(model, torch.randn(batch, 3, size, size), torch.randint(10, (batch,))))
    return (peaks[1] - peaks[0]) / 2


def test_converted_imagenet_resnet_needs_a_third_of_the_memory_per_sample():
    """An ImageNet-layout ResNet whose widest stage is deep (10 bottlenecks at (256, H/4, W/4)), 48 px: the
    converted step holds at most a third of the original's bytes per sample, so fits 3× the batch (the
    conversion before the lean residual function and checkpointed stem held 2.5× less); its peak, at the
    widest stage's reversible backward, is under 10.5 tensors of that stage's state per sample."""
    torch.manual_seed(0)
    model = ResNet(Bottleneck, [10, 1, 1, 1], num_classes=10)
    original = _per_sample_peak(model, 48)
    converted = _per_sample_peak(convert_to_momentum(model, 0.9), 48)
    state = 256 * 12 * 12 * 4
    assert converted <= original / 3, (original / state, converted / state)
    assert converted <= 10.5 * state, converted / state


def test_the_stem_runs_inside_the_first_stages_first_segment():
    """In reversible mode the stem passes the images on and ``layer1`` runs stem + first block as one checkpointed
    segment (the zoo's ResNets do the same): the step no longer holds the stem's output (64 × H/4 × W/4 per
    image) through ``layer1``'s reversible backward. Gradients: the test above; no grad: the plain stem."""
    torch.manual_seed(0)
    converted = convert_to_momentum(ResNet(Bottleneck, [3, 1, 1, 1], num_classes=10), 0.9)
    assert converted.conv1.stage is converted.layer1 and converted.layer1.stem is converted.conv1
    assert "conv1.stage.0.conv1.weight" not in converted.state_dict()  # a reference, not a child
    joined = _per_sample_peak(converted, 64)
    object.__setattr__(converted.conv1, "stage", None)
    object.__setattr__(converted.layer1, "stem", None)
    separate = _per_sample_peak(converted, 64)
    assert separate - joined >= 0.9 * 64 * 16 * 16 * 4, (separate, joined)
    with torch.no_grad():
        x = torch.randn(2, 3, 32, 32)
        assert converted.conv1(x).shape == (2, 64, 8, 8)  # without grad the stem runs itself
