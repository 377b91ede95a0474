"""Every bad input gets a clear error that names the argument (or the layer) and what is accepted.

Each test checks the exception type *and* the message with ``pytest.raises(..., match=...)``, so a
test fails if the library accepts the input, raises the wrong type, or raises an unhelpful message.
Small networks are built locally (no shared factory) so that this file stands alone.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from helpers import assemble
from torch import nn

import revnets

ARCHS = ("MomentumNet", "RevNet", "HamiltonianNet", "MidpointNet", "LeapfrogNet")
TWO_STREAM = ("RevNet", "HamiltonianNet", "MidpointNet", "LeapfrogNet")
STEP_SIZE_ARCHS = ("HamiltonianNet", "MidpointNet", "LeapfrogNet")
MODES_RE = r"mode must be one of 'reversible', 'autograd', 'checkpoint'"


pytestmark = pytest.mark.usefixtures("one_thread")


def small(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(width, width), nn.Tanh())


def build(arch: str, functions_f, functions_g=None, **options) -> revnets.ReversibleNet:
    """``arch`` from explicit function lists (``functions_g`` for the couplings, defaulting to ``functions_f``)."""
    return assemble(arch, functions_f, functions_g, **options)


def make(arch: str, depth: int = 3, width: int = 4, **options) -> revnets.ReversibleNet:
    fw = width if arch == "MomentumNet" else width // 2
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        fs = [small(fw) for _ in range(depth)]
        gs = [small(fw) for _ in range(depth)]
    return build(arch, fs, gs, **options)


# --------------------------------------------------------------------------------------------------
# gamma


@pytest.mark.parametrize("gamma", [-0.1, -1e-12, 1.0 + 1e-9, 2.0, math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("mode", ["reversible", "autograd", "checkpoint"])
def test_gamma_outside_unit_interval_is_rejected(gamma, mode):
    with pytest.raises(ValueError, match=r"gamma.*\[0, 1\].*got " + re.escape(repr(gamma))):
        revnets.MomentumNet([small(4)], gamma=gamma, mode=mode)


@pytest.mark.parametrize("gamma", ["0.9", None, torch.tensor(0.9), True])
def test_gamma_of_wrong_type_is_rejected(gamma):
    with pytest.raises((TypeError, ValueError), match=r"gamma"):
        revnets.MomentumNet([small(4)], gamma=gamma)


def test_gamma_zero_is_rejected_in_reversible_mode():
    with pytest.raises(ValueError, match=r"gamma=0.*not invertible.*reversible.*autograd"):
        revnets.MomentumNet([small(4)], gamma=0.0, mode="reversible")
    with pytest.raises(ValueError, match=r"gamma ?= ?0.*not invertible"):
        revnets.MomentumNet([small(4)], gamma=0, mode="reversible", exact=True)


@pytest.mark.parametrize("mode", ["autograd", "checkpoint"])
def test_gamma_zero_is_a_plain_resnet_in_autograd_and_checkpoint(mode):
    torch.manual_seed(0)
    fs = [small(4) for _ in range(3)]
    net = revnets.MomentumNet(fs, gamma=0.0, mode=mode)
    x = torch.randn(5, 4, requires_grad=True)
    out = net(x)
    # gamma = 0: v_{n+1} = f_n(x_n), x_{n+1} = x_n + f_n(x_n): a ResNet.
    expected = x
    for f in fs:
        expected = expected + f(expected)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    # switching such a network to the reversible mode must be refused as well
    with pytest.raises(ValueError, match=r"gamma=0.*not invertible"):
        net.set_mode("reversible")
    assert net.mode == mode, "a refused set_mode must leave the mode unchanged"


@pytest.mark.parametrize("gamma", [0.0, 1.0, 0, 1])
def test_learn_gamma_needs_open_interval(gamma):
    # gamma = sigmoid(logit) can never reach 0 or 1: the error names learn_gamma and the open interval.
    with pytest.raises(ValueError, match=r"learn_gamma=True keeps gamma inside the open interval \(0, 1\)"):
        revnets.MomentumNet([small(4)], gamma=gamma, learn_gamma=True, mode="autograd")


def test_learn_gamma_with_exact_is_rejected():
    with pytest.raises(ValueError, match=r"learn_gamma.*exact"):
        revnets.MomentumNet([small(4)], gamma=0.9, learn_gamma=True, exact=True)


# --------------------------------------------------------------------------------------------------
# channel counts and shapes


@pytest.mark.parametrize("arch", TWO_STREAM)
@pytest.mark.parametrize("mode", ["reversible", "autograd", "checkpoint"])
@pytest.mark.parametrize("channels", [3, 5])
def test_odd_channel_count_is_rejected(arch, mode, channels):
    net = make(arch, width=4, mode=mode)
    x = torch.randn(2, channels, requires_grad=True)
    with pytest.raises(ValueError, match=rf"x has {channels} channels.*even"):
        net(x)
    with pytest.raises(ValueError, match=rf"y has {channels} channels.*even"):
        net.inverse(x.detach())


@pytest.mark.parametrize("arch", TWO_STREAM)
def test_input_without_channel_dimension_is_rejected(arch):
    net = make(arch, width=4)
    with pytest.raises(ValueError, match=r"x must have a channel dimension"):
        net(torch.randn(4))


class Shrink(nn.Module):
    """Returns one feature fewer than it receives (with 2 features: shape (B, 1), which broadcasts)."""

    def forward(self, x):
        return x[:, :-1]


class Grow(nn.Module):
    """Returns one feature more than it receives (does not broadcast against the input)."""

    def forward(self, x):
        return torch.cat([x, x[:, :1]], dim=1)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ["reversible", "autograd", "checkpoint"])
@pytest.mark.parametrize("bad_layer", [0, 2])
@pytest.mark.parametrize("bad", [Shrink, Grow])
def test_function_with_wrong_output_shape_names_the_layer(arch, mode, bad_layer, bad):
    # Width 4: the two-stream functions see 2 features, so Shrink returns (3, 1), a shape that
    # *broadcasts* against the state; it must be refused all the same, not silently broadcast.
    width = 4
    fw = width if arch == "MomentumNet" else width // 2
    got = fw - 1 if bad is Shrink else fw + 1
    fs = [small(fw) for _ in range(4)]
    fs[bad_layer] = bad()
    net = build(arch, fs, [small(fw) for _ in range(4)], mode=mode)
    x = torch.randn(3, width, requires_grad=True)
    with pytest.raises(ValueError, match=rf"layer {bad_layer}\b.*returned \(3, {got}\).*shape \(3, {fw}\)"):
        net(x)


@pytest.mark.parametrize("arch", ["RevNet", "HamiltonianNet"])
def test_second_coupling_function_with_wrong_shape_names_the_layer(arch):
    fs = [small(2) for _ in range(3)]
    gs = [small(2) for _ in range(3)]
    gs[1] = Shrink()
    net = build(arch, fs, gs)
    with pytest.raises(ValueError, match=r"layer 1\b.*returned \(3, 1\)"):
        net(torch.randn(3, 4, requires_grad=True))


def test_function_returning_non_tensor_is_rejected():
    net = revnets.MomentumNet([lambda x: 1.0, small(4)], gamma=0.9)
    with pytest.raises(ValueError, match=r"layer 0\b.*returned float"):
        net(torch.randn(2, 4, requires_grad=True))


def test_non_callable_function_is_rejected():
    with pytest.raises(TypeError, match=r"functions\[1\] must be a callable"):
        revnets.MomentumNet([small(4), 3])
    with pytest.raises(TypeError, match=r"g_functions\[0\] must be a callable"):
        revnets.RevNet([small(2)], ["not a function"])


def test_init_velocity_with_wrong_shape_is_rejected():
    net = revnets.MomentumNet([small(4)], init_velocity=nn.Linear(4, 3))
    with pytest.raises(ValueError,
                       match=r"init_velocity must return a tensor of the input's shape \(2, 4\); got \(2, 3\)"):
        net(torch.randn(2, 4))


def test_init_velocity_must_be_a_module():
    with pytest.raises(TypeError, match=r"init_velocity must be an nn.Module"):
        revnets.MomentumNet([small(4)], init_velocity=lambda x: x)


# --------------------------------------------------------------------------------------------------
# modes


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("bad", ["Reversible", "memory", "", "exact", None])
def test_unknown_mode_is_rejected_by_constructor_and_set_mode(arch, bad):
    with pytest.raises(ValueError, match=MODES_RE + r".*got " + re.escape(repr(bad))):
        make(arch, mode=bad)
    net = make(arch)
    with pytest.raises(ValueError, match=MODES_RE):
        net.set_mode(bad)
    assert net.mode == "reversible", "a refused set_mode must leave the mode unchanged"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ["autograd", "checkpoint"])
def test_exact_needs_reversible_mode(arch, mode):
    with pytest.raises(ValueError, match=r"exact=True.*mode='reversible'.*got mode=" + re.escape(repr(mode))):
        make(arch, exact=True, mode=mode)
    net = make(arch, exact=True)
    with pytest.raises(ValueError, match=r"exact=True.*mode='reversible'"):
        net.set_mode(mode)
    assert net.mode == "reversible"


@pytest.mark.parametrize("bad", [1, "yes", None])
def test_exact_must_be_boolean(bad):
    with pytest.raises(TypeError, match=r"exact must be True or False"):
        make("MomentumNet", exact=bad)


@pytest.mark.parametrize("frac_bits", [-1, 41, 8.0, "32"])
def test_frac_bits_range(frac_bits):
    with pytest.raises(ValueError, match=r"frac_bits must be an integer in \[0, 40\]"):
        make("MomentumNet", exact=True, frac_bits=frac_bits)


# --------------------------------------------------------------------------------------------------
# coupling lengths and step sizes


@pytest.mark.parametrize("arch", ["RevNet", "HamiltonianNet"])
def test_f_g_length_mismatch(arch):
    with pytest.raises(ValueError, match=r"f_functions and g_functions must have the same length.*got 3 and 2"):
        build(arch, [small(2) for _ in range(3)], [small(2) for _ in range(2)])


@pytest.mark.parametrize("arch", STEP_SIZE_ARCHS)
@pytest.mark.parametrize("h", [0, 0.0, -0.1, -1, math.nan, math.inf, -math.inf, True, "1", None])
def test_step_size_must_be_finite_and_positive(arch, h):
    with pytest.raises(ValueError, match=r"h \(the step size\) must be a finite number > 0; got " + re.escape(repr(h))):
        make(arch, h=h)


# --------------------------------------------------------------------------------------------------
# non-finite values met while inverting


class EvalInf(nn.Module):
    """tanh in training mode; +inf in eval mode (as if a different, broken path ran on inversion)."""

    def forward(self, x):
        return torch.tanh(x) if self.training else torch.full_like(x, math.inf)


@pytest.mark.parametrize("arch", ARCHS)
def test_non_finite_function_output_while_inverting_names_the_layer(arch):
    depth = 4
    net = build(arch, [EvalInf() for _ in range(depth)], [EvalInf() for _ in range(depth)])
    x = torch.randn(2, 4)
    with torch.no_grad():
        state = net.forward_state(net.init_state(x))
    net.eval()
    with pytest.raises(FloatingPointError,
                       match=rf"layer {depth - 1}: a function returned a non-finite value .* while inverting"):
        net.inverse_state(state)


def test_reconstruction_overflow_names_the_layer():
    # gamma = 1e-20: inverting divides the velocity by 1e-20 per layer; from an arbitrary (x, v)
    # of order 1 the velocity reaches 1e20 at layer 4 and overflows float32 at layer 3.
    net = revnets.MomentumNet([nn.Tanh() for _ in range(5)], gamma=1e-20)
    x, v = torch.randn(2, 3), torch.randn(2, 3).abs() + 0.5
    with pytest.raises(FloatingPointError, match=r"non-finite value met while inverting layer 3\b.*amplified.*small γ"):
        net.inverse(x, v)


class CountingFunction(nn.Module):
    """Finite on the first ``finite_calls`` calls, NaN afterwards (the backward's recomputation)."""

    def __init__(self, finite_calls: int):
        super().__init__()
        self.calls = 0
        self.finite_calls = finite_calls
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        self.calls += 1
        y = torch.tanh(self.linear(x))
        return y if self.calls <= self.finite_calls else y * math.nan


def test_non_finite_value_in_reversible_backward_names_the_layer():
    shared = CountingFunction(finite_calls=3)  # three forward calls, then the backward recomputes
    net = revnets.MomentumNet([shared] * 3, gamma=0.9)
    out = net(torch.randn(2, 4, requires_grad=True))
    with pytest.raises(FloatingPointError, match=r"layer 2: a function returned a non-finite .* re-evaluated in the "
                       r"backward.* although the forward's values were finite"):
        out.sum().backward()


@pytest.mark.parametrize("arch", ARCHS)
def test_nan_input_is_reported_as_the_forward_s_not_the_inversion_s(arch):
    net = make(arch)
    x = torch.randn(2, 4)
    x[1, 1] = math.nan
    out = net(x.requires_grad_())
    with pytest.raises(FloatingPointError, match=r"the forward already produced it \(the stack's input already holds "
                       r"NaN/inf\); this is not an inversion error"):
        out.sum().backward()
    with pytest.raises(FloatingPointError, match="the state to invert holds NaN/inf"):
        net.inverse_state(net.init_state(x.detach()))


@pytest.mark.parametrize("arch", ARCHS)
def test_diverged_weights_name_the_first_layer_that_produced_nan(arch):
    """As after a diverging learning rate: layer 1's weights are inf, so its function returns NaN/inf."""
    net = make(arch, depth=3)
    with torch.no_grad():
        functions = net.functions if arch in ("MomentumNet", "MidpointNet", "LeapfrogNet") else net.f_functions
        for p in functions[1].parameters():
            p.fill_(math.inf)
    out = net(torch.randn(2, 4, requires_grad=True))
    with pytest.raises(FloatingPointError, match=r"forward already produced it \(the state first became non-finite at "
                       r"layer 1 .*learning rate"):
        out.sum().backward()


class NaNFromCall(nn.Module):
    """``tanh(linear(x))``, NaN from call ``nan_from`` on (calls are counted across forward and backward)."""

    def __init__(self, nan_from: int):
        super().__init__()
        self.calls, self.nan_from = 0, nan_from
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        self.calls += 1
        y = torch.tanh(self.linear(x))
        return y * math.nan if self.calls >= self.nan_from else y


@pytest.mark.parametrize("bad", [0, 5, 13, 19])
def test_deep_stacks_name_the_exact_layer_whatever_the_check_interval(bad):
    """The forward checks only its output and the backward every few layers (non-finite values never leave a
    state); the layer named is still the exact one, in the forward and in the backward."""
    depth = 20
    functions = [small(4) for _ in range(depth)]
    functions[bad] = NaNFromCall(nan_from=1)  # NaN already in the forward
    out = revnets.MomentumNet(functions, gamma=0.9)(torch.randn(2, 4, requires_grad=True))
    with pytest.raises(FloatingPointError, match=rf"forward already produced it \(the state first became non-finite at "
                       rf"layer {bad} "):
        out.sum().backward()
    functions[bad] = NaNFromCall(nan_from=2)  # finite in the forward, NaN when the backward re-evaluates it
    out = revnets.MomentumNet(functions, gamma=0.9)(torch.randn(2, 4, requires_grad=True))
    with pytest.raises(FloatingPointError, match=rf"^layer {bad}: a function returned a non-finite .* re-evaluated"):
        out.sum().backward()


def test_amplified_reconstruction_in_the_backward_names_the_layer_inversion_names():
    torch.manual_seed(0)
    net = revnets.MomentumNet([nn.Tanh() for _ in range(20)], gamma=1e-10)  # overflows at layer 6
    out_state = net.forward_state(net.init_state(torch.randn(2, 3).requires_grad_()))
    with pytest.raises(FloatingPointError, match="amplified") as inverting:
        net.inverse_state(tuple(s.detach() for s in out_state))
    layer = re.search(r"inverting (layer \d+)", str(inverting.value)).group(1)
    with pytest.raises(FloatingPointError, match=rf"non-finite value met while inverting {layer}:.*amplified"):
        sum(s.sum() for s in out_state).backward()


def test_locating_a_forward_nan_leaves_running_statistics_and_generator_alone():
    torch.manual_seed(0)
    norm = nn.BatchNorm1d(4)
    functions = [nn.Sequential(nn.Linear(4, 4), norm, nn.Dropout(0.5)) for _ in range(3)] + [NaNFromCall(1)]
    net = revnets.MomentumNet(functions, gamma=0.9)
    x = torch.randn(8, 4, requires_grad=True)
    torch.manual_seed(1)
    out = net(x)
    after_forward = torch.get_rng_state()
    assert int(norm.num_batches_tracked) == 3
    reference = revnets.MomentumNet(functions[:3], gamma=0.9)
    torch.manual_seed(1)
    reference(x)
    assert torch.equal(after_forward, torch.get_rng_state())
    assert torch.isnan(out).all()


# --------------------------------------------------------------------------------------------------
# exact mode


@pytest.mark.parametrize("arch", ARCHS)
def test_exact_input_out_of_range_overflows(arch):
    net = make(arch, exact=True, frac_bits=32)  # representable range ±2^46 / 2^32 = ±16384
    x = torch.randn(2, 4)
    x[0, 0] = 20000.0
    with pytest.raises(OverflowError, match=r"input state.*outside the representable range.*16384"):
        net.exact_state(x)
    with pytest.raises(OverflowError, match=r"outside the representable range"):
        net(x.requires_grad_())


class Huge(nn.Module):
    def forward(self, x):
        return torch.full_like(x, 3000.0)


@pytest.mark.parametrize("arch", ARCHS)
def test_exact_state_growing_out_of_range_overflows_and_names_the_layer(arch):
    # Each layer adds a few thousand: the state passes 2^14 = 16384 (frac_bits=32) after a few layers.
    net = build(arch, [Huge() for _ in range(20)], [Huge() for _ in range(20)], exact=True)
    x = torch.zeros(2, 4)
    with pytest.raises(OverflowError, match=r"layer \d+.*2\^46"):
        net.forward_exact(net.exact_state(x))
    with pytest.raises(OverflowError, match=r"layer \d+.*2\^46"):
        net(x.requires_grad_())


@pytest.mark.parametrize("arch", ARCHS)
def test_exact_nan_input_is_floating_point_error(arch):
    net = make(arch, exact=True)
    x = torch.randn(2, 4)
    x[1, 1] = math.nan
    with pytest.raises(FloatingPointError, match=r"non-finite"):
        net.exact_state(x)
    with pytest.raises(FloatingPointError, match=r"non-finite"):
        net(x.requires_grad_())


class NaNAfter(nn.Module):
    def forward(self, x):
        return x * math.nan


@pytest.mark.parametrize("arch", ARCHS)
def test_exact_nan_from_a_function_names_the_layer(arch):
    fw = 4 if arch == "MomentumNet" else 2
    fs = [small(fw), small(fw), NaNAfter()]
    net = build(arch, fs, [small(fw) for _ in range(3)], exact=True)
    x = torch.randn(2, 4)
    with pytest.raises(FloatingPointError, match=r"layer 2\b.*non-finite"):
        net.forward_exact(net.exact_state(x))


@pytest.mark.parametrize("gamma", [1.0 / 2**17, 1e-9])
def test_exact_gamma_too_small_for_the_denominator_limit(gamma):
    with pytest.raises(ValueError, match=r"gamma.*(not invertible|1/65536)"):
        revnets.MomentumNet([small(4)], gamma=gamma, exact=True)


@pytest.mark.parametrize("mode", ["reversible", "autograd", "checkpoint"])
@pytest.mark.parametrize("arch", ARCHS)
def test_no_layers_is_the_documented_identity(arch, mode):
    """Depth 0 is the identity (as an empty nn.Sequential), not an error: converted stages of one block
    keep an empty stack."""
    net = build(arch, [], [], mode=mode)
    assert net.depth == 0
    x = torch.randn(2, 4, requires_grad=True)
    y = net(x)
    torch.testing.assert_close(y, x, rtol=0, atol=0)
    (y * torch.arange(8.0).view(2, 4)).sum().backward()
    torch.testing.assert_close(x.grad, torch.arange(8.0).view(2, 4), rtol=0, atol=0)


@pytest.mark.parametrize("functions", [
    nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)),  # one function, not three layers
    nn.Linear(4, 4),
])
def test_one_module_where_a_list_of_layers_is_expected_is_refused(functions):
    with pytest.raises(TypeError, match=r"functions must be a list with one function per layer; got a single"):
        revnets.MomentumNet(functions)
    with pytest.raises(TypeError, match=r"f_functions must be a list"):
        revnets.RevNet(functions, [nn.Linear(2, 2)])
    assert revnets.MomentumNet([functions]).depth == 1
    assert revnets.MomentumNet(nn.ModuleList([nn.Linear(4, 4)] * 2)).depth == 2
