"""``revnets train``: a zoo model on a dataset."""

from __future__ import annotations

from pathlib import Path

import typer
from tqdm import tqdm

from ..experiments.train import TrainConfig
from ..experiments.train import train as train_model


def train(
    model: str = typer.Option(..., help="A name of revnets.models.list_models(), e.g. momentum_resnet18."),
    dataset: str = typer.Option(..., help="A name of revnets.data.list_datasets() with images, e.g. digits."),
    root: str = typer.Option(None, help="Directory of a dataset read from disk (cifar10, stl10, imagefolder...)."),
    epochs: int = typer.Option(10, help="Passes over the training set."),
    batch_size: int = typer.Option(128, help="Images per step."),
    lr: float = typer.Option(0.1, help="Initial SGD learning rate (cosine schedule to 0)."),
    weight_decay: float = typer.Option(5e-4, help="SGD weight decay."),
    mode: str = typer.Option("reversible", help="Memory strategy: reversible, autograd or checkpoint."),
    gamma: float = typer.Option(None, help="Momentum γ of momentum_* models (their default otherwise)."),
    h: float = typer.Option(None, help="Step size of hamiltonian/midpoint/leapfrog models."),
    limit: int = typer.Option(None, help="Train on the first LIMIT images only."),
    eval_split: str = typer.Option("test", help="Split evaluated after every epoch (e.g. val for an image folder)."),
    image_size: int = typer.Option(None, help="Side images of an image folder are resized to."),
    seed: int = typer.Option(0, help="Random seed (weights, shuffling)."),
    out: Path = typer.Option(Path("runs/latest"), help="Run directory: metrics.json, curves.png, model.safetensors."),
) -> None:
    """Train a zoo model on an image dataset, with a progress bar; writes metrics, curves and weights."""
    options = {key: value for key, value in (("gamma", gamma), ("h", h)) if value is not None}
    dataset_options = {} if image_size is None else {"image_size": image_size}
    config = TrainConfig(model, dataset, root, epochs, batch_size, lr, weight_decay=weight_decay, mode=mode,
                         seed=seed, limit=limit, eval_split=eval_split, model_options=options,
                         dataset_options=dataset_options)
    bars: dict[int, tqdm] = {}

    def progress(epoch: int, step: int, steps: int, loss: float) -> None:
        if epoch not in bars:
            for bar in bars.values():
                bar.close()
            bars[epoch] = tqdm(total=steps, desc=f"epoch {epoch}/{epochs}", unit="step")
        bars[epoch].update()
        bars[epoch].set_postfix(loss=f"{loss:.3f}")

    try:
        _, history = train_model(config, out, progress=progress)
    except (ValueError, FileNotFoundError) as error:
        raise typer.BadParameter(str(error)) from None
    finally:
        for bar in bars.values():
            bar.close()
    typer.echo(f"\n{'epoch':>5}{'train loss':>12}{'train acc':>11}{eval_split + ' acc':>10}{'seconds':>9}")
    for row in history:
        typer.echo(f"{row.epoch:>5}{row.train_loss:>12.4f}{100 * row.train_accuracy:>10.1f}%"
                   f"{100 * row.eval_accuracy:>9.1f}%{row.seconds:>9.1f}")
    typer.echo(f"run written to {out}/ (metrics.json, curves.png, model.safetensors)")
