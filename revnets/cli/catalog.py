"""``revnets models`` and ``revnets datasets``: what `revnets train --model` and ``--dataset`` accept."""

from __future__ import annotations

import typer

from ..data import dataset_info, list_datasets
from ..models import list_models
from ..models.registry import model_summary


def models(pattern: str = typer.Argument("*", help="Shell-style pattern of names, e.g. 'momentum_*'.")) -> None:
    """List the models of the zoo (the names `revnets train --model` takes), with what each one is."""
    names = list_models(pattern)
    if not names:
        raise typer.BadParameter(f"no model matches {pattern!r}; `revnets models` lists them all", param_hint="PATTERN")
    width = max(map(len, names))
    for name in names:
        typer.echo(f"{name.ljust(width)}  {model_summary(name)}")


def datasets() -> None:
    """List the datasets (the names `revnets train --dataset` takes): task, shape, and whether they need --root."""
    names = list_datasets()
    width = max(map(len, names))
    for name in names:
        info = dataset_info(name)
        where = "--root DIR" + (" (or --download)" if info.downloadable else "") if info.needs_root else "built in"
        typer.echo(f"{name.ljust(width)}  {info.task:<14}  {where:<27}  {info.description}")
