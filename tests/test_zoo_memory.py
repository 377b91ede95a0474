"""Training-step memory of the memory-saving models against their autograd counterparts.

Peaks are the bytes of the tensors one SGD step creates (activations, gradients, temporaries), measured
by :class:`revnets.memory.StorageTracker`; the weights and momentum buffers exist before the step.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import revnets
from revnets.memory import StorageTracker
from revnets.models import create_model
from revnets.training.step import sgd_step_peak


def step_peak(name: str, mode: str, batch: int, side: int) -> int:
    """Peak bytes created by the second SGD step of zoo model ``name`` in ``mode`` on ``(batch, 3, side, side)``."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).train().set_mode(mode)
    return sgd_step_peak(model, torch.randn(batch, 3, side, side), torch.randint(0, 10, (batch,)))


@pytest.mark.parametrize("name", ["momentum_resnet18", "momentum_resnet50", "revnet18", "revnet50", "hamiltonian38",
                                  "midpoint38", "leapfrog38"])
def test_reversible_step_peak_is_below_autograd(name):
    assert step_peak(name, "reversible", 4, 32) < step_peak(name, "autograd", 4, 32)


def test_momentum_resnet18_per_sample_peak_is_below_resnet18():
    """Per-sample peak (slope between batches 4 and 8, 3×32×32 images) at most 2/3 of resnet18's, the
    issue's target (today 2.5 vs 4.0 MiB per sample: 0.625).

    The reversible peak is the backward of layer1's one-block stack (64 channels at full resolution): the
    state, its gradients, one block's graph and its backward's temporaries. It was 0.9375 of resnet18's
    with the stem's output and the stack's saved output held through that backward, and 0.69 with the
    ``(1 − γ)·g`` gradient held through the block's VJP.
    """
    def slope(name, mode):
        return (step_peak(name, mode, 8, 32) - step_peak(name, mode, 4, 32)) / 4

    assert slope("momentum_resnet18", "reversible") <= 2 / 3 * slope("resnet18", "autograd")


@pytest.mark.parametrize("batch", [4, 16])
@pytest.mark.parametrize("seq", [32, 128])
def test_converted_encoder_peak_is_below_the_original(batch, seq):
    """A 6-layer ``nn.TransformerEncoder`` (width 64, the benchmark suite's quick configuration) against its
    conversion (reversible): forward and backward. At depth 1 the conversion holds more (the stack's
    inversion needs the velocity and its gradient besides the layer's graph); from depth 3 on, less."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
    original = nn.TransformerEncoder(layer, 6, enable_nested_tensor=False).train()
    converted = revnets.convert_to_momentum(original, 0.9).train()
    x = torch.randn(batch, seq, 64, requires_grad=True)
    grad = torch.randn_like(x)
    peaks = []
    for model in (original, converted):
        with StorageTracker() as tracker:
            model(x).backward(grad)
        peaks.append(tracker.peak_bytes)
    assert peaks[1] < peaks[0], peaks
