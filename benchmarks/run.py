"""The revnets benchmark suite: every contender on every workload; JSON, markdown and plots.

Usage::

    python benchmarks/run.py --quick                 # under 5 minutes on 2 CPU cores
    python benchmarks/run.py --device cuda           # the full suite, for a GPU
    python benchmarks/run.py --sections targets pareto --threads 2
    python benchmarks/run.py --report benchmarks/results/quick.json   # tables and plots again

Outputs (``--out``, default ``benchmarks/results/``): ``<name>.json`` (config, environment with
hardware, versions, commit and load, every raw time and memory number), ``<name>.md`` (tables and
the verdicts on the targets), ``<name>-*.png`` (plots). ``<name>`` is ``quick`` or ``full-<device>``.
See BENCHMARKS.md for what is measured and how.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the suite package
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # revnets, from a checkout

import torch
from suite import environment, peers, plan, report
from suite.worker import LocalWorker, SubprocessWorker

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the quick preset (under 5 minutes on 2 CPU cores)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: available CPUs)")
    parser.add_argument("--sections", nargs="+", choices=plan.SECTIONS, default=None, help="run only these")
    parser.add_argument("--trials", type=int, default=None, help="timed trials per comparison")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up trials dropped per comparison")
    parser.add_argument("--peers-env", type=Path, default=HERE / ".peers-venv",
                        help="the peers' virtual environment, created if missing (default benchmarks/.peers-venv)")
    parser.add_argument("--no-peers", action="store_true", help="do not create or run the peers' environment")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default inductor)")
    parser.add_argument("--allocator-check", action="store_true", help="cross-check memory with the profiler")
    parser.add_argument("--default-malloc", action="store_true", help="leave glibc's malloc settings alone")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="folder of the outputs")
    parser.add_argument("--name", default=None, help="file name stem of the outputs")
    parser.add_argument("--report", type=Path, default=None, help="only redo tables and plots from this JSON")
    args = parser.parse_args(argv)

    if args.report:
        results = json.loads(args.report.read_text())
        report.write(results, args.report.parent, args.report.stem)
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("CUDA is unavailable on this machine: nothing was run (use --device cpu).")
        return 2

    threads = args.threads or environment.available_cpus()
    torch.set_num_threads(threads)
    malloc = "default (--default-malloc)" if args.default_malloc else environment.keep_freed_memory()
    options = {"compile_backend": args.compile_backend, "keep_freed_memory": not args.default_malloc}
    changes = {k: v for k, v in {"trials": args.trials, "warmup": args.warmup}.items() if v is not None}
    cfg = plan.Config.preset(args.quick, device=args.device, threads=threads, compile_backend=args.compile_backend,
                             allocator_check=args.allocator_check, peers=not args.no_peers, options=options,
                             sections=tuple(args.sections or plan.SECTIONS), **changes)
    name = args.name or ("quick" if args.quick else f"full-{args.device}")
    started = time.perf_counter()
    results: dict = {"config": cfg.as_dict(), "environment": environment.describe(args.device)}
    results["environment"]["malloc"] = malloc
    env = results["environment"]
    print(f"revnets benchmark suite ({name}): {env['cpu']}, {threads} threads, torch {env['torch']}, "
          f"load {env['load_average_at_start']}")
    if env["load_average_at_start"] and env["load_average_at_start"][0] > environment.available_cpus() and threads > 1:
        print(f"warning: the load average exceeds the {environment.available_cpus()} CPUs: {threads} threads will "
              "wait for each other (steps took 5-20x longer here); consider --threads 1, or a quiet machine")

    args.out.mkdir(parents=True, exist_ok=True)
    peer_worker, peer_failure = None, None
    if cfg.peers:
        python, status = peers.ensure(args.peers_env)
        results["peers"] = status
        print("peers:", ", ".join(f"{k}: {v[:80]}" for k, v in status.items() if k != "path"))
        if python:
            try:
                log = args.out / f"{name}-peers.log"
                peer_worker = SubprocessWorker(python, args.device, threads, options, log_path=log)
                results["peers"]["versions"] = peer_worker.versions
            except Exception as error:  # the peers are then reported as failed
                peer_failure = f"peers' worker did not start: {error}"
        else:
            peer_failure = "peers' environment unavailable: " + "; ".join(f"{k}: {v}" for k, v in status.items())
    else:
        peer_failure = "not run (--no-peers)"

    runner = plan.Runner(cfg, LocalWorker(args.device, threads, options), peer_worker, peer_failure)
    results["sections"] = {}
    for section in cfg.sections:
        print(f"{section}:")
        t0 = time.perf_counter()
        results["sections"][section] = getattr(runner, section)()
        results.setdefault("section_seconds", {})[section] = round(time.perf_counter() - t0, 1)
    if peer_worker:
        peer_worker.close()
    results["environment"]["load_average_at_end"] = environment.load()
    results["elapsed_s"] = round(time.perf_counter() - started, 1)
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    # CPU seconds of this process and its finished children (the peers' worker): on a loaded machine
    # the wall time says little about what a quiet one would take.
    results["cpu_s"] = round(sum(u.ru_utime + u.ru_stime for u in usage), 1)
    path = args.out / f"{name}.json"
    path.write_text(json.dumps(results, indent=1, default=str))
    report.write(results, args.out, name)
    print(f"saved {path} and {name}.md ({results['elapsed_s']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
