"""``revnets train``: a zoo model on a dataset (a thin layer over :mod:`revnets.training`).

The options are generated from the fields of :class:`revnets.training.TrainConfig` (name, type, help
text, accepted values and default are declared once, there). Every option left out keeps the value of
the layer below it: ``--config`` file, then ``--recipe``, then the defaults of ``TrainConfig``. Under
``torchrun`` (``torchrun --nproc-per-node N -m revnets train ...``) each process runs this command and
joins the process group.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from pathlib import Path
from typing import Any

import typer
from tqdm import tqdm

from ..training import RECIPES, Interrupted, RunDirectoryError, TrainConfig, resolve, summary_table
from ..training.checkpoint import NEW_RUN_DIR
from ..training.config import field_type
from ..training.distributed import launched_by_torchrun
from ..training.loop import Trainer, resumed_trainer

#: Options that are not fields of TrainConfig: entries of its option dicts, and how the run is set up.
_EXTRA_OPTIONS: dict[str, tuple[type, Any]] = {
    "gamma": (float, typer.Option(None, help="Momentum γ of momentum_* models.", show_default="the model's own")),
    "h": (float, typer.Option(None, help="Step size of hamiltonian/midpoint/leapfrog models.",
                              show_default="the model's own")),
    "image_size": (int, typer.Option(None, help="Side images of an image folder are resized to.",
                                     show_default="the images' own")),
    "recipe": (typing.Literal[tuple(RECIPES)], typer.Option(None, help="A paper's protocol, under the options given.",
                                                            show_default="none")),
    "config": (Path, typer.Option(None, help="A TOML, YAML or JSON file of options (keys as the option names), "
                                  "under the options given.", show_default="none")),
    "out": (Path, typer.Option(None, help="Run directory: a new one, an empty one, or with --overwrite an earlier "
                               "run's.", show_default="a new runs/<model>-<dataset>-<time>")),
    "overwrite": (bool, typer.Option(False, "--overwrite", help="Replace the run in --out: deletes what that run "
                                     "wrote, and refuses if --out holds anything else.")),
    "resume": (Path, typer.Option(None, help="Continue the run in this directory from its last checkpoint, with its "
                                  "saved configuration.", show_default="none")),
}


def _field_option(spec: dataclasses.Field) -> tuple[type, Any]:
    """The command-line type and ``typer.Option`` of a :class:`TrainConfig` field."""
    annotation, _ = field_type(spec.name)
    metadata = spec.metadata
    shown = metadata["shown"] or str(spec.default)
    if annotation is bool:
        flag = "--" + spec.name.replace("_", "-")
        return bool, typer.Option(None, f"{flag}/--no-{flag[2:]}", help=metadata["help"],
                                  show_default="on" if spec.default else "off")
    if typing.get_origin(annotation) is tuple:  # parsed by TrainConfig from "80,120,160"
        annotation = str
    if metadata["choices"] is not None:
        annotation = typing.Literal[metadata["choices"]]
    return annotation, typer.Option(None, help=metadata["help"], show_default=shown)


def _parameters() -> list[inspect.Parameter]:
    options = {spec.name: _field_option(spec) for spec in dataclasses.fields(TrainConfig) if spec.metadata["cli"]}
    options.update(_EXTRA_OPTIONS)
    return [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
            for name, (annotation, default) in options.items()]


def train(**options: Any) -> None:
    """Train a zoo model on an image dataset; writes checkpoints, metrics, curves and weights as it goes."""
    recipe, config, out, overwrite, resume = (options.pop(key) for key in ("recipe", "config", "out", "overwrite",
                                                                          "resume"))
    extras = {key: options.pop(key) for key in ("gamma", "h", "image_size")}
    options["model_options"] = {key: extras[key] for key in ("gamma", "h") if extras[key] is not None} or None
    options["dataset_options"] = None if extras["image_size"] is None else {"image_size": extras["image_size"]}
    given = {key: value for key, value in options.items() if value is not None}
    bars: dict[int, tqdm] = {}
    try:
        if resume is not None:
            if out is not None or overwrite or recipe is not None or config is not None:
                raise typer.BadParameter("--resume DIR continues the run in DIR with its saved configuration: "
                                         "--out, --overwrite, --recipe and --config cannot be given with it")
            trainer = resumed_trainer(resume, progress=lambda *a: _progress(bars, trainer, *a), **given)
        else:
            settings: TrainConfig = resolve(given, recipe=recipe, config_file=config)
            trainer = Trainer(settings, NEW_RUN_DIR if out is None else out, overwrite=overwrite,
                              progress=lambda *a: _progress(bars, trainer, *a))
        history = trainer.run()
    except Interrupted as stopped:
        _close(bars)
        if not launched_by_torchrun() or stopped.out is not None:
            typer.echo(f"\n{stopped}", err=True)
        raise typer.Exit(130) from None
    except (ValueError, FileNotFoundError, RunDirectoryError) as error:
        raise typer.BadParameter(str(error)) from None
    finally:
        _close(bars)
    if trainer.processes.main:
        typer.echo("\n" + summary_table(history, trainer.config.eval_split))
        typer.echo(f"run written to {trainer.out}/ (metrics.csv, metrics.jsonl, curves.png, model.safetensors, "
                   "checkpoints/)")


train.__signature__ = inspect.Signature(_parameters())  # what typer reads the options from


def _progress(bars: dict[int, tqdm], trainer: Trainer, epoch: int, step: int, steps: int, loss: float) -> None:
    """One progress bar per epoch, on the main process only."""
    if not trainer.processes.main:
        return
    if epoch not in bars:
        _close(bars)
        bars[epoch] = tqdm(total=steps, initial=step - 1, desc=f"epoch {epoch}/{trainer.config.epochs}", unit="step")
    bars[epoch].update()
    bars[epoch].set_postfix(loss=f"{loss:.3f}")


def _close(bars: dict[int, tqdm]) -> None:
    for bar in bars.values():
        bar.close()
    bars.clear()
