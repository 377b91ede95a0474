"""The ``revnets`` typer application: one thin command per module of :mod:`revnets.cli`."""

from __future__ import annotations

import typer

from .catalog import datasets, models
from .reproduce import demo, reproduce
from .train import train

app = typer.Typer(help="Reversible residual networks: train zoo models, reproduce the papers' experiments.",
                  no_args_is_help=True)
app.command()(demo)
app.command()(reproduce)
app.command()(train)
app.command()(models)
app.command()(datasets)
