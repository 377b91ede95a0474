"""``finetune``: a pretrained ResNet converted to a Momentum ResNet fine-tunes as well, with larger
batches in the same memory (Sander et al. 2021, Fig. 8, in miniature).

1. **Pretraining** (no downloads: done here). A torchvision ResNet (``resnet34`` by default) is
   trained on a task of its own: scikit-learn's digits, upsampled to ``image_size`` and repeated
   over three channels (SGD, cosine learning rate).
2. **Conversion.** :func:`revnets.convert_to_momentum` turns every stage but its first block into one
   momentum stack ``v ← γv + (1−γ)(block(x) − x); x ← x + v`` (γ = 0.9, ``mode="reversible"``); the
   pretrained weights are kept.
3. **Fine-tuning** on an image folder (``--data-dir``: ``<dir>/train/<class>/*`` and
   ``<dir>/val/<class>/*``, or ``test/``; with ``--smoke`` and no ``--data-dir``, a generated folder of
   striped/checkered patterns): both the ResNet and its Momentum conversion get a fresh linear head
   and the same SGD schedule; accuracy on the folder's validation split, several seeds (one
   pretraining, one fine-tuning per seed).
4. **Memory.** For each network, the largest power-of-two batch (from 2) whose training step stays within
   ``memory_budget_mib`` of peak live tensor bytes (:class:`revnets.memory.StorageTracker`; CUDA:
   ``max_memory_allocated``), doubling the batch until it does not fit.

Differences from the paper: ResNet-34 on small images instead of an ImageNet-pretrained ResNet-152,
a budget in MiB of tensors (not a GPU's memory), pretraining on digits.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..convert import convert_to_momentum
from ..data import load_dataset
from ._common import (
    TrainSettings,
    accuracy,
    bar,
    dataset_tensors,
    mib,
    resolve_device,
    threads,
    train_classifier,
    training_step_memory,
)
from .base import Experiment, pyplot, register_experiment, save_figure, summary_entry

NETWORKS = {"resnet": "ResNet (fine-tuned)", "momentum": "Momentum ResNet (converted, fine-tuned)"}
FOLDER_LAYOUT = ("--data-dir must be an image folder: <dir>/train/<class name>/<images> and <dir>/val/<class name>/"
                 "<images> (or test/), any format Pillow reads")


@dataclass
class FinetuneConfig:
    """Settings of the fine-tuning experiment."""

    seeds: int = 3
    data_dir: str | None = None
    architecture: str = "resnet34"
    image_size: int = 32
    gamma: float = 0.9
    pretrain_steps: int = 150
    pretrain_lr: float = 0.05
    finetune_steps: int = 60
    finetune_lr: float = 0.01
    batch_size: int = 32
    memory_budget_mib: float = 256.0
    max_batch: int = 1024
    generated_per_class: int = 0
    device: str = "auto"
    threads: int | None = None


def generate_image_folder(root: Path, per_class: int, image_size: int, seed: int = 0) -> Path:
    """Write a small image folder (``train/`` and ``val/``) of three classes — horizontal stripes,
    vertical stripes, checkerboards — with random phase, colour and noise, as PNGs."""
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    coords = torch.arange(image_size)
    patterns = {
        "horizontal": lambda p, k: ((coords[:, None] + p) // k % 2).expand(image_size, image_size),
        "vertical": lambda p, k: ((coords[None, :] + p) // k % 2).expand(image_size, image_size),
        "checker": lambda p, k: (((coords[:, None] + p) // k + (coords[None, :] + p) // k) % 2),
    }
    for split, count in (("train", per_class), ("val", max(2, per_class // 2))):
        for name, pattern in patterns.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                phase = int(torch.randint(0, 8, (1,), generator=generator))
                period = int(torch.randint(2, 5, (1,), generator=generator))
                colour = torch.rand(3, 1, 1, generator=generator)
                image = pattern(phase, period).float()[None] * colour + 0.25 * torch.rand(3, image_size, image_size,
                                                                                          generator=generator)
                pixels = (image.clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
                Image.fromarray(pixels).save(folder / f"{index}.png")
    return root


def as_rgb(images: Tensor, size: int) -> Tensor:
    """Grey ``(N, 1, H, W)`` images to ``(N, 3, size, size)`` (bilinear resize, channel repeat)."""
    resized = nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return resized.repeat(1, 3, 1, 1)


def pretrain(config: FinetuneConfig, device: torch.device) -> nn.Module:
    """The torchvision ResNet trained on digits (upsampled, three channels)."""
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, config.architecture)(weights=None, num_classes=10).to(device)
    x, y = dataset_tensors(load_dataset("digits", split="train", normalize=True))
    settings = TrainSettings(config.pretrain_steps, config.batch_size, config.pretrain_lr)
    train_classifier(model, (as_rgb(x, config.image_size), y), settings, seed=0, desc="pretraining")
    return model


def with_head(model: nn.Module, num_classes: int, seed: int) -> nn.Module:
    """A copy of ``model`` with a fresh linear head of ``num_classes`` outputs."""
    torch.manual_seed(seed)
    model = copy.deepcopy(model)
    model.fc = nn.Linear(model.fc.in_features, num_classes).to(next(model.parameters()).device)
    return model


def largest_batch(model: nn.Module, config: FinetuneConfig, num_classes: int, device: torch.device) -> tuple[int, dict]:
    """The largest power-of-two batch whose training step peaks within the budget, and the peaks measured."""
    budget = config.memory_budget_mib * 2**20
    model.train()
    best, peaks, batch = 0, {}, 2  # BatchNorm needs two samples in training
    while batch <= config.max_batch:
        x = torch.randn(batch, 3, config.image_size, config.image_size, device=device)
        y = torch.randint(num_classes, (batch,), device=device)
        memory = training_step_memory(model, lambda m, x=x, y=y: nn.functional.cross_entropy(m(x), y))
        peak = memory.peak_bytes if memory.cuda_peak_bytes is None else memory.cuda_peak_bytes
        peaks[batch] = mib(peak)
        if peak > budget:
            break
        best, batch = batch, 2 * batch
    return best, peaks


def resolve_folder(config: FinetuneConfig, scratch: Path) -> tuple[Path, bool]:
    """``(folder, generated)``: ``--data-dir``, or a generated folder (only allowed with ``generated_per_class``)."""
    if config.data_dir is not None:
        root = Path(config.data_dir)
        if not (root / "train").is_dir() or not ((root / "val").is_dir() or (root / "test").is_dir()):
            raise FileNotFoundError(f"{root} is not a usable image folder; {FOLDER_LAYOUT}")
        return root, False
    if not config.generated_per_class:
        raise ValueError(f"finetune needs --data-dir (or --smoke, which generates a folder); {FOLDER_LAYOUT}")
    return generate_image_folder(scratch, config.generated_per_class, config.image_size), True


def run(config: FinetuneConfig) -> dict[str, Any]:
    """Pretrain, convert, fine-tune both networks per seed; largest batch in the budget for each."""
    import tempfile

    device = resolve_device(config.device)
    with tempfile.TemporaryDirectory() as scratch, threads(config.threads):
        folder, generated = resolve_folder(config, Path(scratch) / "imagefolder")
        evaluation = "val" if (folder / "val").is_dir() else "test"
        options = {"image_size": config.image_size}
        train_set = load_dataset("imagefolder", folder, split="train", **options)
        train = dataset_tensors(train_set)
        test = dataset_tensors(load_dataset("imagefolder", folder, split=evaluation, **options))
        num_classes = len(train_set.classes)
        pretrained = pretrain(config, device)
        pretrain_accuracy = accuracy(pretrained, as_rgb(dataset_tensors(load_dataset(
            "digits", split="test", normalize=True))[0], config.image_size),
            dataset_tensors(load_dataset("digits", split="test"))[1])
        settings = TrainSettings(config.finetune_steps, config.batch_size, config.finetune_lr)
        per_seed: dict[str, list[float]] = {name: [] for name in NETWORKS}
        with bar(config.seeds * len(NETWORKS), "fine-tuning") as progress:
            for seed in range(config.seeds):
                for network, description in NETWORKS.items():
                    model = with_head(pretrained, num_classes, seed)
                    if network == "momentum":
                        model = convert_to_momentum(model, config.gamma, mode="reversible")
                    train_classifier(model, train, settings, seed=seed, desc=description)
                    per_seed[network].append(accuracy(model, *test))
                    progress.update()
        resnet = with_head(pretrained, num_classes, 0)
        momentum = convert_to_momentum(resnet, config.gamma, mode="reversible")
        batches = {name: largest_batch(model, config, num_classes, device)
                   for name, model in (("resnet", resnet), ("momentum", momentum))}
    summary = {name: summary_entry("finetune_accuracy", per_seed[name]) for name in NETWORKS}
    return {
        "summary": summary,
        "largest_batch_in_budget": {name: b for name, (b, _) in batches.items()},
        "peak_mib_by_batch": {name: p for name, (_, p) in batches.items()},
        "memory_budget_mib": config.memory_budget_mib,
        "pretrain_digits_test_accuracy": pretrain_accuracy,
        "folder": "generated (striped/checkered patterns)" if generated else str(folder),
        "classes": list(train_set.classes),
        "train_size": len(train[1]),
        "eval_split": evaluation,
        "eval_size": len(test[1]),
        "device": str(device),
    }


def plot(results: dict[str, Any], out: Path) -> Path:
    """(a) fine-tuning accuracy of both networks; (b) peak memory against batch size with the budget."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    names = list(NETWORKS)
    entries = [results["summary"][n] for n in names]
    left.bar(range(len(names)), [100 * e["mean"] for e in entries], yerr=[100 * e["std"] for e in entries], capsize=4)
    left.set_xticks(range(len(names)), ["ResNet", "Momentum ResNet"])
    left.set_ylabel(f"accuracy on {results['eval_split']} (%)")
    left.set_title("(a) fine-tuned from the same pretrained ResNet", fontsize=10)
    for name, label in (("resnet", "ResNet"), ("momentum", "Momentum ResNet")):
        peaks = results["peak_mib_by_batch"][name]
        right.plot([int(b) for b in peaks], list(peaks.values()), "o-",
                   label=f"{label}: largest batch {results['largest_batch_in_budget'][name]}")
    right.axhline(results["memory_budget_mib"], color="k", ls=":", label="budget")
    right.set_xscale("log", base=2)
    right.set_yscale("log")
    right.set_xlabel("batch size")
    right.set_ylabel("peak training-step memory (MiB)")
    right.set_title("(b) largest batch in the memory budget", fontsize=10)
    right.legend(fontsize=8)
    return save_figure(fig, out, "finetune.png")


EXPERIMENT = register_experiment(Experiment(
    name="finetune",
    claim="A pretrained ResNet converted to a Momentum ResNet fine-tunes to the same accuracy and fits "
          "larger batches in the same memory.",
    paper="Sander et al. 2021, Fig. 8",
    config_type=FinetuneConfig,
    run=run,
    plot=plot,
    smoke={"seeds": 1, "architecture": "resnet18", "image_size": 16, "pretrain_steps": 2, "finetune_steps": 2,
           "batch_size": 8, "memory_budget_mib": 100.0, "max_batch": 8, "generated_per_class": 6, "threads": 1},
    needs_data_dir=FOLDER_LAYOUT,
))
