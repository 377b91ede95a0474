"""``cubic``: learning x ↦ −x³ on [−1, 1] (Sander et al. 2021, the 1-D dynamics plot).

The map reverses the order of the line. A ResNet ``x ← x + f(x)`` is, in the continuous limit,
the flow of ``ẋ = f(x)`` on ℝ: trajectories cannot cross, so the learned map is non-decreasing.
The best non-decreasing fit of a decreasing function under ``x ~ U[−1, 1]`` is the constant
``E[−x³] = 0`` (isotonic regression of a decreasing target is its mean), whose mean squared error is
``E[x⁶] = 1/7 ≈ 0.143``: no ResNet in that limit can beat it. A Momentum ResNet
(``ε ẍ + ẋ = f(x)``, a second-order flow) can cross trajectories and get below.

Protocol (the authors' ``examples/plot_dynamics_1D.py``): ``f = Linear(1, 16)–Tanh–Linear(16, 1)``
shared by 15 steps, ``x ~ U[−1, 1]`` fresh each step, batch 200, SGD lr 0.01; Momentum ResNet γ = 0.99,
301 steps; ResNet 2001 steps. Test MSE on 10,000 fresh points, several seeds (the authors show one).
Difference: gradients are clipped to norm 1 (``clip_grad_norm``, both networks). Without it, plain
SGD diverged to NaN for the ResNet on 2 of the first 3 seeds: with PyTorch's default initialisation,
15 tied steps of ``x + f(x)`` amplify the input by up to ``(1 + max f′)¹⁵`` and the first gradients
are huge (the authors' single seed happens to be stable).
A discrete ResNet with large steps is not bound by the continuous-limit argument (``x + f(x)`` can
be decreasing if ``f′ < −1``); the measured MSE says whether training finds such a map.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..data.synthetic import cubic_map
from ..nn import MomentumNet
from ..training.step import training_step
from ._common import bar, threads, tied_trajectory
from .base import Experiment, pyplot, register_experiment, save_figure, summary_entry

ORDER_PRESERVING_BOUND = 1 / 7
"""MSE of the best non-decreasing fit of x ↦ −x³ on U[−1, 1] (the constant 0): E[x⁶] = 1/7."""

NETWORKS = {"resnet": "ResNet", "momentum": "Momentum ResNet"}


@dataclass
class CubicConfig:
    """Settings of the x ↦ −x³ experiment (defaults: the authors' script)."""

    seeds: int = 5
    depth: int = 15
    hidden: int = 16
    gamma: float = 0.99
    batch_size: int = 200
    lr: float = 0.01
    momentum_steps: int = 301
    resnet_steps: int = 2001
    test_points: int = 10_000
    plot_points: int = 12
    clip_grad_norm: float | None = 1.0
    threads: int = 1


def train_network(network: str, config: CubicConfig, seed: int) -> tuple[nn.Module, float]:
    """Train ``network`` on fresh batches with MSE and plain SGD; return ``f`` and γ."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(1000 * seed + 7)
    function = nn.Sequential(nn.Linear(1, config.hidden), nn.Tanh(), nn.Linear(config.hidden, 1))
    gamma = config.gamma if network == "momentum" else 0.0
    steps = config.momentum_steps if network == "momentum" else config.resnet_steps
    net = MomentumNet([function] * config.depth, gamma, mode="autograd")
    optimizer = torch.optim.SGD(net.parameters(), lr=config.lr)

    def mse(x: Tensor, y: Tensor) -> Tensor:
        return (net(x) - y).square().mean()

    with bar(steps, f"{NETWORKS[network]} seed {seed}") as progress:
        for _ in range(steps):
            x, y = cubic_map(config.batch_size, generator=generator)
            training_step(optimizer, mse, x, y, grad_clip=config.clip_grad_norm)
            progress.update()
    return function, gamma


def run(config: CubicConfig) -> dict[str, Any]:
    """Both networks for every seed: test MSE, and the trajectories of seed 0 (position vs depth)."""
    per_seed: dict[str, list[float]] = {name: [] for name in NETWORKS}
    trajectories: dict[str, list[list[float]]] = {}
    monotone: dict[str, list[bool]] = {name: [] for name in NETWORKS}
    with threads(config.threads):
        for seed in range(config.seeds):
            for network in NETWORKS:
                function, gamma = train_network(network, config, seed)
                x, y = cubic_map(config.test_points, generator=torch.Generator().manual_seed(10_000 + seed))
                final = tied_trajectory(function, gamma, x, config.depth)[-1]
                per_seed[network].append((final - y).square().mean().item())
                grid = torch.linspace(-1, 1, 201).view(-1, 1)
                image = tied_trajectory(function, gamma, grid, config.depth)[-1].flatten()
                monotone[network].append(bool((image.diff() >= 0).all()))
                if seed == 0:
                    start = torch.linspace(-1, 1, config.plot_points).view(-1, 1)
                    path = tied_trajectory(function, gamma, start, config.depth)
                    trajectories[network] = [p.flatten().tolist() for p in path]  # [layer][point]
    return {
        "summary": {name: summary_entry("test_mse", per_seed[name]) for name in NETWORKS},
        "order_preserving_bound": ORDER_PRESERVING_BOUND,
        "learned_map_non_decreasing": monotone,
        "trajectories_seed0": trajectories,
        "device": "cpu",
    }


def plot(results: dict[str, Any], out: Path) -> Path:
    """Trajectories (position against depth) of evenly spaced inputs for both networks, as in the authors' plot."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(7, 4), sharey=True)
    for ax, network in zip(axes, NETWORKS):
        path = torch.tensor(results["trajectories_seed0"][network])  # (depth + 1, points)
        depth = len(path) - 1
        colours = plt.cm.viridis(torch.linspace(0, 1, path.shape[1]).numpy())
        for k in range(path.shape[1]):
            ax.plot(path[:, k], range(depth + 1), "-x", color=colours[k], lw=1.5, ms=3)
            ax.plot([path[0, k], -path[0, k] ** 3], [0, depth], ":", color=colours[k], lw=0.8)
        entry = results["summary"][network]
        ax.set_title(f"{NETWORKS[network]}\ntest MSE {entry['mean']:.3f} ± {entry['std']:.3f}", fontsize=10)
        ax.set_xlabel("position x")
        ax.set_xlim(-1.3, 1.3)
    axes[0].set_ylabel("layer")
    fig.suptitle(f"x ↦ −x³ (dotted: target; order-preserving bound MSE = 1/7 ≈ {ORDER_PRESERVING_BOUND:.3f})",
                 fontsize=10)
    return save_figure(fig, out, "cubic.png")


EXPERIMENT = register_experiment(Experiment(
    name="cubic",
    claim="x ↦ −x³: a ResNet cannot cross trajectories (best order-preserving MSE 1/7 ≈ 0.143); "
          "a Momentum ResNet gets well below.",
    paper="Sander et al. 2021, 1-D dynamics plot (examples/plot_dynamics_1D.py)",
    config_type=CubicConfig,
    run=run,
    plot=plot,
    smoke={"seeds": 2, "momentum_steps": 10, "resnet_steps": 10, "test_points": 500},
))
