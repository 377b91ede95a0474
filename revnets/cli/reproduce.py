"""``revnets reproduce NAME`` and ``revnets demo``: the papers' experiments (:mod:`revnets.experiments`)."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from ..experiments import format_table, get_experiment, list_experiments
from ..experiments import reproduce as run_experiment


def _experiment_list() -> str:
    """One paragraph per registered experiment: its name and claim (the help text lists them all)."""
    return "\n\n".join(f"{name}: {get_experiment(name).claim}" for name in list_experiments())


def _default_out(name: str) -> Path:
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _run(name: str, out: Path, smoke: bool, command: str, **options) -> None:
    """Run ``name``, print its table and where the files went; bad settings become CLI errors."""
    try:
        record = run_experiment(name, out, smoke=smoke, command=command, **options)
    except (ValueError, FileNotFoundError) as error:
        raise typer.BadParameter(str(error)) from None
    typer.echo(f"\n{record['claim']}\n")
    typer.echo(format_table(record["summary"]))
    typer.echo(f"\n{record['wall_time_s']:.1f} s; written to {out}/ ({record['figure']}, results.json)")


def reproduce(
    name: str = typer.Argument(..., help="The experiment: " + ", ".join(list_experiments()) + "."),
    seeds: int = typer.Option(None, help="Number of seeds (0 … N−1); default: the experiment's own."),
    out: Path = typer.Option(None, help="Output folder for the figure and results.json (default: runs/NAME-TIME)."),
    smoke: bool = typer.Option(False, help="Tiny settings that run in seconds (for tests), not the paper's."),
    rings: int = typer.Option(None, help="rings only: number of rings, 2 or 4 (the figure uses 4)."),
    data_dir: Path = typer.Option(None, help="Dataset folder (cifar, finetune; small-data: CIFAR-10/STL-10)."),
) -> None:
    """Reproduce one experiment of the papers: writes a figure and results.json into --out and prints a table."""
    try:
        get_experiment(name)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="NAME") from None
    out = out or _default_out(name)
    flags = [f"--seeds {seeds}" if seeds is not None else "", "--smoke" if smoke else "",
             f"--rings {rings}" if rings is not None else "", f"--data-dir {data_dir}" if data_dir else ""]
    command = " ".join(["revnets reproduce", name, *filter(None, flags)])
    _run(name, out, smoke, command, seeds=seeds, rings=rings, data_dir=None if data_dir is None else str(data_dir))


reproduce.__doc__ = (
    "Reproduce one experiment of the papers: writes a figure and results.json (claim, config, seeds, "
    "environment, git commit, summary) into --out and prints a table.\n\nExperiments:\n\n" + _experiment_list()
)


def demo(
    out: Path = typer.Option(None, help="Output folder (default: runs/demo-TIME)."),
    seeds: int = typer.Option(1, help="Number of seeds."),
    steps: int = typer.Option(None, help="Adam steps of both networks (default: the rings protocol's own)."),
    smoke: bool = typer.Option(False, help="Tiny settings (seconds), for tests."),
) -> None:
    """Nested rings (Sander et al. 2021, Fig. 1), i.e. `revnets reproduce rings` with one seed: a ResNet
    against a Momentum ResNet, 15 tied steps, on generated data; writes the figure, prints both accuracies."""
    out = out or _default_out("demo")
    command = f"revnets demo --seeds {seeds}" + (f" --steps {steps}" if steps else "") + (" --smoke" if smoke else "")
    _run("rings", out, smoke, command, seeds=seeds, momentum_steps=steps, resnet_steps=steps)
