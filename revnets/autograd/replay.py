"""Replaying a forward computation exactly during the backward pass.

A recomputation must see what the original forward saw:

* the random number generators (dropout masks): :class:`RngSnapshot` captures the CPU generator and
  the generators of the accelerator devices holding the state, and restores them inside
  :func:`torch.random.fork_rng` so that the caller's generator is untouched;
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


@dataclass(frozen=True)
class RngSnapshot:
    """The state of the CPU generator and of the generators of ``devices``."""

    cpu: Tensor
    devices: tuple[torch.device, ...]
    device_states: tuple[Tensor, ...]

    @classmethod
    def capture(cls, devices: tuple[torch.device, ...]) -> RngSnapshot:
        return cls(
            torch.get_rng_state(),
            devices,
            tuple(_device_module(d).get_rng_state(d) for d in devices),
        )

    def same_as(self, other: RngSnapshot) -> bool:
        """Whether no random number was drawn between ``self`` and ``other``."""
        return torch.equal(self.cpu, other.cpu) and all(
            torch.equal(a, b) for a, b in zip(self.device_states, other.device_states, strict=True)
        )

    @contextlib.contextmanager
    def restored(self) -> Iterator[None]:
        """Run the body with these generator states; the caller's states are restored afterwards."""
        device_type = self.devices[0].type if self.devices else "cuda"
        with torch.random.fork_rng(devices=list(self.devices), device_type=device_type):
            torch.set_rng_state(self.cpu)
            for device, state in zip(self.devices, self.device_states, strict=True):
                _device_module(device).set_rng_state(state, device)
            yield


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


def running_stat_modules(functions: Iterable[object]) -> tuple[_NormBase, ...]:
    """The normalisation layers (BatchNorm, SyncBatchNorm, InstanceNorm...) that keep running statistics."""
    found: dict[int, _NormBase] = {}
    for function in functions:
        if isinstance(function, nn.Module):
            for module in function.modules():
                if isinstance(module, _NormBase) and module.track_running_stats:
                    found[id(module)] = module
    return tuple(found.values())


class preserved_running_stats:  # noqa: N801 - used like a function-style context manager
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
