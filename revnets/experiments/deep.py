"""``deep``: a 1202-layer Hamiltonian network trains, with the memory per sample of a 38-layer one
(Chang et al. 2018).

In ``mode="reversible"`` a Hamiltonian unit stores only its input (the unit boundary) and rebuilds
every layer's activation by inverting the Verlet step ``Z_j = Z_{j+1} + h·G(Y_{j+1}),
Y_j = Y_{j+1} − h·F(Z_j)``, so the activation memory does not depend on the number of blocks: the
zoo's ``hamiltonian1202`` (100 blocks per unit) should need the same memory *per sample* as
``hamiltonian38`` (3 blocks), up to the slightly wider last unit (128 vs 112 channels).

**Measured.** For each depth, the peak live tensor bytes of one training step
(:class:`revnets.memory.StorageTracker`) at two batch sizes; the memory per sample is the slope
``(peak(B₂) − peak(B₁))/(B₂ − B₁)``, which removes what does not scale with the batch (parameter
gradients, which do grow with depth). The same in ``mode="autograd"`` (every activation stored) for
contrast, and the wall time of one reversible step at ``B₂``. Then the 1202-layer network is trained
for a few SGD steps (momentum 0.9, weight decay 2e-4, lr 0.05, the authors' batch 32) on a shipped
dataset (scikit-learn's digits, 8×8 grey): it trains if its loss falls (mean of the last five steps
below the mean of the first five). Differences from the paper: digits instead of CIFAR-10, and a
few steps instead of 240k iterations — this shows that the network trains and fits in memory, not
its final accuracy. One intra-op thread by default (``threads``): with two on a shared 2-core machine
the threads wait on each other, and the run took over 12 minutes instead of about one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import load_dataset
from ..models import create_model
from ._common import (
    TrainSettings,
    bar,
    count_parameters,
    dataset_tensors,
    mib,
    resolve_device,
    threads,
    train_classifier,
    training_step_memory,
)
from .base import Experiment, pyplot, register_experiment, save_figure, summary_entry


@dataclass
class DeepConfig:
    """Settings of the deep-network experiment."""

    seeds: int = 1
    depths: list[int] = field(default_factory=lambda: [38, 110, 218, 1202])
    dataset: str = "digits"
    memory_batches: list[int] = field(default_factory=lambda: [8, 32])
    autograd_batches: list[int] = field(default_factory=lambda: [2, 4])
    train_depth: int = 1202
    train_steps: int = 30
    batch_size: int = 32
    lr: float = 0.05
    weight_decay: float = 2e-4
    device: str = "auto"
    threads: int | None = 1

    def __post_init__(self) -> None:
        if len(self.memory_batches) != 2 or len(self.autograd_batches) != 2:
            raise ValueError("memory_batches and autograd_batches must each hold two batch sizes (B1 < B2)")


def per_sample_memory(depth: int, mode: str, batches: list[int], data: torch.Tensor, labels: torch.Tensor,
                      device: torch.device) -> tuple[float, float, float]:
    """``(MiB per sample, peak MiB at the larger batch, seconds of that step)`` of ``hamiltonian<depth>``."""
    torch.manual_seed(0)
    model = create_model(f"hamiltonian{depth}", num_classes=10, in_channels=data.shape[1], mode=mode).to(device)
    model.train()
    peaks, seconds = [], 0.0
    for batch in batches:
        x, y = data[:batch].to(device), labels[:batch].to(device)
        memory = training_step_memory(model, lambda m, x=x, y=y: nn.functional.cross_entropy(m(x), y))
        peaks.append(memory.peak)
        seconds = memory.seconds
    return mib((peaks[1] - peaks[0]) / (batches[1] - batches[0])), mib(peaks[1]), seconds


def run(config: DeepConfig) -> dict[str, Any]:
    """The depth/memory/time table, then a short training run of the deepest network per seed."""
    device = resolve_device(config.device)
    data, labels = dataset_tensors(load_dataset(config.dataset, split="train", normalize=True))
    table = []
    with threads(config.threads):
        with bar(len(config.depths), "memory per depth") as progress:
            for depth in config.depths:
                reversible = per_sample_memory(depth, "reversible", config.memory_batches, data, labels, device)
                autograd = per_sample_memory(depth, "autograd", config.autograd_batches, data, labels, device)
                model = create_model(f"hamiltonian{depth}", num_classes=10, in_channels=data.shape[1])
                table.append({"depth": depth, "layers": model.num_layers, "parameters": count_parameters(model),
                              "reversible_mib_per_sample": reversible[0], "reversible_peak_mib": reversible[1],
                              "reversible_seconds_per_step": reversible[2],
                              "autograd_mib_per_sample": autograd[0]})
                progress.update()
        losses, falls = [], []
        settings = TrainSettings(config.train_steps, config.batch_size, config.lr, weight_decay=config.weight_decay,
                                 schedule="constant")
        for seed in range(config.seeds):
            torch.manual_seed(seed)
            model = create_model(f"hamiltonian{config.train_depth}", num_classes=10, in_channels=data.shape[1])
            curve = train_classifier(model.to(device), (data, labels), settings, seed=seed,
                                     desc=f"Hamiltonian-{config.train_depth}")
            window = min(5, len(curve) // 2) or 1
            falls.append(sum(curve[:window]) / window - sum(curve[-window:]) / window)
            losses.append(curve)
    by_depth = {row["depth"]: row for row in table}
    shallow, deep = config.depths[0], config.depths[-1]
    summary = {f"hamiltonian{d}": summary_entry("reversible_mib_per_sample", [by_depth[d]["reversible_mib_per_sample"]])
               for d in (shallow, deep)}
    summary[f"hamiltonian{config.train_depth}_training"] = summary_entry("loss_decrease_first_to_last_steps", falls)
    return {"summary": summary, "table": table, "losses": losses, "train_depth": config.train_depth,
            "memory_batches": config.memory_batches, "autograd_batches": config.autograd_batches,
            "dataset": config.dataset, "device": str(device)}


def plot(results: dict[str, Any], out: Path) -> Path:
    """(a) MiB per sample against depth, reversible and autograd; (b) the training loss of the deepest net."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    depths = [row["depth"] for row in results["table"]]
    left.plot(depths, [row["autograd_mib_per_sample"] for row in results["table"]], "s--",
              label="autograd (stores all)")
    left.plot(depths, [row["reversible_mib_per_sample"] for row in results["table"]], "o-", label="reversible")
    left.set_xscale("log")
    left.set_yscale("log")
    left.set_xlabel("depth (layers)")
    left.set_ylabel("training memory per sample (MiB)")
    left.set_title("(a) Hamiltonian networks: memory per sample", fontsize=10)
    left.legend(fontsize=8)
    for index, curve in enumerate(results["losses"]):
        right.plot(range(1, len(curve) + 1), curve, label=f"seed {index}")
    right.set_xlabel("SGD step")
    right.set_ylabel("training loss")
    right.set_title(f"(b) Hamiltonian-{results['train_depth']} trains ({results['dataset']})", fontsize=10)
    right.legend(fontsize=8)
    return save_figure(fig, out, "deep.png")


EXPERIMENT = register_experiment(Experiment(
    name="deep",
    claim="A 1202-layer Hamiltonian network trains, and its memory per sample equals that of Hamiltonian-38.",
    paper="Chang et al. 2018 (Hamiltonian-1202)",
    config_type=DeepConfig,
    run=run,
    plot=plot,
    smoke={"depths": [38, 74], "memory_batches": [2, 4], "autograd_batches": [1, 2], "train_depth": 38,
           "train_steps": 4, "batch_size": 8},
))
