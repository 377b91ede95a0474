"""Exact mode: fixed-point state and information buffer, bit-exact inversion at any depth and γ.

* ``net.inverse_exact(net.forward_exact(st)).equal(st)`` for all five architectures, negative inputs,
  several γ (including a :class:`fractions.Fraction`) and step sizes, and depths;
* a depth-10,000 Momentum ResNet at γ = 0.9 reconstructs its input bit for bit, with a buffer close
  to the information-theoretic floor ``log2(10/9) ≈ 0.152`` bits per element per layer;
* the float inverse at γ = 0.5, depth 100 does *not* reconstruct: why exact mode exists;
* γ conversion to a rational (silent for 0.9, a warning naming the value used otherwise);
* gradients of ``net(x)`` in exact mode are those of the float scheme (float64, rel ~1e-6).
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from fractions import Fraction

import pytest
import torch
from helpers import NO_KERNELS, assemble, mlp, scheme_options
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import revnets
from revnets.autograd import exact, kernels

ARCHS = ("MomentumNet", "RevNet", "HamiltonianNet", "MidpointNet", "LeapfrogNet")
GAMMAS = (0.9, 0.5, 0.1, Fraction(1, 3), 0.999)
STEP_SIZES = (1.0, 0.5, 0.1, 1 / 3)


pytestmark = pytest.mark.usefixtures("one_thread")


def build(
    arch: str,
    depth: int,
    width: int = 6,
    *,
    seed: int = 0,
    gamma=0.9,
    h: float = 0.5,
    dtype: torch.dtype = torch.float64,
    **options,
) -> revnets.ReversibleNet:
    """``arch`` with ``depth`` fresh Linear-Tanh-Linear functions (weights from ``seed``) in ``dtype``."""
    fw = width if arch == "MomentumNet" else width // 2
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fs = [mlp(fw) for _ in range(depth)]
        gs = [mlp(fw) for _ in range(depth)]
    return assemble(arch, fs, gs, **scheme_options(arch, gamma, h), **options).to(dtype)


def inputs(seed: int, shape=(3, 6), *, sign: str = "mixed", scale: float = 1.0, dtype=torch.float64) -> torch.Tensor:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    if sign == "negative":
        x = -x.abs()
    elif sign == "positive":
        x = x.abs()
    return x.to(dtype)


def assert_round_trip(net: revnets.ReversibleNet, x: torch.Tensor, *args, **kwargs) -> revnets.ExactState:
    start = net.exact_state(x)
    assert all(t.dtype == torch.int64 for t in start.tensors)
    saved = tuple(t.clone() for t in start.tensors)
    out = net.forward_exact(start, *args, **kwargs)
    back = net.inverse_exact(out, *args, **kwargs)
    assert back.equal(start), "inverse_exact(forward_exact(s)) differs from s"
    for a, b in zip(back.tensors, saved, strict=True):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(start.tensors, saved, strict=True)), "forward_exact modified its input"
    assert back.buffer_bits() == 0, "the inverse must hand back the (empty) input buffers"
    # a second inversion of the same output state (buffers are persistent) gives the same answer
    assert net.inverse_exact(out, *args, **kwargs).equal(start)
    return out


# --------------------------------------------------------------------------------------------------
# bit-exact round trips


@pytest.mark.parametrize("gamma", GAMMAS, ids=str)
@pytest.mark.parametrize("sign", ["mixed", "negative"])
@pytest.mark.parametrize("depth", [1, 7, 60])
def test_momentum_round_trip_is_bit_exact(gamma, sign, depth):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none of these γ needs rounding
        net = build("MomentumNet", depth, gamma=gamma, exact=True)
        out = assert_round_trip(net, inputs(depth, sign=sign, scale=3.0))
    if gamma < 1 and depth > 1:  # v_0 = 0: the first layer's γ·v_0 loses nothing
        assert out.buffer_bits() > 0, "a contraction must push information into the buffer"


@pytest.mark.parametrize("arch", ARCHS[1:])
@pytest.mark.parametrize("h", STEP_SIZES, ids=str)
@pytest.mark.parametrize("sign", ["mixed", "negative"])
@pytest.mark.parametrize("depth", [1, 9, 40])
def test_two_stream_round_trip_is_bit_exact(arch, h, sign, depth):
    net = build(arch, depth, h=h, exact=True)
    out = assert_round_trip(net, inputs(depth + 1, sign=sign, scale=2.0))
    assert out.buffer_bits() == 0, f"{arch} has no contracting update: no buffer needed"


@settings(max_examples=40, deadline=None)
@given(
    arch=st.sampled_from(ARCHS),
    depth=st.integers(1, 25),
    gamma=st.sampled_from(GAMMAS),
    h=st.sampled_from(STEP_SIZES),
    seed=st.integers(0, 10_000),
    sign=st.sampled_from(["mixed", "negative", "positive"]),
    scale=st.sampled_from([1e-6, 1.0, 50.0]),
    frac_bits=st.sampled_from([8, 20, 32, 40]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_round_trip_property(arch, depth, gamma, h, seed, sign, scale, frac_bits, dtype):
    net = build(arch, depth, seed=seed, gamma=gamma, h=h, dtype=dtype, exact=True, frac_bits=frac_bits)
    x = inputs(seed, sign=sign, scale=scale, dtype=dtype)
    try:
        assert_round_trip(net, x)
    except OverflowError:
        # only legitimate if the state really leaves ±2^(46 - frac_bits): check on the float trajectory
        limit = 2.0 ** (46 - frac_bits)
        float_net = build(arch, depth, seed=seed, gamma=float(gamma), h=h, dtype=torch.float64)
        with torch.no_grad():
            state = float_net.forward_state(float_net.init_state(x.double()))
        biggest = max(float(x.abs().max()), *(float(s.abs().max()) for s in state))
        assert not biggest < limit / 2, f"OverflowError although the float trajectory stays within {biggest:.3g}"


@pytest.mark.parametrize("arch", ARCHS)
def test_exact_forward_follows_the_float_scheme(arch):
    """A round trip proves invertibility, not correctness: the fixed-point trajectory must also be the scheme's."""
    depth = 12
    net = build(arch, depth, exact=True)
    float_net = build(arch, depth)
    x = inputs(5, scale=2.0)
    out = net.forward_exact(net.exact_state(x)).to_float()
    with torch.no_grad():
        expected = float_net.forward_state(float_net.init_state(x))
    for a, b in zip(out, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-7)


def test_exact_round_trip_with_extra_arguments():
    """Extra arguments reach the functions identically in forward_exact and inverse_exact."""

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(6, 6)

        def forward(self, x, scale, *, shift):
            return torch.tanh(self.linear(x)) * scale + shift

    torch.manual_seed(0)
    net = revnets.MomentumNet([Scaled() for _ in range(10)], gamma=0.5, exact=True).double()
    scale = torch.rand(3, 6, dtype=torch.float64)
    assert_round_trip(net, inputs(1, scale=2.0), scale, shift=0.25)


# --------------------------------------------------------------------------------------------------
# very deep


def test_depth_10000_reconstructs_bit_for_bit_with_a_small_buffer(record_property):
    depth, batch, width = 10_000, 4, 8
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        f = nn.Sequential(nn.Linear(width, width), nn.Tanh())
    # tanh(·) - 0.1·x pulls the position back, so it stays well inside ±2^14 (frac_bits=32) at any depth
    net = revnets.MomentumNet([lambda x: f(x) - 0.1 * x] * depth, gamma=0.9, exact=True)
    x = inputs(0, shape=(batch, width), dtype=torch.float32)
    start = net.exact_state(x)
    t0 = time.perf_counter()
    out = net.forward_exact(start)
    back = net.inverse_exact(out)
    elapsed = time.perf_counter() - t0
    assert back.equal(start)
    assert back.buffer_bits() == 0
    assert not out.equal(start), "sanity: the network moved the state"
    # Only the velocity is multiplied by γ; its buffer grows by at least log2(10/9) bits per element per layer.
    floor = math.log2(10 / 9)
    per_element_layer = out.buffer_bits() / (batch * width * depth)
    record_property("buffer_bits_per_element_per_layer", per_element_layer)
    record_property("depth_10000_seconds", elapsed)
    print(f"\ndepth {depth}: {per_element_layer:.4f} buffer bits per element per layer (floor {floor:.4f}); "
          f"{elapsed:.1f} s")
    assert per_element_layer < 0.2
    assert per_element_layer >= 0.95 * floor, "fewer bits than the information destroyed: buffer_bits() miscounts"


def test_buffer_beyond_64_bits_does_not_overflow_silently():
    """γ = 0.5 needs 1 bit per element per layer: at depth 200 that is 200 bits, far past one int64."""
    net = build("MomentumNet", 200, gamma=0.5, exact=True)
    x = inputs(3, scale=1.0)
    out = assert_round_trip(net, x)
    assert out.buffer_bits() >= 200 * x.numel() * 0.95


# --------------------------------------------------------------------------------------------------
# contrast: the float inverse


def test_float_inverse_fails_where_exact_inverse_succeeds():
    """Dividing by γ = 0.5 doubles float rounding errors at every layer: 2^100 · 1e-7 at depth 100."""
    depth = 100
    net = build("MomentumNet", depth, width=8, gamma=0.5, dtype=torch.float32)
    x = inputs(0, shape=(4, 8), dtype=torch.float32)
    with torch.no_grad():
        state = net.forward_state(net.init_state(x))
        try:
            back = net.inverse_state(state)[0]
            error = float((back - x).abs().max())
        except FloatingPointError:
            error = math.inf
    assert not error < 1.0, f"the float inverse was expected to fail, but reconstructed within {error}"
    exact = build("MomentumNet", depth, width=8, gamma=0.5, dtype=torch.float32, exact=True)
    start = exact.exact_state(x)
    assert exact.inverse_exact(exact.forward_exact(start)).equal(start)
    torch.testing.assert_close(start.to_float()[0], x, rtol=0, atol=2**-32)


# --------------------------------------------------------------------------------------------------
# γ conversion


def test_gamma_09_is_nine_tenths_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        net = build("MomentumNet", 5, gamma=0.9, exact=True)
        x = inputs(0)
        out = net.forward_exact(net.exact_state(x))
        net.inverse_exact(out)
        net(x.clone().requires_grad_()).sum().backward()
    same = build("MomentumNet", 5, gamma=Fraction(9, 10), exact=True)
    assert same.forward_exact(same.exact_state(x)).equal(out), "0.9 must be used as exactly 9/10"


def test_inexact_float_gamma_warns_with_the_value_used():
    gamma = 0.123456789123
    used = Fraction(gamma).limit_denominator(2**16)
    assert float(used) != gamma
    with pytest.warns(RuntimeWarning, match=rf"0\.123456789123.*{used.numerator}/{used.denominator}"):
        net = build("MomentumNet", 6, gamma=gamma, exact=True)
    same = build("MomentumNet", 6, gamma=used, exact=True)
    x = inputs(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = net.forward_exact(net.exact_state(x))
    assert same.forward_exact(same.exact_state(x)).equal(out), "the exact forward must use the rational reported"


def test_fraction_gamma_is_used_exactly():
    net = build("MomentumNet", 30, gamma=Fraction(1, 3), exact=True)
    out = assert_round_trip(net, inputs(4))
    floor = math.log2(3) * 30 * inputs(4).numel()
    assert out.buffer_bits() >= 0.95 * floor


def test_gamma_with_too_large_denominator_fraction_is_rejected():
    with pytest.raises(ValueError, match=r"gamma.*65536"):
        build("MomentumNet", 3, gamma=Fraction(1, 2**17 + 1), exact=True)


# --------------------------------------------------------------------------------------------------
# gradients in exact mode


@pytest.mark.parametrize("arch", ARCHS)
def test_exact_mode_gradients_match_float_autograd(arch):
    depth = 8
    net = build(arch, depth, gamma=0.9, exact=True)
    ref = build(arch, depth, gamma=0.9, mode="autograd")
    x = inputs(7, scale=2.0)

    def grads(model):
        xi = x.clone().requires_grad_()
        out = model(xi)
        loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum() + out.pow(2).sum()
        loss.backward()
        return out, [xi.grad, *(p.grad for p in model.parameters())]

    out, g = grads(net)
    ref_out, ref_g = grads(ref)
    torch.testing.assert_close(out, ref_out, rtol=1e-8, atol=1e-8)
    for a, b in zip(g, ref_g, strict=True):
        assert a is not None
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * float(b.abs().max()))


@pytest.mark.parametrize("arch", ARCHS)
def test_exact_mode_backward_twice(arch):
    net = build(arch, 6, exact=True)
    x = inputs(8).requires_grad_()
    loss = net(x).pow(2).sum()
    loss.backward(retain_graph=True)
    first = [x.grad.clone(), *(p.grad.clone() for p in net.parameters())]
    loss.backward()
    second = [x.grad, *(p.grad for p in net.parameters())]
    for a, b in zip(second, first, strict=True):
        torch.testing.assert_close(a, 2 * b, rtol=1e-12, atol=0)


@pytest.mark.parametrize("gamma", [0.5, 0.1])
def test_exact_mode_gradients_deep_small_gamma(gamma):
    """Where the float reversible backward fails (γ small, deep), exact mode still matches autograd."""
    depth = 60
    net = build("MomentumNet", depth, gamma=gamma, exact=True)
    ref = build("MomentumNet", depth, gamma=gamma, mode="autograd")
    x = inputs(9)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    net(xs[0]).pow(2).sum().backward()
    ref(xs[1]).pow(2).sum().backward()
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-6, atol=1e-6 * float(xs[1].grad.abs().max()))
    for p, q in zip(net.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-6 * float(q.grad.abs().max()))


@pytest.mark.parametrize("arch", ARCHS)
def test_exact_mode_under_autocast_matches_the_autocast_reference(arch):
    """CPU autocast (bf16 functions, float32 state): the exact trajectory is the autocast trajectory.

    The only differences allowed are the 2^-32 quantisation of the state (float32 rounding ~6e-8).
    A function's bf16 output times a gain (1 − γ, ±h, 2h) must not be rounded to bf16 again before
    it is quantised: that would add a bf16-sized (~1e-3) error at every layer, which the float32
    state of the reference never sees. h = 0.3 so that the gains are not powers of two.
    """
    depth = 6
    net = build(arch, depth, h=0.3, dtype=torch.float32, exact=True)
    ref = build(arch, depth, h=0.3, dtype=torch.float32, mode="autograd")
    x = inputs(11, dtype=torch.float32)

    def run(model):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(xi)
            loss = out.pow(2).sum()
        loss.backward()
        return out.detach(), xi.grad

    (out, gx), (ref_out, ref_gx) = run(net), run(ref)
    assert out.dtype == torch.float32
    for a, b, what in ((out, ref_out, "output"), (gx, ref_gx, "input gradient")):
        error = float((a - b).abs().max() / b.abs().max())
        assert error < 1e-5, f"{what}: relative error {error:.2e} against the autocast reference"


def test_exact_mode_without_grad_returns_floats():
    net = build("MomentumNet", 4, exact=True)
    ref = build("MomentumNet", 4, mode="autograd")
    x = inputs(1)
    with torch.no_grad():
        out = net(x)
        expected = ref(x)
    assert out.dtype == x.dtype and not out.requires_grad
    torch.testing.assert_close(out, expected, rtol=1e-8, atol=1e-8)


def test_exact_state_is_not_shared_between_copies():
    net = build("MomentumNet", 4, exact=True)
    other = copy.deepcopy(net)
    x = inputs(1)
    assert net.forward_exact(net.exact_state(x)).equal(other.forward_exact(other.exact_state(x)))


@pytest.mark.skipif(kernels.cpu_kernels() is None, reason=NO_KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_and_separate_arithmetic_give_the_same_bits(dtype, monkeypatch):
    """MomentumNet's contraction runs in the fused kernels; without them, the same states and gradients."""
    def run():
        net = build("MomentumNet", 12, width=16, gamma=0.9, dtype=dtype, exact=True)
        x = inputs(3, shape=(5, 16), dtype=dtype).requires_grad_()
        out = net(x)
        out.backward(torch.linspace(-1, 1, out.numel(), dtype=dtype).view_as(out))
        state = net.forward_exact(net.exact_state(x.detach()))
        return out, [x.grad, *(p.grad for p in net.parameters())], state

    out, grads, state = run()
    with monkeypatch.context() as patch:
        patch.setattr(kernels, "cpu_kernels", lambda: None)
        plain_out, plain_grads, plain_state = run()
    assert torch.equal(out, plain_out) and state.equal(plain_state)
    assert all(torch.equal(a.head, b.head) for a, b in zip(state.buffers, plain_state.buffers, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(grads, plain_grads, strict=True))


@pytest.mark.skipif(kernels.cpu_kernels() is None, reason=NO_KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_view_made_with_a_copy_update_is_handed_out_once(dtype):
    """``x ← x + v`` makes the view of the new x in the same pass; the next view of that x is it, once
    (a function may modify its input in place), then a fresh dequantisation with the same bits."""
    from revnets.autograd.arithmetic import FixedPointArithmetic
    from revnets.steps.base import Update

    arithmetic = FixedPointArithmetic(32, dtype, (Fraction(1),))
    x, v = (exact.quantize(inputs(seed, dtype=dtype), 32) for seed in (1, 2))
    buffer = exact.InformationBuffer.empty(x)
    new, _ = arithmetic.apply(0, Update.copy(0, 1), x, buffer, v, "layer 0")
    expected = new.to(dtype).mul_(2.0**-32)
    first = arithmetic.view(new)
    assert torch.equal(first, expected)
    first.mul_(2)  # a function modifying its input in place
    second = arithmetic.view(new)
    assert second is not first and torch.equal(second, expected)
    old, _ = arithmetic.undo(0, Update.copy(0, 1), new, buffer, v, "layer 0")
    assert torch.equal(old, x) and torch.equal(arithmetic.view(old), x.to(dtype).mul_(2.0**-32))
