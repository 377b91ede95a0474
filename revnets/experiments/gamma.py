"""``gamma``: accuracy is robust to the momentum term γ (Sander et al. 2021, Fig. 6, in miniature).

The paper trains and tests a Momentum ResNet-101 on CIFAR-10 at each γ and finds ≈ 95 % for every
γ ∈ [0, 1]. Here, on a dataset that ships with the package (scikit-learn's 8×8 digits by default;
``mnist5k`` also works), a small network — 3×3 stem (16 channels), one stage of 8 basic blocks,
global pooling, linear head — is trained and tested at each γ in {0, 0.1, …, 0.9, 0.99, 1}.

The stage is laid out as in the authors' networks (``momentumnet/models.py`` of their code, and
:func:`revnets.convert_to_momentum`): its first block is a plain residual block
``ReLU(x + BN(conv(ReLU(BN(conv x)))))``, the other 7 are one :class:`revnets.MomentumNet` with the
branches ``BN(conv(ReLU(BN(conv x))))`` and ``v₀ = 0`` (``mode="reversible"`` for γ > 0; γ = 0 is
the ResNet with the same branches). With ``plain_first_block=False`` all 8 blocks are momentum
steps: then the stack's output ``x_N = x₀ + Σ_k (1 − γ^{N−k}) f_k`` weighs the branches by
``Σ_j (1 − γ^j)`` = 0.35 in all at γ = 0.99 (2.9 at 0.9, 0 at γ = 1, where the stack is the
identity), the network is little more than its stem near γ = 1, and 200 steps are too few for the
branches to grow (see docs/reproduction.md). Training: SGD (momentum 0.9, weight decay 5e-4, cosine
learning rate from 0.05), 200 steps of 64 images (9 epochs of digits), 3 seeds; test accuracy on the
held-out 20 % split. Differences: the dataset, the network (one stage of 8 blocks instead of
ResNet-101's four stages) and the schedule are miniature (the authors: SGD lr 0.01, ÷10 at epoch
180 of 220, batch 128); the claim tested is the flatness of accuracy in γ, not the 95 %.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import dataset_info, load_dataset
from ..models.layers import BasicBlock
from ._common import TrainSettings, accuracy, bar, dataset_tensors, momentum_classifier, threads, train_classifier
from .base import Experiment, pyplot, register_experiment, save_figure, summary_entry

SHIPPED = ("digits", "mnist5k")


@dataclass
class GammaConfig:
    """Settings of the γ sweep."""

    seeds: int = 3
    dataset: str = "digits"
    gammas: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.99, 1.0])
    channels: int = 16
    depth: int = 8
    plain_first_block: bool = True
    steps: int = 200
    batch_size: int = 64
    lr: float = 0.05
    weight_decay: float = 5e-4
    threads: int = 1

    def __post_init__(self) -> None:
        if self.dataset not in SHIPPED:
            shipped = ", ".join(SHIPPED)
            raise ValueError(f"dataset must be one of {shipped} (shipped with the package); got {self.dataset!r}")


def network_name(gamma: float) -> str:
    """Summary key at ``gamma``: ``resnet`` (0), ``momentum`` (0.9, revnets' default), else ``momentum_gamma<γ>``."""
    if gamma == 0:
        return "resnet"
    return "momentum" if gamma == 0.9 else f"momentum_gamma{gamma:g}"


def make_network(config: GammaConfig, in_channels: int, num_classes: int, gamma: float) -> nn.Sequential:
    """Stem → one stage of ``config.depth`` blocks → pooling → head: a plain residual block, then
    ``depth − 1`` momentum steps (``plain_first_block``, the authors' layout), or ``depth`` momentum steps."""
    stack_depth = config.depth - 1 if config.plain_first_block else config.depth
    model = momentum_classifier(in_channels, num_classes, channels=config.channels, depth=stack_depth, gamma=gamma)
    if config.plain_first_block:
        model.insert(3, BasicBlock(config.channels, config.channels))  # after the stem's conv, BN, ReLU
    return model


def run(config: GammaConfig) -> dict[str, Any]:
    """Train and test at every γ and seed."""
    info = dataset_info(config.dataset)
    train = dataset_tensors(load_dataset(config.dataset, split="train", normalize=True))
    test = dataset_tensors(load_dataset(config.dataset, split="test", normalize=True))
    settings = TrainSettings(config.steps, config.batch_size, config.lr, weight_decay=config.weight_decay)
    per_seed: dict[float, list[float]] = {g: [] for g in config.gammas}
    with threads(config.threads), bar(len(config.gammas) * config.seeds, "gamma sweep") as progress:
        for seed in range(config.seeds):
            for gamma in config.gammas:
                torch.manual_seed(seed)
                model = make_network(config, info.input_shape[0], info.num_classes, gamma)
                train_classifier(model, train, settings, seed=seed, desc=f"gamma={gamma}")
                per_seed[gamma].append(accuracy(model, *test))
                progress.update()
    return {
        "summary": {network_name(g): summary_entry("test_accuracy", v) for g, v in per_seed.items()},
        "gammas": {network_name(g): g for g in config.gammas},
        "train_size": len(train[1]),
        "test_size": len(test[1]),
        "dataset": config.dataset,
        "device": "cpu",
    }


def plot(results: dict[str, Any], out: Path) -> Path:
    """Test accuracy against γ: mean ± std over seeds, and every seed."""
    plt = pyplot()
    names = list(results["gammas"])
    gammas = [results["gammas"][n] for n in names]
    entries = [results["summary"][n] for n in names]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.errorbar(gammas, [100 * e["mean"] for e in entries], yerr=[100 * e["std"] for e in entries], fmt="o-",
                capsize=3, label="mean ± std")
    for gamma, entry in zip(gammas, entries):
        ax.plot([gamma] * len(entry["per_seed"]), [100 * a for a in entry["per_seed"]], "k.", ms=3, alpha=0.5)
    ax.set_xlabel("γ (trained and tested at the same γ; 0 = ResNet)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Momentum ResNet on {results['dataset']} (Fig. 6 in miniature)", fontsize=10)
    ax.legend(fontsize=8)
    return save_figure(fig, out, "gamma.png")


EXPERIMENT = register_experiment(Experiment(
    name="gamma",
    claim="Trained and tested at the same γ, a Momentum ResNet's accuracy is about the same for every γ in [0, 1].",
    paper="Sander et al. 2021, Fig. 6",
    config_type=GammaConfig,
    run=run,
    plot=plot,
    smoke={"seeds": 1, "gammas": [0.0, 0.9], "channels": 4, "depth": 2, "steps": 5, "batch_size": 16},
))
