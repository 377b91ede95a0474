"""Helpers the experiments share: threads, learning-rate schedules, trajectories of tied networks,
one classification training loop (the trainer's step on in-memory batches), and one training-memory
probe. Public revnets API only."""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm import tqdm

from ..memory import StorageTracker
from ..memory import mib as memory_mib
from ..models.layers import BasicBlock
from ..nn import MomentumNet
from ..training.data import InMemoryBatches, on_device
from ..training.devices import resolve_device as resolve_device
from ..training.step import training_step


@contextlib.contextmanager
def threads(count: int | None) -> Iterator[None]:
    """Run the block with ``count`` intra-op threads (``None``: leave as is), restoring the old value.

    The toy experiments use one thread: their tensors are tiny, so a second thread only adds
    synchronisation, and it is immune to contention with other processes on a shared machine.
    """
    old = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def step_decay(step: int, total: int, milestones: Sequence[tuple[float, float]] = ()) -> float:
    """Learning-rate factor at ``step``: the product of every ``factor`` whose ``fraction·total`` is passed.

    ``((0.5, 0.5), (0.75, 0.1))`` halves the rate at 50 % of the steps and divides it by 10 more at 75 %
    (the ResNet schedule of Sander et al.'s nested-rings script).
    """
    factor = 1.0
    for fraction, multiplier in milestones:
        if step >= int(fraction * total):
            factor *= multiplier
    return factor


def cosine(step: int, total: int) -> float:
    """Cosine learning-rate factor ``½(1 + cos(π·step/total))``."""
    return 0.5 * (1 + math.cos(math.pi * step / max(total, 1)))


def bar(total: int, desc: str) -> tqdm:
    """A progress bar on stderr, shown only on a terminal."""
    return tqdm(total=total, desc=desc, unit="step", disable=None, leave=False)


@torch.no_grad()
def tied_trajectory(function: nn.Module, gamma: float, x0: Tensor, depth: int, *args) -> list[Tensor]:
    """Positions ``x_0 … x_depth`` of the tied Momentum ResNet ``v ← γv + (1−γ)f(x); x ← x + v``
    (γ = 0: the ResNet ``x ← x + f(x)``), from ``v_0 = 0``; ``args`` reach ``f``.

    One single-layer :class:`~revnets.MomentumNet` is applied ``depth`` times to the full state
    ``(x, v)`` (``forward_state``), which is what a depth-``depth`` network with the same function at
    every layer computes.
    """
    step = MomentumNet([function], float(gamma), mode="autograd")
    state = step.init_state(x0)
    positions = [x0.clone()]
    for _ in range(depth):
        state = step.forward_state(state, *args)
        positions.append(state[0].clone())
    return positions


# --------------------------------------------------------------------------------------------------
# Classification


def dataset_tensors(dataset: Dataset, limit: int | None = None) -> tuple[Tensor, Tensor]:
    """All ``(image, label)`` items of a (small) dataset stacked: ``x (N, ...)``, ``y (N,)`` int64."""
    count = len(dataset) if limit is None else min(limit, len(dataset))
    items = [dataset[i] for i in range(count)]
    return torch.stack([x for x, _ in items]), torch.as_tensor([int(y) for _, y in items], dtype=torch.int64)


def stratified_subset(labels: Tensor, fraction: float, generator: torch.Generator) -> Tensor:
    """Indices of a random ``fraction`` of each class (at least one per class), sorted."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1]; got {fraction}")
    chosen = []
    for label in labels.unique():
        members = (labels == label).nonzero().flatten()
        keep = max(1, round(fraction * len(members)))
        chosen.append(members[torch.randperm(len(members), generator=generator)[:keep]])
    return torch.cat(chosen).sort().values


@dataclass
class TrainSettings:
    """One classification training run: SGD with momentum and a cosine (or constant) learning rate."""

    steps: int
    batch_size: int
    lr: float
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # "cosine" | "constant"
    augment: bool = False
    eval_batch_size: int = 500


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy of ``model`` (eval mode) on ``(x, y)``."""
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(x), batch_size):
        logits = model(x[start:start + batch_size].to(device))
        correct += (logits.argmax(1).cpu() == y[start:start + batch_size]).sum().item()
    return correct / len(x)


def train_classifier(
    model: nn.Module,
    train: tuple[Tensor, Tensor],
    settings: TrainSettings,
    *,
    seed: int,
    penalty: Callable[[], Tensor] | None = None,
    desc: str = "train",
) -> list[float]:
    """Train ``model`` with cross-entropy on ``train = (x (N, ...), y (N,))`` for ``settings.steps``
    minibatch steps; returns the loss of every step. ``penalty()`` is added to the loss.

    SGD (momentum, weight decay) with ``lr·½(1 + cos(π t/T))`` (or constant), one
    :func:`~revnets.training.step.training_step` per batch; the batches (:class:`InMemoryBatches`,
    reshuffled every pass) and the optional crop + flip augmentation drawn from one generator seeded
    with ``seed``.
    """
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum,
                                weight_decay=settings.weight_decay)
    schedule = (torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: cosine(step, settings.steps))
                if settings.schedule == "cosine" else None)
    batches = on_device(InMemoryBatches(*train, settings.batch_size, generator), device,
                        augment=generator if settings.augment else None)

    def loss_fn(x: Tensor, y: Tensor) -> Tensor:
        loss = nn.functional.cross_entropy(model(x), y)
        return loss if penalty is None else loss + penalty()

    losses = []
    model.train()
    with bar(settings.steps, desc) as progress:
        for x, y in itertools.islice(batches, settings.steps):
            losses.append(training_step(optimizer, loss_fn, x, y, schedule=schedule).item())
            progress.update()
    return losses


# --------------------------------------------------------------------------------------------------
# Memory


@dataclass
class StepMemory:
    """Memory of one training step (forward + backward): the peak of live tensor bytes created inside
    it (:class:`revnets.memory.StorageTracker`, any device), the CUDA allocator's peak above the
    bytes allocated before the step (``None`` on CPU), and the step's wall time."""

    peak_bytes: int
    cuda_peak_bytes: int | None
    seconds: float

    @property
    def peak(self) -> int:
        """The CUDA allocator's peak where it was measured, else the peak of live tensor bytes."""
        return self.peak_bytes if self.cuda_peak_bytes is None else self.cuda_peak_bytes


def peak_memory(work: Callable[[], object], device: torch.device) -> StepMemory:
    """Run ``work()`` and measure it: peak live tensor bytes created inside it (StorageTracker), the
    CUDA allocator's peak above what was allocated before (``None`` off CUDA), and its wall time."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    with StorageTracker() as tracker:
        work()
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    cuda_peak = torch.cuda.max_memory_allocated(device) - base if cuda else None
    return StepMemory(tracker.peak_bytes, cuda_peak, seconds)


def training_step_memory(model: nn.Module, loss_fn: Callable[[nn.Module], Tensor]) -> StepMemory:
    """:func:`peak_memory` of one step ``loss_fn(model).backward()``; gradients are set to ``None``
    before and after, so that their creation is counted the same way for every model."""
    model.zero_grad(set_to_none=True)
    memory = peak_memory(lambda: loss_fn(model).backward(), next(model.parameters()).device)
    model.zero_grad(set_to_none=True)
    return memory


def mib(n: float | None) -> float | None:
    """:func:`revnets.memory.mib`, with ``None`` (not measured) staying ``None``."""
    return None if n is None else memory_mib(n)


# --------------------------------------------------------------------------------------------------
# Small image classifiers (plain PyTorch around the public revnets modules)


class ConvBranch(nn.Module):
    """The residual branch of a basic block: ``BN(conv(ReLU(BN(conv(x)))))``, 3×3 convolutions, shape kept."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


def cifar_resnet(blocks_per_stage: int, in_channels: int, num_classes: int,
                 channels: Sequence[int] = (16, 32, 64)) -> nn.Sequential:
    """He et al.'s (2016) CIFAR ResNet-(6n+2): 3×3 stem, three stages of ``n`` basic blocks
    (16, 32, 64 channels, strides 1, 2, 2; the zoo's :class:`~revnets.models.layers.BasicBlock`), global
    average pooling, linear head."""
    layers: list[nn.Module] = [nn.Conv2d(in_channels, channels[0], 3, padding=1, bias=False),
                               nn.BatchNorm2d(channels[0]), nn.ReLU()]
    previous = channels[0]
    for index, width in enumerate(channels):
        for block in range(blocks_per_stage):
            layers.append(BasicBlock(previous, width, 2 if index and not block else 1))
            previous = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(previous, num_classes)]
    return nn.Sequential(*layers)


def momentum_classifier(in_channels: int, num_classes: int, *, channels: int, depth: int, gamma: float,
                        mode: str = "reversible") -> nn.Sequential:
    """Stem (3×3 conv, BN, ReLU) → :class:`~revnets.MomentumNet` of ``depth`` :class:`ConvBranch`
    functions with momentum ``gamma`` → global average pooling → linear head. ``γ = 0`` is the ResNet
    with the same branches (run with ``mode="autograd"``, since it is not invertible)."""
    stack = MomentumNet([ConvBranch(channels) for _ in range(depth)], gamma,
                        mode="autograd" if gamma == 0 else mode)
    return nn.Sequential(
        nn.Conv2d(in_channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(),
        stack, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes),
    )


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
