"""``small-data``: a Hamiltonian network against a ResNet trained on a fraction of the data
(Chang et al. 2018, Figs. 3–4, in miniature).

Chang et al. train on 5 %…100 % of CIFAR-10 / STL-10 and find their Hamiltonian networks clearly
better than ResNets when data are scarce. Here: the zoo's ``hamiltonian38`` (the authors' Hamiltonian-38,
``h = 1``, reversible units) against He et al.'s CIFAR ResNet-32 (16/32/64 channels, 5 basic blocks per
stage, about twice the parameters), each trained on a class-stratified random 5, 10, 20, 50 and
100 % of the training split and tested on the whole test split, several seeds (each seed draws its
own subset). Same budget for every fraction: a fixed number of SGD steps (momentum 0.9, weight
decay 2e-4 as the authors, cosine learning rate from 0.1) of 32 images; the Hamiltonian net also gets
the authors' kernel-smoothness penalty (weight 2e-4).

Data: a dataset that ships with the package (``digits``, 8×8 grey, by default), or with ``--data-dir``
CIFAR-10 (``<dir>/cifar-10-batches-py/``, the python version) or STL-10 (``<dir>/stl10_binary/``).
Differences from the paper: the dataset (by default), the budget (minutes on a CPU, not 80k
iterations), no augmentation, the cosine schedule, the ResNet's depth.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data import dataset_info, load_dataset
from ..models import create_model
from ._common import (
    TrainSettings,
    accuracy,
    bar,
    cifar_resnet,
    count_parameters,
    dataset_tensors,
    resolve_device,
    stratified_subset,
    threads,
    train_classifier,
)
from .base import Experiment, pyplot, register_experiment, save_figure, summary_entry

NETWORKS = {"resnet": "ResNet-32", "hamiltonian": "Hamiltonian-38"}
DATA_DIR_LAYOUT = ("--data-dir must hold CIFAR-10 as <dir>/cifar-10-batches-py/ (the python version: data_batch_1…5, "
                   "test_batch, batches.meta) or STL-10 as <dir>/stl10_binary/ (train_X.bin, train_y.bin, "
                   "test_X.bin, test_y.bin)")


@dataclass
class SmallDataConfig:
    """Settings of the small-data experiment."""

    seeds: int = 3
    fractions: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2, 0.5, 1.0])
    dataset: str = "digits"
    data_dir: str | None = None
    steps: int = 200
    batch_size: int = 32
    lr: float = 0.1
    weight_decay: float = 2e-4
    smoothness: float = 2e-4
    resnet_blocks: int = 5
    test_limit: int | None = None
    device: str = "auto"
    threads: int | None = 1


def resolve_dataset(config: SmallDataConfig) -> tuple[str, dict[str, Any]]:
    """``(name, load_dataset keyword arguments)``: the shipped dataset, or what ``data_dir`` holds."""
    if config.data_dir is None:
        return config.dataset, {"normalize": True}
    root = Path(config.data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"--data-dir {root} is not a directory; {DATA_DIR_LAYOUT}")
    if (root / "cifar-10-batches-py").is_dir():
        return "cifar10", {"root": root, "normalize": True}
    if (root / "stl10_binary").is_dir():
        return "stl10", {"root": root}
    raise FileNotFoundError(f"nothing usable in {root}: {DATA_DIR_LAYOUT}")


def make_network(network: str, in_channels: int, num_classes: int, config: SmallDataConfig) -> torch.nn.Module:
    if network == "hamiltonian":
        return create_model("hamiltonian38", num_classes=num_classes, in_channels=in_channels)
    return cifar_resnet(config.resnet_blocks, in_channels, num_classes)


def run(config: SmallDataConfig) -> dict[str, Any]:
    """Train both networks on every fraction and seed; test accuracy on the full test split."""
    device = resolve_device(config.device)
    name, options = resolve_dataset(config)
    info = dataset_info(name)
    train_all = dataset_tensors(load_dataset(name, split="train", **options))
    test = dataset_tensors(load_dataset(name, split="test", **options), limit=config.test_limit)
    in_channels = train_all[0].shape[1]
    settings = TrainSettings(config.steps, config.batch_size, config.lr, weight_decay=config.weight_decay)
    results: dict[str, dict[float, list[float]]] = {n: {f: [] for f in config.fractions} for n in NETWORKS}
    sizes: dict[float, int] = {}
    parameters: dict[str, int] = {}
    with threads(config.threads), bar(config.seeds * len(config.fractions) * len(NETWORKS), "small data") as progress:
        for seed in range(config.seeds):
            for fraction in config.fractions:
                index = stratified_subset(train_all[1], fraction, torch.Generator().manual_seed(seed))
                subset = (train_all[0][index], train_all[1][index])
                sizes[fraction] = len(index)
                for network, description in NETWORKS.items():
                    torch.manual_seed(seed)
                    model = make_network(network, in_channels, info.num_classes or 10, config).to(device)
                    parameters[network] = count_parameters(model)
                    penalty = None
                    if network == "hamiltonian" and config.smoothness:
                        penalty = lambda m=model: config.smoothness * m.smoothness_penalty()  # noqa: E731
                    train_classifier(model, subset, settings, seed=seed, penalty=penalty,
                                     desc=f"{description} {fraction:.0%}")
                    results[network][fraction].append(accuracy(model, *test))
                    progress.update()
    largest, smallest = config.fractions[-1], config.fractions[0]
    summary = {n: summary_entry(f"test_accuracy_fraction{smallest:g}", results[n][smallest]) for n in NETWORKS}
    return {
        "summary": summary,
        "accuracy": {n: {str(f): summary_entry("test_accuracy", v) for f, v in by.items()}
                     for n, by in results.items()},
        "train_sizes": {str(f): s for f, s in sizes.items()},
        "largest_fraction": largest,
        "parameters": parameters,
        "dataset": name,
        "test_size": len(test[1]),
        "device": str(device),
    }


def plot(results: dict[str, Any], out: Path) -> Path:
    """Test accuracy against the fraction of training data, mean ± std over seeds."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for network, by_fraction in results["accuracy"].items():
        fractions = [float(f) for f in by_fraction]
        ax.errorbar([100 * f for f in fractions], [100 * e["mean"] for e in by_fraction.values()],
                    yerr=[100 * e["std"] for e in by_fraction.values()], fmt="o-", capsize=3,
                    label=f"{NETWORKS[network]} ({results['parameters'][network] / 1e3:.0f}k params)")
    ax.set_xscale("log")
    ax.set_xlabel("training data used (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Small data ({results['dataset']}; Chang et al. Figs. 3–4 in miniature)", fontsize=10)
    ax.legend(fontsize=8)
    return save_figure(fig, out, "small_data.png")


EXPERIMENT = register_experiment(Experiment(
    name="small-data",
    claim="With little training data (5–20 %), a Hamiltonian network generalises clearly better than a ResNet.",
    paper="Chang et al. 2018, Figs. 3–4",
    config_type=SmallDataConfig,
    run=run,
    plot=plot,
    smoke={"seeds": 1, "fractions": [0.1, 1.0], "steps": 3, "batch_size": 16, "resnet_blocks": 1, "test_limit": 100},
    needs_data_dir=DATA_DIR_LAYOUT + " (optional: without it, the shipped digits are used)",
))
