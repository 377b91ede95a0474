"""``l2o``: learning to optimise — a Momentum ResNet converges to a fixed point, a RevNet cannot.

The paper's exact task is not available to us (Sander et al. 2021 state the claim; we could not
check their task, depth or metrics); this one is designed from first principles.

**Task.** Random strongly convex quadratics ``F(z) = ½(z − z*)ᵀQ(z − z*)`` in ``d = 8`` dimensions,
``Q = U·diag(q)·Uᵀ`` with ``U`` a random rotation and ``q`` log-uniform in ``[0.05, 1]``, minimiser
``z* ~ N(0, I)``; starting point ``z₀ ~ N(0, I)``. A network sees the problem only through its
gradient oracle ``g(z) = Q(z − z*)`` (as a learned optimiser does) and must map ``z₀`` to ``z*``.
Layers are iterations: one learned function is applied at every layer (tied weights), so a network
is an iterative method and "converging" means its iterates approach the fixed point ``z*``.

**Networks** (each ``f`` a gradient step with learned step sizes, so each contains a classical method):

* ``resnet``: ``z ← z − η·g(z)`` — gradient descent (the ResNet with ``f = −η g``), learned η;
* ``momentum``: ``v ← γv − (1−γ)·η·g(z); z ← z + v`` — heavy-ball gradient descent, the Momentum ResNet
  with ``f = −η g``, learned η and γ (``learn_gamma``);
* ``revnet``: additive coupling on the state ``(p, z)`` (``p₀ = 0``): ``p ← p − η·g(z); z ← z + τ·p``
  — a RevNet with ``F = −η g``, ``G = τ·id``, learned η, τ: heavy ball *without friction*
  (symplectic Euler on ``H = F(z) + ½|p|²``).

**Why the RevNet cannot converge.** With ``e = z − z*``, one RevNet layer is linear in ``(p, e)``,
block-diagonal over the eigenvalues ``q`` of ``Q``: ``[[1, −ηq], [τ, 1 − τηq]]``, of determinant 1
(volume preserving, as every additive coupling). Its two eigenvalues multiply to 1, so at least one
has modulus ≥ 1: the iterates rotate or blow up and never approach ``(0, 0)`` from a generic start.
The momentum layer's block ``[[γ, −(1−γ)ηq], [γ, 1 − (1−γ)ηq]]`` has determinant γ < 1: it can contract.

**Measured.** Each network is trained at depth ``N`` (Adam on the mean of
``‖z_N − z*‖²/‖z₀ − z*‖²``), then iterated to ``3N`` layers on fresh problems: the relative distance
``‖z_n − z*‖/‖z₀ − z*‖`` against depth ``n`` (mean over problems), several seeds. Summary: the value
at the trained depth ``N``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..nn import MomentumNet, RevNet
from ..training.step import training_step
from ._common import bar, threads, tied_trajectory
from .base import Experiment, pyplot, register_experiment, save_figure, summary_entry

NETWORKS = {"resnet": "ResNet (gradient descent)", "momentum": "Momentum ResNet (heavy ball)",
            "revnet": "RevNet (frictionless, volume preserving)"}


@dataclass
class L2OConfig:
    """Settings of the learning-to-optimise experiment (design ours)."""

    seeds: int = 5
    dim: int = 8
    curvature_min: float = 0.05
    curvature_max: float = 1.0
    depth: int = 20
    extrapolate: int = 3
    steps: int = 300
    lr: float = 0.05
    batch_size: int = 128
    test_problems: int = 1000
    gamma_init: float = 0.5
    threads: int = 1


def random_problems(count: int, config: L2OConfig, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """``(Q (count, d, d), z* (count, d), z₀ (count, d))`` as in the module docstring."""
    d = config.dim
    u, _ = torch.linalg.qr(torch.randn(count, d, d, generator=generator))
    low, high = torch.log(torch.tensor(config.curvature_min)), torch.log(torch.tensor(config.curvature_max))
    q = torch.exp(low + (high - low) * torch.rand(count, d, generator=generator))
    hessian = u @ torch.diag_embed(q) @ u.transpose(1, 2)
    return hessian, torch.randn(count, d, generator=generator), torch.randn(count, d, generator=generator)


def gradient(z: Tensor, hessian: Tensor, solution: Tensor) -> Tensor:
    """``g(z) = Q(z − z*)`` per problem."""
    return torch.einsum("bij,bj->bi", hessian, z - solution)


class GradientStep(nn.Module):
    """``f(z; Q, z*) = −η·g(z)`` with ``η = softplus(θ)`` learned."""

    def __init__(self, eta: float = 1.0):
        super().__init__()
        self.raw_eta = nn.Parameter(torch.tensor(eta).expm1().log())

    def forward(self, z: Tensor, hessian: Tensor, solution: Tensor) -> Tensor:
        return -nn.functional.softplus(self.raw_eta) * gradient(z, hessian, solution)


class Drift(nn.Module):
    """``G(p) = τ·p`` with ``τ = softplus(θ)`` learned (the position update of the frictionless scheme)."""

    def __init__(self, tau: float = 1.0):
        super().__init__()
        self.raw_tau = nn.Parameter(torch.tensor(tau).expm1().log())

    def forward(self, p: Tensor, hessian: Tensor, solution: Tensor) -> Tensor:
        return nn.functional.softplus(self.raw_tau) * p


class LearnedOptimizer(nn.Module):
    """One of the three networks, tied over ``depth`` layers: ``forward(z₀, Q, z*) → z_depth``."""

    def __init__(self, network: str, depth: int, gamma_init: float):
        super().__init__()
        self.network = network
        self.step = GradientStep()
        if network == "revnet":
            self.drift = Drift()
            self.net = RevNet([self.step] * depth, [self.drift] * depth, mode="autograd")
        elif network == "momentum":
            self.net = MomentumNet([self.step] * depth, gamma_init, learn_gamma=True, mode="autograd")
        else:
            self.net = MomentumNet([self.step] * depth, 0.0, mode="autograd")

    def forward(self, z0: Tensor, hessian: Tensor, solution: Tensor) -> Tensor:
        if self.network == "revnet":
            return self.net(torch.cat([torch.zeros_like(z0), z0], 1), hessian, solution)[:, z0.shape[1]:]
        return self.net(z0, hessian, solution)

    @torch.no_grad()
    def distances(self, z0: Tensor, hessian: Tensor, solution: Tensor, depth: int) -> list[float]:
        """Mean relative distance ``‖z_n − z*‖/‖z₀ − z*‖`` for ``n = 0 … depth`` (the tied layer iterated)."""
        if self.network == "revnet":
            one, state, iterates = RevNet([self.step], [self.drift], mode="autograd"), None, [z0]
            state = torch.cat([torch.zeros_like(z0), z0], 1)
            for _ in range(depth):
                state = one(state, hessian, solution)
                iterates.append(state[:, z0.shape[1]:])
        else:
            iterates = tied_trajectory(self.step, float(torch.as_tensor(self.net.gamma)), z0, depth, hessian, solution)
        start = (z0 - solution).norm(dim=1)
        return [((z - solution).norm(dim=1) / start).nan_to_num(nan=float("inf")).mean().item() for z in iterates]

    def learned(self) -> dict[str, float]:
        values = {"eta": nn.functional.softplus(self.step.raw_eta).item()}
        if self.network == "momentum":
            values["gamma"] = float(self.net.gamma.detach())
        if self.network == "revnet":
            values["tau"] = nn.functional.softplus(self.drift.raw_tau).item()
        return values


def train(network: str, config: L2OConfig, seed: int) -> LearnedOptimizer:
    """Train ``network`` at depth ``config.depth`` on fresh random problems."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(100 + seed)
    model = LearnedOptimizer(network, config.depth, config.gamma_init)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)

    def loss_fn(hessian: Tensor, solution: Tensor, z0: Tensor) -> Tensor:
        """Mean over the problems of ``‖z − z*‖² / ‖z₀ − z*‖²``."""
        z = model(z0, hessian, solution)
        return ((z - solution).square().sum(1) / (z0 - solution).square().sum(1)).mean()

    for _ in range(config.steps):
        training_step(optimizer, loss_fn, *random_problems(config.batch_size, config, generator), grad_clip=10.0)
    return model


def run(config: L2OConfig) -> dict[str, Any]:
    """Train every network for every seed; distance-to-solution curves up to ``extrapolate·depth`` layers."""
    curves: dict[str, list[list[float]]] = {name: [] for name in NETWORKS}
    learned: dict[str, list[dict[str, float]]] = {name: [] for name in NETWORKS}
    horizon = config.extrapolate * config.depth
    with threads(config.threads), bar(config.seeds * len(NETWORKS), "learning to optimise") as progress:
        for seed in range(config.seeds):
            test = random_problems(config.test_problems, config, torch.Generator().manual_seed(10_000 + seed))
            for network in NETWORKS:
                model = train(network, config, seed)
                curves[network].append(model.distances(test[2], test[0], test[1], horizon))
                learned[network].append(model.learned())
                progress.update()
    summary = {name: summary_entry("relative_distance_at_trained_depth", [c[config.depth] for c in curves[name]])
               for name in NETWORKS}
    at_horizon = {name: summary_entry("relative_distance_at_extrapolated_depth", [c[horizon] for c in curves[name]])
                  for name in NETWORKS}
    return {"summary": summary, "at_extrapolated_depth": at_horizon, "curves": curves, "learned": learned,
            "trained_depth": config.depth, "device": "cpu"}


def plot(results: dict[str, Any], out: Path) -> Path:
    """Relative distance to the minimiser against depth (mean over problems; one line per seed)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    colours = {"resnet": "tab:blue", "momentum": "tab:green", "revnet": "tab:red"}
    for network, seeds in results["curves"].items():
        for index, curve in enumerate(seeds):
            ax.plot(range(len(curve)), [min(max(c, 1e-12), 1e6) for c in curve], color=colours[network], lw=1.2,
                    alpha=0.8, label=NETWORKS[network] if index == 0 else None)
    ax.axvline(results["trained_depth"], color="grey", ls=":", lw=1, label="trained depth")
    ax.set_yscale("log")
    ax.set_xlabel("layer (iteration) n")
    ax.set_ylabel("‖z_n − z*‖ / ‖z₀ − z*‖  (test, mean)")
    ax.set_title("Learning to optimise random quadratics (d = 8), tied layers", fontsize=10)
    ax.legend(fontsize=8)
    return save_figure(fig, out, "l2o.png")


EXPERIMENT = register_experiment(Experiment(
    name="l2o",
    claim="Learning to optimise: a Momentum ResNet (contains heavy-ball descent) converges to the minimiser; "
          "a RevNet (volume preserving) cannot.",
    paper="Sander et al. 2021, learning to optimise (task designed here, the paper's exact one is unavailable)",
    config_type=L2OConfig,
    run=run,
    plot=plot,
    smoke={"seeds": 2, "depth": 5, "steps": 10, "batch_size": 32, "test_problems": 64},
))
