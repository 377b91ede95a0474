"""Shared test factories: the five architectures with f = Linear-Tanh-Linear, and a reference.

Import from test files as ``from helpers import make_net, ARCHITECTURES`` (``conftest.py`` puts
this directory on ``sys.path``). Everything here is plain PyTorch and independent of the engine,
except :func:`make_net`, which calls the public constructors.

:func:`reference_forward` re-implements each scheme straight from the papers' formulas (Sander et
al. 2021 for the momentum scheme; Chang et al. 2018 for Hamiltonian, Midpoint and Leapfrog; Gomez et
al. 2017 for RevNet) with a Python loop over the network's own functions, so that
gradients obtained by plain autograd through it are a reference that does not share code with
``revnets`` (``mode="autograd"`` goes through the same step declarations as the reversible engine
and could share their bugs).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

import revnets

NO_KERNELS = "exact mode's operators were not built (no C++ compiler or ninja): only the separate operations run"

ARCHITECTURES = ("MomentumNet", "RevNet", "HamiltonianNet", "MidpointNet", "LeapfrogNet")
"""The five architectures, by class name (use as a pytest parametrisation list)."""

TWO_STREAM = ("RevNet", "HamiltonianNet", "MidpointNet", "LeapfrogNet")
"""Architectures that split dim 1 into two halves: their functions act on ``width // 2`` features."""

COUPLINGS = ("RevNet", "HamiltonianNet")
"""Architectures with two functions per layer (F, G)."""


def mlp(width: int, hidden: int | None = None) -> nn.Sequential:
    """``Linear(width, hidden) - Tanh - Linear(hidden, width)`` (``hidden`` defaults to ``width``)."""
    hidden = width if hidden is None else hidden
    return nn.Sequential(nn.Linear(width, hidden), nn.Tanh(), nn.Linear(hidden, width))


def function_width(arch: str, width: int) -> int:
    """Feature width each function of ``arch`` sees for an input of ``width`` channels."""
    if arch in TWO_STREAM:
        if width % 2:
            raise ValueError(f"{arch} needs an even width; got {width}")
        return width // 2
    return width


def make_net(
    arch: str,
    depth: int = 3,
    width: int = 4,
    *,
    dtype: torch.dtype = torch.float64,
    mode: str = "reversible",
    seed: int = 0,
    gamma: float = 0.9,
    h: float = 0.1,
    function: Callable[[int], nn.Module] = mlp,
    **options,
) -> revnets.ReversibleNet:
    """Build ``arch`` with ``depth`` layers for inputs of ``width`` features, in ``dtype``.

    Each function is ``function(fw)`` with ``fw = function_width(arch, width)`` (default: a fresh
    Linear-Tanh-Linear). Weights come from ``seed`` (the global RNG is left untouched). ``gamma``
    is used by MomentumNet, ``h`` by Hamiltonian/Midpoint/Leapfrog; ``options`` go to the
    constructor (``learn_gamma``, ``init_velocity``, ``exact``...).
    """
    fw = function_width(arch, width)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fs = [function(fw) for _ in range(depth)]
        gs = [function(fw) for _ in range(depth)] if arch in COUPLINGS else None
        net = assemble(arch, fs, gs, mode=mode, **scheme_options(arch, gamma, h), **options)
    return net.to(dtype)


def scheme_options(arch: str, gamma: float, h: float) -> dict:
    """The scheme's own coefficient: ``gamma`` for MomentumNet, ``h`` for the ODE schemes, none for RevNet."""
    if arch == "MomentumNet":
        return {"gamma": gamma}
    return {} if arch == "RevNet" else {"h": h}


def assemble(arch: str, fs: list, gs: list | None = None, **options) -> revnets.ReversibleNet:
    """``arch`` from explicit function lists (``gs`` for the couplings, defaulting to ``fs``); ``options``
    go to the constructor unchanged."""
    gs = fs if gs is None else gs
    if arch == "MomentumNet":
        return revnets.MomentumNet(fs, **options)
    if arch == "RevNet":
        return revnets.RevNet(fs, gs, **options)
    if arch == "HamiltonianNet":
        return revnets.HamiltonianNet(fs, gs, **options)
    if arch == "MidpointNet":
        return revnets.MidpointNet(fs, **options)
    if arch == "LeapfrogNet":
        return revnets.LeapfrogNet(fs, **options)
    raise ValueError(f"unknown architecture {arch!r}; expected one of {ARCHITECTURES}")


def make_input(
    batch: int = 3, width: int = 4, *, dtype: torch.dtype = torch.float64, seed: int = 1, requires_grad: bool = False
) -> Tensor:
    """A standard normal ``(batch, width)`` input drawn from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, width, generator=generator, dtype=torch.float64).to(dtype)
    return x.requires_grad_(requires_grad)


def reference_forward(net: revnets.ReversibleNet, x: Tensor, *args, return_state: bool = False, **kwargs):
    """The network's output computed from the papers' formulas with a plain Python loop.

    Uses ``net``'s own functions (so parameters are shared) and, for MomentumNet, its γ and
    ``init_velocity``. With ``return_state=True`` MomentumNet returns ``(x_N, v_N)``.
    """
    name = type(net).__name__
    if name == "MomentumNet":
        gamma = net.gamma
        v = torch.zeros_like(x) if net.init_velocity is None else net.init_velocity(x)
        for f in net.functions:
            v = gamma * v + (1 - gamma) * f(x, *args, **kwargs)
            x = x + v
        return (x, v) if return_state else x
    y, z = torch.chunk(x, 2, dim=1)
    if name in COUPLINGS:
        a, b = (1.0, 1.0) if name == "RevNet" else (net.h, -net.h)
        for F, G in zip(net.f_functions, net.g_functions, strict=True):
            y = y + a * F(z, *args, **kwargs)
            z = z + b * G(y, *args, **kwargs)
    elif name == "MidpointNet":  # (y, z) = (Y_{j-1}, Y_j)
        for f in net.functions:
            y, z = z, y + 2 * net.h * f(z, *args, **kwargs)
    elif name == "LeapfrogNet":
        for f in net.functions:
            y, z = z, 2 * z - y - net.h**2 * f(z, *args, **kwargs)
    else:
        raise ValueError(f"no reference for {name}")
    return torch.cat([y, z], dim=1)


def gradients(
    forward: Callable[..., Tensor],
    inputs: tuple[Tensor, ...],
    params: list[Tensor],
    cotangent: Tensor,
) -> list[Tensor]:
    """``d <forward(), cotangent> / d (inputs..., params...)`` via ``torch.autograd.grad``.

    Unused inputs get zeros. ``forward`` takes no arguments (close over what it needs).
    """
    out = forward()
    targets = [*inputs, *params]
    grads = torch.autograd.grad((out * cotangent).sum(), targets, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, targets, strict=True)]


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """``max|actual - expected| / max(max|expected|, tiny)``, computed in float64."""
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = expected.abs().max().item() if expected.numel() else 0.0
    return (actual - expected).abs().max().item() / max(scale, 1e-300)


def max_relative_error(actual: list[Tensor], expected: list[Tensor]) -> float:
    """The worst :func:`relative_error` over matching lists of tensors."""
    assert len(actual) == len(expected)
    return max(relative_error(a, e) for a, e in zip(actual, expected, strict=True))
