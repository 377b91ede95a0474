"""The model registry: ``register_model``, ``create_model``, ``list_models`` (the timm pattern)."""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import re
from collections.abc import Callable

from torch import nn

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}
_SUMMARIES: dict[str, str] = {}


def register_model(builder: Callable[..., nn.Module] | None = None, *, name: str | None = None,
                   summary: str | None = None):
    """Register ``builder(num_classes=..., **kwargs) -> model`` under ``name`` (default: its ``__name__``),
    described by ``summary`` (default: the first paragraph of its docstring; ``revnets models`` prints it).

    Usable as a decorator (``@register_model``) or as a call (``register_model(fn, name="x")``).
    A name can be registered once.
    """

    def add(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or fn.__name__
        if key in _BUILDERS:
            raise ValueError(f"a model named {key!r} is already registered")
        _BUILDERS[key] = fn
        docstring = re.sub(r":\w+:`([^`]+)`", r"\1", inspect.getdoc(fn) or "")  # no Sphinx roles in a terminal
        _SUMMARIES[key] = summary or " ".join(docstring.split("\n\n")[0].split())
        return fn

    return add if builder is None else add(builder)


def list_models(pattern: str = "*") -> list[str]:
    """The registered model names matching the shell-style ``pattern`` (``"momentum_*"``), sorted."""
    return sorted(n for n in _BUILDERS if fnmatch.fnmatchcase(n, pattern))


def model_builder(name: str) -> Callable[..., nn.Module]:
    """The builder registered as ``name`` (its docstring says what the model is).

    Raises:
        ValueError: ``name`` is not registered (the message lists the closest names).
    """
    if name not in _BUILDERS:
        close = difflib.get_close_matches(name, _BUILDERS, n=5)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"unknown model {name!r}{hint} (revnets.models.list_models() or `revnets models` lists "
                         f"all {len(_BUILDERS)})")
    return _BUILDERS[name]


def model_summary(name: str) -> str:
    """One line saying what the registered model ``name`` is."""
    model_builder(name)
    return _SUMMARIES[name]


def create_model(name: str, num_classes: int = 10, **kwargs) -> nn.Module:
    """Build the registered model ``name`` with ``num_classes`` outputs; ``kwargs`` go to its builder.

    Raises:
        ValueError: ``name`` is not registered (the message lists the closest names).
    """
    return model_builder(name)(num_classes=num_classes, **kwargs)
