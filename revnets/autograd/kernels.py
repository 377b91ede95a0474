"""Fused CPU kernels of exact mode: quantise, scale and add in one pass over memory; add and dequantise in
one pass. They are ``torch.library`` operators of the namespace ``revnets`` (``torch.ops.revnets.exact_*``),
written in C++ in ``exact_kernels.cpp`` beside this module and split over threads with ``at::parallel_for``;
:func:`cpu_kernels` builds that source once with :func:`torch.utils.cpp_extension.load` and registers the
operators' fake (meta) kernels, so that they trace under ``torch.compile`` and pass
:func:`torch.library.opcheck`. Where a kernel does not apply (no compiler, GPU tensors, denominators above
63, non-contiguous tensors) :mod:`revnets.autograd.exact` runs the same arithmetic as separate torch
operations, with the same bits.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import platform
import shutil
import sysconfig
import warnings
from pathlib import Path

import torch

KERNEL_SOURCE_PATH = Path(__file__).with_name("exact_kernels.cpp")
"""The C++ source of the operators (``exact_kernels.cpp``, shipped with the package)."""

KERNEL_FLAGS = ("-O3", "-march=native", "-fno-trapping-math", "-ffp-contract=off", "-fopenmp")
"""Compiler flags: vectorised for this processor, no FMA (each product rounded as written), OpenMP for
``at::parallel_for`` (whose loop is inlined into the extension)."""

KERNEL_MAX_DENOMINATOR = 63
KERNEL_DTYPES = (torch.float32, torch.float64)  # the floating dtypes of the kernels
FUSED_OPERATORS = {"apply": "exact_scale_add", "undo": "exact_unscale_sub"}


def cpu_identity() -> str:
    """The processor's model and instruction-set flags (from ``/proc/cpuinfo`` where there is one)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    keys = ("model name", "flags", "Features", "CPU part")
    return "\n".join(sorted({line for line in lines if line.split(":")[0].strip() in keys}))


def extension_name(compiler: str) -> str:
    """``revnets_exact_<hash>``: the name of the build, a hash of the source, the compiler and its flags,
    torch's version (its C++ ABI) and the processor (model and instruction-set flags), so that a shared
    extension cache (``TORCH_EXTENSIONS_DIR``) never serves a library built for another processor or
    another torch."""
    parts = (KERNEL_SOURCE_PATH.read_text(), compiler, *KERNEL_FLAGS, torch.__version__, platform.machine(),
             cpu_identity())
    return "revnets_exact_" + hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


@functools.cache
def cpu_kernels():
    """The namespace ``torch.ops.revnets`` of the fused operators, or ``None`` where they cannot be built.

    Built once per machine (and loaded once per process) by :func:`torch.utils.cpp_extension.load` with
    :data:`KERNEL_FLAGS`, under the name :func:`extension_name` in torch's extension cache
    (``$TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``); the first build takes some
    seconds. It needs a C++ compiler (``$CXX``, by default ``c++``) and ninja (the ``ninja`` package). Where
    the build or the loading fails a :class:`RuntimeWarning` says why, once: callers then run the same
    arithmetic as separate torch operations (the same bits, slower).
    """
    try:
        build()
    except (OSError, RuntimeError, ImportError) as error:
        warnings.warn(f"revnets: exact mode's fused CPU kernels are unavailable ({_cause(error)}); exact mode runs "
                      "as separate torch operations instead (the same bits, slower)", RuntimeWarning, stacklevel=3)
        return None
    return torch.ops.revnets


def _cause(error: BaseException) -> str:
    """The first line of a build error and its compiler's first ``error:`` line, shortened."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    detail = next((line for line in lines[1:] if "error" in line.lower()), None)
    head = lines[0].split(": [", 1)[0][:200]  # "Error building extension 'name': [1/2] c++ ...": the name
    return head + (f": {detail[:300]}" if detail else "")


def build() -> None:
    """Build (or find in the cache) and load ``exact_kernels.cpp``, and register its fake kernels.

    Raises:
        RuntimeError: no C++ compiler or no ninja, or the build failed.
        OSError: the library cannot be loaded.
    """
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler: {compiler!r} not found (set CXX to one)")
    with _ninja_on_path(), _quiet_cuda_notice():
        from torch.utils import cpp_extension

        cpp_extension.load(name=extension_name(compiler), sources=[str(KERNEL_SOURCE_PATH)],
                           extra_cflags=list(KERNEL_FLAGS), extra_ldflags=["-fopenmp"], is_python_module=False)
    register_fakes()


@contextlib.contextmanager
def _ninja_on_path():
    """``PATH`` with this environment's scripts folder (where the ``ninja`` package puts ninja) appended,
    if ninja is not on it otherwise (a virtual environment used without activating it)."""
    path = os.environ.get("PATH")
    if shutil.which("ninja") is None:
        os.environ["PATH"] = os.pathsep.join(filter(None, (path, sysconfig.get_path("scripts"))))
    try:
        yield
    finally:
        if path is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = path


@contextlib.contextmanager
def _quiet_cuda_notice():
    """Importing ``torch.utils.cpp_extension`` with a CUDA build of torch and no GPU logs "No CUDA runtime
    is found": irrelevant to this CPU-only build, so not shown."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _fused_fake(stats: int):
    def fake(q, head, increment, factor, n, d):
        return torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty_like(
            head, memory_format=torch.contiguous_format), q.new_empty(stats)

    return fake


def _add_fake(q, increment, scale, subtract, dtype):
    new = torch.empty_like(q, memory_format=torch.contiguous_format)
    return new, torch.empty_like(new, dtype=dtype), q.new_empty(2)


def _view_fake(q, scale, dtype):
    return torch.empty_like(q, dtype=dtype, memory_format=torch.contiguous_format)


@functools.cache
def register_fakes() -> None:
    """Register the fake (meta) kernels of the operators: their outputs' shapes, dtypes and devices.

    ``exact_scale_add(q, head, increment, factor, n, d) -> (q', head', stats[4])``,
    ``exact_unscale_sub(...) -> (q, head, stats[5])``: int64 of ``q``'s shape, int64 stats;
    ``exact_add(q, increment, scale, subtract, dtype) -> (q', view, stats[2])``: the view of ``dtype``;
    ``exact_view(q, scale, dtype) -> view``.
    """
    torch.library.register_fake("revnets::exact_scale_add")(_fused_fake(4))
    torch.library.register_fake("revnets::exact_unscale_sub")(_fused_fake(5))
    torch.library.register_fake("revnets::exact_add")(_add_fake)
    torch.library.register_fake("revnets::exact_view")(_view_fake)


def fused_kernel(kind: str, q: torch.Tensor, head: torch.Tensor, increment: torch.Tensor, n: int, d: int):
    """The operator ``kind`` ("apply": ``exact_scale_add``, "undo": ``exact_unscale_sub``) for these
    operands, or ``None`` where it does not apply.

    It needs contiguous non-empty CPU tensors of one shape, a float32 or float64 increment and a
    contraction ``0 < |n| < d ≤ 63`` with ``(⌊2^47/|n|⌋ + 1)·d ≤ 2^51`` (:func:`kernel_ratio`). Called as
    ``op(q, head, increment, factor, n, d)`` it returns ``(q', head', stats)`` (int64, stats on the CPU).
    """
    if increment.dtype not in KERNEL_DTYPES or not kernel_ratio(n, d) or not (q.is_cpu and increment.is_cpu):
        return None
    if not q.numel() or increment.shape != q.shape or head.shape != q.shape:
        return None
    if not (q.is_contiguous() and head.is_contiguous() and increment.is_contiguous()):
        return None
    kernels = cpu_kernels()
    return None if kernels is None else getattr(kernels, FUSED_OPERATORS[kind]).default


@functools.cache
def kernel_ratio(n: int, d: int) -> bool:
    """Whether the kernels of :func:`fused_kernel` take the contraction ``n/d``: ``0 < |n| < d ≤ 63`` and
    ``(⌊2^47/|n|⌋ + 1)·d ≤ 2^51``, so that every intermediate of their float64 arithmetic is an integer
    below ``2^52`` (``|q·n|, |q·d| ≤ 2^46·63``, heads ``< 2^51``), exact."""
    return 0 < abs(n) < d <= KERNEL_MAX_DENOMINATOR and ((1 << 47) // abs(n) + 1) * d <= 1 << 51


def integer_kernel(kind: str, dtype: torch.dtype, q: torch.Tensor, other: torch.Tensor | None = None):
    """The operator ``kind`` making a ``dtype`` view of int64 ``q``: "add" (``exact_add(q, other, scale,
    subtract, dtype) -> (q ± other, view, stats)``) or "view" (``exact_view(q, scale, dtype)``), or ``None``
    unless they are contiguous non-empty CPU tensors of one shape and ``dtype`` is float32 or float64."""
    if dtype not in KERNEL_DTYPES or not (q.dtype == torch.int64 and q.is_cpu and q.is_contiguous() and q.numel()):
        return None
    if other is not None and not (other.dtype == torch.int64 and other.is_cpu and other.is_contiguous()
                                  and other.shape == q.shape):
        return None
    kernels = cpu_kernels()
    return None if kernels is None else getattr(kernels, f"exact_{kind}").default
