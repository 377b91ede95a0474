"""What the backward of each memory-saving method recomputes: matrix-product calls and their mean time.

On the suite's MLP stack (``f_n = Linear → Tanh → Linear``, momentum γ = 0.9), ``torch.profiler`` counts
the ``addmm`` calls (the functions' ``Linear`` layers) and their mean self time in the backward of
torch checkpoint per step (with checkpoint's default ``early_stop=True``, then with ``early_stop=False``)
and of revnets' reversible mode. With early stopping, checkpoint's recomputation ends once every tensor
the step's backward needs is back: the second ``Linear``'s output is needed by no backward formula, so
that call stops before computing (its mean time halves). A reversible backward needs the function's
value to invert the step, and recomputes it whole.

    python benchmarks/profile_recomputation.py --width 256 --batch 512 --depth 64 --threads 1
"""

from __future__ import annotations

import argparse

import torch
from suite import contenders, environment, workloads
from torch.profiler import ProfilerActivity, profile

import revnets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--depth", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    environment.keep_freed_memory()
    torch.set_num_threads(args.threads)
    stack = workloads.build(workloads.Spec("mlp", args.depth, args.width, args.batch))
    x, grad = stack.x.detach().requires_grad_(), stack.grad_output
    loops = {early_stop: contenders.SchemeLoop(stack, use_checkpoint=True, early_stop=early_stop)
             for early_stop in (True, False)}  # the suite's torch-checkpoint and torch-checkpoint-full
    net = revnets.MomentumNet(stack.functions, gamma=workloads.GAMMA)
    methods = {"torch checkpoint (early_stop=True)": lambda: loops[True](x),
               "torch checkpoint (early_stop=False)": lambda: loops[False](x),
               "revnets reversible": lambda: net(x)}
    print(f"MLP W{args.width} B{args.batch} depth {args.depth}, {args.threads} thread(s); backward only, 3 passes")
    for name, forward in methods.items():
        forward().backward(grad)  # warm-up
        outputs = [forward() for _ in range(3)]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for output in outputs:
                output.backward(grad)
        addmm = next(e for e in prof.key_averages() if e.key == "aten::addmm")
        print(f"  {name:38s} addmm calls {addmm.count:4d}, "
              f"mean self time {addmm.self_cpu_time_total / addmm.count:7.1f} µs")


if __name__ == "__main__":
    main()
