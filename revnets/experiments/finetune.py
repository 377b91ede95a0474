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
4. **Memory, at the paper's scale**: a torchvision ResNet-152 (``memory_architecture``, random
   weights: memory does not depend on them) at 224 px (``memory_image_size``), 1000 classes, and its
   conversion. The peak live tensor bytes of one training step (forward, backward, gradients;
   :class:`revnets.memory.StorageTracker`; CUDA: ``max_memory_allocated``) is measured at batches
   ``memory_batches`` (1 and 2); it is linear in the batch, ``peak(B) = fixed + B·per_sample``, and the
   largest batch within ``memory_budget_mib`` is ``⌊(budget − fixed) / per_sample⌋`` (a step at the
   batches themselves would take minutes per network on a CPU).

Differences from the paper: fine-tuning from ResNet-34 on small images instead of an
ImageNet-pretrained ResNet-152 (the memory panel has the ResNet-152 layout at 224 px, untrained), a
budget in MiB of tensors (not a GPU's memory), pretraining on digits.
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
    memory_architecture: str = "resnet152"
    memory_image_size: int = 224
    memory_batches: tuple[int, ...] = (1, 2)
    memory_budget_mib: float = 4096.0
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


def step_peak_mib(model: nn.Module, batch: int, config: FinetuneConfig, device: torch.device) -> float:
    """Peak MiB of one training step of ``model`` on ``batch`` random ``(3, S, S)`` images (cross-entropy
    over ``model``'s 1000 classes), ``S = memory_image_size``."""
    size = config.memory_image_size
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(model.fc.out_features, (batch,), device=device)
    memory = training_step_memory(model, lambda m: nn.functional.cross_entropy(m(x), y))
    return mib(memory.peak)


def largest_batch(model: nn.Module, config: FinetuneConfig, device: torch.device) -> dict[str, Any]:
    """The step's peak at ``memory_batches``, its line ``fixed + B·per_sample`` (least squares, MiB) and the
    largest batch whose peak stays within ``memory_budget_mib``."""
    torch.manual_seed(0)
    model.train()
    peaks = {batch: step_peak_mib(model, batch, config, device) for batch in config.memory_batches}
    batches = torch.tensor(list(peaks), dtype=torch.float64)
    values = torch.tensor(list(peaks.values()), dtype=torch.float64)
    centred = batches - batches.mean()
    per_sample = float((centred * (values - values.mean())).sum() / centred.square().sum())
    fixed = float(values.mean() - per_sample * batches.mean())
    return {"peak_mib_by_batch": peaks, "fixed_mib": fixed, "per_sample_mib": per_sample,
            "largest_batch": max(0, int((config.memory_budget_mib - fixed) // per_sample))}


def memory_panel(config: FinetuneConfig, device: torch.device) -> dict[str, dict[str, Any]]:
    """:func:`largest_batch` of a randomly initialised ``memory_architecture`` and of its conversion."""
    import torchvision

    torch.manual_seed(0)
    resnet = getattr(torchvision.models, config.memory_architecture)(weights=None).to(device)
    momentum = convert_to_momentum(resnet, config.gamma, mode="reversible")
    return {name: largest_batch(model, config, device) for name, model in (("resnet", resnet), ("momentum", momentum))}


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
        memory = memory_panel(config, device)
    summary = {name: summary_entry("finetune_accuracy", per_seed[name]) for name in NETWORKS}
    return {
        "summary": summary,
        "largest_batch_in_budget": {name: m["largest_batch"] for name, m in memory.items()},
        "peak_mib_by_batch": {name: m["peak_mib_by_batch"] for name, m in memory.items()},
        "per_sample_mib": {name: m["per_sample_mib"] for name, m in memory.items()},
        "fixed_mib": {name: m["fixed_mib"] for name, m in memory.items()},
        "batch_gain": memory["resnet"]["per_sample_mib"] / memory["momentum"]["per_sample_mib"],
        "memory_budget_mib": config.memory_budget_mib,
        "memory_model": f"{config.memory_architecture}, {config.memory_image_size} px",
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
        peaks, largest = results["peak_mib_by_batch"][name], results["largest_batch_in_budget"][name]
        line = right.plot([int(b) for b in peaks], list(peaks.values()), "o",
                          label=f"{label}: {results['per_sample_mib'][name]:.1f} MiB/sample, largest batch {largest}")
        batches = [1, max(largest, 1)]
        right.plot(batches, [results["fixed_mib"][name] + b * results["per_sample_mib"][name] for b in batches],
                   "--", color=line[0].get_color())
    right.axhline(results["memory_budget_mib"], color="k", ls=":", label="budget")
    right.set_xscale("log", base=2)
    right.set_yscale("log")
    right.set_xlabel("batch size")
    right.set_ylabel("peak training-step memory (MiB)")
    gain = results.get("batch_gain", 0)
    right.set_title(f"(b) {results.get('memory_model', '')}: {gain:.1f}× less memory per sample", fontsize=10)
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
           "batch_size": 8, "memory_architecture": "resnet18", "memory_image_size": 64, "memory_budget_mib": 100.0,
           "generated_per_class": 6, "threads": 1},
    needs_data_dir=FOLDER_LAYOUT,
))
