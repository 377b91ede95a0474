"""Gradients of the memory-free engine, and reconstruction by inversion.

The reference throughout is plain autograd in float64 through :func:`helpers.reference_forward`, a
Python loop written from the papers' formulas that shares no code with ``revnets``; every mode
(``reversible``, ``autograd``, ``checkpoint``) is compared with it.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import (
    ARCHITECTURES,
    TWO_STREAM,
    function_width,
    gradients,
    make_input,
    make_net,
    max_relative_error,
    mlp,
    reference_forward,
    relative_error,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

import revnets
from revnets.autograd import reversible

MODES = revnets.MODES


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Every test here crosses the reversible engine's chunk boundaries (about every 4 layers of width 4),
    which real layers only meet every 1 Mi parameters."""
    monkeypatch.setattr(reversible, "CHUNK_PARAMETERS", 100)
EPS32 = torch.finfo(torch.float32).eps
HIDDEN = 3  # hidden width of the conditioned functions below


def _cotangent(shape, dtype=torch.float64, seed=7):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _grads_of(net, x, cotangent, *args, reference=False, **kwargs):
    """Gradients of ``<net(x), cotangent>`` w.r.t. ``x`` and every parameter (zeros where unused)."""
    params = list(net.parameters())
    if reference:
        return gradients(lambda: reference_forward(net, x, *args, **kwargs), (x,), params, cotangent)
    return gradients(lambda: net(x, *args, **kwargs), (x,), params, cotangent)


# --------------------------------------------------------------------------------------------------
# gradcheck: finite differences against the analytic (reversible / autograd / checkpoint) backward.


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_gradcheck_input(arch, mode):
    net = make_net(arch, depth=3, width=4, mode=mode)
    x = make_input(2, 4, requires_grad=True)
    assert torch.autograd.gradcheck(net, (x,), eps=1e-6, atol=1e-8, rtol=1e-6)


def _numerical_parameter_gradients(net, x, cotangent, eps=1e-6):
    """Central differences of ``<net(x), cotangent>`` in every parameter entry (float64)."""
    grads = []
    with torch.no_grad():
        for p in net.parameters():
            g = torch.empty_like(p)
            flat, gflat = p.view(-1), g.view(-1)
            for i in range(flat.numel()):
                original = flat[i].item()
                flat[i] = original + eps
                plus = (net(x) * cotangent).sum().item()
                flat[i] = original - eps
                minus = (net(x) * cotangent).sum().item()
                flat[i] = original
                gflat[i] = (plus - minus) / (2 * eps)
            grads.append(g)
    return grads


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_finite_differences_parameters(arch, mode):
    """Parameter gradients of each mode's backward against central differences (gradcheck for the
    modules' own parameters, which gradcheck cannot take as inputs)."""
    net = make_net(arch, depth=3, width=4, mode=mode)
    x = make_input(2, 4)
    ct = _cotangent(x.shape)
    params = list(net.parameters())
    analytic = torch.autograd.grad((net(x) * ct).sum(), params)
    numerical = _numerical_parameter_gradients(net, x, ct)
    for a, n in zip(analytic, numerical, strict=True):
        torch.testing.assert_close(a, n, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("mode", ["reversible", "checkpoint"])
def test_functional_call_is_refused_by_a_recomputing_backward(mode):
    """The memory-free and the checkpointed backward re-evaluate the modules after ``functional_call``
    has put their own parameters back: they must refuse loudly rather than differentiate the wrong
    weights (torch.utils.checkpoint alone silently does)."""
    for arch in ARCHITECTURES:
        net = make_net(arch, depth=3, width=4, mode=mode)
        substitutes = {n: (1.5 * p.detach()).requires_grad_() for n, p in net.named_parameters()}
        out = functional_call(net, substitutes, (make_input(3, 4, requires_grad=True),))
        with pytest.raises(RuntimeError, match=f"parameters of the {mode} stack.*functional_call"):
            out.sum().backward()


def test_functional_call_parameters():
    """``torch.func.functional_call`` substitutes parameters for one call (meta-learning, torch.func):
    the gradients must be those of the substituted values, and reach the substituted tensors."""
    for arch in ARCHITECTURES:
        net = make_net(arch, depth=3, width=4, mode="autograd")
        substitutes = {n: (1.5 * p.detach()).requires_grad_() for n, p in net.named_parameters()}
        reference = make_net(arch, depth=3, width=4)
        with torch.no_grad():
            for p in reference.parameters():
                p.mul_(1.5)
        x = make_input(3, 4, requires_grad=True)
        ct = _cotangent(x.shape)
        expected = _grads_of(reference, x, ct, reference=True)
        out = functional_call(net, substitutes, (x,))
        got = torch.autograd.grad((out * ct).sum(), [x, *substitutes.values()], allow_unused=True)
        missing = [n for n, g in zip(substitutes, got[1:], strict=True) if g is None]
        assert not missing, f"{arch}: no gradient for substituted parameters {missing}"
        assert max_relative_error(list(got), expected) < 1e-10, arch


# --------------------------------------------------------------------------------------------------
# Every mode against the float64 reference, for the input and all parameters.


@pytest.mark.parametrize(("batch", "hidden"), [(3, None), (16, 1)], ids=["wide-functions", "narrow-functions"])
@pytest.mark.parametrize("depth", [1, 8, 64])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_gradients_match_reference_float64(arch, mode, depth, batch, hidden):
    """Both ways the reversible backward applies an update's gain: to the state's gradient (functions with
    more parameters than the state has elements) or to the VJP's results (fewer: hidden width 1, batch 16)."""
    net = make_net(arch, depth=depth, width=4, mode=mode, gamma=0.9, h=0.1, function=lambda w: mlp(w, hidden))
    x = make_input(batch, 4, requires_grad=True)
    ct = _cotangent(x.shape)
    expected = _grads_of(net, x, ct, reference=True)
    actual = _grads_of(net, x, ct)
    assert len(actual) == 1 + len(list(net.parameters()))
    assert all(e.abs().max() > 0 for e in expected), "degenerate set-up: a reference gradient is zero"
    assert max_relative_error(actual, expected) < 1e-10


@pytest.mark.parametrize("depth", [1, 8, 64])
@pytest.mark.parametrize("mode", MODES)
def test_gradients_reversible_equal_autograd_mode_float64(mode, depth):
    """The library's own modes agree with each other (besides each agreeing with the reference)."""
    for arch in ARCHITECTURES:
        net = make_net(arch, depth=depth, width=4, mode="autograd")
        x = make_input(3, 4, requires_grad=True)
        ct = _cotangent(x.shape)
        expected = _grads_of(net, x, ct)
        actual = _grads_of(net.set_mode(mode), x, ct)
        assert max_relative_error(actual, expected) < 1e-10, arch


@pytest.mark.parametrize("depth", [1, 8, 64])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_gradients_float32_close_to_float64_reference(arch, depth):
    """float32 gradients of every mode against the float64 reference on the same weights and input.

    γ = 0.9, h = 0.1. Depths 1 and 8: relative error < 1e-5 for every mode. Depth 64: plain float32
    backprop itself is off by up to ~5e-5 here (Leapfrog's and RevNet's growth), so the reversible
    backward may be worse by at most 4× that; for MomentumNet the float inversion also divides by
    γ once per layer, which amplifies rounding by γ^-N (the reason revnets has an exact mode), so the
    bound has an extra eps32·γ^-N/(1−γ) term (≈ 1e-3 at N = 64, measured error 4.3e-4).
    """
    net32 = make_net(arch, depth=depth, width=4, dtype=torch.float32)
    net64 = make_net(arch, depth=depth, width=4, dtype=torch.float64)  # the same (float32-drawn) weights
    x32 = make_input(3, 4, dtype=torch.float32, requires_grad=True)
    x64 = x32.detach().double().requires_grad_()
    ct64 = _cotangent(x32.shape)
    ct32 = ct64.float()
    expected = _grads_of(net64, x64, ct64, reference=True)
    errors = {}
    for mode in MODES:
        errors[mode] = max_relative_error(_grads_of(net32.set_mode(mode), x32, ct32), expected)
    if depth <= 8:
        assert max(errors.values()) < 1e-5, errors
    else:
        bound = max(1e-5, 4 * errors["autograd"])
        if arch == "MomentumNet":
            bound += 2 * EPS32 * 0.9**-depth / (1 - 0.9)
        assert errors["reversible"] < bound, errors
        assert errors["checkpoint"] < max(1e-5, 4 * errors["autograd"]), errors


# --------------------------------------------------------------------------------------------------
# How gradients are delivered.


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_autograd_grad_returns_gradients_without_accumulating(arch, mode):
    net = make_net(arch, depth=4, width=4, mode=mode)
    x = make_input(3, 4, requires_grad=True)
    ct = _cotangent(x.shape)
    params = list(net.parameters())
    expected = _grads_of(net, x, ct, reference=True)
    got = torch.autograd.grad((net(x) * ct).sum(), [x, *params])
    assert all(g is not None for g in got)
    assert max_relative_error(list(got), expected) < 1e-10
    assert x.grad is None
    assert all(p.grad is None for p in params), "torch.autograd.grad must not accumulate into .grad"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_backward_fills_leaf_grads_once(arch, mode):
    """``loss.backward()``: the leaf input's and the parameters' ``.grad`` equal the reference (not doubled)."""
    net = make_net(arch, depth=4, width=4, mode=mode)
    x = make_input(3, 4, requires_grad=True)
    ct = _cotangent(x.shape)
    expected = _grads_of(net, x, ct, reference=True)
    (net(x) * ct).sum().backward()
    actual = [x.grad, *(p.grad for p in net.parameters())]
    assert all(a is not None for a in actual)
    assert max_relative_error(actual, expected) < 1e-10


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_input_without_grad_still_trains_parameters(arch, mode):
    net = make_net(arch, depth=4, width=4, mode=mode)
    x = make_input(3, 4, requires_grad=False)
    ct = _cotangent(x.shape)
    params = list(net.parameters())
    expected = gradients(lambda: reference_forward(net, x), (), params, ct)
    out = net(x)
    assert out.requires_grad
    (out * ct).sum().backward()
    assert x.grad is None
    assert max_relative_error([p.grad for p in params], expected) < 1e-10


@pytest.mark.parametrize("mode", MODES)
def test_backward_twice_with_retain_graph(mode):
    """Two backward passes through one graph accumulate twice the gradient (gradcheck relies on it)."""
    for arch in ARCHITECTURES:
        net = make_net(arch, depth=3, width=4, mode=mode)
        x = make_input(3, 4, requires_grad=True)
        ct = _cotangent(x.shape)
        expected = _grads_of(net, x, ct, reference=True)
        loss = (net(x) * ct).sum()
        loss.backward(retain_graph=True)
        loss.backward()
        actual = [x.grad, *(p.grad for p in net.parameters())]
        assert max_relative_error(actual, [2 * e for e in expected]) < 1e-10, arch


@pytest.mark.parametrize("mode", MODES)
def test_double_backward_is_correct_or_refused(mode):
    """``create_graph=True`` then a second derivative: either the true Hessian-vector product or an
    error — never a silently wrong number."""
    net = make_net("MomentumNet", depth=3, width=4, mode=mode)
    x = make_input(3, 4, requires_grad=True)

    def second(forward):
        (gx,) = torch.autograd.grad(forward(x).pow(2).sum(), x, create_graph=True)
        (ggx,) = torch.autograd.grad(gx.sum(), x)
        return ggx

    expected = second(lambda x: reference_forward(net, x))
    try:
        actual = second(net)
    except RuntimeError:
        return  # refused loudly: acceptable
    assert relative_error(actual, expected) < 1e-10


# --------------------------------------------------------------------------------------------------
# Extra arguments.


class Conditioned(nn.Module):
    """Linear-Tanh-Linear reading a positional conditioning tensor ``c`` (B, HIDDEN), a boolean
    ``mask`` (B, 1) keyword, and a nested dict ``extra = {"shift": tensor (HIDDEN,), "scale": float,
    "flags": [bool tensor (B, 1)]}``. No defaults: a function that does not get them raises."""

    def __init__(self, width: int):
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(width, HIDDEN), nn.Linear(HIDDEN, width)
        self.calls = 0

    def forward(self, x, c, *, mask, extra):
        assert mask.dtype == torch.bool and extra["flags"][0].dtype == torch.bool
        self.calls += 1
        hidden = torch.tanh(self.lin1(x) + c + extra["scale"] * extra["shift"])
        out = self.lin2(hidden)
        out = torch.where(extra["flags"][0], -out, out)
        return torch.where(mask, out, torch.zeros_like(out))


def _conditioning(batch, dtype=torch.float64):
    g = torch.Generator().manual_seed(11)
    c = torch.randn(batch, HIDDEN, generator=g, dtype=dtype).requires_grad_()
    shift = torch.randn(HIDDEN, generator=g, dtype=dtype).requires_grad_()
    mask = torch.tensor([[True], [False], [True], [True]])[:batch]
    flags = torch.tensor([[False], [False], [True], [False]])[:batch]
    return c, shift, mask, {"shift": shift, "scale": 0.5, "flags": [flags]}


@pytest.mark.parametrize("depth", [3, 20])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_extra_arguments_reach_every_function_and_get_gradients(arch, mode, depth):
    net = make_net(arch, depth=depth, width=4, mode=mode, function=Conditioned)
    x = make_input(4, 4, requires_grad=True)
    c, shift, mask, extra = _conditioning(4)
    ct = _cotangent(x.shape)
    params = list(net.parameters())
    expected = gradients(lambda: reference_forward(net, x, c, mask=mask, extra=extra), (x, c, shift), params, ct)
    functions = [m for m in net.modules() if isinstance(m, Conditioned)]
    for m in functions:
        m.calls = 0
    out = net(x, c, mask=mask, extra=extra)
    assert all(m.calls >= 1 for m in functions), "a function was not called with the extra arguments"
    got = torch.autograd.grad((out * ct).sum(), [x, c, shift, *params])
    assert max_relative_error(list(got), expected) < 1e-10
    # The mask really acts: masked-out samples never touch the conditioning tensor.
    assert torch.equal(got[1][1], torch.zeros(HIDDEN, dtype=torch.float64))
    assert got[1][0].abs().max() > 0


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_extra_arguments_without_grad_input(arch):
    """Only the conditioning tensor (and the parameters) require grad: the reversible graph is still built."""
    net = make_net(arch, depth=3, width=4, function=Conditioned)
    x = make_input(4, 4)
    c, shift, mask, extra = _conditioning(4)
    ct = _cotangent(x.shape)
    expected = gradients(lambda: reference_forward(net, x, c, mask=mask, extra=extra), (c, shift), [], ct)
    got = torch.autograd.grad((net(x, c, mask=mask, extra=extra) * ct).sum(), [c, shift])
    assert max_relative_error(list(got), expected) < 1e-10


# --------------------------------------------------------------------------------------------------
# MomentumNet: learnable γ and learned initial velocity.


# with γ = 0.3, inversion amplifies rounding by 0.3^-20 ≈ 3e10 at depth 20
@pytest.mark.parametrize(("gamma", "depth"), [(0.3, 6), (0.9, 6), (0.9, 20)])
@pytest.mark.parametrize("mode", MODES)
def test_learnable_gamma_gradient(mode, gamma, depth):
    net = make_net("MomentumNet", depth=depth, width=4, mode=mode, gamma=gamma, learn_gamma=True)
    assert isinstance(net.gamma_logit, nn.Parameter) and net.gamma_logit.dtype == torch.float64
    assert abs(net.gamma.item() - gamma) < 1e-7  # the logit is initialised in the default dtype (float32)
    x = make_input(3, 4, requires_grad=True)
    ct = _cotangent(x.shape)
    expected = _grads_of(net, x, ct, reference=True)
    names = ["x", *(n for n, _ in net.named_parameters())]
    assert "gamma_logit" in names and expected[names.index("gamma_logit")].abs() > 0
    actual = _grads_of(net, x, ct)
    errors = {n: relative_error(a, e) for n, a, e in zip(names, actual, expected, strict=True)}
    assert errors["gamma_logit"] < 1e-10, errors
    assert max(errors.values()) < 1e-10, errors


@pytest.mark.parametrize("mode", MODES)
def test_learnable_gamma_stays_in_open_interval(mode):
    """Training pushes γ hard towards 0, then towards 1 (Adam, lr 0.5): it stays strictly inside (0, 1)."""
    net = make_net("MomentumNet", depth=4, width=4, mode=mode, gamma=0.9, learn_gamma=True)
    x = make_input(3, 4)
    opt = torch.optim.Adam(net.parameters(), lr=0.5)
    seen = []
    for direction in (1.0, -1.0):  # minimise, then maximise, the output's energy
        for _ in range(20):
            opt.zero_grad()
            (direction * net(x).pow(2).mean()).backward()
            opt.step()
            gamma = net.gamma.item()
            assert 0.0 < gamma < 1.0 and math.isfinite(gamma)
            seen.append(gamma)
    assert max(seen) - min(seen) > 0.05, "γ did not move: its gradient is not reaching the optimiser"
    for logit in (-20.0, 20.0):
        with torch.no_grad():
            net.gamma_logit.fill_(logit)
        assert 0.0 < net.gamma.item() < 1.0


@pytest.mark.parametrize("mode", MODES)
def test_init_velocity_gradients(mode):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        phi = mlp(4).double()
    net = make_net("MomentumNet", depth=5, width=4, mode=mode, init_velocity=phi)
    x = make_input(3, 4, requires_grad=True)
    ct = _cotangent(x.shape)
    expected = _grads_of(net, x, ct, reference=True)
    actual = _grads_of(net, x, ct)
    phi_params = {id(p) for p in phi.parameters()}
    assert any(id(p) in phi_params for p in net.parameters()), "init_velocity's parameters must be registered"
    assert max_relative_error(actual, expected) < 1e-10


# --------------------------------------------------------------------------------------------------
# Reconstruction.


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_inverse_of_forward_float64(arch):
    net = make_net(arch, depth=8, width=6, function=Conditioned)
    x = make_input(4, 6)
    c, _, mask, extra = _conditioning(4)
    with torch.no_grad():
        if arch in TWO_STREAM:
            y = net(x, c, mask=mask, extra=extra)
            assert torch.allclose(y, reference_forward(net, x, c, mask=mask, extra=extra), rtol=0, atol=1e-12)
            back = net.inverse(y, c, mask=mask, extra=extra)
        else:
            x_n, v_n = net.forward_state(net.init_state(x), c, mask=mask, extra=extra)
            ref_x, ref_v = reference_forward(net, x, c, mask=mask, extra=extra, return_state=True)
            assert torch.allclose(x_n, ref_x, rtol=0, atol=1e-12) and torch.allclose(v_n, ref_v, rtol=0, atol=1e-12)
            assert torch.equal(net(x, c, mask=mask, extra=extra), x_n)
            back = net.inverse(x_n, v_n, c, mask=mask, extra=extra)
            x0, v0 = net.inverse_state((x_n, v_n), c, mask=mask, extra=extra)
            assert torch.equal(x0, back) and v0.abs().max() < 1e-12
    assert (back - x).abs().max() < 1e-12
    assert not torch.equal(y if arch in TWO_STREAM else x_n, x)  # the network did something


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_inverse_with_learned_init_velocity_and_parameters_untouched(arch):
    """Inverting needs no graph and leaves no gradients behind."""
    options = {"init_velocity": mlp(4).double()} if arch == "MomentumNet" else {}
    net = make_net(arch, depth=5, width=4, **options)
    x = make_input(3, 4)
    state = net.forward_state(net.init_state(x))
    assert all(s.requires_grad for s in state)  # parameters require grad: a graph was built
    back = net.inverse_state(tuple(s.detach() for s in state))
    assert not any(s.requires_grad for s in back)
    back = torch.cat(back, dim=1) if arch in TWO_STREAM else back[0]
    assert (back - x).abs().max() < 1e-12
    assert all(p.grad is None for p in net.parameters())


def test_momentum_float32_reconstruction_depth_64():
    """float32 inversion at depth 64, γ = 0.9: each layer divides by γ, so rounding grows as
    γ^-64 = 0.9^-64 ≈ 850. Measured: max error 5.1e-4 on outputs of size ~4.6 (relative 1.1e-4)."""
    depth, gamma = 64, 0.9
    net = make_net("MomentumNet", depth=depth, width=4, dtype=torch.float32, gamma=gamma)
    x = make_input(3, 4, dtype=torch.float32)
    with torch.no_grad():
        x_n, v_n = net.forward_state(net.init_state(x))
        back = net.inverse(x_n, v_n)
        _, v0 = net.inverse_state((x_n, v_n))
    scale = x_n.abs().max().item()
    error = (back - x).abs().max().item()
    assert error < 1e-3 * scale, error
    assert error < 4 * EPS32 * gamma**-depth / (1 - gamma) * scale, error
    assert v0.abs().max() < 1e-3 * scale
    # The same weights in float64 reconstruct to rounding level.
    net64, x64 = net.double(), x.double()
    with torch.no_grad():
        back64 = net64.inverse(*net64.forward_state(net64.init_state(x64)))
    assert (back64 - x64).abs().max() < 1e-11


# --------------------------------------------------------------------------------------------------
# Property tests (float64).


@st.composite
def configurations(draw):
    arch = draw(st.sampled_from(ARCHITECTURES))
    return {
        "arch": arch,
        "batch": draw(st.integers(1, 4)),
        "width": 2 * draw(st.integers(1, 4)),
        "depth": draw(st.integers(1, 12)),
        "gamma": draw(st.floats(0.3, 1.0)),
        "h": draw(st.floats(0.01, 0.5)),
        "seed": draw(st.integers(0, 2**16)),
    }


@settings(max_examples=25, deadline=None)
@given(cfg=configurations())
def test_property_reversible_gradients_equal_reference(cfg):
    net = make_net(cfg["arch"], cfg["depth"], cfg["width"], gamma=cfg["gamma"], h=cfg["h"], seed=cfg["seed"])
    x = make_input(cfg["batch"], cfg["width"], seed=cfg["seed"] + 1, requires_grad=True)
    ct = _cotangent(x.shape, seed=cfg["seed"] + 2)
    expected = _grads_of(net, x, ct, reference=True)
    actual = _grads_of(net, x, ct)
    assert max_relative_error(actual, expected) < 1e-9


@settings(max_examples=25, deadline=None)
@given(cfg=configurations())
def test_property_inverse_of_forward(cfg):
    net = make_net(cfg["arch"], cfg["depth"], cfg["width"], gamma=cfg["gamma"], h=cfg["h"], seed=cfg["seed"])
    x = make_input(cfg["batch"], cfg["width"], seed=cfg["seed"] + 1)
    with torch.no_grad():
        if cfg["arch"] in TWO_STREAM:
            back = net.inverse(net(x))
        else:
            back = net.inverse(*net.forward_state(net.init_state(x)))
    assert torch.allclose(back, x, rtol=0, atol=1e-9)


def test_fixtures_build_the_papers_schemes(net, architecture):
    """The shared ``net`` fixture (conftest) computes the papers' formulas in reversible mode."""
    assert type(net).__name__ == architecture and net.mode == "reversible" and net.depth == 3
    x = make_input(3, 4)
    torch.testing.assert_close(net(x), reference_forward(net, x), atol=1e-12, rtol=0)


def test_function_width_helper():
    """The factory gives two-stream functions half the channels (guards the helpers themselves)."""
    assert function_width("MomentumNet", 6) == 6 and function_width("RevNet", 6) == 3
    net = make_net("MidpointNet", depth=2, width=6)
    assert net.functions[0][0].in_features == 3


# --------------------------------------------------------------------------------------------------
# keep_input: the first layer is evaluated on the stored input instead of its reconstruction.


@pytest.mark.parametrize("depth", [4, 20])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_keep_input_gradients_match_reference_with_extra_arguments(arch, depth):
    net = make_net(arch, depth=depth, width=4, function=Conditioned)
    net.keep_input = True
    x = make_input(4, 4, requires_grad=True)
    c, shift, mask, extra = _conditioning(4)
    ct = _cotangent(x.shape)
    params = list(net.parameters())
    expected = gradients(lambda: reference_forward(net, x, c, mask=mask, extra=extra), (x, c, shift), params, ct)
    got = torch.autograd.grad((net(x, c, mask=mask, extra=extra) * ct).sum(), [x, c, shift, *params])
    assert max_relative_error(list(got), expected) < 1e-10



# --------------------------------------------------------------------------------------------------
# Parameter gradients reach autograd chunk by chunk.


class _Logged(nn.Module):
    """A linear layer that logs its evaluations with autograd on (the backward's re-evaluations)."""

    def __init__(self, index: int, log: list):
        super().__init__()
        self.index, self.log, self.linear = index, log, nn.Linear(4, 4, dtype=torch.float64)

    def forward(self, x):
        if torch.is_grad_enabled():
            self.log.append(("evaluated", self.index))
        return torch.tanh(self.linear(x))


def test_parameter_gradients_are_handed_over_before_the_first_layers_are_rebuilt(monkeypatch):
    """Each chunk of layers (here 8 layers of 20 parameters) is its own autograd node: the gradients of the
    last layers' parameters are accumulated (and their hooks, such as DDP's reductions, run) while the first
    layers are still to be rebuilt, instead of all at the end of the stack's backward."""
    monkeypatch.setattr(reversible, "CHUNK_PARAMETERS", 8 * 20)
    log: list = []
    functions = [_Logged(k, log) for k in range(20)]
    for k, f in enumerate(functions):
        f.linear.weight.register_post_accumulate_grad_hook(lambda p, k=k: log.append(("accumulated", k)))
    net = revnets.MomentumNet(functions, gamma=0.9)
    net(make_input(3, 4)).sum().backward()
    position = {entry: i for i, entry in enumerate(log)}
    assert all(position[("accumulated", k)] < position[("evaluated", 0)] for k in range(8, 20))
    assert all(position[("accumulated", k)] < position[("evaluated", 8)] for k in range(16, 20))
    assert all(f.linear.weight.grad is not None for f in functions)
