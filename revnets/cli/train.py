"""``revnets train``: a zoo model on a dataset (a thin layer over :mod:`revnets.training`).

Every option left out keeps the value of the layer below it: ``--config`` file, then ``--recipe``, then
the defaults of :class:`revnets.training.TrainConfig`. Under ``torchrun`` (``torchrun --nproc-per-node N
-m revnets train ...``) each process runs this command and joins the process group.
"""

from __future__ import annotations

from pathlib import Path

import typer
from tqdm import tqdm

from ..training import RECIPES, Interrupted, RunDirectoryError, TrainConfig, resolve, summary_table
from ..training.checkpoint import NEW_RUN_DIR
from ..training.distributed import launched_by_torchrun
from ..training.loop import Trainer, resumed_trainer


def _milestones(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise typer.BadParameter(f"--milestones takes comma-separated epochs, e.g. 80,120,160; got {text!r}") from None


def train(
    model: str = typer.Option(None, help="A name of revnets.models.list_models(), e.g. momentum_resnet18."),
    dataset: str = typer.Option(None, help="A name of revnets.data.list_datasets() with images, e.g. digits."),
    root: str = typer.Option(None, help="Directory of a dataset read from disk (cifar10, stl10, imagefolder...)."),
    epochs: int = typer.Option(None, help="Passes over the training set [10]."),
    batch_size: int = typer.Option(None, help="Images per step, over all processes [128]."),
    lr: float = typer.Option(None, help="Peak learning rate [0.1]."),
    optimizer: str = typer.Option(None, help="sgd (momentum 0.9) or adamw [sgd]."),
    momentum: float = typer.Option(None, help="SGD momentum [0.9]."),
    weight_decay: float = typer.Option(None, help="Weight decay [5e-4]."),
    schedule: str = typer.Option(None, help="cosine, multistep or constant, after the warm-up [cosine]."),
    milestones: str = typer.Option(None, help="Epochs of the multistep schedule, e.g. 80,120,160."),
    lr_decay: float = typer.Option(None, help="Factor of the multistep schedule at each milestone [0.1]."),
    warmup_epochs: float = typer.Option(None, help="Epochs of linear learning-rate warm-up (fractions allowed) [0]."),
    label_smoothing: float = typer.Option(None, help="Label smoothing of the cross-entropy [0]."),
    grad_clip: float = typer.Option(None, help="Clip the global gradient norm to this value [none]."),
    smoothness: float = typer.Option(None, help="Weight of Chang et al.'s kernel smoothness penalty [0]."),
    augment: str = typer.Option(None, help="auto (crop+flip for CIFAR/STL/folders, none for digits), none, crop-flip."),
    bn_recalibration: int = typer.Option(None, help="Training batches over which BatchNorm statistics are "
                                         "recomputed after every epoch (0: keep running averages) [16]."),
    mode: str = typer.Option(None, help="Memory strategy: reversible, autograd or checkpoint [reversible]."),
    precision: str = typer.Option(None, help="32, bf16 (autocast) or 16-mixed (float16 autocast, loss scaling) [32]."),
    gamma: float = typer.Option(None, help="Momentum γ of momentum_* models (their default otherwise)."),
    h: float = typer.Option(None, help="Step size of hamiltonian/midpoint/leapfrog models."),
    limit: int = typer.Option(None, help="Train on the first LIMIT images only."),
    eval_split: str = typer.Option(None, help="Split evaluated after every epoch (e.g. val for an image folder)."),
    image_size: int = typer.Option(None, help="Side images of an image folder are resized to."),
    seed: int = typer.Option(None, help="Random seed (weights, data order, augmentation) [0]."),
    device: str = typer.Option(None, help="auto (CUDA if available), cpu, cuda, cuda:N or mps [auto]."),
    num_workers: int = typer.Option(None, help="Data-loading worker processes [0]."),
    checkpoint_every: int = typer.Option(None, help="Also checkpoint every N steps (0: every epoch only) [0]."),
    sync_bn: bool = typer.Option(None, "--sync-bn/--no-sync-bn", help="SyncBatchNorm under torchrun (DDP)."),
    parallel: str = typer.Option(None, help="Under torchrun: ddp or fsdp [ddp]."),
    tensorboard: bool = typer.Option(None, "--tensorboard/--no-tensorboard", help="Also log to TensorBoard."),
    recipe: str = typer.Option(None, help=f"A paper's protocol: {', '.join(RECIPES)}."),
    config: Path = typer.Option(None, help="A TOML or YAML file of options (keys as the option names)."),
    out: Path = typer.Option(None, help="Run directory [a new runs/<model>-<dataset>-<time>]."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out run directory."),
    resume: Path = typer.Option(None, help="Continue the run in this directory from its last checkpoint."),
) -> None:
    """Train a zoo model on an image dataset; writes checkpoints, metrics, curves and weights as it goes."""
    options = {
        "model": model, "dataset": dataset, "root": root, "epochs": epochs, "batch_size": batch_size, "lr": lr,
        "optimizer": optimizer, "momentum": momentum, "weight_decay": weight_decay, "schedule": schedule,
        "milestones": _milestones(milestones), "lr_decay": lr_decay, "warmup_epochs": warmup_epochs,
        "label_smoothing": label_smoothing, "grad_clip": grad_clip, "smoothness": smoothness, "augment": augment,
        "bn_recalibration": bn_recalibration, "mode": mode, "precision": precision, "limit": limit,
        "eval_split": eval_split, "seed": seed, "device": device, "num_workers": num_workers,
        "checkpoint_every": checkpoint_every, "sync_bn": sync_bn, "parallel": parallel, "tensorboard": tensorboard,
        "model_options": {key: value for key, value in (("gamma", gamma), ("h", h)) if value is not None} or None,
        "dataset_options": None if image_size is None else {"image_size": image_size},
    }
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
