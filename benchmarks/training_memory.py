"""Memory of one training step per memory mode (the README's Scaling table).

For a zoo model, a batch of random images and SGD with momentum, the peak bytes of the tensors one
step creates (activations, gradients, temporaries; the weights and the momentum buffers exist before
it), measured by :class:`revnets.memory.StorageTracker` around the trainer's step
(:func:`revnets.training.step.sgd_step_peak`). Device-independent: what a GPU's allocator holds on
top of that is its workspace and fragmentation.

    python benchmarks/training_memory.py hamiltonian110 32 32     # model, batch, image side
"""

import argparse

import torch

from revnets.memory import mib
from revnets.models import create_model
from revnets.training.step import sgd_step_peak


def step_peak(name: str, mode: str, batch: int, side: int) -> tuple[int, int]:
    """Parameters of ``name`` and the peak bytes created by its second SGD step in ``mode``."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).train().set_mode(mode)
    images, labels = torch.randn(batch, 3, side, side), torch.randint(0, 10, (batch,))
    return sum(p.numel() for p in model.parameters()), sgd_step_peak(model, images, labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("batch", type=int)
    parser.add_argument("side", type=int)
    args = parser.parse_args()
    for mode in ("autograd", "checkpoint", "reversible"):
        params, peak = step_peak(args.model, mode, args.batch, args.side)
        print(f"{args.model} ({params / 1e6:.1f} M parameters), batch {args.batch} of {args.side}x{args.side}, "
              f"mode={mode}: {mib(peak):.0f} MiB created by a step", flush=True)


if __name__ == "__main__":
    main()
