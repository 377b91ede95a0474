"""The ``revnets`` typer application: one thin command per module of :mod:`revnets.cli`."""

from __future__ import annotations

import typer

from .reproduce import demo, reproduce
from .train import train

app = typer.Typer(help="Reversible residual networks: train, reproduce the papers, compare.", no_args_is_help=True)
app.command()(demo)
app.command()(reproduce)
app.command()(train)
