"""Where a run computes and in which precision: ``--device`` and ``--precision``, with torch's own
pieces (``torch.autocast``, ``torch.amp.GradScaler``).

Precision ``32`` runs in float32. ``bf16`` runs the forward (and the reversible engine's recomputation,
which replays the forward's autocast state) under ``torch.autocast(dtype=torch.bfloat16)``; bfloat16
has float32's range, so no loss scaling. ``16-mixed`` uses float16 autocast and a ``GradScaler``, which
multiplies the loss before backward and skips the steps whose gradients overflowed. Parameters,
optimizer state and the reversible stacks' carried state stay float32 (autocast only casts the inputs
of matmul-like ops), so inversion is as accurate as in float32 up to the low-precision function values
it subtracts.
"""

from __future__ import annotations

import contextlib

import torch

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N, mps"


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The device ``--device name`` means: ``auto`` is CUDA if available (GPU ``local_rank`` under
    torchrun), then MPS, else CPU; an unavailable device is a clear error."""
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device must be one of {DEVICE_CHOICES}; got {name!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available here (torch {torch.__version__}, "
                             f"built with CUDA {torch.version.cuda}); use --device cpu or auto")
        index = local_rank if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices")
        return torch.device("cuda", index)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available here; use --device cpu or auto")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device must be one of {DEVICE_CHOICES}; got {name!r}")
    return device


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of ``--precision`` (``None``: float32, no autocast)."""
    return {"32": None, "bf16": torch.bfloat16, "16-mixed": torch.float16}[precision]


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The forward's autocast context for ``precision`` on ``device`` (a no-op for ``32``)."""
    dtype = autocast_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A ``GradScaler`` enabled for float16 only (disabled, it passes losses and steps through)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "16-mixed")
