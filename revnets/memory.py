"""Honest memory measurement for PyTorch forward/backward passes (CPU or any device).

Three instruments, each answering a different question:

:func:`saved_tensors`
    Bytes **packed by autograd for the backward** (``torch.autograd.graph.saved_tensors_hooks``),
    each storage counted once. It sees what ``save_for_backward`` and built-in ops save, but *not*
    objects a custom ``autograd.Function`` keeps as plain ``ctx`` attributes (buffers, RNG states),
    nor anything saved under an inner saved-tensor hook (e.g. inside non-reentrant checkpoint).

:class:`StorageTracker`
    A ``TorchDispatchMode`` that registers every storage **created by an ATen op** while it is active
    (outputs that alias an input of the op — views, in-place and ``out=`` ops — are skipped) with a
    ``weakref.finalize`` on its ``UntypedStorage`` (PyTorch keeps one Python object per live storage,
    so the finalizer fires exactly when the memory is released, whoever held it: a Python variable,
    autograd's saved variables or ``ctx`` attributes). It keeps a running total of live bytes and its
    peak. ``live_bytes`` after a forward is therefore "bytes held after the forward minus before it",
    whatever holds them. Blind spots: tensors created without an ATen op (``torch.get_rng_state()``,
    ``torch.from_numpy``), allocations that never become a tensor, and in-place storage resizes
    (``storage.resize_(0)``, memcnn's way of freeing activations): :meth:`StorageTracker.recount`
    corrects the live total for those, the running peak cannot.

:func:`allocator_held`
    A cross-check at the allocator level: the CPU allocator events recorded by
    ``torch.profiler`` (``profile_memory=True``), summed — bytes allocated inside the window and not
    freed by its end. It also sees tensors made outside ATen ops (RNG snapshots). CPU only here.

Every count is of *storage* bytes (what is really held: a view of a big tensor holds the big tensor).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import tempfile
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["SavedTensors", "StorageTracker", "allocator_held", "mib", "saved_tensors", "storage_bytes"]


def mib(n: float) -> float:
    """Bytes to MiB."""
    return n / 2**20


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (each storage once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


# --------------------------------------------------------------------------------------------------
# (a) what autograd packs for the backward


@dataclass
class SavedTensors:
    """Storages packed by autograd: ``data_ptr -> nbytes``; those in ``exclude`` counted apart."""

    exclude: frozenset[int] = frozenset()
    storages: dict[int, int] = field(default_factory=dict)
    excluded: dict[int, int] = field(default_factory=dict)

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        ptr = s.data_ptr()
        (self.excluded if ptr in self.exclude else self.storages)[ptr] = s.nbytes()
        return t

    @property
    def bytes(self) -> int:
        """Bytes of saved storages that are not in ``exclude`` (the activations)."""
        return sum(self.storages.values())

    @property
    def excluded_bytes(self) -> int:
        """Bytes of saved storages listed in ``exclude`` (typically parameters and the input)."""
        return sum(self.excluded.values())


@contextlib.contextmanager
def saved_tensors(exclude: Iterator[torch.Tensor] | list[torch.Tensor] = ()) -> Iterator[SavedTensors]:
    """Record every tensor autograd saves for the backward inside the block.

    ``exclude``: tensors whose storages are counted apart (parameters and inputs, which exist
    anyway). The tensors themselves are saved unchanged (the unpack hook returns them).
    """
    record = SavedTensors(frozenset(t.untyped_storage().data_ptr() for t in exclude))
    with torch.autograd.graph.saved_tensors_hooks(record.pack, lambda t: t):
        yield record


# --------------------------------------------------------------------------------------------------
# (b), (c) live storages created by ATen ops


class StorageTracker(TorchDispatchMode):
    """Live bytes, and their peak, of the storages created by ATen ops while the mode is active.

    Usage::

        with StorageTracker() as tracker:
            y = model(x)
            held = tracker.live_bytes      # bytes created by the forward and still alive
            tracker.reset_peak()
            y.backward(g)
        peak = tracker.peak_bytes

    The tracker holds only weak references: it never keeps a tensor alive. Storages keep being
    tracked (and released from the count when freed) after the block exits.
    """

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, int] = {}  # id(UntypedStorage) -> nbytes at creation
        self._refs: dict[int, weakref.ref] = {}
        self.live_bytes = 0
        self.peak_bytes = 0
        self.created_bytes = 0  # total ever created (a measure of allocation traffic)

    def _release(self, key: int) -> None:
        self.live_bytes -= self._live.pop(key)
        self._refs.pop(key, None)

    def _track(self, storage: torch.UntypedStorage) -> None:
        key = id(storage)
        if key in self._live:
            return
        nbytes = storage.nbytes()
        if nbytes == 0:
            return
        self._live[key] = nbytes
        self._refs[key] = weakref.ref(storage)
        self.live_bytes += nbytes
        self.created_bytes += nbytes
        weakref.finalize(storage, self._release, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if outputs:
            inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
            for t in outputs:
                storage = t.untyped_storage()
                if id(storage) not in inputs:  # views, in-place and out= results alias an input
                    self._track(storage)
            if self.live_bytes > self.peak_bytes:
                self.peak_bytes = self.live_bytes
        return out

    def recount(self) -> int:
        """Live bytes recounted from the storages' current sizes.

        Differs from :attr:`live_bytes` only when a tracked storage was resized in place
        (``storage.resize_(0)``, as memcnn does to free activations): a storage resize is not an
        ATen op on a tensor, so the running total (and :attr:`peak_bytes`) cannot see it.
        """
        total = 0
        for ref in list(self._refs.values()):
            storage = ref()
            if storage is not None:
                total += storage.nbytes()
        return total

    def reset_peak(self) -> None:
        """Start a new peak from the current live bytes."""
        self.peak_bytes = self.live_bytes


# --------------------------------------------------------------------------------------------------
# allocator-level cross-check


def allocator_held(fn: Callable[[], Any]) -> tuple[Any, int, int]:
    """Run ``fn()`` under the profiler; return its result, the CPU bytes allocated inside the window
    and not freed by its end, and the peak of that running total.

    Read from the allocator's own events (the ``[memory]`` events of the trace, every allocation and
    free with the allocator's running total). Only allocations made inside the window count (the
    allocator does not report frees of blocks allocated before profiling started), so ``held`` is
    "bytes held after ``fn`` minus before it" at the allocator level.
    """
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
        gc.collect()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as file:
            events = json.load(file)["traceEvents"]
    memory = sorted(
        (e for e in events if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type", 0) == 0),
        key=lambda e: e["ts"],
    )
    if not memory:
        return result, 0, 0
    base = memory[0]["args"]["Total Allocated"] - memory[0]["args"]["Bytes"]
    totals = [e["args"]["Total Allocated"] - base for e in memory]
    return result, int(totals[-1]), int(max(0, *totals))
