"""The reversible engine runs a stack as a chain of autograd nodes (chunks of about 1 Mi parameters, see
``revnets.autograd.reversible.chunk_ranges``) that hand each other their state outside autograd. Splitting changes
nothing but when parameter gradients reach autograd: the same bits in exact mode, the same gradients,
random numbers, running statistics and error messages as one node."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import ARCHITECTURES, make_input, make_net
from torch import nn

import revnets
from revnets.autograd import reversible

DEPTH = 20


def run(net, x):
    """Output, and gradients of the input and every parameter, of ``<net(x), cotangent>``."""
    x = x.detach().requires_grad_()
    out = net(x)
    cotangent = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    grads = torch.autograd.grad(out, [x, *net.parameters()], cotangent, allow_unused=True)
    return out.detach(), grads


def one_node_and_chunks(monkeypatch, build, x):
    """``run`` on a fresh ``build()`` as one autograd node, and split into chunks of about 3 layers."""
    torch.manual_seed(3)
    whole = run(build(), x)
    monkeypatch.setattr(reversible, "CHUNK_PARAMETERS", 3 * 24)
    torch.manual_seed(3)
    chunked = run(build(), x)
    return whole, chunked


def assert_identical(a, b):
    (out_a, grads_a), (out_b, grads_b) = a, b
    assert torch.equal(out_a, out_b)
    assert all((g is None and h is None) or torch.equal(g, h) for g, h in zip(grads_a, grads_b, strict=True))


def test_the_split_is_into_chunks_of_at_least_the_parameter_count(monkeypatch):
    monkeypatch.setattr(reversible, "CHUNK_PARAMETERS", 50)
    params = tuple(torch.zeros(n) for n in (20, 20, 20, 60, 10, 10))
    layers = ((0,), (1,), (2,), (3,), (4,), (5,))
    assert reversible.chunk_ranges(params, layers) == [(0, 3), (3, 4), (4, 6)]
    shared = ((0,), (0,), (0, 1), (0, 2))  # a parameter counts once per chunk
    assert reversible.chunk_ranges(params, shared) == [(0, 4)]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_exact_mode_continues_bit_for_bit_across_chunks(arch, monkeypatch):
    x = make_input(3, 4)
    whole, chunked = one_node_and_chunks(monkeypatch, lambda: make_net(arch, depth=DEPTH, width=4, exact=True), x)
    assert_identical(whole, chunked)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_dropout_and_batchnorm_across_chunks(arch, monkeypatch):
    """Random numbers are seeded by the layer's number in the whole stack; running statistics move once."""

    def build():
        net = make_net(arch, depth=DEPTH, width=4)
        for f in net.modules():
            if isinstance(f, nn.Sequential):
                f.append(nn.Dropout(0.3))
                f.insert(1, nn.BatchNorm1d(f[0].out_features, dtype=torch.float64))
        return net

    x = make_input(5, 4)
    whole, chunked = one_node_and_chunks(monkeypatch, build, x)
    assert_identical(whole, chunked)
    torch.manual_seed(3)
    net = build().set_mode("autograd")
    reference = run(net, x)
    torch.testing.assert_close(chunked[0], reference[0], rtol=1e-12, atol=1e-12)
    for g, h in zip(chunked[1], reference[1], strict=True):
        torch.testing.assert_close(g, h, rtol=1e-9, atol=1e-12)
    counts = {int(m.num_batches_tracked) for m in net.modules() if isinstance(m, nn.BatchNorm1d)}
    assert counts == {1}


def test_a_nan_in_a_later_chunk_is_named_exactly(monkeypatch):
    monkeypatch.setattr(reversible, "CHUNK_PARAMETERS", 3 * 24)
    functions = [nn.Sequential(nn.Linear(4, 4), nn.Tanh()) for _ in range(DEPTH)]
    with torch.no_grad():
        functions[13][0].weight.fill_(math.inf)
    out = revnets.MomentumNet(functions, gamma=0.9)(torch.randn(2, 4, requires_grad=True))
    with pytest.raises(FloatingPointError, match=r"first became non-finite at layer 13 "):
        out.sum().backward()


@pytest.mark.parametrize("arch", ["MomentumNet", "RevNet"])
def test_chunks_add_nothing_to_the_backward_peak(arch, monkeypatch):
    """Each chunk gets its output gradients through the chain, not from autograd (which would hold them until
    the chunk's backward returns): split into one-layer chunks, the backward peaks no higher than as one node,
    where the state (4096 × 8 per component) outweighs the parameters."""
    from revnets.memory import StorageTracker

    def backward_peak():
        torch.manual_seed(3)
        net = make_net(arch, depth=6, width=8, dtype=torch.float32)
        x = torch.randn(4096, 8, requires_grad=True)
        with StorageTracker() as tracker:
            out = net(x)
            tracker.reset_peak()
            out.backward(torch.ones_like(out))
        return tracker.peak_bytes - tracker.live_bytes

    whole = backward_peak()
    monkeypatch.setattr(reversible, "CHUNK_PARAMETERS", 1)
    state = 4096 * 8 * 4
    assert backward_peak() <= whole + state // 4, (backward_peak() / state, whole / state)
