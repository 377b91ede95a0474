"""Small helpers shared by the dataset readers: optional imports, split checks, normalisation switches."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from types import ModuleType


def import_extra(module: str, package: str) -> ModuleType:
    """Import ``module`` (from the pip package ``package``), which ships with the ``revnets[data]`` extra.

    Raises:
        ImportError: naming the package and the extra when ``module`` is not installed.
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"this dataset needs {package!r}, which is not installed; "
            f"install it with `pip install 'revnets[data]'` (or `pip install {package}`)"
        ) from error


def check_split(dataset: str, split: str, accepted: Sequence[str]) -> None:
    """Raise ``ValueError`` listing the ``accepted`` splits unless ``split`` is one of them."""
    if split not in accepted:
        raise ValueError(f"split must be one of {', '.join(map(repr, accepted))} for {dataset!r}; got {split!r}")


def normalization(
    normalize: bool, mean: tuple[float, ...], std: tuple[float, ...]
) -> dict[str, tuple[float, ...] | None]:
    """``mean``/``std`` keyword arguments for an image dataset: the given statistics if ``normalize``, else none."""
    return {"mean": mean, "std": std} if normalize else {"mean": None, "std": None}
