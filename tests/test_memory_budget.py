"""``memory_budget``: reversible mode keeps the graphs of the last layers, within a fraction of autograd's
activation memory; gradients are those of autograd at every budget."""

from __future__ import annotations

import pytest
import torch
from helpers import ARCHITECTURES, gradients, make_input, make_net, max_relative_error
from torch import nn

import revnets
from revnets.memory import StorageTracker

pytestmark = pytest.mark.usefixtures("one_thread")

BUDGETS = (0.0, 0.25, 0.5, 0.75, 1.0)


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_gradients_equal_autograd_at_every_budget(arch, budget):
    net = make_net(arch, depth=8, width=4, memory_budget=budget)
    reference = make_net(arch, depth=8, width=4, mode="autograd")
    x = make_input(3, 4, requires_grad=True)
    cotangent = make_input(3, 4, seed=5)
    got = gradients(lambda: net(x), (x,), list(net.parameters()), cotangent)
    want = gradients(lambda: reference(x), (x,), list(reference.parameters()), cotangent)
    assert max_relative_error(got, want) < 1e-12


def dropout_net(budget: float) -> revnets.MomentumNet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        fs = [nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Dropout(0.5)) for _ in range(8)]
    return revnets.MomentumNet(fs, gamma=0.8, memory_budget=budget).double()


def test_dropout_masks_do_not_depend_on_the_budget():
    """One seed per call for both parts: every budget draws the masks of budget 0 (and of autograd mode)."""
    results = []
    for budget in (*BUDGETS, "autograd"):
        net = dropout_net(0.0).set_mode("autograd") if budget == "autograd" else dropout_net(budget)
        x = make_input(4, 6, requires_grad=True)
        torch.manual_seed(3)
        out = net(x)
        out.pow(2).sum().backward()
        results.append((out.detach(), x.grad, torch.get_rng_state()))
    for out, grad, rng in results[1:]:
        torch.testing.assert_close(out, results[0][0], rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-12, atol=1e-12)
        assert torch.equal(rng, results[0][2])


def held_after_forward(budget: float, depth: int = 16) -> int:
    torch.manual_seed(0)
    fs = [nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 32)) for _ in range(depth)]
    net = revnets.MomentumNet(fs, gamma=0.9, memory_budget=budget)
    x = torch.randn(64, 32, requires_grad=True)
    with StorageTracker() as tracker:
        out = net(x)
        held = tracker.live_bytes
    out.sum().backward()
    return held


def test_memory_held_grows_with_the_budget_in_proportion():
    held = {budget: held_after_forward(budget) for budget in BUDGETS}
    autograd_activations = held[1.0] - held[0.0]
    assert autograd_activations > 0
    per_layer = autograd_activations / 16
    for budget in BUDGETS:
        assert held[budget] == pytest.approx(held[0.0] + budget * autograd_activations, abs=per_layer), held
    assert sorted(held.values()) == [held[b] for b in BUDGETS]


@pytest.mark.parametrize("budget", [-0.1, 1.5, float("nan"), True, "0.5", None])
def test_bad_budget_is_refused_with_the_range(budget):
    with pytest.raises(ValueError, match=r"memory_budget must be a number in \[0, 1\].*got"):
        revnets.MomentumNet([nn.Tanh()], memory_budget=budget)


def test_exact_mode_refuses_a_budget():
    with pytest.raises(ValueError, match="memory_budget=0.5 keeps floating-point graphs.*exact=True"):
        revnets.MomentumNet([nn.Tanh()], exact=True, memory_budget=0.5)
    net = revnets.MomentumNet([nn.Tanh()], exact=True)
    with pytest.raises(ValueError, match="exact=True"):
        revnets.set_mode(net, "reversible", memory_budget=0.5)
    assert net.memory_budget == 0.0


def test_set_mode_sets_the_budget_on_every_stack():
    from revnets.models import create_model

    model = create_model("momentum_resnet18", num_classes=10)
    revnets.set_mode(model, "reversible", memory_budget=0.5)
    stacks = [m for m in model.modules() if isinstance(m, revnets.ReversibleNet)]
    assert stacks and all(m.memory_budget == 0.5 and m.mode == "reversible" for m in stacks)
    assert "memory_budget=0.5" in repr(stacks[0])
