"""Every zoo model with invertible stacks: training-step peak in reversible mode against autograd mode.

The check behind BENCHMARKS.md's "no zoo model's reversible peak above its autograd peak": for each
model and each (batch, image side), the peak bytes one SGD step creates
(``training_memory.step_peak``: seeded weights and images), both modes, flagged where reversible
is higher. The 1202-layer Chang nets run only on the smallest input (they take minutes on a CPU).

    python benchmarks/zoo_peaks.py                 # batches 2 of 8x8, 1 and 4 of 32x32
    python benchmarks/zoo_peaks.py --sizes 4x32
"""

import argparse

from training_memory import step_peak

from revnets.memory import mib
from revnets.models import list_models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["2x8", "1x32", "4x32"], help="BATCHxSIDE (default: %(default)s)")
    args = parser.parse_args()
    sizes = [tuple(int(v) for v in size.split("x")) for size in args.sizes]
    smallest = min(sizes, key=lambda s: s[0] * s[1] ** 2)
    names = [n for n in list_models() if not n.startswith("resnet")]  # plain ResNets have no invertible stack
    higher = 0
    for name in names:
        for batch, side in sizes if "1202" not in name else [smallest]:
            autograd, reversible = (step_peak(name, mode, batch, side)[1] for mode in ("autograd", "reversible"))
            flag = "  <- reversible higher" if reversible > autograd else ""
            higher += reversible > autograd
            print(f"{name:20s} batch {batch} of {side}x{side}: autograd {mib(autograd):8.2f} MiB, "
                  f"reversible {mib(reversible):8.2f} MiB{flag}", flush=True)
    print(f"{higher} case(s) with the reversible peak above autograd's")


if __name__ == "__main__":
    main()
