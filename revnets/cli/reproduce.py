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


def _command(words: list[str], options: dict[str, object]) -> str:
    """The command line as typed: ``words``, then the options given (``None``/``False`` ones left out)."""
    flags = [f"--{key.replace('_', '-')}" + ("" if value is True else f" {value}")
             for key, value in options.items() if value is not None and value is not False]
    return " ".join([*words, *flags])


def _run(name: str, out: Path, smoke: bool, command: str, overwrite: bool, **options) -> None:
    """Run ``name``, print its table and where the files went; bad settings become CLI errors."""
    try:
        record = run_experiment(name, out, smoke=smoke, command=command, overwrite=overwrite, **options)
    except (ValueError, FileNotFoundError) as error:
        raise typer.BadParameter(str(error)) from None
    typer.echo(f"\n{record['claim']}\n")
    typer.echo(format_table(record["summary"]))
    typer.echo(f"\n{record['wall_time_s']:.1f} s; written to {out}/ ({record['figure']}, results.json)")


def reproduce(
    name: str = typer.Argument(..., help="The experiment: " + ", ".join(list_experiments()) + "."),
    seeds: int = typer.Option(None, help="Number of seeds (0 … N−1); default: the experiment's own."),
    out: Path = typer.Option(None, help="Output folder for the figure and results.json: new, empty, or an earlier "
                             "run's with --overwrite.", show_default="a new runs/NAME-TIME"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write over the results.json and figure of an earlier "
                                   "run in --out (nothing else there is touched)."),
    smoke: bool = typer.Option(False, help="Tiny settings that run in seconds (for tests), not the paper's."),
    rings: int = typer.Option(None, help="rings only: number of rings, 2 or 4 (the figure uses 4)."),
    data_dir: Path = typer.Option(None, help="Dataset folder (cifar, finetune; small-data: CIFAR-10/STL-10)."),
    threads: int = typer.Option(None, min=1, help="Intra-op CPU threads (torch.set_num_threads) while it runs; "
                                "default: the experiment's own (1 for most: on a shared machine more threads wait "
                                "on each other)."),
) -> None:
    """Reproduce one experiment of the papers: writes a figure and results.json into --out and prints a table."""
    try:
        get_experiment(name)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="NAME") from None
    options = {"seeds": seeds, "rings": rings, "data_dir": None if data_dir is None else str(data_dir),
               "threads": threads}
    command = _command(["revnets", "reproduce", name], {**options, "smoke": smoke})
    _run(name, out or _default_out(name), smoke, command, overwrite, **options)


reproduce.__doc__ = (
    "Reproduce one experiment of the papers: writes a figure and results.json (claim, config, seeds, "
    "environment, git commit, summary) into --out and prints a table.\n\nExperiments:\n\n" + _experiment_list()
)


def demo(
    out: Path = typer.Option(None, help="Output folder: new, empty, or an earlier run's with --overwrite.",
                             show_default="a new runs/demo-TIME"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write over the results.json and figure of an earlier "
                                   "run in --out."),
    seeds: int = typer.Option(None, help="Number of seeds.", show_default="1"),
    steps: int = typer.Option(None, help="Adam steps of both networks.", show_default="the rings protocol's own"),
    smoke: bool = typer.Option(False, help="Tiny settings (seconds), for tests."),
) -> None:
    """Nested rings (Sander et al. 2021, Fig. 1), i.e. `revnets reproduce rings` with one seed: a ResNet
    against a Momentum ResNet, 15 tied steps, on generated data; writes the figure, prints both accuracies."""
    command = _command(["revnets", "demo"], {"seeds": seeds, "steps": steps, "smoke": smoke})
    _run("rings", out or _default_out("demo"), smoke, command, overwrite, seeds=1 if seeds is None else seeds,
         momentum_steps=steps, resnet_steps=steps)
