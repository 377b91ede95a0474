"""``rings``: nested rings (Sander et al. 2021, Fig. 1) — a Momentum ResNet separates them, a ResNet cannot.

Both networks map the plane to itself with one function ``f = Linear(2, 16)–Tanh–Linear(16, 2)``
shared by all 15 steps; the final position is read as two logits (cross-entropy). The ResNet is
``x ← x + f(x)``; the Momentum ResNet is ``v ← γv + (1−γ)f(x); x ← x + v`` with γ = 0.99, v₀ = 0.

Why: a ResNet is (in the continuous limit) the flow of ``ẋ = f(x)``, a homeomorphism of the plane
whose trajectories cannot cross, so rings with alternating labels stay nested and no half-plane
separates them; the Momentum ResNet is ``ε ẍ + ẋ = f(x)``, whose position map need not be injective.

Protocol (the authors' ``examples_paper/run_separation_nested_rings.py``): fresh points every step;
Momentum ResNet: Adam, lr 0.2, 1500 steps; ResNet (the authors' more generous schedule, so the
baseline gets its best shot): Adam, lr 0.01, 5000 steps, halved at 50 % and divided by 10 more at
75 %. Rings ``r = 1 … n`` have radius ``3·(0.5 r + 0.2·U[0, 1])``, labels alternating
(:func:`revnets.data.synthetic.nested_rings`). Differences: ``points_per_step`` (default 4,000, the
authors' 2 rings × 2,000) is split over however many rings there are, so with 4 rings it is 1,000 per
ring rather than 2,000 (half the compute); accuracy is measured on 10,000 fresh points. 3 seeds by
default (about 3.5 min of CPU on one thread); ``--seeds 5`` is the 5-seed run of docs/reproduction.md
with the same per-seed protocol (seed ``k`` gives the same result whatever the number of seeds).
Fewer points per step is not a safe shortcut: at 2,000 the ResNet beat the Momentum ResNet on average.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.synthetic import nested_rings
from ..nn import MomentumNet
from ..training.step import training_step
from ._common import bar, step_decay, threads, tied_trajectory
from .base import Experiment, pyplot, register_experiment, save_figure, summary_entry

RESNET_MILESTONES = ((0.5, 0.5), (0.75, 0.1))
"""The ResNet's schedule: ×0.5 at 50 % of the steps, ×0.1 more at 75 %."""


@dataclass
class RingsConfig:
    """Settings of the nested-rings experiment (defaults: the paper's Fig. 1 with the authors' protocol)."""

    seeds: int = 3
    rings: int = 4
    depth: int = 15
    hidden: int = 16
    gamma: float = 0.99
    points_per_step: int = 4000
    momentum_steps: int = 1500
    momentum_lr: float = 0.2
    resnet_steps: int = 5000
    resnet_lr: float = 0.01
    test_points: int = 10_000
    plot_points: int = 500
    plot_every: int = 3
    threads: int = 1

    def __post_init__(self) -> None:
        if self.rings not in (2, 4):
            raise ValueError(f"--rings must be 2 or 4; got {self.rings}")
        if self.depth < 1 or self.seeds < 1:
            raise ValueError(f"depth and seeds must be >= 1; got depth={self.depth}, seeds={self.seeds}")


NETWORKS = {"resnet": "ResNet", "momentum": "Momentum ResNet"}


def make_function(hidden: int) -> nn.Module:
    """``f = Linear(2, hidden)–Tanh–Linear(hidden, 2)``, shared by every step."""
    return nn.Sequential(nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, 2))


def train_network(network: str, config: RingsConfig, seed: int, generator: torch.Generator,
                  desc: str | None = None) -> tuple[nn.Module, float, list[float]]:
    """Train ``network`` (``"resnet"`` or ``"momentum"``) from ``seed``; return ``f``, γ and the losses."""
    torch.manual_seed(seed)
    function = make_function(config.hidden)
    gamma = config.gamma if network == "momentum" else 0.0
    steps, lr = (config.momentum_steps, config.momentum_lr) if network == "momentum" else \
        (config.resnet_steps, config.resnet_lr)
    milestones = () if network == "momentum" else RESNET_MILESTONES
    net = MomentumNet([function] * config.depth, gamma, mode="autograd")
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: step_decay(step, steps, milestones))
    losses = []
    with bar(steps, desc or f"{NETWORKS[network]} seed {seed}") as progress:
        for _ in range(steps):
            x, y = nested_rings(config.points_per_step, n_rings=config.rings, generator=generator)
            losses.append(training_step(optimizer, lambda x, y: nn.functional.cross_entropy(net(x), y), x, y,
                                        schedule=schedule).item())
            progress.update()
    return function, gamma, losses


def run(config: RingsConfig) -> dict[str, Any]:
    """Train both networks for every seed; test accuracy on fresh points; layer-by-layer clouds of seed 0."""
    per_seed: dict[str, list[float]] = {name: [] for name in NETWORKS}
    final_loss: dict[str, list[float]] = {name: [] for name in NETWORKS}
    clouds: dict[str, list] = {}
    with threads(config.threads):
        for seed in range(config.seeds):
            for network in NETWORKS:
                generator = torch.Generator().manual_seed(1000 * seed + 1)
                function, gamma, losses = train_network(network, config, seed, generator)
                x, y = nested_rings(config.test_points, n_rings=config.rings, generator=generator)
                with torch.no_grad():
                    final = tied_trajectory(function, gamma, x, config.depth)[-1]
                per_seed[network].append((final.argmax(1) == y).float().mean().item())
                final_loss[network].append(sum(losses[-50:]) / len(losses[-50:]))
                if seed == 0:
                    px, py = nested_rings(config.plot_points, n_rings=config.rings,
                                          generator=torch.Generator().manual_seed(12345))
                    path = tied_trajectory(function, gamma, px, config.depth)
                    layers = list(range(0, config.depth + 1, config.plot_every))
                    if layers[-1] != config.depth:
                        layers.append(config.depth)
                    clouds[network] = {"layers": layers, "points": [path[n].tolist() for n in layers],
                                       "labels": py.tolist()}
    return {
        "summary": {name: summary_entry("test_accuracy", per_seed[name]) for name in NETWORKS},
        "final_train_loss": {name: final_loss[name] for name in NETWORKS},
        "clouds_seed0": clouds,
        "device": "cpu",
    }


def plot(results: dict[str, Any], out: Path) -> Path:
    """Fig. 1: columns = layers 0, 3, …, 15; row 1 ResNet, row 2 Momentum ResNet; points coloured by class."""
    plt = pyplot()
    clouds = results["clouds_seed0"]
    summary = results["summary"]
    layers = clouds["resnet"]["layers"]
    fig, axes = plt.subplots(2, len(layers), figsize=(2.0 * len(layers), 4.4), squeeze=False)
    for row, network in enumerate(NETWORKS):
        cloud = clouds[network]
        labels = torch.tensor(cloud["labels"])
        for col, (layer, points) in enumerate(zip(cloud["layers"], cloud["points"])):
            ax = axes[row, col]
            pts = torch.tensor(points)
            ax.scatter(pts[:, 0], pts[:, 1], c=labels, cmap="coolwarm", s=3, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f"layer {layer}", fontsize=9)
        entry = summary[network]
        axes[row, 0].set_ylabel(f"{NETWORKS[network]}\n{100 * entry['mean']:.1f} ± {100 * entry['std']:.1f} %",
                                fontsize=9)
    fig.suptitle("Nested rings (Sander et al. 2021, Fig. 1): test accuracy mean ± std over seeds", fontsize=10)
    return save_figure(fig, out, "rings.png")


EXPERIMENT = register_experiment(Experiment(
    name="rings",
    claim="Nested rings: a 15-step Momentum ResNet (γ=0.99) separates them, a ResNet with the same tied f cannot.",
    paper="Sander et al. 2021, Fig. 1",
    config_type=RingsConfig,
    run=run,
    plot=plot,
    smoke={"seeds": 2, "momentum_steps": 15, "resnet_steps": 15, "points_per_step": 400, "test_points": 1000,
           "plot_points": 100},
))
