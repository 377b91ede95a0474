"""Time one workload of the suite at several commits: is a change a speed-up?

Each commit is checked out into a temporary git worktree and measured in its own process
(``PYTHONPATH`` pointing at it), commits alternating round by round so that load drifting over the run
spreads over all of them. A process times ``trials`` interleaved pairs of the plain autograd loop and
revnets' ``MomentumNet`` (``--mode``: reversible, exact or checkpoint) on the suite's MLP stack and
prints the median of the paired ratios; the table gives, per commit, the median and range of those medians
over the rounds.

    python benchmarks/compare_commits.py efea7b0 HEAD --width 64 --batch 64 --rounds 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MEASURE = r"""
import statistics, sys, time, torch
sys.path.insert(0, sys.argv[1])
from suite import environment, workloads
import revnets
assert revnets.__file__.startswith(sys.argv[1].rsplit("/", 1)[0]), revnets.__file__  # this tree's revnets
environment.keep_freed_memory()
torch.set_num_threads(int(sys.argv[6]))
stack = workloads.build(workloads.Spec("mlp", int(sys.argv[4]), int(sys.argv[2]), int(sys.argv[3])))
mode = sys.argv[7]
net = revnets.MomentumNet(stack.functions, gamma=workloads.GAMMA, exact=mode == "exact",
                          mode="reversible" if mode == "exact" else mode)
x, g = stack.x.detach().requires_grad_(), stack.grad_output
def plain():
    h, v = x, torch.zeros_like(x)
    for f in stack.functions:
        v = workloads.GAMMA * v + (1 - workloads.GAMMA) * f(h)
        h = h + v
    h.backward(g)
ratios = []
for trial in range(int(sys.argv[5])):
    t = time.process_time(); plain(); a = time.process_time() - t
    t = time.process_time(); net(x).backward(g); b = time.process_time() - t
    ratios.append(b / a)
print(statistics.median(ratios[2:]))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("commits", nargs="+", help="commits (anything git rev-parse takes)")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--depth", type=int, default=64)
    parser.add_argument("--trials", type=int, default=40, help="paired trials per process (2 dropped)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mode", choices=("reversible", "exact", "checkpoint"), default="reversible",
                        help="revnets' memory mode (exact: reversible with exact=True)")
    args = parser.parse_args()
    results: dict[str, list[float]] = {c: [] for c in args.commits}
    with tempfile.TemporaryDirectory() as scratch:
        trees = {}
        for commit in args.commits:
            tree = Path(scratch) / f"tree{len(trees)}"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(tree), commit], check=True)
            trees[commit] = tree
        try:
            for _ in range(args.rounds):
                for commit, tree in trees.items():
                    env = {**os.environ, "PYTHONPATH": str(tree)}
                    out = subprocess.run(
                        [sys.executable, "-c", MEASURE, str(tree / "benchmarks"), str(args.width), str(args.batch),
                         str(args.depth), str(args.trials), str(args.threads), args.mode],
                        # cwd: ``-c`` puts it first on sys.path
                        env=env, cwd=tree, check=True, capture_output=True, text=True)
                    results[commit].append(float(out.stdout.split()[-1]))
        finally:
            for tree in trees.values():
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    print(f"MLP W{args.width} B{args.batch} depth {args.depth}, {args.threads} thread(s): {args.mode} / plain loop")
    for commit, values in results.items():
        print(f"  {commit:12s} {statistics.median(values):.3f}x  (rounds: {', '.join(f'{v:.3f}' for v in values)})")


if __name__ == "__main__":
    main()
