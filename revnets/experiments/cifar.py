"""``cifar``: Table 2 of Sander et al. (2021) — ResNet-101 against Momentum ResNet-101 on CIFAR-10/100.

The paper (10 runs each): CIFAR-10 ResNet 95.15 ± 0.12, Momentum (v₀ = 0) 95.10 ± 0.13, Momentum
(v₀ learned) 95.18 ± 0.06; CIFAR-100 76.86 ± 0.25 / 76.39 ± 0.18 / 76.38 ± 0.42 %.

Protocol: the zoo's ``resnet101``, ``momentum_resnet101`` with ``init_velocity="zero"`` and with
``"learned"`` (γ = 0.9; CIFAR stem: 3×3 stride-1 convolution, no max-pool), SGD momentum 0.9, weight
decay 5e-4, batch 128, random crop (padding 4) + horizontal flip, 220 epochs, per-channel
normalisation; learning rate 0.1 with a cosine schedule [the paper's schedule was not available to
us: this one is our choice]. Data: ``--data-dir`` holding ``cifar-10-batches-py/`` or
``cifar-100-python/`` (the python versions).

This needs a GPU (ResNet-101 for 220 epochs is days of CPU time): without CUDA only ``--smoke`` runs,
which trains ResNet-18-sized versions for two steps on a generated stand-in (random 32×32 images)
when no ``--data-dir`` is given — a test of the pipeline, not a result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data import dataset_info, load_dataset
from ..models import create_model
from ._common import (
    TrainSettings,
    accuracy,
    bar,
    count_parameters,
    dataset_tensors,
    resolve_device,
    threads,
    train_classifier,
)
from .base import Experiment, pyplot, register_experiment, save_figure, summary_entry

NETWORKS = {"resnet": ("resnet", {}), "momentum": ("momentum_resnet", {"init_velocity": "zero"}),
            "momentum_learned_v0": ("momentum_resnet", {"init_velocity": "learned"})}
PAPER = {"cifar10": {"resnet": (95.15, 0.12), "momentum": (95.10, 0.13), "momentum_learned_v0": (95.18, 0.06)},
         "cifar100": {"resnet": (76.86, 0.25), "momentum": (76.39, 0.18), "momentum_learned_v0": (76.38, 0.42)}}
LAYOUT = ("--data-dir must hold CIFAR-10 as <dir>/cifar-10-batches-py/ (data_batch_1…5, test_batch, batches.meta) or "
          "CIFAR-100 as <dir>/cifar-100-python/ (train, test, meta): the python versions from "
          "https://www.cs.toronto.edu/~kriz/cifar.html")


@dataclass
class CifarConfig:
    """Settings of the CIFAR protocol (defaults: Table 2's)."""

    seeds: int = 1
    data_dir: str | None = None
    depth: int = 101
    gamma: float = 0.9
    epochs: float = 220
    batch_size: int = 128
    lr: float = 0.1
    weight_decay: float = 5e-4
    steps: int | None = None
    generated_stand_in: bool = False
    train_limit: int | None = None
    device: str = "auto"
    threads: int | None = None


def locate_data(config: CifarConfig) -> str | None:
    """The dataset ``--data-dir`` holds (``"cifar10"`` or ``"cifar100"``), or ``None`` for the stand-in.

    Raises:
        ValueError / FileNotFoundError: no ``--data-dir`` (outside ``--smoke``), or no CIFAR in it,
            saying which layout is expected.
    """
    if config.data_dir is None:
        if not config.generated_stand_in:
            raise ValueError(f"cifar needs --data-dir; {LAYOUT}")
        return None
    root = Path(config.data_dir)
    if (root / "cifar-10-batches-py").is_dir():
        return "cifar10"
    if (root / "cifar-100-python").is_dir():
        return "cifar100"
    raise FileNotFoundError(f"no CIFAR data in {root}; {LAYOUT}")


def load_data(name: str | None, config: CifarConfig) -> tuple[str, tuple, tuple, int]:
    """``(dataset name, train (x, y), test (x, y), num_classes)``; ``name=None``: random stand-in images."""
    if name is None:
        generator = torch.Generator().manual_seed(0)
        train = (torch.randn(64, 3, 32, 32, generator=generator), torch.randint(10, (64,), generator=generator))
        test = (torch.randn(32, 3, 32, 32, generator=generator), torch.randint(10, (32,), generator=generator))
        return "generated stand-in (random images, not CIFAR)", train, test, 10
    root = Path(config.data_dir)
    train = dataset_tensors(load_dataset(name, root, split="train", normalize=True), limit=config.train_limit)
    test = dataset_tensors(load_dataset(name, root, split="test", normalize=True))
    return name, train, test, dataset_info(name).num_classes


def run(config: CifarConfig) -> dict[str, Any]:
    """Train and test the three networks per seed."""
    located = locate_data(config)
    device = resolve_device(config.device)
    if device.type != "cuda" and config.steps is None:
        raise ValueError("cifar's full protocol (ResNet-101, 220 epochs) needs a CUDA GPU; on CPU only --smoke runs")
    name, train, test, num_classes = load_data(located, config)
    steps = config.steps or math.ceil(config.epochs * len(train[1]) / config.batch_size)
    settings = TrainSettings(steps, config.batch_size, config.lr, weight_decay=config.weight_decay, augment=True)
    per_seed: dict[str, list[float]] = {n: [] for n in NETWORKS}
    parameters: dict[str, int] = {}
    with threads(config.threads), bar(config.seeds * len(NETWORKS), "cifar") as progress:
        for seed in range(config.seeds):
            for network, (prefix, options) in NETWORKS.items():
                torch.manual_seed(seed)
                extra = {"gamma": config.gamma, **options} if prefix.startswith("momentum") else {}
                model = create_model(f"{prefix}{config.depth}", num_classes=num_classes, **extra).to(device)
                parameters[network] = count_parameters(model)
                train_classifier(model, train, settings, seed=seed, desc=f"{network} seed {seed}")
                per_seed[network].append(accuracy(model, *test))
                progress.update()
    return {
        "summary": {n: summary_entry("test_accuracy", v) for n, v in per_seed.items()},
        "paper": PAPER.get(name),
        "dataset": name,
        "steps": steps,
        "parameters": parameters,
        "device": str(device),
    }


def plot(results: dict[str, Any], out: Path) -> Path:
    """Test accuracy of the three networks (mean ± std), beside the paper's when the dataset is CIFAR."""
    plt = pyplot()
    names = list(NETWORKS)
    fig, ax = plt.subplots(figsize=(6, 4))
    ours = [results["summary"][n] for n in names]
    ax.bar([i - 0.2 for i in range(3)], [100 * e["mean"] for e in ours], 0.4, yerr=[100 * e["std"] for e in ours],
           capsize=4, label="revnets")
    if results.get("paper"):
        paper = [results["paper"][n] for n in names]
        ax.bar([i + 0.2 for i in range(3)], [m for m, _ in paper], 0.4, yerr=[s for _, s in paper], capsize=4,
               label="paper (Table 2)")
    ax.set_xticks(range(3), ["ResNet", "Momentum v₀=0", "Momentum v₀ learned"])
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Table 2 protocol on {results['dataset']} ({results['steps']} steps)", fontsize=10)
    ax.legend(fontsize=8)
    return save_figure(fig, out, "cifar.png")


EXPERIMENT = register_experiment(Experiment(
    name="cifar",
    claim="CIFAR-10/100 (Table 2): Momentum ResNet-101 (v₀ = 0 or learned) matches ResNet-101's accuracy "
          "(needs a GPU; CPU: --smoke only).",
    paper="Sander et al. 2021, Table 2",
    config_type=CifarConfig,
    run=run,
    plot=plot,
    smoke={"depth": 18, "steps": 2, "batch_size": 8, "generated_stand_in": True, "train_limit": 256, "threads": 1},
    needs_data_dir=LAYOUT,
))
