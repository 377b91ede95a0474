"""What the reversible backward holds at its peak, counted in tensors of the state's size.

One VJP of a layer's function needs its own graph and gradients (measured here, with the same tracker, on
the function alone). Beyond that, the momentum backward holds x, v and the gradients of both streams (the
stack's output gradient among them): the function's value, ``c·g`` and the ``−g`` of a converted block's
``±(block(x) − x)`` are not held through the VJP, and in the stack's first layer the velocity is not rebuilt.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge

import revnets
from revnets.autograd.backward import scaled_result
from revnets.convert import ResidualFunction
from revnets.memory import StorageTracker

BATCH, WIDTH = 4096, 16  # 2^16 elements: the backward takes c·VJP(g), not VJP(c·g), from this size on
STATE_BYTES = BATCH * WIDTH * 4


class Block(nn.Module):
    """A residual block ``x + tanh(Wx + b)``, as a converter finds it."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(WIDTH, WIDTH)

    def forward(self, x):
        return x + torch.tanh(self.linear(x))


def function(kind: str) -> nn.Module:
    """``plain``: ``tanh(Wx + b)``; ``residual``: ``block(x) − x``; ``subtracted``: ``x − block(x)`` (as Leapfrog's
    conversion makes it)."""
    if kind == "plain":
        return nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh())
    return ResidualFunction(Block(), sign=1 if kind == "residual" else -1)


def one_vjp_peak(kind: str) -> float:
    """States allocated at the peak of one evaluation and VJP of the function alone (input and output
    gradient given; the value is not held, as a graph's output need not be)."""
    torch.manual_seed(0)
    f = function(kind)
    x, g = torch.randn(BATCH, WIDTH, requires_grad=True), torch.randn(BATCH, WIDTH)
    with StorageTracker() as tracker:
        edge = get_gradient_edge(f(x))
        torch.autograd.grad([edge], [x, *f.parameters()], [g])
    return tracker.peak_bytes / STATE_BYTES


def backward_peak(kind: str, depth: int) -> float:
    """States allocated at the peak of the backward of a momentum stack of ``depth`` such functions."""
    torch.manual_seed(0)
    net = revnets.MomentumNet([function(kind) for _ in range(depth)], gamma=0.9)
    x = torch.randn(BATCH, WIDTH, requires_grad=True)
    with StorageTracker() as tracker:
        out = net(x)
        tracker.reset_peak()
        live = tracker.live_bytes
        out.backward(torch.ones_like(out))
    return (tracker.peak_bytes - live) / STATE_BYTES


@pytest.mark.parametrize("kind", ["plain", "residual", "subtracted"])
def test_the_backward_holds_the_state_and_its_gradients_beside_one_vjp(kind):
    """Beside one VJP: the output gradient, x, v and one more gradient (four states); the same at depth 2 and 6."""
    vjp = one_vjp_peak(kind)
    for depth in (2, 6):
        assert backward_peak(kind, depth) <= vjp + 4.05, (depth, backward_peak(kind, depth), vjp)


@pytest.mark.parametrize("kind", ["plain", "residual", "subtracted"])
def test_the_first_layer_does_not_rebuild_the_velocity(kind):
    """In a one-layer stack only x is rebuilt (the input velocity feeds no gradient): two states beside one VJP."""
    vjp = one_vjp_peak(kind)
    assert backward_peak(kind, 1) <= vjp + 2.05, (backward_peak(kind, 1), vjp)


@pytest.mark.parametrize("sign", [1, -1])
def test_the_residual_gradient_is_exact_and_an_ordinary_tensor(sign):
    """``±(block(x) − x)`` hands the operand it subtracts a negated view of its gradient; the sums autograd
    makes of it are ordinary tensors, first and second derivatives are exact, and a block that ignores ``x``
    gets ``∓g``."""
    torch.manual_seed(0)
    block = Block().double()
    f = ResidualFunction(block, sign=sign)
    x = torch.randn(3, WIDTH, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))
    (grad,) = torch.autograd.grad(f(x).sum(), x)
    assert not grad.is_neg()
    expected = torch.autograd.functional.vjp(lambda x: torch.tanh(block.linear(x)), x, torch.ones_like(x))[1]
    torch.testing.assert_close(grad, sign * expected, rtol=1e-12, atol=1e-12)
    ignoring = ResidualFunction(nn.Identity(), sign=sign)
    assert torch.equal(torch.autograd.grad(ignoring(x).sum(), x)[0], torch.zeros_like(x))
    x.grad = None
    ResidualFunction(Constant(), sign=sign)(x).sum().backward()
    assert torch.equal(x.grad, -sign * torch.ones_like(x))


class Constant(nn.Module):
    """A block that ignores its input."""

    def forward(self, x):
        return torch.ones_like(x)


def test_a_result_is_scaled_in_place_only_when_nothing_else_holds_it():
    fresh = [torch.ones(3)]
    storage = fresh[0].untyped_storage().data_ptr()
    scaled = scaled_result(fresh, 0, 0.5)
    assert fresh == [None] and scaled.untyped_storage().data_ptr() == storage
    assert torch.equal(scaled, torch.full((3,), 0.5))
    transposed = [torch.ones(2, 3).t()]  # a weight's gradient as autograd makes it: a view of a fresh tensor
    storage = transposed[0].untyped_storage().data_ptr()
    assert scaled_result(transposed, 0, 0.5).untyped_storage().data_ptr() == storage
    for held in (torch.ones(3), torch.ones(6)[:3]):  # referenced elsewhere, or a view referenced elsewhere
        results = [held]
        assert torch.equal(scaled_result(results, 0, 0.5), torch.full((3,), 0.5))
        assert torch.equal(held, torch.ones(3))
    base = torch.ones(3, 2)
    results = [base.t()]  # a view of a tensor referenced elsewhere
    assert torch.equal(scaled_result(results, 0, 0.5), torch.full((2, 3), 0.5))
    assert torch.equal(base, torch.ones(3, 2))


class PassThrough(nn.Module):
    """``tanh(Wx) + p`` with ``p`` of the state's shape: autograd hands ``p`` the output gradient itself."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(WIDTH, WIDTH)
        self.offset = nn.Parameter(torch.randn(BATCH, WIDTH) / 10)

    def forward(self, x):
        return torch.tanh(self.linear(x)) + self.offset


def test_gradients_passed_through_are_not_scaled_in_place():
    """At this size the backward scales the VJP's results by γ's gain: a parameter whose gradient is the output
    gradient itself must get a copy, and every gradient equals autograd mode's."""
    torch.manual_seed(0)
    net = revnets.MomentumNet([PassThrough() for _ in range(3)], gamma=0.9).double()
    x = torch.randn(BATCH, WIDTH, dtype=torch.float64, requires_grad=True)
    grads = {}
    for mode in ("autograd", "reversible"):
        revnets.set_mode(net, mode)
        out = net(x)
        grads[mode] = torch.autograd.grad(out, [x, *net.parameters()], torch.cos(out))
    for reversible, reference in zip(grads["reversible"], grads["autograd"], strict=True):
        torch.testing.assert_close(reversible, reference, rtol=1e-10, atol=1e-12)


class TaggedParameter(nn.Parameter):
    """A parameter subclass, as libraries make them (tensor subclasses go through ``torch.autograd.grad``)."""


def test_autograd_s_engine_and_torch_autograd_grad_give_the_same_gradients(monkeypatch):
    """The backward hands plain tensors straight to autograd's engine and anything else to
    ``torch.autograd.grad``: both give bit for bit the same gradients, equal to autograd mode's."""
    torch_grad = torch.autograd.grad

    def gradients(tag: bool, mode: str = "reversible"):
        torch.manual_seed(0)
        net = revnets.MomentumNet([function("residual") for _ in range(3)], gamma=0.9, mode=mode).double()
        if tag:
            for module in net.modules():
                if isinstance(module, nn.Linear):
                    module.weight = TaggedParameter(module.weight.detach().clone())
        x = torch.randn(8, WIDTH, dtype=torch.float64, requires_grad=True)
        out = net(x)
        return torch_grad(out, [x, *net.parameters()], torch.cos(out))

    calls = []
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: calls.append(1) or torch_grad(*a, **k))
    engine = gradients(tag=False)
    assert calls == []
    through_grad = gradients(tag=True)
    assert len(calls) == 3  # one VJP per layer
    for a, b, reference in zip(engine, through_grad, gradients(tag=False, mode="autograd"), strict=True):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, reference, rtol=1e-10, atol=1e-12)
