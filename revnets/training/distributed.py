"""Several processes with PyTorch's own engine: ``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; a run that finds them joins the process group (NCCL on CUDA, gloo otherwise) and wraps
its model in :class:`~torch.nn.parallel.DistributedDataParallel`, or shards it with
``torch.distributed.fsdp.fully_shard``. Process 0 alone writes the run directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .config import TrainConfig


@dataclass(frozen=True)
class Processes:
    """This process's place among the run's processes (``world == 1``: a single process)."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this process writes metrics and checkpoints."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """Whether the environment describes a process started by ``torchrun`` (or any launcher setting
    ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``)."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def join(device: torch.device) -> Processes:
    """Join the process group described by the environment (if any); returns this process's place.

    A process group initialised by the caller is used as it is.
    """
    if not launched_by_torchrun() and not dist.is_initialized():
        return Processes()
    if not dist.is_available():
        raise RuntimeError("launched by torchrun, but this torch build has no torch.distributed")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", str(dist.get_rank())))
    return Processes(dist.get_world_size(), dist.get_rank(), local_rank)


def local_rank() -> int:
    """``LOCAL_RANK`` of a torchrun launch (which GPU of the machine is this process's), else 0."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def wrap(model: nn.Module, config: TrainConfig, processes: Processes, device: torch.device) -> nn.Module:
    """``model`` prepared for ``processes``: itself alone, else DDP (with SyncBatchNorm under
    ``sync_bn``) or FSDP (every reversible stack's functions and the whole model sharded)."""
    if processes.world == 1:
        return model
    if config.sync_bn:
        if device.type != "cuda":
            raise ValueError("--sync-bn: torch's SyncBatchNorm runs on CUDA only (it refuses CPU tensors); "
                             "drop --sync-bn on CPU, or train on GPUs")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if config.parallel == "fsdp":
        from .fsdp import shard

        return shard(model)
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """``values`` summed over the processes (themselves for a single process)."""
    if not dist.is_initialized():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_max(value: float, device: torch.device) -> float:
    """The largest ``value`` over the processes (itself for a single process)."""
    if not dist.is_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.item()


def gather(value: Any, processes: Processes) -> list[Any]:
    """Every process's ``value``, in rank order (a list of one for a single process)."""
    if processes.world == 1:
        return [value]
    values: list[Any] = [None] * processes.world
    dist.all_gather_object(values, value)
    return values


def broadcast(value: Any, processes: Processes) -> Any:
    """Process 0's ``value`` on every process."""
    if processes.world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
