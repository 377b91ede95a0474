"""Replaying a forward computation exactly during the backward pass.

A recomputation must see what the original forward saw:

* the random number generators (dropout masks): :class:`LayerSeeds` seeds the CPU generator and
  those of the accelerator devices holding the state before every update, from one number drawn
  from the caller's generator, inside :func:`torch.random.fork_rng`;
* the autocast settings: :class:`AutocastState`;
* normalisation layers must not update their running statistics a second time:
  :class:`preserved_running_stats`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase


def accelerator_devices(tensors: Iterable[Tensor]) -> tuple[torch.device, ...]:
    """The distinct non-CPU devices among ``tensors`` (their RNGs are captured too)."""
    return tuple(sorted({t.device for t in tensors if t.device.type != "cpu"}, key=str))


_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # odd: (layer, update) ↦ seed is one-to-one on the low 32 bits the CPU generator uses


@dataclass(frozen=True)
class LayerSeeds:
    """Random numbers of a stack drawn from one seed per update, so that a recomputation replays them.

    A stack call that records a graph draws one integer ``base`` from the caller's CPU generator
    (:meth:`draw`). Inside :meth:`forked` (the caller's generators are restored on exit, so the
    caller sees exactly that one draw), update ``j`` of layer ``k`` runs after :meth:`seed` has seeded
    the CPU generator and those of ``devices`` with a seed computed from ``base``, ``k`` and ``j``.
    Replaying the update in the backward only takes seeding again: the bookkeeping is one integer per
    stack call, whatever the depth, instead of a generator snapshot (5 KB for the CPU generator) per
    layer. Every mode of the engine (autograd, checkpoint, reversible, exact) follows this protocol,
    so they draw the same dropout masks and leave the caller's generator in the same state.
    """

    base: int
    devices: tuple[torch.device, ...]

    @classmethod
    def draw(cls, devices: tuple[torch.device, ...]) -> LayerSeeds:
        return cls(int(torch.randint(0, 2**62, (), dtype=torch.int64)), devices)

    @contextlib.contextmanager
    def forked(self) -> Iterator[None]:
        """Run the body on forked generators; the caller's generator states are restored afterwards."""
        device_type = self.devices[0].type if self.devices else "cuda"
        with torch.random.fork_rng(devices=list(self.devices), device_type=device_type):
            yield

    def seed(self, layer: int, update: int) -> None:
        """Seed the generators for update ``update`` of layer ``layer`` (inside :meth:`forked`)."""
        seed = (self.base + ((layer << 8) | update) * _GOLDEN) & _MASK64
        torch.default_generator.manual_seed(seed)
        for device in self.devices:
            module = _device_module(device)
            generators = getattr(module, "default_generators", None)
            if generators is None:
                module.manual_seed(seed)
            else:
                generators[module.current_device() if device.index is None else device.index].manual_seed(seed)


def _device_module(device: torch.device):
    return getattr(torch, device.type)


@dataclass(frozen=True)
class AutocastState:
    """Autocast settings of the CPU and of one accelerator type, as seen by the forward."""

    settings: tuple[tuple[str, bool, torch.dtype], ...]

    @classmethod
    def capture(cls, devices: tuple[torch.device, ...]) -> AutocastState:
        device_types = ("cpu", *sorted({d.type for d in devices}))
        return cls(tuple((t, torch.is_autocast_enabled(t), torch.get_autocast_dtype(t)) for t in device_types))

    @contextlib.contextmanager
    def restored(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for device_type, enabled, dtype in self.settings:
                stack.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled))
            yield


def submodules(functions: Iterable[object]) -> list[nn.Module]:
    """The modules among ``functions`` and all their submodules, in ``Module.modules()`` order (a module
    reached twice is listed twice). Read from the modules' own dictionaries at every call, so that
    substituted parameters (``functional_call``) are seen; plain loops, since every stack call walks every
    layer (``modules()``' generators cost several times more)."""
    found: list[nn.Module] = []
    pending = [f for f in reversed(tuple(functions)) if isinstance(f, nn.Module)]
    while pending:
        module = pending.pop()
        found.append(module)
        for child in reversed(module._modules.values()):
            if child is not None:
                pending.append(child)
    return found


def keeps_running_stats(module: nn.Module) -> bool:
    """Whether ``module`` is a normalisation layer (BatchNorm, SyncBatchNorm, InstanceNorm...) with running
    statistics."""
    return isinstance(module, _NormBase) and module.track_running_stats


def running_stat_modules(functions: Iterable[object]) -> tuple[_NormBase, ...]:
    """The normalisation layers that keep running statistics (:func:`keeps_running_stats`), in
    ``Module.modules()`` order, each once."""
    return tuple({id(m): m for m in submodules(functions) if keeps_running_stats(m)}.values())


class preserved_running_stats:
    """Recompute normalisation layers without changing their running statistics.

    On entry, each running statistic (``running_mean``, ``running_var``, ``num_batches_tracked``) of
    the layers in training mode is replaced in its module by a copy; on exit the original tensor is
    put back. A recomputation (or an inversion) therefore updates only the copies, and the running
    statistics are left as the original forward left them: updated exactly once per training step.
    The originals are never written, so their autograd version counters do not change: a pending
    backward of a graph that saved them (an ``autograd``-mode forward, or the same BatchNorm used
    outside the stack) still runs. The recomputation itself runs the layers unchanged (batch
    statistics in training mode, the same saved tensors, which ``torch.utils.checkpoint`` verifies).
    Re-entrant: the same object may be entered again after it was exited (checkpoint enters its
    recomputation context once per backward).
    """

    _STATISTICS = ("running_mean", "running_var", "num_batches_tracked")

    def __init__(self, modules: Iterable[_NormBase]):
        self.modules = tuple(modules)
        self.swapped: list[list[tuple[_NormBase, str, Tensor]]] = []

    def __enter__(self) -> None:
        swapped = []
        with torch.no_grad():
            for module in self.modules:
                if module.training:
                    for name in self._STATISTICS:
                        original = module._buffers.get(name)
                        if original is not None:
                            module._buffers[name] = original.clone()
                            swapped.append((module, name, original))
        self.swapped.append(swapped)

    def __exit__(self, *exc_info) -> None:
        for module, name, original in self.swapped.pop():
            module._buffers[name] = original
