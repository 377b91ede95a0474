"""Where a run happened: hardware, versions, commit, machine load; and the allocator setting."""

from __future__ import annotations

import ctypes
import datetime
import os
import platform
import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def git_commit() -> str:
    """HEAD, with a note when files under revnets/ differ from it (the numbers are of the work tree)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "revnets"], cwd=REPO, capture_output=True,
                               text=True, check=True).stdout.strip()
        return head + (" (revnets/ modified)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def load() -> list[float]:
    """``os.getloadavg()``: 1, 5 and 15-minute load averages (runnable processes)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def describe(device: str) -> dict:
    import revnets

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "cpu": cpu_model(),
        "cpus_available": available_cpus(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "revnets": revnets.__version__,
        "commit": git_commit(),
        "load_average_at_start": load(),
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def keep_freed_memory() -> str:
    """Stop glibc from handing freed memory back to the kernel (``mallopt``); say what was done.

    On VMs with free-page reporting, pages given back are slow to fault in again: single passes of
    0.2 s took up to 30 s at random. Keeping the heap (no mmap below 32 MiB, no trimming) removes
    that noise for every contender alike; it changes no memory number measured here (those count
    tensor storages and allocator events, not resident pages). Inherited by the peers' worker
    only through its own call (it runs this too).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return "default allocator (not glibc)"
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    ok = all(libc.mallopt(option, value) for option, value in
             ((m_mmap_threshold, 32 << 20), (m_trim_threshold, 1 << 30), (m_top_pad, 64 << 20)))
    return ("glibc mallopt: M_MMAP_THRESHOLD=32 MiB, M_TRIM_THRESHOLD=1 GiB, M_TOP_PAD=64 MiB"
            if ok else "glibc mallopt failed: default allocator")
