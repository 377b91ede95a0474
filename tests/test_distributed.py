"""DistributedDataParallel (PyTorch's own engine, gloo on CPU) with a reversible stack of shared weights.

Two ranks see different halves of a batch; after one backward the averaged gradients must equal the
single-process gradient of the whole batch, and the parameters must stay identical across ranks.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import revnets

WIDTH, BATCH, DEPTH = 6, 8, 5


def _model() -> revnets.MomentumNet:
    torch.manual_seed(0)
    shared = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH))
    return revnets.MomentumNet([shared] * DEPTH, gamma=0.8).double()


def _data() -> torch.Tensor:
    return torch.randn(BATCH, WIDTH, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _worker(rank: int, world: int, port: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = nn.parallel.DistributedDataParallel(_model())
        x = _data().chunk(world)[rank]
        model(x).pow(2).sum().mul(world / BATCH).backward()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        optimizer.step()
        results[rank] = (
            [p.grad.clone() for p in model.module.parameters()],
            [p.detach().clone() for p in model.module.parameters()],
        )
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_ddp_shared_weights_matches_single_process():
    world = 2
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(world, _free_port(), results), nprocs=world, join=True)
        results = dict(results)
    reference = _model()
    reference.set_mode("autograd")
    reference(_data()).pow(2).sum().div(BATCH).backward()
    for rank in range(world):
        grads, _params = results[rank]
        for g, p_ref in zip(grads, reference.parameters(), strict=True):
            torch.testing.assert_close(g, p_ref.grad, rtol=1e-10, atol=1e-12)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        assert torch.equal(a, b), "parameters diverged across ranks"
