"""Image datasets read from their standard released formats: CIFAR-10/100 (python), STL-10 (binary), image folders.

Every dataset yields ``(image, label)``: ``image`` a float32 tensor of shape ``(C, H, W)`` with values
in ``[0, 1]``, then passed through the optional ``transform``, then — if channel statistics are given —
normalised per channel, ``x_c ← (x_c − mean_c) / std_c``; ``label`` an ``int`` (−1 for unlabelled images).

CIFAR and STL-10 keep their uint8 pixels in one array (STL-10's memory-mapped from its file), and share
:class:`ArrayImageDataset`; an image folder is read image by image with Pillow.
"""

from __future__ import annotations

import pickle
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ._common import check_split, import_extra, normalization
from .download import ARCHIVES, locate_files

Transform = Callable[[Tensor], Tensor]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

CIFAR_SPLITS = ("train", "test")
STL10_SPLITS = ("train", "test", "unlabeled")
IMAGE_FOLDER_SPLITS = ("train", "val", "test")

_CIFAR_SHAPE = (3, 32, 32)
_STL10_SHAPE = (3, 96, 96)


class ImageDataset(Dataset[tuple[Tensor, int]], ABC):
    """Labelled images; item ``i`` is ``(image, label)`` as described in the module docstring.

    Args:
        labels: ``(N,)`` integer class indices into ``classes`` (−1: unlabelled).
        classes: class names, index ``k`` naming label ``k``.
        transform: applied to the ``[0, 1]`` image, before normalisation.
        mean: per-channel means, given with ``std`` or not at all; when given, images are normalised.
        std: per-channel standard deviations, given with ``mean`` or not at all.

    Attributes:
        labels: ``(N,)`` int64 tensor.
        classes: tuple of class names.
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        classes: Sequence[str],
        *,
        transform: Transform | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        if (mean is None) != (std is None):
            raise ValueError("pass both mean and std (per-channel statistics), or neither")
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
        self.classes = tuple(classes)
        self.transform = transform
        self._mean = None if mean is None else torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self._std = None if std is None else torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    @abstractmethod
    def _image(self, index: int) -> Tensor:
        """Image ``index`` as a float32 tensor of shape ``(C, H, W)`` with values in ``[0, 1]``."""

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = self._image(index)
        if self.transform is not None:
            image = self.transform(image)
        if self._mean is not None:
            image = (image - self._mean) / self._std
        return image, int(self.labels[index])


class ArrayImageDataset(ImageDataset):
    """Images held in one integer array ``images`` of shape ``(N, C, H, W)``; pixel ``v`` becomes ``v / max_value``.

    ``images`` may be any array-like indexable by image (a NumPy array, a view of a memory map).
    Other arguments as in :class:`ImageDataset`.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: Sequence[int] | np.ndarray,
        classes: Sequence[str],
        *,
        max_value: float = 255,
        transform: Transform | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        super().__init__(labels, classes, transform=transform, mean=mean, std=std)
        if images.ndim != 4 or len(images) != len(self.labels):
            raise ValueError(
                f"images must have shape (N, C, H, W) with N = {len(self.labels)} labels; got {images.shape}"
            )
        self.images = images
        self.max_value = max_value

    def _image(self, index: int) -> Tensor:
        return torch.from_numpy(np.array(self.images[index], dtype=np.float32)) / self.max_value


def _unpickle(path: Path, keys: Sequence[bytes]) -> dict[bytes, Any]:
    """The dict pickled in the CIFAR file ``path`` (byte-string keys), checked to hold ``keys``.

    CIFAR files are Python pickles: read only files from the official archive.
    """
    try:
        with path.open("rb") as file:
            content = pickle.load(file, encoding="bytes")
    except Exception as error:  # a damaged pickle can raise almost anything
        raise ValueError(f"cannot read the CIFAR python file {path} (truncated or corrupt?): {error}") from error
    if not isinstance(content, dict) or any(key not in content for key in keys):
        found = sorted(content) if isinstance(content, dict) else type(content).__name__
        raise ValueError(f"expected {path} to hold a pickled dict with keys {list(keys)}; found {found}")
    return content


def _read_cifar_batches(paths: Sequence[Path], label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 3, 32, 32)`` uint8 and labels ``(N,)`` int64 from CIFAR python batches, concatenated.

    Each batch holds ``b"data"``, uint8 of shape ``(n, 3072)``: one row per image, the 1024 red, then
    1024 green, then 1024 blue values, each channel row-major (CHW order), and ``label_key``, ``n`` labels.
    """
    images, labels = [], []
    for path in paths:
        batch = _unpickle(path, (b"data", label_key))
        data, batch_labels = np.asarray(batch[b"data"]), np.asarray(batch[label_key], dtype=np.int64)
        size = int(np.prod(_CIFAR_SHAPE))
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != size:
            raise ValueError(
                f"expected b'data' in {path} to be uint8 of shape (N, {size}) (3×32×32 images); "
                f"found {data.dtype} of shape {data.shape}"
            )
        if batch_labels.shape != (len(data),):
            raise ValueError(
                f"expected {len(data)} labels ({label_key!r}) in {path}, one per image; found {batch_labels.shape}"
            )
        images.append(data.reshape(-1, *_CIFAR_SHAPE))
        labels.append(batch_labels)
    return np.concatenate(images), np.concatenate(labels)


def _cifar(
    dataset: str,
    root: str | Path,
    batch_names: Sequence[str],
    meta_name: str,
    label_key: bytes,
    names_key: bytes,
    *,
    download: bool,
    transform: Transform | None,
    mean: tuple[float, ...] | None,
    std: tuple[float, ...] | None,
) -> ArrayImageDataset:
    """A CIFAR dataset from ``batch_names`` and the class names ``names_key`` of ``meta_name``."""
    *batch_paths, meta_path = locate_files(ARCHIVES[dataset], root, [*batch_names, meta_name], download=download)
    classes = [name.decode() for name in _unpickle(meta_path, (names_key,))[names_key]]
    images, labels = _read_cifar_batches(batch_paths, label_key)
    return ArrayImageDataset(images, labels, classes, transform=transform, mean=mean, std=std)


def cifar10(
    root: str | Path,
    split: str = "train",
    *,
    download: bool = False,
    transform: Transform | None = None,
    normalize: bool = False,
) -> ArrayImageDataset:
    """CIFAR-10 from ``<root>/cifar-10-batches-py`` (the python version): 50,000 train / 10,000 test images.

    Images ``(3, 32, 32)``, 10 classes; ``normalize`` uses :data:`CIFAR10_MEAN` and :data:`CIFAR10_STD`.
    ``download=True`` fetches and extracts the official archive into ``root`` if files are missing.
    """
    check_split("cifar10", split, CIFAR_SPLITS)
    batches = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    return _cifar(
        "cifar10",
        root,
        batches,
        "batches.meta",
        b"labels",
        b"label_names",
        download=download,
        transform=transform,
        **normalization(normalize, CIFAR10_MEAN, CIFAR10_STD),
    )


def cifar100(
    root: str | Path,
    split: str = "train",
    *,
    coarse: bool = False,
    download: bool = False,
    transform: Transform | None = None,
    normalize: bool = False,
) -> ArrayImageDataset:
    """CIFAR-100 from ``<root>/cifar-100-python`` (the python version): 50,000 train / 10,000 test images.

    Images ``(3, 32, 32)``; 100 fine classes, or with ``coarse=True`` the 20 superclasses.
    ``normalize`` uses :data:`CIFAR100_MEAN` and :data:`CIFAR100_STD`; ``download`` as in :func:`cifar10`.
    """
    check_split("cifar100", split, CIFAR_SPLITS)
    kind = "coarse" if coarse else "fine"
    return _cifar(
        "cifar100",
        root,
        [split],
        "meta",
        f"{kind}_labels".encode(),
        f"{kind}_label_names".encode(),
        download=download,
        transform=transform,
        **normalization(normalize, CIFAR100_MEAN, CIFAR100_STD),
    )


def _read_stl10_images(path: Path) -> np.ndarray:
    """STL-10 images ``(N, 3, 96, 96)`` uint8, memory-mapped from ``path``.

    The file stores each image channel by channel, each channel column-major: read as
    ``(N, 3, 96, 96)`` the last two axes are (width, height), so they are swapped (a view, no copy).
    """
    image_bytes = int(np.prod(_STL10_SHAPE))
    size = path.stat().st_size
    if size == 0 or size % image_bytes:
        raise ValueError(
            f"expected the size of {path} to be a positive multiple of {image_bytes} bytes "
            f"(uint8 images of 3×96×96); found {size} bytes (truncated?)"
        )
    stored = np.memmap(path, dtype=np.uint8, mode="r", shape=(size // image_bytes, *_STL10_SHAPE))
    return stored.transpose(0, 1, 3, 2)


def _read_stl10_labels(path: Path, n_images: int) -> np.ndarray:
    """STL-10 labels from ``path``: ``n_images`` bytes valued 1…10, returned as int64 0…9."""
    size = path.stat().st_size
    if size != n_images:
        raise ValueError(
            f"expected {path} to hold {n_images} bytes, one label per image of the matching _X.bin; found {size} bytes"
        )
    labels = np.fromfile(path, dtype=np.uint8).astype(np.int64)
    if labels.min() < 1 or labels.max() > 10:
        raise ValueError(f"expected labels 1…10 in {path}; found values {labels.min()}…{labels.max()}")
    return labels - 1


def stl10(
    root: str | Path,
    split: str = "train",
    *,
    download: bool = False,
    transform: Transform | None = None,
) -> ArrayImageDataset:
    """STL-10 from ``<root>/stl10_binary`` (the binary version): 5,000 train / 8,000 test / 100,000 unlabelled.

    Images ``(3, 96, 96)``, 10 classes (labels 0…9; −1 for split ``"unlabeled"``). The pixels stay in
    their files (memory-mapped). ``download`` as in :func:`cifar10` (the archive is 2.6 GB).
    """
    check_split("stl10", split, STL10_SPLITS)
    labelled = split != "unlabeled"
    names = [f"{split}_X.bin", *([f"{split}_y.bin"] if labelled else []), "class_names.txt"]
    images_path, *labels_path, classes_path = locate_files(ARCHIVES["stl10"], root, names, download=download)
    images = _read_stl10_images(images_path)
    labels = _read_stl10_labels(labels_path[0], len(images)) if labelled else np.full(len(images), -1)
    classes = classes_path.read_text().split()
    return ArrayImageDataset(images, labels, classes, transform=transform)


class ImageFolderDataset(ImageDataset):
    """Images in a tree ``<root>/<class name>/<image file>``, classes sorted by name, read with Pillow.

    Each image is converted to RGB and resized to ``image_size`` (``size`` or ``(height, width)``;
    bilinear, aspect ratio not kept): items are ``(3, height, width)``. Files Pillow does not know by
    their extension, and hidden files and folders, are skipped. ``mean``/``std`` as in :class:`ImageDataset`
    (for fine-tuning, the statistics the network was trained with).

    Raises:
        FileNotFoundError: if ``root`` is not a directory.
        ValueError: if ``root`` has no class folders, or a class folder has no images.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        image_size: int | tuple[int, int] = 224,
        transform: Transform | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        pil = import_extra("PIL.Image", "pillow")
        root = Path(root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"expected an image folder at {root}: one subfolder of images per class")
        height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
        if height < 1 or width < 1:
            raise ValueError(f"image_size must be positive; got {image_size}")
        self.size = (height, width)
        extensions = set(pil.registered_extensions())
        classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not classes:
            raise ValueError(f"expected one subfolder per class in {root} (<root>/<class name>/<images>); found none")
        self.files: list[Path] = []
        labels = []
        for label, name in enumerate(classes):
            files = sorted(
                p
                for p in (root / name).iterdir()
                if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in extensions
            )
            if not files:
                raise ValueError(f"expected image files in the class folder {root / name}; found none")
            self.files += files
            labels += [label] * len(files)
        super().__init__(labels, classes, transform=transform, mean=mean, std=std)

    def _image(self, index: int) -> Tensor:
        pil = import_extra("PIL.Image", "pillow")
        height, width = self.size
        with pil.open(self.files[index]) as image:
            rgb = image.convert("RGB").resize((width, height), pil.Resampling.BILINEAR)
        return torch.from_numpy(np.asarray(rgb, dtype=np.float32)).permute(2, 0, 1) / 255


def image_folder(
    root: str | Path,
    split: str = "train",
    *,
    image_size: int | tuple[int, int] = 224,
    transform: Transform | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> ImageFolderDataset:
    """An :class:`ImageFolderDataset` for ``split``: the tree ``<root>/<split>`` if that folder exists.

    Without split folders, ``root`` itself is the tree, read as the ``"train"`` split.
    """
    check_split("imagefolder", split, IMAGE_FOLDER_SPLITS)
    root = Path(root).expanduser()
    folder = root / split
    if not folder.is_dir():
        if split != "train":
            raise FileNotFoundError(f"expected the {split!r} split as an image folder at {folder}")
        folder = root
    return ImageFolderDataset(folder, image_size=image_size, transform=transform, mean=mean, std=std)
