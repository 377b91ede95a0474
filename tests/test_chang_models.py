"""Chang et al.'s Hamiltonian, Midpoint and Leapfrog networks in the model zoo (``revnets.models.chang``)."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

import revnets.models.chang as chang  # registers the models even if revnets.models does not import it yet
from revnets.models.base import ZooModel
from revnets.models.registry import create_model, list_models
from revnets.nn import HamiltonianNet, LeapfrogNet, MidpointNet, ReversibleNet

SCHEMES = ("hamiltonian", "midpoint", "leapfrog")
DEPTHS = (38, 74, 110, 218, 1202)
NAMES = [f"{s}{d}" for s in SCHEMES for d in DEPTHS]
BLOCKS = {38: 3, 74: 6, 110: 9, 218: 18, 1202: 100}
CHANNELS = {38: (32, 32, 64, 112), 74: (32, 32, 64, 112), 110: (32, 32, 64, 128), 218: (32, 32, 64, 128),
            1202: (32, 32, 64, 128)}
STACK_TYPE = {"hamiltonian": HamiltonianNet, "midpoint": MidpointNet, "leapfrog": LeapfrogNet}


def depth_of(name: str) -> int:
    return int(name.lstrip("abcdefghijklmnopqrstuvwxyz"))


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def projected_gradients(model: nn.Module, x: torch.Tensor, mode: str) -> list[torch.Tensor]:
    """Gradients of a fixed random projection of the logits w.r.t. ``x`` and every parameter."""
    model.set_mode(mode)
    logits = model(x)
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1), dtype=logits.dtype)
    return list(torch.autograd.grad((logits * weights).sum(), [x, *model.parameters()]))


@functools.cache
def built(name: str) -> ZooModel:
    """A default-built model, cached: for the tests that only inspect the structure."""
    torch.manual_seed(0)
    return create_model(name)


@pytest.fixture(scope="module", autouse=True)
def _free_cached_models():
    yield
    built.cache_clear()


def small_model(name: str, **kwargs) -> ZooModel:
    torch.manual_seed(0)
    return create_model(name, num_classes=5, **kwargs)


# -- registry and builders ----------------------------------------------------------------------------


def test_the_fifteen_models_are_registered():
    for scheme in SCHEMES:
        assert sorted(list_models(f"{scheme}*")) == sorted(f"{scheme}{d}" for d in DEPTHS)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_builder_arguments(scheme):
    default = create_model(f"{scheme}38")
    assert isinstance(default, ZooModel) and default.num_classes == 10
    assert default.h == chang.DEFAULT_STEP_SIZES[scheme]
    assert all(isinstance(u, STACK_TYPE[scheme]) and u.h == default.h and u.mode == "reversible" for u in default.units)
    model = create_model(f"{scheme}38", num_classes=3, h=0.25, mode="checkpoint", in_channels=1)
    assert model.h == 0.25 and all(u.h == 0.25 and u.mode == "checkpoint" for u in model.units)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 3)
    with pytest.raises(ValueError, match="step size"):
        create_model(f"{scheme}38", h=0.0)
    with pytest.raises(ValueError, match="mode"):
        create_model(f"{scheme}38", mode="fast")
    with pytest.raises(TypeError):
        create_model(f"{scheme}38", width=3)


def test_bad_configurations_are_refused():
    with pytest.raises(ValueError, match="scheme"):
        chang.ChangNet("euler", (32, 32, 64, 112), 3)
    with pytest.raises(ValueError, match="depth"):
        chang.chang_net("hamiltonian", 56)
    with pytest.raises(ValueError, match="channels"):
        chang.ChangNet("hamiltonian", (32, 33, 64, 112), 3)
    with pytest.raises(ValueError, match="channels"):
        chang.ChangNet("hamiltonian", (32, 64, 32, 112), 3)
    with pytest.raises(ValueError, match="blocks_per_unit"):
        chang.ChangNet("hamiltonian", (32, 32, 64, 112), 0)


# -- every model: forward, backward -------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in NAMES if depth_of(n) <= 110])
def test_forward_backward_every_parameter_gets_a_finite_gradient(name):
    model = small_model(name)
    x = torch.randn(2, 3, 8, 8)
    features = model.forward_features(x)
    assert features.shape == (2, model.num_features) == (2, CHANNELS[depth_of(name)][-1])
    logits = model.forward_head(features)
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()
    logits.square().mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), (name, pname)
        assert p.grad.abs().sum() > 0, (name, pname)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_1202_layers_builds_and_runs(scheme):
    model = built(f"{scheme}1202")
    assert model.num_layers == 1202 and [u.depth for u in model.units] == [100 if scheme == "hamiltonian" else 200] * 3
    if scheme == "hamiltonian":  # one forward of the deepest net (the others have the same cost), BN in training mode
        with torch.no_grad():
            logits = model(torch.randn(1, 3, 8, 8))
        assert logits.shape == (1, 10) and torch.isfinite(logits).all()


# -- structure: layer and parameter counts, no duplicated kernel -------------------------------------


class _CountLayers(TorchFunctionMode):
    """Counts the weight layers a forward applies: conv2d, conv_transpose2d and linear calls."""

    def __init__(self):
        super().__init__()
        self.counts = {"conv2d": 0, "conv_transpose2d": 0, "linear": 0}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.counts:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", NAMES)
def test_layer_count_is_four_per_block_plus_two(name):
    depth = depth_of(name)
    model = built(name)
    blocks = 3 * BLOCKS[depth]
    assert model.num_layers == 4 * blocks + 2 == depth
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    branches = [m for m in model.modules() if isinstance(m, chang.KernelBranch)]
    assert len(branches) == 2 * blocks  # two branches per block (F, G or two steps)
    assert len(convs) == 1 + len(branches)  # the stem and one kernel K per branch (Kᵀ shares it)
    assert [m for m in model.modules() if isinstance(m, nn.Linear)] == [model.head]


@pytest.mark.parametrize("name", ["hamiltonian38", "midpoint38", "leapfrog38", "leapfrog74"])
def test_a_forward_applies_four_layers_per_block_plus_two(name):
    model = create_model(name).set_mode("autograd")
    with torch.no_grad(), _CountLayers() as counter:
        model(torch.randn(1, 3, 8, 8))
    blocks = 3 * BLOCKS[depth_of(name)]
    assert counter.counts == {"conv2d": 1 + 2 * blocks, "conv_transpose2d": 2 * blocks, "linear": 1}
    assert sum(counter.counts.values()) == model.num_layers


@pytest.mark.parametrize("name", NAMES)
def test_parameter_count_stores_each_kernel_once(name):
    channels = CHANNELS[depth_of(name)]
    blocks = BLOCKS[depth_of(name)]
    model = built(name)
    expected = 3 * 9 * channels[0] + 2 * channels[0]  # stem conv (no bias) + BN
    for c in channels[1:]:
        half = c // 2
        expected += 2 * blocks * (9 * half * half + 2 * 2 * half)  # K (no bias), two BNs
    expected += 2 * channels[-1] + channels[-1] * 10 + 10  # final BN, head
    assert sum(p.numel() for p in model.parameters()) == expected


def test_transpose_uses_the_kernel_of_k():
    branch = chang.SymmetricBranch(4).double()
    y = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    (grad,) = torch.autograd.grad(branch.apply_transpose(y).sum(), [branch.conv.weight])
    assert branch.kernel is branch.conv.weight and grad.abs().sum() > 0


# -- the branches ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(5, 5), (6, 9), (1, 3)])
def test_transpose_is_the_adjoint_of_k(size):
    torch.manual_seed(0)
    branch = chang.SymmetricBranch(6).double()
    x = torch.randn(3, 6, *size, dtype=torch.float64)
    y = torch.randn(3, 6, *size, dtype=torch.float64)
    with torch.no_grad():
        kx, kty = branch.apply_kernel(x), branch.apply_transpose(y)
    assert kx.shape == kty.shape == x.shape
    left, right = (kx * y).sum(), (x * kty).sum()
    assert abs(left - right) <= 1e-12 * left.abs()
    # and Kᵀ y is the vector-Jacobian product of K at y (autograd's own transpose)
    xr = x.clone().requires_grad_()
    (vjp,) = torch.autograd.grad(branch.apply_kernel(xr), [xr], y)
    assert relative_error(kty, vjp) < 1e-13


def test_midpoint_operator_is_antisymmetric():
    torch.manual_seed(0)
    branch = chang.AntisymmetricBranch(6).double()
    x = torch.randn(3, 6, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        ax = branch.apply_kernel(x) - branch.apply_transpose(x)
    assert abs((ax * x).sum()) <= 1e-12 * ax.norm() * x.norm()


def _reference_branch(branch: chang.KernelBranch, x: torch.Tensor) -> torch.Tensor:
    """The branch from its parameters with functional ops (BatchNorm in eval mode)."""

    def bn(m: nn.BatchNorm2d, t: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(t, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)

    w = branch.conv.weight
    x = bn(branch.norm_in, x)
    if isinstance(branch, chang.AntisymmetricBranch):  # σ(BN((K − Kᵀ)x))
        return torch.relu(bn(branch.norm, F.conv2d(x, w, padding=1) - F.conv_transpose2d(x, w, padding=1)))
    return F.conv_transpose2d(torch.relu(bn(branch.norm, F.conv2d(x, w, padding=1))), w, padding=1)  # Kᵀσ(BN(Kx))


def _reference_unit(unit: ReversibleNet, x: torch.Tensor) -> torch.Tensor:
    """The paper's updates written out (no revnets.nn code)."""
    a, b = torch.chunk(x, 2, dim=1)
    h = unit.h
    if isinstance(unit, HamiltonianNet):
        for f, g in zip(unit.f_functions, unit.g_functions):
            a = a + h * _reference_branch(f, b)  # Y_{j+1} = Y_j + h·K₁ᵀσ(K₁Z_j + b₁)
            b = b - h * _reference_branch(g, a)  # Z_{j+1} = Z_j − h·K₂ᵀσ(K₂Y_{j+1} + b₂)
    elif isinstance(unit, MidpointNet):
        for f in unit.functions:
            a, b = b, a + 2 * h * _reference_branch(f, b)  # Y_{j+1} = Y_{j−1} + 2h·σ((K − Kᵀ)Y_j + b)
    else:
        for f in unit.functions:
            a, b = b, 2 * b - a - h * h * _reference_branch(f, b)  # Y_{j+1} = 2Y_j − Y_{j−1} − h²·Kᵀσ(…)
    return torch.cat([a, b], dim=1)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_units_are_the_papers_updates_and_invert(scheme):
    model = small_model(f"{scheme}38", h=0.7).double().eval()
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():  # non-trivial BatchNorms
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                for t in (m.weight, m.bias, m.running_mean):
                    t.copy_(torch.randn(t.shape, generator=generator, dtype=t.dtype))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=generator, dtype=torch.float64) + 0.5)
    for unit, c in zip(model.units, (32, 64, 112)):
        x = torch.randn(2, c, 4, 4, dtype=torch.float64)
        with torch.no_grad():
            y = unit(x)
            torch.testing.assert_close(y, _reference_unit(unit, x), rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(unit.inverse(y), x, rtol=0, atol=1e-9)


# -- transitions --------------------------------------------------------------------------------------------


def test_transition_pools_and_pads_each_stream():
    torch.manual_seed(0)
    y, z = torch.randn(2, 16, 8, 6), torch.randn(2, 16, 8, 6)
    out = chang.transition(torch.cat([y, z], dim=1), 64)
    assert out.shape == (2, 64, 4, 3)
    y2, z2 = torch.chunk(out, 2, dim=1)  # how the next unit splits its streams
    torch.testing.assert_close(y2[:, :16], F.avg_pool2d(y, 2))
    torch.testing.assert_close(z2[:, :16], F.avg_pool2d(z, 2))
    assert (y2[:, 16:] == 0).all() and (z2[:, 16:] == 0).all()


def test_pad_streams():
    x = torch.randn(1, 4, 2, 2)
    assert chang.pad_streams(x, 4) is x
    out = chang.pad_streams(x, 10)
    torch.testing.assert_close(out[:, [0, 1, 5, 6]], x, rtol=0, atol=0)
    assert (out[:, [2, 3, 4, 7, 8, 9]] == 0).all()
    for channels in (2, 7):
        with pytest.raises(ValueError, match="pad_streams"):
            chang.pad_streams(x, channels)
    with pytest.raises(ValueError, match="pad_streams"):
        chang.pad_streams(torch.randn(1, 3, 2, 2), 6)


# -- memory strategies ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_reversible_and_checkpoint_give_the_autograd_gradients(scheme, train):
    model = small_model(f"{scheme}38").double().train(train)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, requires_grad=True)
    reference = projected_gradients(model, x, "autograd")
    names = ["input", *(n for n, _ in model.named_parameters())]
    for mode in ("reversible", "checkpoint"):
        got = projected_gradients(model, x, mode)
        assert all(u.mode == mode for u in model.units)
        for name, a, b in zip(names, got, reference, strict=True):
            assert b.norm() > 0, name
            assert relative_error(a, b) < 1e-9, (scheme, mode, name, relative_error(a, b))


def _global_error(got, reference) -> float:
    return float(torch.cat([(a - b).reshape(-1) for a, b in zip(got, reference)]).norm()
                 / torch.cat([b.reshape(-1) for b in reference]).norm())


@pytest.mark.parametrize("scheme", SCHEMES)
def test_float32_reversible_gradients_thanks_to_the_kept_unit_inputs(scheme):
    """The zero-padded channels of a unit's input reach a BatchNorm with zero variance, which divides
    inversion rounding by sqrt(eps): the units keep their inputs (keep_input) so that the first branch
    sees them exactly. Without it the float32 gradients are off by ~1e-2 (checked here too)."""
    torch.manual_seed(0)
    model = create_model(f"{scheme}38").train()
    assert all(unit.keep_input for unit in model.units)
    x = torch.randn(8, 3, 16, 16, requires_grad=True)
    reference = projected_gradients(model, x, "autograd")
    assert _global_error(projected_gradients(model, x, "reversible"), reference) < 2e-5
    for unit in model.units:
        unit.keep_input = False
    assert _global_error(projected_gradients(model, x, "reversible"), reference) > 1e-4


@pytest.mark.parametrize("mode", ["reversible", "checkpoint"])
def test_batchnorm_statistics_update_once_per_step(mode):
    torch.manual_seed(0)
    reference = create_model("leapfrog38", mode="autograd").double()
    model = create_model("leapfrog38", mode=mode).double()
    model.load_state_dict(reference.state_dict())
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    reference(x).sum().backward()
    model(x).sum().backward()
    for (name, a), b in zip(reference.state_dict().items(), model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
    assert all(m.num_batches_tracked.item() == 1 for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_set_mode_switches_every_unit_and_refuses_unknown_modes():
    model = create_model("midpoint38")
    assert model.set_mode("checkpoint") is model
    assert [u.mode for u in model.units] == ["checkpoint"] * 3
    with pytest.raises(ValueError, match="mode"):
        model.set_mode("fast")
    assert [u.mode for u in model.units] == ["checkpoint"] * 3


def test_exact_mode_needs_reversible():
    model = small_model("hamiltonian38", exact=True)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    with pytest.raises(ValueError, match="exact"):
        model.set_mode("autograd")
    assert all(u.mode == "reversible" for u in model.units)


def _saved_numel(model: nn.Module, x: torch.Tensor) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return total


def test_reversible_memory_does_not_grow_with_depth():
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    for scheme in SCHEMES:
        shallow, deep = create_model(f"{scheme}38"), create_model(f"{scheme}74")
        assert _saved_numel(shallow, x) == _saved_numel(deep, x)  # only unit boundaries are kept
        shallow.set_mode("autograd"), deep.set_mode("autograd")
        assert _saved_numel(deep, x) > _saved_numel(shallow, x)


# -- the smoothness penalty ------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
def test_smoothness_penalty(scheme):
    model = create_model(f"{scheme}38").double()
    kernels = model.kernel_sequences()
    assert len(kernels) == (6 if scheme == "hamiltonian" else 3)
    penalty = model.smoothness_penalty()
    expected = sum(((seq[j + 1] - seq[j]) ** 2).sum() for seq in kernels for j in range(len(seq) - 1))
    assert penalty.dim() == 0 and penalty > 0
    torch.testing.assert_close(penalty, expected)
    (grad,) = torch.autograd.grad(penalty, [kernels[0][0]])
    torch.testing.assert_close(grad, -2 * (kernels[0][1] - kernels[0][0]).detach())

    with torch.no_grad():  # all kernels of a unit equal: no penalty
        for unit in model.units:
            branches = [m for m in unit.modules() if isinstance(m, chang.KernelBranch)]
            for branch in branches[1:]:
                branch.conv.weight.copy_(branches[0].conv.weight)
    penalty = model.smoothness_penalty()
    assert penalty.item() == 0.0 and penalty.requires_grad
    with torch.no_grad():  # one kernel off by 0.5 in one entry: two differences of 0.5
        kernels[-1][1][0, 0, 1, 1] += 0.5
    assert model.smoothness_penalty().item() == pytest.approx(0.5)
