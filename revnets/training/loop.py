"""The training loop: a zoo model on an image dataset, per-epoch evaluation, checkpoints that resume
bit for bit, metrics as they happen, and a clean stop on Ctrl-C or SIGTERM.

:func:`train` starts a run, :func:`resume` continues the run of a directory from its newest
checkpoint with its saved configuration. On CPU a resumed run ends with bitwise the weights of an
uninterrupted one: the checkpoint holds the weights and buffers, the optimizer, schedule and scaler
states, every random generator's state and the position in the data order (see
:mod:`revnets.training.checkpoint` and :mod:`revnets.training.data`).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import platform
import random
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.utils.data import DataLoader

from ..models import create_model
from . import checkpoint as ckpt
from . import distributed
from .config import RUNTIME_FIELDS, TrainConfig
from .data import Datasets, augmentation, evaluation_loader, fetch_dataset, load_datasets, on_device, training_loader
from .devices import autocast, grad_scaler, resolve_device
from .metrics import EpochMetrics, MetricsLog, PeakMemory, summary_table, tensorboard_writer
from .step import training_loss, training_step

Progress = Callable[[int, int, int, float], None]

#: Checkpoints hold full tensors named by parameter: the same files for 1 process, DDP or FSDP, on CPU.
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


class Interrupted(Exception):
    """The run stopped on a signal after writing a checkpoint; ``str()`` says how to resume it."""

    def __init__(self, out: Path | None, signal_name: str, step: int):
        self.out, self.signal_name, self.step = out, signal_name, step
        where = (f"checkpoint written to {out}/checkpoints; resume with: revnets train --resume {shlex.quote(str(out))}"
                 if out is not None else "no run directory, nothing saved")
        super().__init__(f"stopped by {signal_name} after step {step}: {where}")


def build_model(config: TrainConfig, channels: int, classes: int) -> nn.Module:
    """``config.model`` for ``channels``-channel images and ``classes`` classes, in ``config.mode``."""
    try:
        model = create_model(config.model, num_classes=classes, in_channels=channels, **config.model_options)
    except TypeError as error:
        raise ValueError(f"model {config.model!r} does not take the options {config.model_options}: {error}") from None
    model.set_mode(config.mode)
    if config.smoothness and not callable(getattr(model, "smoothness_penalty", None)):
        raise ValueError(f"smoothness={config.smoothness}: model {config.model!r} has no smoothness_penalty() "
                         "(only Chang et al.'s hamiltonian/midpoint/leapfrog networks do)")
    return model


def build_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD (``momentum``) or AdamW, with ``weight_decay``, at ``lr``."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def lr_factor(config: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """The learning rate after ``s`` steps as a fraction of ``lr``: a linear warm-up over
    ``warmup_epochs``, then the ``schedule`` (cosine to 0 over the remaining steps, multistep, constant)."""
    total = config.epochs * steps_per_epoch
    warmup = min(total, round(config.warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if config.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
        if config.schedule == "multistep":
            return config.lr_decay ** sum(step >= m * steps_per_epoch for m in config.milestones)
        return 1.0

    return factor


def evaluate(model: nn.Module, loader: DataLoader, *, device: torch.device | None = None,
             precision: str = "32", lockstep: bool = False) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` (eval mode, no graph) over ``loader``, summed over
    the processes of a distributed run (each evaluates its own share).

    ``lockstep``: every process makes as many forward calls as the one with the most batches (a
    sharded model gathers its parameters in every forward, a collective), with empty batches at the end.
    """
    device = next(model.parameters()).device if device is None else device
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    calls = int(distributed.all_max(len(loader), device)) if lockstep else len(loader)
    with torch.no_grad(), autocast(precision, device):
        batches = iter(loader)
        for _ in range(calls):
            batch = next(batches, None)
            if batch is not None:
                images, labels = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
            else:  # this process's share is exhausted: an empty batch keeps the collectives in step
                images, labels = images[:0], labels[:0]
            logits = model(images).float()
            total_loss += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(1) == labels).sum())
            count += len(labels)
    total_loss, correct, count = distributed.all_sum([total_loss, correct, count], device)
    return total_loss / count, correct / count


@contextlib.contextmanager
def _stop_on_signals(flag: list[str]) -> Iterator[None]:
    """SIGINT and SIGTERM set ``flag`` (the loop stops at the end of the step, after a checkpoint);
    a second one acts at once. Outside the main thread signals are left alone."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    names = {signal.SIGINT: "SIGINT (Ctrl-C)", signal.SIGTERM: "SIGTERM"}
    previous = {number: signal.getsignal(number) for number in names}

    def handler(number, frame):
        flag.append(names[number])
        for other, old in previous.items():
            signal.signal(other, old)

    for number in names:
        signal.signal(number, handler)
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old)


class Trainer:
    """One run: everything :func:`train` and :func:`resume` share (see the module docs)."""

    def __init__(self, config: TrainConfig, out: Path | None, *, progress: Progress | None = None,
                 new_run: bool = True, overwrite: bool = False):
        self.config, self.out, self.progress = config, out, progress
        self.device = resolve_device(config.device, distributed.local_rank())
        if config.tensorboard:
            tensorboard_writer()  # before anything is written
        self.processes = distributed.join(self.device)
        if out is ckpt.NEW_RUN_DIR:
            self.out = out = Path(distributed.broadcast(
                str(ckpt.default_run_dir(config.model, config.dataset)) if self.processes.main else None,
                self.processes))
        self.writes = out is not None and self.processes.main
        if out is not None and new_run:
            self._create_run_dir(overwrite)
        pin = self.device.type == "cuda"
        torch.manual_seed(config.seed)
        np.random.seed(config.seed)
        random.seed(config.seed)
        if config.download:
            self._download()
        self.datasets: Datasets = load_datasets(config)
        world, rank = self.processes.world, self.processes.rank
        self.train_loader = training_loader(self.datasets, config, world=world, rank=rank, pin_memory=pin)
        self.eval_loader = evaluation_loader(self.datasets, config, world=world, rank=rank, pin_memory=pin)
        model = build_model(config, self.datasets.channels, self.datasets.classes).to(self.device)
        self.wrapped = distributed.wrap(model, config, self.processes, self.device)
        #: the model itself (inside DDP; sharded in place by FSDP), what checkpoints name parameters by
        self.model = getattr(self.wrapped, "module", self.wrapped)
        self.sharded = self.processes.world > 1 and config.parallel == "fsdp"
        # the training draws (dropout, augmentation) differ between processes, the weights do not
        torch.manual_seed(config.seed + rank)
        self.augment = torch.Generator().manual_seed(config.seed + rank)
        self.optimizer = build_optimizer(config, self.wrapped)
        self.steps_per_epoch = len(self.train_loader)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(config, self.steps_per_epoch))
        self.scaler = grad_scaler(config.precision, self.device)
        self.epoch, self.step_in_epoch, self.global_step = 1, 0, 0
        self.totals = [0.0, 0.0, 0.0]  # loss sum, correct, count of the epoch so far (this process)
        self.seconds = 0.0  # spent on this epoch before a resume
        self.metrics = (MetricsLog(out, title=f"{config.model} on {config.dataset} ({config.mode})",
                                   eval_split=config.eval_split, tensorboard=config.tensorboard)
                        if self.writes else None)

    def _create_run_dir(self, overwrite: bool) -> None:
        """The new run's directory and its ``config.json``; a refusal reaches every process."""
        error = None
        if self.writes:
            try:
                ckpt.prepare_run_dir(self.out, overwrite=overwrite)
                ckpt.atomic_write(self.out / ckpt.CONFIG_FILE, lambda path: path.write_text(
                    json.dumps({"config": self.config.to_dict(), "environment": environment()}, indent=1)))
            except ckpt.RunDirectoryError as refused:
                error = str(refused)
        error = distributed.broadcast(error, self.processes)
        if error is not None:
            raise ckpt.RunDirectoryError(error)

    def _download(self) -> None:
        """Fetch the dataset's archive on the main process while the others wait; a failure reaches all."""
        error = None
        if self.processes.main:
            try:
                fetch_dataset(self.config)
            except (OSError, ValueError) as failed:
                error = f"--download of {self.config.dataset} into {self.config.root} failed: {failed}"
        error = distributed.broadcast(error, self.processes)
        if error is not None:
            raise ValueError(error)

    # ----------------------------------------------------------------------------------------------

    def state(self) -> dict:
        """Everything but the weights that an uninterrupted run would carry to the next step."""
        rng = distributed.gather(ckpt.rng_states(self.augment, self.device), self.processes)
        totals = distributed.gather(list(self.totals), self.processes)
        return {
            "optimizer": get_optimizer_state_dict(self.model, self.optimizer, options=FULL),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng,
            "totals": totals,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "seconds": self.seconds,
            "world": self.processes.world,
        }

    def save(self) -> None:
        """Checkpoint the current step boundary (every process takes part; process 0 writes)."""
        weights, state = self.weights(), self.state()
        if self.writes:
            ckpt.save_checkpoint(self.out, self.global_step, weights, state)

    def weights(self) -> dict[str, Tensor]:
        """The full (unsharded) parameters and buffers, on the CPU, by name (every process takes part)."""
        return get_model_state_dict(self.model, options=FULL)

    def restore(self, folder: Path) -> None:
        """Continue from checkpoint ``folder``: weights, optimizer, schedule, scaler, position; the
        generators (and epoch totals) of each process if the number of processes is unchanged."""
        weights, state = ckpt.load_checkpoint(folder)
        set_model_state_dict(self.model, weights, options=FULL)
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=FULL)
        self.schedule.load_state_dict(state["schedule"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step, self.seconds = state["global_step"], state["seconds"]
        rank = self.processes.rank
        if state["world"] == self.processes.world:
            ckpt.set_rng_states(state["rng"][rank], self.augment, self.device)
            self.totals = list(state["totals"][rank])
        else:  # another number of processes: the same data order, fresh draws, the epoch's totals pooled
            torch.manual_seed(self.config.seed + rank + self.global_step)
            self.augment.manual_seed(self.config.seed + rank + self.global_step)
            pooled = [sum(column) for column in zip(*state["totals"])]
            self.totals = pooled if self.processes.main else [0.0, 0.0, 0.0]
        if self.metrics is not None:
            self.metrics.keep(self.epoch - 1)

    # ----------------------------------------------------------------------------------------------

    def run(self) -> list[EpochMetrics]:
        """Train to the last epoch from the current position; returns the metrics of every epoch."""
        config, stop = self.config, []
        history: list[EpochMetrics] = list(self.metrics.rows) if self.metrics is not None else []
        local_batch = config.batch_size // self.processes.world
        sampler = self.train_loader.sampler
        crop = augmentation(config) == "crop-flip"
        peak = PeakMemory(self.device)
        with _stop_on_signals(stop):
            while self.epoch <= config.epochs:
                started, first = time.perf_counter(), True
                self.wrapped.train()
                sampler.set_position(self.epoch, self.step_in_epoch * local_batch)
                with peak.epoch():
                    for images, labels in on_device(self.train_loader, self.device,
                                                    augment=self.augment if crop else None):
                        with peak.step(first):
                            self.step(images, labels)
                        first = False
                        if self.progress is not None:
                            self.progress(self.epoch, self.step_in_epoch, self.steps_per_epoch,
                                          self.totals[0] / self.totals[2])
                        if self._stop_requested(stop):
                            self.seconds += time.perf_counter() - started
                            self.save()
                            raise Interrupted(self.out if self.writes else None, stop[0] if stop else "a signal",
                                              self.global_step)
                        if config.checkpoint_every and self.global_step % config.checkpoint_every == 0:
                            self.save()
                row = self._end_epoch(self.seconds + time.perf_counter() - started, peak.bytes)
                history.append(row)
                self.save()
        if self.out is not None:
            weights = self.weights()
            if self.writes:
                ckpt.save_weights(weights, self.out / "model.safetensors")
                self.metrics.close()
        return history

    def step(self, images: Tensor, labels: Tensor) -> None:
        """One :func:`~revnets.training.step.training_step` (scaler, ``grad_clip``, schedule) of
        :func:`training_loss` on a batch already on the device (and augmented); the gradients it used
        stay in ``.grad`` until the next step (averaged over the processes under DDP)."""
        outputs: list[Tensor] = []

        def loss_fn(images: Tensor, labels: Tensor) -> Tensor:
            loss, logits = training_loss(self.wrapped, images, labels, self.config, penalised=self.model,
                                         device=self.device)
            outputs.append(logits.detach())
            return loss

        loss = training_step(self.optimizer, loss_fn, images, labels, scaler=self.scaler,
                             grad_clip=self.config.grad_clip, schedule=self.schedule, check=self._check_finite)
        self.step_in_epoch += 1
        self.global_step += 1
        self.totals[0] += loss.item() * len(labels)
        self.totals[1] += int((outputs[0].argmax(1) == labels).sum())
        self.totals[2] += len(labels)

    def _check_finite(self, loss: Tensor) -> None:
        """Stop the run, before the step's update, on a loss that is NaN or infinite."""
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the training loss became {float(loss)} at epoch {self.epoch}, "
                                     f"step {self.step_in_epoch + 1}")

    def _stop_requested(self, stop: list[str]) -> bool:
        """Whether any process received a stop signal (all processes stop at the same step)."""
        if self.processes.world == 1:
            return bool(stop)
        return distributed.all_sum([float(bool(stop))], self.device)[0] > 0

    def recalibrate_batchnorm(self) -> None:
        """BatchNorm statistics recomputed over the first ``bn_recalibration`` batches of this epoch's
        data order (without augmentation), as plain averages; a no-op for models without BatchNorm."""
        if not self.config.bn_recalibration or not any(
                isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.model.modules()):
            return
        self.train_loader.sampler.set_position(self.epoch, 0)
        batches = itertools.islice(self.train_loader, self.config.bn_recalibration)
        with autocast(self.config.precision, self.device):
            torch.optim.swa_utils.update_bn((images for images, _ in batches), self.model, self.device)

    def _end_epoch(self, seconds: float, peak_bytes: int) -> EpochMetrics:
        loss_sum, correct, count = distributed.all_sum(self.totals, self.device)
        self.recalibrate_batchnorm()
        eval_loss, eval_accuracy = evaluate(self.model, self.eval_loader, device=self.device,
                                            precision=self.config.precision, lockstep=self.sharded)
        peak_bytes = max(distributed.gather(peak_bytes, self.processes))
        row = EpochMetrics(self.epoch, self.global_step, loss_sum / count, correct / count, eval_loss, eval_accuracy,
                           self.schedule.get_last_lr()[0], seconds, count / seconds, int(peak_bytes))
        if self.metrics is not None:
            self.metrics.append(row)
        self.epoch, self.step_in_epoch, self.totals, self.seconds = self.epoch + 1, 0, [0.0, 0.0, 0.0], 0.0
        return row


def environment() -> dict:
    """Versions and hardware a run's numbers depend on."""
    return {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "platform": platform.platform(), "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "command": sys.argv}


def train(config: TrainConfig, out: Path | None = None, *, overwrite: bool = False,
          progress: Progress | None = None) -> tuple[nn.Module, list[EpochMetrics]]:
    """Train ``config.model`` on ``config.dataset``; returns the (unwrapped) model and one row of
    metrics per epoch.

    ``progress(epoch, step, steps_per_epoch, running_loss)`` is called after every step. With ``out``
    the run directory is written as it goes (:mod:`revnets.training.checkpoint`); an existing ``out`` is
    refused unless ``overwrite``; :data:`~revnets.training.checkpoint.NEW_RUN_DIR` asks for a new directory
    under ``runs/`` (then use :class:`Trainer` to learn its name: ``trainer.out``). Raises
    :class:`Interrupted` after checkpointing on SIGINT or SIGTERM.
    """
    trainer = Trainer(config, out, progress=progress, overwrite=overwrite)
    return trainer.model, trainer.run()


def saved_config(out: Path) -> TrainConfig:
    """The configuration of the run in ``out`` (its ``config.json``)."""
    if not out.is_dir():
        what = "does not exist" if not out.exists() else "is a file, not a run directory"
        raise ckpt.RunDirectoryError(f"--resume {out}: {out} {what}")
    if not ckpt.is_run_dir(out):
        raise ckpt.RunDirectoryError(f"--resume {out}: no revnets run there (no readable {ckpt.CONFIG_FILE} "
                                     "with the run's configuration)")
    try:
        return TrainConfig.from_dict(json.loads((out / ckpt.CONFIG_FILE).read_text())["config"])
    except ValueError as error:
        raise ckpt.RunDirectoryError(f"--resume {out}: its {ckpt.CONFIG_FILE} holds a configuration this version "
                                     f"of revnets cannot use: {error}") from None


def resume(out: Path, *, progress: Progress | None = None, **runtime) -> tuple[nn.Module, list[EpochMetrics]]:
    """Continue the run in ``out`` from its newest checkpoint, with its saved configuration.

    ``runtime`` may change only what does not change the result (:data:`RUNTIME_FIELDS`: ``device``,
    ``num_workers``, ``checkpoint_every``, ``tensorboard``). A run without a checkpoint starts over.
    """
    trainer = resumed_trainer(out, progress=progress, **runtime)
    return trainer.model, trainer.run()


def resumed_trainer(out: Path, *, progress: Progress | None = None, **runtime) -> Trainer:
    """The :class:`Trainer` of :func:`resume`, positioned at the newest checkpoint, not yet run."""
    unknown = sorted(set(runtime) - RUNTIME_FIELDS)
    if unknown:
        raise ValueError(f"a resumed run keeps its configuration; only {', '.join(sorted(RUNTIME_FIELDS))} may be "
                         f"given with --resume, not {', '.join(unknown)}")
    config = TrainConfig.from_dict({**saved_config(out).to_dict(), **runtime})
    trainer = Trainer(config, out, progress=progress, new_run=False)
    folder = ckpt.latest_checkpoint(out)
    if folder is not None:
        trainer.restore(folder)
    return trainer


__all__ = ["Interrupted", "Trainer", "build_model", "build_optimizer", "evaluate", "lr_factor", "resume",
           "resumed_trainer", "saved_config", "summary_table", "train"]
