"""Metrics as they happen: one row per epoch appended to ``metrics.csv`` and ``metrics.jsonl`` (each
flushed and fsynced), ``curves.png`` redrawn, optionally TensorBoard, and the peak memory of an epoch."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..memory import StorageTracker
from .checkpoint import atomic_write


@dataclass
class EpochMetrics:
    """One epoch: losses and accuracies (training ones averaged over the epoch's steps, as they were
    computed in train mode), the learning rate at its end, its duration, throughput and peak memory
    (:class:`PeakMemory`: ``torch.cuda.max_memory_allocated`` on CUDA, else the peak bytes of the live
    tensors created by a training step)."""

    epoch: int
    step: int
    train_loss: float
    train_accuracy: float
    eval_loss: float
    eval_accuracy: float
    lr: float
    seconds: float
    images_per_second: float
    peak_memory_bytes: int


FIELDS = [f.name for f in dataclasses.fields(EpochMetrics)]


class PeakMemory:
    """Peak memory of an epoch on ``device``: ``bytes`` after ``with peak.epoch():`` around the epoch and
    ``with peak.step(first):`` around each of its steps.

    On CUDA it is the allocator's peak over the whole epoch. Elsewhere it is the peak of live tensor
    bytes created during the epoch's first step (:class:`revnets.memory.StorageTracker`, which sees every
    ATen op and would slow every step down by a factor 1.5-4 on small models; the steps are alike).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.bytes = 0

    @contextlib.contextmanager
    def epoch(self) -> Iterator[None]:
        self.bytes = 0
        if self.device.type != "cuda":
            yield
            return
        torch.cuda.reset_peak_memory_stats(self.device)
        yield
        self.bytes = torch.cuda.max_memory_allocated(self.device)

    @contextlib.contextmanager
    def step(self, first: bool) -> Iterator[None]:
        if self.device.type == "cuda" or not first:
            yield
            return
        with StorageTracker() as tracker:
            yield
        self.bytes = tracker.peak_bytes


class MetricsLog:
    """The per-epoch metrics files of the run directory ``out`` (written by one process only)."""

    def __init__(self, out: Path, *, title: str, eval_split: str, tensorboard: bool):
        self.out, self.title, self.eval_split = out, title, eval_split
        self.rows: list[EpochMetrics] = []
        self.writer = tensorboard_writer()(str(out / "tensorboard")) if tensorboard else None

    def keep(self, epochs: int) -> None:
        """Keep the rows of the first ``epochs`` epochs only (a resumed run rewrites the later ones)."""
        rows = [row for row in read_metrics(self.out) if row["epoch"] <= epochs]
        self.rows = [EpochMetrics(**row) for row in rows]
        atomic_write(self.out / "metrics.jsonl", lambda path: path.write_text(
            "".join(json.dumps(row) + "\n" for row in rows)))
        atomic_write(self.out / "metrics.csv", lambda path: path.write_text(_csv(rows, header=True)))

    def append(self, row: EpochMetrics) -> None:
        self.rows.append(row)
        data = dataclasses.asdict(row)
        csv_path = self.out / "metrics.csv"
        _append(csv_path, _csv([data], header=not csv_path.exists()))
        _append(self.out / "metrics.jsonl", json.dumps(data) + "\n")
        self.draw()
        if self.writer is not None:
            for name in FIELDS[2:]:
                self.writer.add_scalar(name, data[name], row.epoch)
            self.writer.flush()

    def draw(self) -> None:
        """``curves.png``: losses and accuracies against epochs (matplotlib, Agg)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        epochs = [row.epoch for row in self.rows]
        figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
        left.plot(epochs, [row.train_loss for row in self.rows], "o-", label="train")
        left.plot(epochs, [row.eval_loss for row in self.rows], "o-", label=self.eval_split)
        left.set(xlabel="epoch", ylabel="loss", title=self.title)
        right.plot(epochs, [100 * row.train_accuracy for row in self.rows], "o-", label="train")
        right.plot(epochs, [100 * row.eval_accuracy for row in self.rows], "o-", label=self.eval_split)
        right.set(xlabel="epoch", ylabel="accuracy (%)")
        for axes in (left, right):
            axes.legend()
            axes.grid(alpha=0.3)
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        figure.tight_layout()
        atomic_write(self.out / "curves.png", lambda path: figure.savefig(path, dpi=120, format="png"))
        plt.close(figure)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def tensorboard_writer() -> type:
    """``torch.utils.tensorboard.SummaryWriter``, or a clear error if the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ModuleNotFoundError as error:
        raise ValueError("--tensorboard needs the tensorboard package (pip install tensorboard)") from error
    return SummaryWriter


def read_metrics(out: Path) -> list[dict]:
    """The rows of ``out/metrics.jsonl`` (empty if there is none)."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summary_table(rows: list[EpochMetrics], eval_split: str) -> str:
    """A plain-text table of the epochs, for the end of a run."""
    header = (f"{'epoch':>5}{'train loss':>12}{'train acc':>11}{eval_split + ' acc':>11}{'lr':>10}{'seconds':>9}"
              f"{'img/s':>9}{'peak MiB':>10}")
    lines = [header]
    for row in rows:
        lines.append(f"{row.epoch:>5}{row.train_loss:>12.4f}{100 * row.train_accuracy:>10.1f}%"
                     f"{100 * row.eval_accuracy:>10.1f}%{row.lr:>10.2e}{row.seconds:>9.1f}"
                     f"{row.images_per_second:>9.0f}{row.peak_memory_bytes / 2**20:>10.1f}")
    return "\n".join(lines)


def _csv(rows: list[dict], *, header: bool) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FIELDS)
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _append(path: Path, text: str) -> None:
    with open(path, "a") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
