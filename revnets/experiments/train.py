"""Train a model of the zoo on an image dataset: SGD with momentum, cosine learning rate, per-epoch
evaluation, and a run directory with the metrics, the curves and the weights.

The run directory receives ``metrics.json`` (configuration, environment, one row per epoch),
``curves.png`` (loss and accuracies against epochs, matplotlib) and ``model.safetensors``
(the trained weights, loadable with ``safetensors.torch.load_model`` into
``create_model(config.model, ...)``).
"""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..data import dataset_info, load_dataset
from ..models import create_model


@dataclass(frozen=True)
class TrainConfig:
    """What to train, on what, and how.

    ``model_options`` go to the model's builder (``gamma``, ``init_velocity``, ``h``, ``exact``...),
    ``dataset_options`` to :func:`revnets.data.load_dataset` (``image_size`` of an image folder...);
    the model is evaluated on ``eval_split`` after every epoch; ``limit`` keeps the first ``limit``
    training images (``None``: all).
    """

    model: str
    dataset: str
    root: str | None = None
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    mode: str = "reversible"
    seed: int = 0
    limit: int | None = None
    eval_split: str = "test"
    model_options: dict = field(default_factory=dict)
    dataset_options: dict = field(default_factory=dict)


@dataclass
class EpochMetrics:
    epoch: int
    train_loss: float
    train_accuracy: float
    eval_loss: float
    eval_accuracy: float
    seconds: float


def _loaders(config: TrainConfig) -> tuple[DataLoader, DataLoader, int, int]:
    info = dataset_info(config.dataset)
    if info.task != "classification":
        raise ValueError(f"dataset {config.dataset!r} is a {info.task} task: the zoo's models classify images")
    if info.input_shape is not None and len(info.input_shape) != 3:
        raise ValueError(f"dataset {config.dataset!r} has inputs of shape {info.input_shape}, not images (C, H, W): "
                         "the zoo's models classify images")
    train_set: Dataset = load_dataset(config.dataset, config.root, split="train", **config.dataset_options)
    test_set: Dataset = load_dataset(config.dataset, config.root, split=config.eval_split, **config.dataset_options)
    channels = train_set[0][0].shape[0]
    classes = info.num_classes or len(getattr(train_set, "classes", ()))
    if not classes:
        raise ValueError(f"cannot tell the number of classes of {config.dataset!r}")
    if config.limit is not None:
        if config.limit < 1:
            raise ValueError(f"limit must be >= 1 (images kept for training) or None; got {config.limit}")
        train_set = Subset(train_set, range(min(config.limit, len(train_set))))
    generator = torch.Generator().manual_seed(config.seed)
    train = DataLoader(train_set, batch_size=config.batch_size, shuffle=True, generator=generator, drop_last=False)
    test = DataLoader(test_set, batch_size=config.batch_size)
    return train, test, channels, classes


def evaluate(model: nn.Module, loader: DataLoader) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` (eval mode, no graph) over ``loader``."""
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for images, labels in loader:
            logits = model(images)
            total_loss += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(1) == labels).sum())
            count += len(labels)
    return total_loss / count, correct / count


def train(
    config: TrainConfig,
    out: Path | None = None,
    *,
    progress: Callable[[int, int, int, float], None] | None = None,
) -> tuple[nn.Module, list[EpochMetrics]]:
    """Train ``config.model`` on ``config.dataset``; returns the model and one row of metrics per epoch.

    ``progress(epoch, step, steps_per_epoch, running_loss)`` is called after every step (a progress
    bar). With ``out``, the run directory is written (see the module docs).
    """
    if config.epochs < 1 or config.batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1; got epochs={config.epochs}, batch_size={config.batch_size}")
    torch.manual_seed(config.seed)
    train_loader, test_loader, channels, classes = _loaders(config)
    try:
        model = create_model(config.model, num_classes=classes, in_channels=channels, **config.model_options)
    except TypeError as error:
        raise ValueError(f"model {config.model!r} does not take the options {config.model_options}: {error}") from None
    model.set_mode(config.mode)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs * len(train_loader))
    history: list[EpochMetrics] = []
    for epoch in range(1, config.epochs + 1):
        started = time.perf_counter()
        model.train()
        total_loss, correct, count = 0.0, 0, 0
        for step, (images, labels) in enumerate(train_loader, 1):
            logits = model(images)
            loss = nn.functional.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the training loss became {float(loss)} at epoch {epoch}, step {step}")
            total_loss += loss.item() * len(labels)
            correct += int((logits.argmax(1) == labels).sum())
            count += len(labels)
            if progress is not None:
                progress(epoch, step, len(train_loader), total_loss / count)
        eval_loss, eval_accuracy = evaluate(model, test_loader)
        history.append(EpochMetrics(epoch, total_loss / count, correct / count, eval_loss, eval_accuracy,
                                    time.perf_counter() - started))
    if out is not None:
        write_run(out, config, model, history)
    return model, history


def write_run(out: Path, config: TrainConfig, model: nn.Module, history: list[EpochMetrics]) -> None:
    """``metrics.json``, ``curves.png`` and ``model.safetensors`` in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    from safetensors.torch import save_model

    out.mkdir(parents=True, exist_ok=True)
    metrics = {
        "config": dataclasses.asdict(config),
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "threads": torch.get_num_threads()},
        "epochs": [dataclasses.asdict(row) for row in history],
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    epochs = [row.epoch for row in history]
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.plot(epochs, [row.train_loss for row in history], "o-", label="train")
    left.plot(epochs, [row.eval_loss for row in history], "o-", label=config.eval_split)
    left.set(xlabel="epoch", ylabel="cross-entropy", title=f"{config.model} on {config.dataset}")
    right.plot(epochs, [100 * row.train_accuracy for row in history], "o-", label="train")
    right.plot(epochs, [100 * row.eval_accuracy for row in history], "o-", label=config.eval_split)
    right.set(xlabel="epoch", ylabel="accuracy (%)", title=f"mode={config.mode}")
    for axes in (left, right):
        axes.legend()
        axes.grid(alpha=0.3)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.tight_layout()
    figure.savefig(out / "curves.png", dpi=120)
    plt.close(figure)
    save_model(model, str(out / "model.safetensors"))
