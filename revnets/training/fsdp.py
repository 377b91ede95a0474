"""Fully sharded data parallelism (``torch.distributed.fsdp.fully_shard``, FSDP2) for the zoo.

Every reversible stack is one FSDP unit: its functions' parameters are gathered for its forward, freed
after it, gathered again for the recomputation in its backward (where FSDP's pre-backward hook runs on
the stack's output), and their gradients are reduce-scattered when the stack's backward has produced
them. The rest of the model is the root unit.

Sharding the functions *inside* a stack one by one (``fully_shard(f)`` for each ``f``) is not
supported: the engine differentiates each function with ``torch.autograd.grad`` with respect to the
parameters it recorded, and FSDP only reduces gradients accumulated into its gathered parameters'
``.grad``, so the functions' sharded parameters would silently get no gradient. :func:`shard` never
shards below a stack.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn


def reversible_stacks(model: nn.Module) -> list[nn.Module]:
    """The outermost submodules of ``model`` that run under a memory strategy (``check_mode_allowed``:
    the reversible networks, and the zoo's plain stages)."""
    stacks, names = [], []
    for name, module in model.named_modules():
        if callable(getattr(module, "check_mode_allowed", None)) and not any(name.startswith(f"{n}.") for n in names):
            stacks.append(module)
            names.append(name)
    return stacks


def shard(model: nn.Module) -> nn.Module:
    """``model`` sharded over the default process group: each reversible stack a unit, then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for stack in reversible_stacks(model):
        fully_shard(stack, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model
