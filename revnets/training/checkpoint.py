"""The run directory and its checkpoints: nothing a crash can corrupt, nothing that runs pickled code.

Layout of a run directory::

    config.json                 the resolved configuration (what --resume reads)
    metrics.csv, metrics.jsonl  one row per finished epoch, appended as it finishes
    curves.png                  redrawn after every epoch
    model.safetensors           the final weights (at the end of the run)
    checkpoints/latest          the name of the newest complete checkpoint
    checkpoints/step-00001234/  model.safetensors (weights and buffers) and state.pt (the rest)

A checkpoint is written into ``step-N.tmp``, every file fsynced, renamed to ``step-N``, and only then
named in ``latest`` (itself written to a temporary file, fsynced and renamed over the old one), so
``latest`` always names a complete checkpoint whatever the moment of a kill. ``state.pt`` holds only
tensors, numbers, strings, lists, tuples and dicts and is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

CONFIG_FILE = "config.json"
CHECKPOINTS = "checkpoints"

#: Passed as a run directory: a new one named by :func:`default_run_dir` (chosen by process 0).
NEW_RUN_DIR = Path("runs/<new run>")


class RunDirectoryError(ValueError):
    """The run directory cannot be used as asked (exists without --overwrite/--resume, holds no run...)."""


def default_run_dir(model: str, dataset: str, parent: Path = Path("runs")) -> Path:
    """A directory name used by no earlier run: ``runs/<model>-<dataset>-<UTC date and time>[-k]``."""
    stem = f"{model}-{dataset}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    candidate, k = parent / stem, 1
    while candidate.exists():
        k += 1
        candidate = parent / f"{stem}-{k}"
    return candidate


#: What a run directory holds, all written by revnets (see the module docs); ``--overwrite`` deletes these
#: and nothing else.
RUN_ENTRIES = frozenset({CONFIG_FILE, "metrics.csv", "metrics.jsonl", "curves.png", "model.safetensors",
                         CHECKPOINTS, "tensorboard"})
#: The folders :func:`save_checkpoint` writes (``step-N``, and ``step-N.tmp`` until complete).
_CHECKPOINT_NAME = re.compile(r"step-\d{8}(\.tmp)?")
#: The temporary files of :func:`atomic_write` that a kill can leave behind.
_TEMPORARY = re.compile(r"\..+\.tmp-\d+")


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` is a directory that a revnets run wrote: its ``config.json`` holds the run's
    ``config`` and ``environment`` (what :class:`~revnets.training.loop.Trainer` writes first)."""
    try:
        record = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and isinstance(record.get("config"), dict) and "environment" in record


def prepare_run_dir(out: Path, *, overwrite: bool) -> None:
    """Create ``out`` for a new run. A missing or empty directory is used as it is; a run directory
    is refused unless ``overwrite``, and then only what revnets wrote in it is deleted; anything else
    (a file, a link, a directory that holds no run, a run directory holding files revnets did not
    write) is refused with the reason, and never deleted.

    Raises:
        RunDirectoryError: ``out`` cannot be used, saying why and what to do.
    """
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        kind = "a symbolic link" if out.is_symlink() else "a file"
        raise RunDirectoryError(f"--out {out} is {kind}, not a run directory: revnets does not write over or "
                                f"delete what it did not create; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        if not is_run_dir(out):
            raise RunDirectoryError(f"--out {out} is a directory that holds no revnets run (no run's {CONFIG_FILE}) "
                                    f"and is not empty: revnets does not delete what it did not create; choose "
                                    f"another --out")
        if not overwrite:
            raise RunDirectoryError(f"--out {out} already holds a run: pass --resume {out} to continue it, "
                                    f"--overwrite to replace it, or another --out")
        foreign = sorted(entry.name for entry in out.iterdir()
                         if entry.name not in RUN_ENTRIES and not _TEMPORARY.fullmatch(entry.name))
        if foreign:
            raise RunDirectoryError(f"--overwrite deletes only what revnets wrote, and {out} also holds "
                                    f"{', '.join(foreign)}: move that elsewhere or choose another --out")
        for entry in out.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    out.mkdir(parents=True, exist_ok=True)


def fsync_directory(path: Path) -> None:
    """Make a rename inside ``path`` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as file:
        os.fsync(file.fileno())


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(temporary)`` next to ``path``, fsync it, rename it to ``path``, fsync the directory."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(temporary)
    fsync_file(temporary)
    os.replace(temporary, path)
    fsync_directory(path.parent)


def save_weights(weights: dict[str, Tensor], path: Path) -> None:
    """Named tensors (a model's state dict) to ``path`` in safetensors, atomically. Tensors that share
    memory (tied weights appear under each name) are written once per name."""
    from safetensors.torch import save_file

    seen: set[int] = set()
    unshared = {}
    for name, tensor in weights.items():
        pointer = tensor.untyped_storage().data_ptr()
        unshared[name] = tensor.detach().clone() if pointer in seen else tensor.detach().contiguous()
        seen.add(pointer)
    atomic_write(path, lambda temporary: save_file(unshared, str(temporary)))


# --------------------------------------------------------------------------------------------------
# Random number generators


def rng_states(augment: torch.Generator, device: torch.device) -> dict[str, Any]:
    """The state of every generator a training step may draw from."""
    numpy_state = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]],
        "augment": augment.get_state(),
    }
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state_all()
    elif device.type == "mps":
        states["mps"] = torch.mps.get_rng_state()
    return states


def set_rng_states(states: dict[str, Any], augment: torch.Generator, device: torch.device) -> None:
    """Restore what :func:`rng_states` returned."""
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    name, key, *rest = states["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), *rest))
    augment.set_state(states["augment"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state_all(states["cuda"])
    elif device.type == "mps" and "mps" in states:
        torch.mps.set_rng_state(states["mps"])


# --------------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(out: Path, step: int, weights: dict[str, Tensor], state: dict[str, Any]) -> Path:
    """Checkpoint ``step``: ``weights`` (named tensors) and ``state`` (see the module docs); older ones removed."""
    folder = out / CHECKPOINTS
    folder.mkdir(exist_ok=True)
    name = f"step-{step:08d}"
    temporary = folder / f"{name}.tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    save_weights(weights, temporary / "model.safetensors")
    torch.save(state, temporary / "state.pt")
    for file in temporary.iterdir():
        fsync_file(file)
    fsync_directory(temporary)
    final = folder / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(temporary, final)
    fsync_directory(folder)
    atomic_write(folder / "latest", lambda path: path.write_text(name))
    for other in folder.iterdir():  # older checkpoints and unfinished ones; nothing else
        if other.is_dir() and other.name != name and _CHECKPOINT_NAME.fullmatch(other.name):
            shutil.rmtree(other, ignore_errors=True)
    return final


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint of the run in ``out``, or ``None`` if it has none yet."""
    pointer = out / CHECKPOINTS / "latest"
    if not pointer.is_file():
        return None
    return out / CHECKPOINTS / pointer.read_text().strip()


def load_checkpoint(folder: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Checkpoint ``folder``'s weights (named tensors) and state; no pickled code is run."""
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors")), torch.load(folder / "state.pt", weights_only=True)
