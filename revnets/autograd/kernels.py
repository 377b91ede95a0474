"""Fused CPU kernels of exact mode: quantise, scale and add in one pass over memory; add and dequantise in
one pass. The C source is ``exact_kernels.c`` beside this module; :func:`cpu_kernels` compiles it once
with the system's C compiler and loads it with :mod:`ctypes`. Where a kernel does not apply (no
compiler, GPU tensors, denominators above 63, non-contiguous tensors) :mod:`revnets.autograd.exact`
runs the same arithmetic as separate torch operations, with the same bits.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

KERNEL_SOURCE = (Path(__file__).with_name("exact_kernels.c")).read_text()
"""The C source of the kernels (``exact_kernels.c``, shipped with the package)."""

KERNEL_SUFFIXES = {torch.float32: "f32", torch.float64: "f64"}  # the floating dtypes of the kernels
KERNEL_SIGNATURES = {  # argument types of each kind of kernel, "<kind>_f32" and "<kind>_f64"
    "apply": ("n", "p", "p", "p", "r", "r", "r", "p", "p", "p"),
    "undo": ("n", "p", "p", "p", "r", "r", "r", "p", "p", "p"),
    "add": ("n", "p", "p", "r", "p", "p", "p"),
    "sub": ("n", "p", "p", "r", "p", "p", "p"),
    "view": ("n", "p", "r", "p"),
}
KERNEL_MAX_DENOMINATOR = 63


def cpu_identity() -> str:
    """The processor's model and instruction-set flags (from ``/proc/cpuinfo`` where there is one)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    keys = ("model name", "flags", "Features", "CPU part")
    return "\n".join(sorted({line for line in lines if line.split(":")[0].strip() in keys}))


@functools.cache
def cpu_kernels() -> ctypes.CDLL | None:
    """The fused CPU kernels of :data:`KERNEL_SOURCE`, or ``None`` where they cannot be built.

    Compiled once with the system C compiler (``cc``, ``gcc`` or ``clang``; ``-O3 -march=native``) into
    ``$XDG_CACHE_HOME/revnets`` (``~/.cache/revnets``), named by a hash of the source, the compiler and
    the processor (model and instruction-set flags), so that a shared cache never serves a library
    built for another processor. ``None`` when no compiler is found or building or loading fails:
    callers then run the same arithmetic as separate torch operations (the same bits, slower).
    """
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        return None
    # vectorised, no FMA
    flags = ("-O3", "-march=native", "-fno-trapping-math", "-ffp-contract=off", "-fPIC", "-shared")
    key = hashlib.sha256("\0".join((KERNEL_SOURCE, compiler, *flags, platform.machine(), cpu_identity())).encode())
    key = key.hexdigest()
    directory = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "revnets"
    library = directory / f"exact-{key[:16]}.so"
    try:
        if not library.exists():
            directory.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=directory) as scratch:
                source, built = Path(scratch) / "exact.c", Path(scratch) / "exact.so"
                source.write_text(KERNEL_SOURCE)
                subprocess.run([compiler, *flags, str(source), "-o", str(built)], check=True, capture_output=True,
                               timeout=120)
                os.replace(built, library)  # atomic: concurrent builds leave one complete library
        kernels = ctypes.CDLL(str(library))
    except (OSError, subprocess.SubprocessError):
        return None
    types = {"n": ctypes.c_int64, "p": ctypes.c_void_p, "r": ctypes.c_double}
    for kind, signature in KERNEL_SIGNATURES.items():
        for suffix in ("f32", "f64"):
            function = getattr(kernels, f"{kind}_{suffix}")
            function.argtypes = tuple(types[t] for t in signature)
            function.restype = None
    return kernels


def fused_kernel(kind: str, q: torch.Tensor, head: torch.Tensor, increment: torch.Tensor, n: int, d: int):
    """The kernel ``kind`` ("apply" or "undo") for these operands, or ``None`` where it does not apply.

    It needs contiguous non-empty CPU tensors, a float32 or float64 increment and a contraction
    ``0 < |n| < d ≤ 63`` with ``(⌊2^47/|n|⌋ + 1)·d ≤ 2^51`` (:func:`kernel_ratio`).
    """
    suffix = KERNEL_SUFFIXES.get(increment.dtype)
    if suffix is None or not kernel_ratio(n, d) or not (q.is_cpu and increment.is_cpu and q.numel()):
        return None
    if increment.shape != q.shape or not (q.is_contiguous() and head.is_contiguous() and increment.is_contiguous()):
        return None
    kernels = cpu_kernels()
    return None if kernels is None else getattr(kernels, f"{kind}_{suffix}")


@functools.cache
def kernel_ratio(n: int, d: int) -> bool:
    """Whether the kernels of :func:`fused_kernel` take the contraction ``n/d``: ``0 < |n| < d ≤ 63`` and
    ``(⌊2^47/|n|⌋ + 1)·d ≤ 2^51``, so that every intermediate of their float64 arithmetic is an integer
    below ``2^52`` (``|q·n|, |q·d| ≤ 2^46·63``, heads ``< 2^51``), exact."""
    return 0 < abs(n) < d <= KERNEL_MAX_DENOMINATOR and ((1 << 47) // abs(n) + 1) * d <= 1 << 51


def integer_kernel(kind: str, dtype: torch.dtype, q: torch.Tensor, other: torch.Tensor | None = None):
    """The kernel ``kind`` ("add", "sub" or "view") making a ``dtype`` view from int64 ``q`` (and ``other``),
    or ``None`` unless they are contiguous non-empty CPU tensors of one shape and ``dtype`` is float32
    or float64."""
    suffix = KERNEL_SUFFIXES.get(dtype)
    if suffix is None or not (q.dtype == torch.int64 and q.is_cpu and q.is_contiguous() and q.numel()):
        return None
    if other is not None and not (other.dtype == torch.int64 and other.is_cpu and other.is_contiguous()
                                  and other.shape == q.shape):
        return None
    kernels = cpu_kernels()
    return None if kernels is None else getattr(kernels, f"{kind}_{suffix}")



def run_kernel(kernel, q: torch.Tensor, head: torch.Tensor, increment: torch.Tensor, factor: float, n: int, d: int,
                stat_count: int):
    out, head_out = torch.empty_like(q), torch.empty_like(head)
    stats = (ctypes.c_int64 * stat_count)()
    kernel(q.numel(), q.data_ptr(), head.data_ptr(), increment.data_ptr(), factor, float(n), float(d),
           out.data_ptr(), head_out.data_ptr(), stats)
    return out, head_out, tuple(stats)

