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

import os
import random
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


def prepare_run_dir(out: Path, *, overwrite: bool) -> None:
    """Create ``out`` for a new run; an existing ``out`` is refused unless ``overwrite``.

    With ``overwrite`` an existing file is removed, and so is a directory that holds a run (a
    ``config.json``) or nothing; any other directory is refused rather than deleted.
    """
    if out.exists() or out.is_symlink():
        kind = "a file" if not out.is_dir() else "a directory"
        if not overwrite:
            raise RunDirectoryError(f"--out {out} already exists ({kind}): pass --resume {out} to continue the run "
                                    f"in it, --overwrite to replace it, or another --out")
        if not out.is_dir():
            out.unlink()
        elif (out / CONFIG_FILE).is_file() or not any(out.iterdir()):
            shutil.rmtree(out)
        else:
            raise RunDirectoryError(f"--overwrite refuses to delete {out}: it is not a run directory "
                                    f"(no {CONFIG_FILE})")
    out.mkdir(parents=True)


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
    for other in folder.iterdir():
        if other.is_dir() and other.name != name:
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
