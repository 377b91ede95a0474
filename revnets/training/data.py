"""Data for training: the datasets of a configuration, a data order that can be resumed mid-epoch,
and augmentation drawn from a generator of its own.

The data order of epoch ``e`` is ``torch.randperm`` seeded with ``seed + e`` (what
:class:`~torch.utils.data.DistributedSampler` does), so it needs no state: a resumed run knows it from
the epoch and the number of batches already taken. Process ``r`` of ``N`` takes every N-th image of
it, so global batch ``k`` is the same set of images whatever ``N``.

Augmentation runs on whole batches on the training device (:func:`on_device`), drawn from a
``torch.Generator`` that the checkpoints save: it does not depend on the data loader's worker
processes, and a resumed run draws the same crops and flips as an uninterrupted one.

The experiments' small datasets are held as tensors: :class:`InMemoryBatches` draws their
minibatches, and :func:`on_device` moves and augments them as it does the trainer's.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from ..data import dataset_info, load_dataset
from .config import TrainConfig

#: Datasets that ``augment="auto"`` crops and flips (natural images); digits are left as they are.
NATURAL_IMAGES = ("cifar10", "cifar100", "stl10", "imagefolder")


@dataclass
class Datasets:
    """The training and evaluation sets of a configuration, and what the model needs to know of them."""

    train: Dataset
    eval: Dataset
    channels: int
    classes: int


def load_datasets(config: TrainConfig) -> Datasets:
    """The training split (its first ``limit`` images) and ``eval_split`` of ``config.dataset``."""
    info = dataset_info(config.dataset)
    if info.task != "classification":
        raise ValueError(f"dataset {config.dataset!r} is a {info.task} task: the zoo's models classify images")
    if info.input_shape is not None and len(info.input_shape) != 3:
        raise ValueError(f"dataset {config.dataset!r} has inputs of shape {info.input_shape}, not images (C, H, W): "
                         "the zoo's models classify images")
    train_set: Dataset = load_dataset(config.dataset, config.root, split="train", **config.dataset_options)
    eval_set: Dataset = load_dataset(config.dataset, config.root, split=config.eval_split, **config.dataset_options)
    channels = train_set[0][0].shape[0]
    classes = info.num_classes or len(getattr(train_set, "classes", ()))
    if not classes:
        raise ValueError(f"cannot tell the number of classes of {config.dataset!r}")
    if config.limit is not None:
        train_set = Subset(train_set, range(min(config.limit, len(train_set))))
    return Datasets(train_set, eval_set, channels, classes)


def fetch_dataset(config: TrainConfig) -> None:
    """Download ``config.dataset``'s official archive into ``config.root`` if its files are missing."""
    load_dataset(config.dataset, config.root, split="train", download=True, **config.dataset_options)


class ResumableSampler(DistributedSampler):
    """:class:`DistributedSampler` (shuffled, seeded, this process's share) that can skip the first
    ``skip`` indices of its epoch: the position of a resumed run inside the epoch."""

    def __init__(self, dataset: Dataset, *, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.skip = 0

    def set_position(self, epoch: int, skip: int) -> None:
        """Epoch ``epoch`` (its data order), its first ``skip`` indices of this process already taken."""
        self.set_epoch(epoch)
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.skip :])

    def __len__(self) -> int:
        return super().__len__() - self.skip


def training_loader(datasets: Datasets, config: TrainConfig, *, world: int, rank: int,
                    pin_memory: bool) -> DataLoader:
    """Batches of ``batch_size / world`` images for process ``rank``, in the resumable order."""
    if config.batch_size % world:
        raise ValueError(f"batch_size {config.batch_size} (the global batch) must be divisible by the number of "
                         f"processes, {world}")
    sampler = ResumableSampler(datasets.train, num_replicas=world, rank=rank, seed=config.seed)
    # a generator of its own: creating the loader's iterator must not draw from the global generator
    return DataLoader(datasets.train, batch_size=config.batch_size // world, sampler=sampler,
                      num_workers=config.num_workers, pin_memory=pin_memory, generator=torch.Generator())


def evaluation_loader(datasets: Datasets, config: TrainConfig, *, world: int, rank: int,
                      pin_memory: bool) -> DataLoader:
    """Process ``rank``'s share of the evaluation set (every ``world``-th image, none repeated)."""
    shard = datasets.eval if world == 1 else Subset(datasets.eval, range(rank, len(datasets.eval), world))
    return DataLoader(shard, batch_size=max(1, config.batch_size // world), num_workers=config.num_workers,
                      pin_memory=pin_memory)


def augmentation(config: TrainConfig) -> str:
    """The augmentation ``config`` asks for: ``"crop-flip"`` or ``"none"`` (``auto`` resolved per dataset)."""
    if config.augment == "auto":
        return "crop-flip" if config.dataset in NATURAL_IMAGES else "none"
    return config.augment


def crop_flip(images: Tensor, generator: torch.Generator) -> Tensor:
    """Each image of the batch ``(B, C, H, W)`` shifted by a random crop of the image zero-padded by
    ``H // 8`` pixels (4 for CIFAR's 32), then flipped left-right with probability 1/2.

    The offsets and flips are drawn on the CPU from ``generator``; the images stay on their device.
    """
    batch, _, height, width = images.shape
    pad = max(1, height // 8)
    offsets = torch.randint(0, 2 * pad + 1, (2, batch), generator=generator).to(images.device)
    flips = torch.rand(batch, generator=generator).lt(0.5).to(images.device)
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    rows = offsets[0, :, None] + torch.arange(height, device=images.device)  # (B, H)
    cols = offsets[1, :, None] + torch.arange(width, device=images.device)  # (B, W)
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    index = torch.arange(batch, device=images.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[index, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


def on_device(batches: Iterable[tuple[Tensor, Tensor]], device: torch.device, *,
              augment: torch.Generator | None = None) -> Iterator[tuple[Tensor, Tensor]]:
    """Each ``(inputs (B, ...), labels (B,))`` of ``batches`` moved to ``device`` (non-blocking), then,
    with ``augment``, cropped and flipped (:func:`crop_flip`: images ``(B, C, H, W)``) with draws from
    that generator."""
    for images, labels in batches:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        yield (images if augment is None else crop_flip(images, augment)), labels


class InMemoryBatches(Iterator[tuple[Tensor, Tensor]]):
    """Endless minibatches ``(x[index], y[index])`` of a dataset held as tensors ``x (N, ...)``,
    ``y (N, ...)``: ``min(batch_size, N)`` items each, in a random order of the ``N`` drawn from
    ``generator`` (``torch.randperm``, at creation), taken in turn; when fewer than a batch are left,
    they are dropped and a new order is drawn from ``generator``.

    The orders are all it draws from ``generator``; a caller may draw from it too between batches
    (the experiments' augmentation does, through :func:`on_device`), and the orders then depend on
    those draws.
    """

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, generator: torch.Generator):
        if len(x) != len(y) or not len(x) or batch_size < 1:
            raise ValueError(f"need as many inputs as targets, at least one, and batch_size >= 1; got {len(x)} "
                             f"inputs, {len(y)} targets, batch_size {batch_size}")
        self.x, self.y, self.generator = x, y, generator
        self.batch_size = min(batch_size, len(x))
        self.order, self.position = torch.randperm(len(x), generator=generator), 0

    def __next__(self) -> tuple[Tensor, Tensor]:
        if self.position + self.batch_size > len(self.x):
            self.order, self.position = torch.randperm(len(self.x), generator=self.generator), 0
        index = self.order[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return self.x[index], self.y[index]
