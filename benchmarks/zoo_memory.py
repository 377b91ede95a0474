"""Memory of the model zoo: Sander et al.'s Fig. 7 in miniature (bytes held, largest batch in a budget).

For each pair (a memory-saving model, its plain counterpart) on 3×32×32 images in training mode:

* bytes held after the forward (live tensor storages created by the forward, ``memory.StorageTracker``),
* peak live bytes during forward + backward, at batch sizes 4, 8 and 16, fitted by
  ``peak(B) = fixed + per_sample·B`` (fixed: weights, gradients; the fit's largest residual is printed),
* the largest batch whose fitted peak fits ``--budget`` GiB (weights + gradients + activations;
  optimiser state not included).

Pairs: Momentum ResNet-18/101 (γ = 0.9, reversible) against ResNet-18/101, and Chang et al.'s
Hamiltonian-38/110 in reversible mode against the same network in ``mode="autograd"``.

Usage::

    python benchmarks/zoo_memory.py                 # about 2 minutes on 2 CPU cores
    python benchmarks/zoo_memory.py --budget 8 --quick
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from revnets.memory import StorageTracker, mib  # noqa: E402

from revnets.models import create_model  # noqa: E402

PAIRS = (
    ("ResNet-18", ("momentum_resnet18", "reversible"), ("resnet18", "autograd")),
    ("ResNet-101", ("momentum_resnet101", "reversible"), ("resnet101", "autograd")),
    ("Hamiltonian-38", ("hamiltonian38", "reversible"), ("hamiltonian38", "autograd")),
    ("Hamiltonian-110", ("hamiltonian110", "reversible"), ("hamiltonian110", "autograd")),
)
BATCHES = (4, 8, 16)


def measure(name: str, mode: str, batch: int, image: int) -> dict:
    """Held-after-forward and peak live bytes of one training step (forward + backward)."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).set_mode(mode).train()
    x = torch.randn(batch, 3, image, image)
    target = torch.randint(10, (batch,))
    gc.collect()
    with StorageTracker() as tracker:
        loss = torch.nn.functional.cross_entropy(model(x), target)
        gc.collect()
        held = tracker.recount()
        loss.backward()
        del loss
        gc.collect()
    return {"held_after_forward": held, "peak": tracker.peak_bytes}


def fit(batches, values) -> tuple[float, float, float]:
    """Least squares ``value = fixed + slope·batch``: (fixed, slope, largest residual)."""
    n = len(batches)
    mb, mv = sum(batches) / n, sum(values) / n
    slope = sum((b - mb) * (v - mv) for b, v in zip(batches, values)) / sum((b - mb) ** 2 for b in batches)
    fixed = mv - slope * mb
    return fixed, slope, max(abs(v - fixed - slope * b) for b, v in zip(batches, values))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", type=float, default=4.0, help="memory budget in GiB (default 4)")
    parser.add_argument("--image", type=int, default=32, help="image side (default 32, CIFAR)")
    parser.add_argument("--quick", action="store_true", help="ResNet-18 and Hamiltonian-38 only")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "zoo_memory.json")
    args = parser.parse_args(argv)
    pairs = [p for p in PAIRS if not args.quick or p[0] in ("ResNet-18", "Hamiltonian-38")]
    budget = args.budget * 2**30
    print(f"zoo memory, {args.image}x{args.image} images, train mode, batches {BATCHES}, budget {args.budget:g} GiB; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    header = (f"{'network':<16} {'model (mode)':<34} {'held @16 MiB':>12} {'MiB/sample':>10} "
              f"{'fixed MiB':>9} {'fit res.':>8} {'max batch':>9} {'gain':>6}")
    print(header + "\n" + "-" * len(header), flush=True)
    rows = []
    for label, saving, plain in pairs:
        best = {}
        for name, mode in (plain, saving):
            numbers = [measure(name, mode, b, args.image) for b in BATCHES]
            fixed, per_sample, residual = fit(BATCHES, [n["peak"] for n in numbers])
            max_batch = int((budget - fixed) // per_sample) if budget > fixed else 0
            best[(name, mode)] = max_batch
            gain = max_batch / max(best[plain], 1)
            row = {"network": label, "model": name, "mode": mode, "batches": BATCHES, "measurements": numbers,
                   "peak_fixed_bytes": fixed, "peak_bytes_per_sample": per_sample, "fit_max_residual_bytes": residual,
                   "max_batch_in_budget": max_batch, "gain_vs_plain": gain}
            rows.append(row)
            print(f"{label:<16} {f'{name} ({mode})':<34} {mib(numbers[-1]['held_after_forward']):>12.1f} "
                  f"{mib(per_sample):>10.2f} {mib(fixed):>9.1f} {mib(residual):>8.2f} {max_batch:>9d} "
                  f"{gain:>5.1f}x", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "config": {"budget_gib": args.budget, "image": args.image, "batches": BATCHES},
        "environment": {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                        "torch": torch.__version__, "threads": torch.get_num_threads(),
                        "python": platform.python_version(), "platform": platform.platform()},
        "rows": rows,
    }, indent=1))
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
