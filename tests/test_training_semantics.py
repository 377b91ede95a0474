"""Training semantics of the memory-saving modes against plain autograd.

For every architecture, ``mode="reversible"`` and ``mode="checkpoint"`` (and, where it applies,
``exact=True``) must behave like ``mode="autograd"`` in a training step, not only in a clean
forward/backward of a deterministic function:

* BatchNorm inside the functions: running statistics updated exactly once per step, same gradients;
* Dropout: the recomputation replays the dropout masks, and the caller's generator ends where plain
  autograd leaves it;
* CPU autocast (bfloat16): the recomputation runs under the same autocast settings;
* shared weights (one module repeated at every layer);
* ``backward(retain_graph=True)`` twice;
* ``torch.autograd.grad`` on a subset of the inputs (no side effect on ``.grad``).

Networks are built locally (``build``) from a seed without touching the global generator, so that
two builds with the same seed have the same weights and the dropout tests control the generator.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from helpers import assemble, mlp, scheme_options
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import revnets

ARCHS = ("MomentumNet", "RevNet", "HamiltonianNet", "MidpointNet", "LeapfrogNet")
COUPLINGS = ("RevNet", "HamiltonianNet")
MEMORY_MODES = ("reversible", "checkpoint")
WIDTH = 8
BATCH = 6


pytestmark = pytest.mark.usefixtures("one_thread")


def bn_block(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(width, width), nn.BatchNorm1d(width), nn.Tanh())


def dropout_block(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Dropout(p=0.5))


def build(
    arch: str,
    depth: int = 3,
    *,
    make: Callable[[int], nn.Module] = mlp,
    shared: bool = False,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    mode: str = "reversible",
    gamma: float = 0.9,
    h: float = 0.5,
    **options,
) -> revnets.ReversibleNet:
    """``arch`` for inputs ``(B, WIDTH)``; with ``shared`` the same module (pair) is used at every layer."""
    fw = WIDTH if arch == "MomentumNet" else WIDTH // 2
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if shared:
            f, g = make(fw), make(fw)
            fs, gs = [f] * depth, [g] * depth
        else:
            fs = [make(fw) for _ in range(depth)]
            gs = [make(fw) for _ in range(depth)]
    return assemble(arch, fs, gs, mode=mode, **scheme_options(arch, gamma, h), **options).to(dtype)


def data(dtype: torch.dtype = torch.float64, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, WIDTH, generator=g, dtype=torch.float64).to(dtype)


def target(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(99)
    return torch.randn(BATCH, WIDTH, generator=g, dtype=torch.float64).to(dtype)


def loss_of(out: torch.Tensor) -> torch.Tensor:
    """A loss whose gradient is not uniform (so that every path of the graph matters)."""
    return (out - target(out.dtype)).pow(2).sum() / 2


def pair(arch: str, mode: str, **kwargs) -> tuple[revnets.ReversibleNet, revnets.ReversibleNet]:
    """(network in ``mode``, the autograd reference with the same weights)."""
    net = build(arch, mode=mode, **kwargs)
    return net, copy.deepcopy(net).set_mode("autograd")


def step(net: nn.Module, x: torch.Tensor | None = None, *, autocast: bool = False):
    """One forward + backward; returns (output, {name: grad}) with ``"x"`` the input's gradient."""
    x = (data() if x is None else x).clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = net(x)
        loss = loss_of(out)
    loss.backward()
    grads = {"x": x.grad}
    grads.update({name: p.grad for name, p in net.named_parameters()})
    return out, grads


def assert_grads_close(actual: dict, expected: dict, *, rtol: float, atol: float) -> None:
    assert actual.keys() == expected.keys()
    for name, e in expected.items():
        a = actual[name]
        if e is None:
            assert a is None or torch.count_nonzero(a) == 0, name
            continue
        assert a is not None, f"no gradient for {name}"
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


def norm_buffers(net: nn.Module) -> dict[str, torch.Tensor]:
    return {name: b.clone() for name, b in net.named_buffers()}


# --------------------------------------------------------------------------------------------------
# BatchNorm


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", MEMORY_MODES)
def test_batchnorm_running_stats_updated_once_and_grads_match(arch, mode):
    net, ref = pair(arch, mode, make=bn_block)
    net.train(), ref.train()
    before = norm_buffers(net)
    assert any(name.endswith("running_mean") for name in before)
    _, grads = step(net)
    _, ref_grads = step(ref)
    after, ref_after = norm_buffers(net), norm_buffers(ref)
    for name, value in ref_after.items():
        if name.endswith("num_batches_tracked"):
            assert int(value) == 1, "reference sanity"
            assert int(after[name]) == 1, f"{name}: updated {int(after[name])} times in one step"
        else:
            assert not torch.equal(value, before[name]), "reference sanity: the statistics moved"
            torch.testing.assert_close(after[name], value, rtol=1e-12, atol=1e-14, msg=lambda m, n=name: f"{n}: {m}")
    assert_grads_close(grads, ref_grads, rtol=1e-9, atol=1e-11)
    # every BatchNorm is back to tracking statistics after the backward
    assert all(m.track_running_stats for m in net.modules() if isinstance(m, nn.BatchNorm1d))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", MEMORY_MODES)
def test_batchnorm_two_steps_then_eval(arch, mode):
    """Two training steps: statistics advanced twice as in autograd; then eval mode: frozen, grads match."""
    net, ref = pair(arch, mode, make=bn_block)
    for seed in (1, 2):
        step(net, data(seed=seed)), step(ref, data(seed=seed))
    for name, value in norm_buffers(ref).items():
        if name.endswith("num_batches_tracked"):
            assert int(norm_buffers(net)[name]) == 2
        torch.testing.assert_close(norm_buffers(net)[name], value, rtol=1e-12, atol=1e-14)
    net.eval(), ref.eval()
    net.zero_grad(), ref.zero_grad()
    frozen = norm_buffers(net)
    _, grads = step(net, data(seed=3))
    _, ref_grads = step(ref, data(seed=3))
    for name, value in norm_buffers(net).items():
        assert torch.equal(value, frozen[name]), f"{name} changed in eval mode"
    assert_grads_close(grads, ref_grads, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("arch", ARCHS)
def test_batchnorm_exact_mode_updates_once(arch):
    net = build(arch, make=bn_block, exact=True)
    ref = build(arch, make=bn_block, mode="autograd")
    _, grads = step(net)
    _, ref_grads = step(ref)
    for name, value in norm_buffers(ref).items():
        torch.testing.assert_close(norm_buffers(net)[name], value, rtol=1e-7, atol=1e-9)
    assert_grads_close(grads, ref_grads, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", MEMORY_MODES)
def test_batchnorm_shared_module_tracks_once_per_layer(mode):
    """One BatchNorm at every layer: autograd counts ``depth`` batches per step, and so must the others."""
    depth = 4
    net, ref = pair("MomentumNet", mode, make=bn_block, depth=depth, shared=True)
    _, grads = step(net)
    _, ref_grads = step(ref)
    for name, value in norm_buffers(ref).items():
        if name.endswith("num_batches_tracked"):
            assert int(value) == depth
        torch.testing.assert_close(norm_buffers(net)[name], value, rtol=1e-12, atol=1e-14)
    assert_grads_close(grads, ref_grads, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("arch", ARCHS)
def test_inverse_between_forward_and_backward_keeps_the_graph_valid(arch):
    """``inverse`` after an autograd-mode training forward: the pending backward runs and is unchanged."""
    net, ref = pair(arch, "autograd", make=bn_block)
    x = data().requires_grad_()
    state = net.forward_state(net.init_state(x))
    stats = norm_buffers(net)
    rebuilt = net.inverse_state(tuple(s.detach() for s in state))
    torch.testing.assert_close(net.output(rebuilt), x.detach(), rtol=1e-9, atol=1e-9)
    assert all(torch.equal(b, stats[name]) for name, b in net.named_buffers()), "inverse moved the statistics"
    loss_of(net.output(state)).backward()
    _, ref_grads = step(ref)
    assert_grads_close({"x": x.grad, **{n: p.grad for n, p in net.named_parameters()}}, ref_grads,
                       rtol=1e-12, atol=1e-14)


class SharedNormOutside(nn.Module):
    """One BatchNorm used on (part of) the input outside the stack and inside every layer of it."""

    def __init__(self, arch: str, mode: str):
        super().__init__()
        self.width = WIDTH if arch == "MomentumNet" else WIDTH // 2
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.norm = nn.BatchNorm1d(self.width)
            fs, gs = ([nn.Sequential(nn.Linear(self.width, self.width), self.norm, nn.Tanh()) for _ in range(3)]
                      for _ in range(2))
        self.net = assemble(arch, fs, gs, mode=mode, **scheme_options(arch, 0.9, 0.5))
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.norm(x[:, : self.width]), x[:, self.width :]], dim=1)
        return self.net(x)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", MEMORY_MODES)
def test_batchnorm_used_inside_and_outside_the_stack(arch, mode):
    model = SharedNormOutside(arch, mode)
    ref = copy.deepcopy(model)
    ref.net.set_mode("autograd")
    _, grads = step(model)
    _, ref_grads = step(ref)
    calls = 1 + 3 * (2 if arch in COUPLINGS else 1)  # outside, then every function of the 3 layers
    assert int(ref.norm.num_batches_tracked) == calls
    for name, value in norm_buffers(ref).items():
        torch.testing.assert_close(norm_buffers(model)[name], value, rtol=1e-12, atol=1e-14)
    assert_grads_close(grads, ref_grads, rtol=1e-9, atol=1e-11)


# --------------------------------------------------------------------------------------------------
# Dropout


def seeded_step(net: nn.Module, seed: int, x: torch.Tensor | None = None):
    """forward+backward from ``torch.manual_seed(seed)``; also the generator state after forward and after backward."""
    x = (data() if x is None else x).clone().requires_grad_()
    torch.manual_seed(seed)
    out = net(x)
    after_forward = torch.get_rng_state()
    loss_of(out).backward()
    after_backward = torch.get_rng_state()
    grads = {"x": x.grad, **{name: p.grad for name, p in net.named_parameters()}}
    return out, grads, after_forward, after_backward


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", MEMORY_MODES)
def test_dropout_gradients_and_generator_state_match_autograd(arch, mode):
    net, ref = pair(arch, mode, make=dropout_block, depth=4)
    out, grads, fwd_state, bwd_state = seeded_step(net, seed=1234)
    ref_out, ref_grads, ref_fwd_state, ref_bwd_state = seeded_step(ref, seed=1234)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)  # same masks (a different mask is O(1))
    assert_grads_close(grads, ref_grads, rtol=1e-10, atol=1e-12)
    # the backward's replay must not move the caller's generator
    assert torch.equal(fwd_state, ref_fwd_state), "the forward drew a different amount of randomness"
    assert torch.equal(bwd_state, fwd_state), "the backward moved (or reseeded) the caller's generator"
    assert torch.equal(bwd_state, ref_bwd_state)
    # and the caller's next draws are those of plain autograd
    after = torch.rand(5)
    torch.set_rng_state(ref_bwd_state)
    assert torch.equal(after, torch.rand(5))


@pytest.mark.parametrize("options", [{"mode": "reversible"}, {"mode": "reversible", "exact": True}])
def test_dropout_bookkeeping_does_not_grow_with_depth(options):
    """Memory held after a training forward with dropout, at depths 8 and 64: the RNG replay keeps no
    per-layer generator snapshot (the CPU generator's is 5 KB), only one seed per call. The allocator
    sees every byte (``allocator_held``), including tensors made outside ATen ops such as RNG states.
    Exact mode's information buffer grows by its own floor (log2(1/γ) bits per element per layer)."""
    from revnets.memory import allocator_held

    held = {}
    for depth in (8, 64):
        net = build("MomentumNet", depth, make=dropout_block, gamma=0.5, dtype=torch.float32, **options)
        x = data(torch.float32).requires_grad_()
        out, held[depth], _ = allocator_held(lambda net=net, x=x: net(x))
        out.sum().backward()  # the replay works
    buffer_growth = 56 * BATCH * WIDTH / 8 if options.get("exact") else 0  # 1 bit per element per layer at γ = 1/2
    assert held[64] - held[8] <= buffer_growth + 512, held


@pytest.mark.parametrize("arch", ARCHS)
def test_dropout_is_active_so_the_replay_test_can_fail(arch):
    """Different seeds give different gradients: without a correct replay the test above would fail."""
    ref = build(arch, make=dropout_block, depth=4, mode="autograd")
    _, g1, _, _ = seeded_step(ref, seed=1)
    ref.zero_grad()
    _, g2, _, _ = seeded_step(ref, seed=2)
    assert not torch.allclose(g1["x"], g2["x"])


@pytest.mark.parametrize("arch", ARCHS)
def test_dropout_exact_mode_replays_masks(arch):
    net = build(arch, make=dropout_block, depth=4, exact=True)
    ref = build(arch, make=dropout_block, depth=4, mode="autograd")
    out, grads, fwd_state, bwd_state = seeded_step(net, seed=7)
    ref_out, ref_grads, ref_fwd_state, _ = seeded_step(ref, seed=7)
    torch.testing.assert_close(out, ref_out, rtol=1e-7, atol=1e-8)
    assert_grads_close(grads, ref_grads, rtol=1e-5, atol=1e-7)
    assert torch.equal(fwd_state, ref_fwd_state) and torch.equal(bwd_state, fwd_state)


@settings(max_examples=10, deadline=None)
@given(
    arch=st.sampled_from(ARCHS),
    mode=st.sampled_from(MEMORY_MODES),
    depth=st.integers(1, 5),
    seed=st.integers(0, 2**31 - 1),
    p=st.sampled_from([0.1, 0.5, 0.9]),
)
def test_dropout_replay_property(arch, mode, depth, seed, p):
    def block(width):
        return nn.Sequential(nn.Dropout(p), nn.Linear(width, width), nn.Tanh(), nn.Dropout(p))

    net, ref = pair(arch, mode, make=block, depth=depth, seed=seed % 1000)
    _, grads, _, bwd_state = seeded_step(net, seed=seed)
    _, ref_grads, _, ref_bwd_state = seeded_step(ref, seed=seed)
    assert_grads_close(grads, ref_grads, rtol=1e-10, atol=1e-12)
    assert torch.equal(bwd_state, ref_bwd_state)


# --------------------------------------------------------------------------------------------------
# CPU autocast (bfloat16)


def relative_error(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-30)) for k in b if b[k] is not None)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", MEMORY_MODES)
def test_autocast_bfloat16_gradients_match_autocast_reference(arch, mode):
    """The state stays float32 (fp32 input + bf16 increments promote to fp32); the functions run in bf16.

    The recomputation of the reversible/checkpoint backward must run under the forward's autocast:
    then its gradients agree with the autocast autograd reference far more closely than that
    reference agrees with the float32 one (an error of bf16 size, ~1e-2, would mean the backward ran
    the functions in float32). The reversible reconstruction adds float32-sized errors only, since
    the state is float32 and re-rounding the reconstructed inputs to bf16 nearly always gives the
    forward's bf16 values back.
    """
    net, ref = pair(arch, mode, dtype=torch.float32, depth=4)
    fp32 = copy.deepcopy(ref)
    x = data(torch.float32)
    out, grads = step(net, x, autocast=True)
    ref_out, ref_grads = step(ref, x, autocast=True)
    _, fp32_grads = step(fp32, x, autocast=False)
    assert out.dtype == torch.float32 and ref_out.dtype == torch.float32, "the state should stay float32"
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    gap = relative_error(ref_grads, fp32_grads)
    assert gap > 1e-4, "sanity: autocast must actually change the reference gradients"
    error = relative_error(grads, ref_grads)
    assert error <= 2e-3, f"gradients differ from the autocast reference by {error:.2e} (relative to max)"
    assert error <= 0.1 * gap, (f"error {error:.2e} vs autocast/float32 gap {gap:.2e}: "
                                "was the backward run under autocast?")


def test_autocast_state_restored_after_backward():
    net = build("MomentumNet", dtype=torch.float32)
    x = data(torch.float32).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x)
    assert not torch.is_autocast_enabled("cpu")
    loss_of(out).backward()
    assert not torch.is_autocast_enabled("cpu"), "the backward leaked its autocast replay"


# --------------------------------------------------------------------------------------------------
# Shared weights


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", MEMORY_MODES)
def test_shared_weights_gradients_equal_autograd(arch, mode):
    net, ref = pair(arch, mode, shared=True, depth=5)
    assert len(list(net.parameters())) == (8 if arch in COUPLINGS else 4), "the shared module is registered once"
    _, grads = step(net)
    _, ref_grads = step(ref)
    assert_grads_close(grads, ref_grads, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("arch", ARCHS)
def test_shared_weights_exact_mode(arch):
    net = build(arch, shared=True, depth=5, exact=True)
    ref = build(arch, shared=True, depth=5, mode="autograd")
    _, grads = step(net)
    _, ref_grads = step(ref)
    assert_grads_close(grads, ref_grads, rtol=1e-6, atol=1e-8)


# --------------------------------------------------------------------------------------------------
# backward twice


def make_for(arch: str, kind: str, **kwargs) -> revnets.ReversibleNet:
    """``kind``: a memory mode, or ``"exact"`` for reversible mode with ``exact=True``."""
    if kind == "exact":
        return build(arch, exact=True, **kwargs)
    return build(arch, mode=kind, **kwargs)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["reversible", "checkpoint", "exact"])
def test_backward_twice_with_retain_graph(arch, kind):
    net = make_for(arch, kind)
    ref = build(arch, mode="autograd")
    x = data().requires_grad_()
    loss = loss_of(net(x))
    loss.backward(retain_graph=True)
    first = {"x": x.grad.clone(), **{n: p.grad.clone() for n, p in net.named_parameters()}}
    loss.backward()
    second = {"x": x.grad, **{n: p.grad for n, p in net.named_parameters()}}
    for name, value in first.items():
        torch.testing.assert_close(second[name], 2 * value, rtol=1e-12, atol=1e-14)
    _, ref_grads = step(ref)
    tol = dict(rtol=1e-6, atol=1e-8) if kind == "exact" else dict(rtol=1e-9, atol=1e-11)
    assert_grads_close(first, ref_grads, **tol)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["reversible", "checkpoint", "exact"])
def test_two_losses_on_one_forward(arch, kind):
    """Two different losses backpropagated through one forward (retain_graph) give their own gradients."""
    net = make_for(arch, kind)
    x = data().requires_grad_()
    out = net(x)
    (g1,) = torch.autograd.grad(out.sum(), [x], retain_graph=True)
    (g2,) = torch.autograd.grad(loss_of(out), [x])
    ref = build(arch, mode="autograd")
    xr = data().requires_grad_()
    out_r = ref(xr)
    (r1,) = torch.autograd.grad(out_r.sum(), [xr], retain_graph=True)
    (r2,) = torch.autograd.grad(loss_of(out_r), [xr])
    tol = dict(rtol=1e-6, atol=1e-8) if kind == "exact" else dict(rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(g1, r1, **tol)
    torch.testing.assert_close(g2, r2, **tol)


# --------------------------------------------------------------------------------------------------
# torch.autograd.grad on a subset of the inputs


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["reversible", "checkpoint", "exact"])
def test_autograd_grad_with_respect_to_input_only(arch, kind):
    net = make_for(arch, kind)
    ref = build(arch, mode="autograd")
    x = data().requires_grad_()
    (gx,) = torch.autograd.grad(loss_of(net(x)), [x], create_graph=False)
    assert x.grad is None, "autograd.grad must not accumulate into .grad"
    assert all(p.grad is None for p in net.parameters()), "autograd.grad must not touch parameter .grad"
    _, ref_grads = step(ref)
    tol = dict(rtol=1e-6, atol=1e-8) if kind == "exact" else dict(rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(gx, ref_grads["x"], **tol)
    # a later backward is not doubled by the earlier autograd.grad
    x2 = data().requires_grad_()
    loss_of(net(x2)).backward()
    torch.testing.assert_close(x2.grad, ref_grads["x"], **tol)
    for name, p in net.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name], **tol)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["reversible", "checkpoint", "exact"])
def test_autograd_grad_with_respect_to_some_parameters(arch, kind):
    net = make_for(arch, kind)
    ref = build(arch, mode="autograd")
    params = dict(net.named_parameters())
    chosen = [name for name in params if name.endswith("0.weight")][:2]
    x = data()  # does not require grad
    grads = torch.autograd.grad(loss_of(net(x)), [params[n] for n in chosen])
    assert all(p.grad is None for p in net.parameters())
    _, ref_grads = step(ref)
    tol = dict(rtol=1e-6, atol=1e-8) if kind == "exact" else dict(rtol=1e-9, atol=1e-11)
    for name, g in zip(chosen, grads, strict=True):
        torch.testing.assert_close(g, ref_grads[name], **tol)
