"""The model zoo, driven by the registry: every registered model trains, and its memory strategies agree."""

from __future__ import annotations

import pytest
import torch

from revnets.models import ZooModel, create_model, list_models
from revnets.nn import MomentumNet, ReversibleNet

MODELS = [name for name in list_models() if not name.startswith("test_")]  # test_*: models other tests register
SMALL = [name for name in MODELS if not any(name.endswith(s) for s in ("101", "218", "1202"))]
"""Models cheap enough for float64 gradient comparisons on CPU (the deep ones run forward/backward only)."""


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def loss_gradients(model, x, mode):
    """Gradients of a fixed random projection of the logits w.r.t. the input and every parameter."""
    model.set_mode(mode)
    params = [p for p in model.parameters() if p.requires_grad]
    out = model(x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype)
    return torch.autograd.grad((out * weights).sum(), [x, *params])


def test_registry_lists_every_family():
    for pattern in ("resnet*", "momentum_resnet*", "revnet*", "hamiltonian*", "midpoint*", "leapfrog*"):
        assert list_models(pattern), pattern
    for name in ("resnet18", "momentum_resnet18", "revnet18", "momentum_resnet101", "hamiltonian74", "hamiltonian1202"):
        assert name in MODELS


def test_unknown_model_names_close_matches():
    with pytest.raises(ValueError, match="unknown model 'resnet19'.*resnet18"):
        create_model("resnet19")


@pytest.mark.parametrize("num_classes", [0, -1, 2.5, True])
def test_bad_num_classes(num_classes):
    with pytest.raises(ValueError, match="num_classes"):
        create_model("resnet18", num_classes=num_classes)


@pytest.mark.parametrize("name", MODELS)
def test_forward_backward_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7)
    assert isinstance(model, ZooModel) and model.num_classes == 7
    x = torch.randn(2, 3, 16, 16)
    features = model.forward_features(x)
    assert features.shape == (2, model.num_features)
    logits = model.forward_head(features)
    assert logits.shape == (2, 7)
    logits.square().mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: {pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: {pname} has a non-finite gradient"
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", SMALL)
def test_memory_strategies_give_the_autograd_gradients(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=5).double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, requires_grad=True)
    reversible = any(isinstance(m, ReversibleNet) for m in model.modules())
    reference = loss_gradients(model, x, "autograd")
    # Per tensor: 1e-9 relative, or 1e-12 of the whole gradient for tensors whose gradient is ~0
    # (a bias feeding straight into a BatchNorm has a zero gradient up to rounding).
    scale = torch.cat([g.reshape(-1) for g in reference]).norm()
    for mode in ("reversible", "checkpoint") if reversible else ("checkpoint",):
        for got, want in zip(loss_gradients(model, x, mode), reference, strict=True):
            assert (got - want).norm() <= 1e-9 * want.norm() + 1e-12 * scale, (name, mode, relative_error(got, want))


def test_plain_resnet_refuses_reversible_mode_and_stays_unchanged():
    model = create_model("resnet18").set_mode("checkpoint")
    with pytest.raises(ValueError, match="mode='reversible' needs invertible blocks"):
        model.set_mode("reversible")
    assert model.layer1.mode == "checkpoint"
    with pytest.raises(ValueError, match="mode must be one of"):
        model.set_mode("fast")


def test_checkpointed_plain_stage_updates_batchnorm_statistics_once():
    torch.manual_seed(0)
    reference, checkpointed = create_model("resnet18"), create_model("resnet18").set_mode("checkpoint")
    checkpointed.load_state_dict(reference.state_dict())
    x = torch.randn(4, 3, 8, 8)
    reference(x).sum().backward()
    checkpointed(x).sum().backward()
    for (name, a), b in zip(reference.state_dict().items(), checkpointed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_momentum_resnet_structure_and_learned_velocity():
    model = create_model("momentum_resnet34", gamma=0.5, init_velocity="learned")
    stacks = [m for m in model.modules() if isinstance(m, MomentumNet)]
    assert [s.depth for s in stacks] == [2, 3, 5, 2]  # (3, 4, 6, 3) blocks, the first of each stage kept
    assert all(s.gamma == 0.5 and s.init_velocity is not None for s in stacks)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    assert all(p.grad is not None for s in stacks for p in s.init_velocity.parameters())
    with pytest.raises(ValueError, match="init_velocity must be 'zero' or 'learned'"):
        create_model("momentum_resnet18", init_velocity="random")


def test_momentum_resnet_at_gamma_zero_is_the_resnet():
    torch.manual_seed(0)
    plain = create_model("resnet18").eval()
    momentum = create_model("momentum_resnet18", gamma=0.0, mode="autograd").eval()
    momentum.load_state_dict(plain.state_dict(), strict=False)  # momentum keys differ: copy by position
    for p, q in zip(plain.parameters(), momentum.parameters(), strict=True):
        q.data.copy_(p.data)
    for p, q in zip(plain.buffers(), momentum.buffers(), strict=True):
        q.data.copy_(p.data)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(momentum(x), plain(x), rtol=1e-5, atol=1e-5)


def test_revnet_has_fewer_parameters_and_inverts():
    model = create_model("revnet18").eval()
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in create_model("resnet18").parameters())
    couplings = model.layer2[1]
    x = torch.randn(2, 128, 4, 4, dtype=torch.float64)
    couplings.double()
    with torch.no_grad():
        torch.testing.assert_close(couplings.inverse(couplings(x)), x, rtol=0, atol=1e-10)
