"""The GPU run: revnets' CUDA tests, gradient checks, benchmark suite, training throughput and DDP, one command.

Prepared on the CPU for the short loans of a GPU machine (one H200 for about 15 minutes): one command, a
time budget per section, results written after every section (a crash or a time-out keeps what was
done). From the repository root, on the GPU machine (no package registry needed: torch, torchvision,
transformers and numpy are all it imports besides revnets, from the checkout)::

    PYTHONPATH=. python benchmarks/gpu.py --dry-run      # about 1 minute: tiny sizes on the GPU, a smoke test
    PYTHONPATH=. python benchmarks/gpu.py --quick        # at most 3 minutes on one H200
    PYTHONPATH=. python benchmarks/gpu.py                # at most 8 minutes on one H200
    PYTHONPATH=. python benchmarks/gpu.py --sections throughput --budget 300   # one section, more time
    PYTHONPATH=. python benchmarks/gpu.py --commit "$(git rev-parse HEAD)"     # where the copy has no .git

and on any machine, the same plumbing on tiny sizes in seconds (what ``tests/test_gpu_script.py`` runs)::

    python benchmarks/gpu.py --device cpu --dry-run --out /tmp/gpu-dry-run

Sections (each records its status: ``ok``, ``partial: …`` (items left out for time), ``failed: …`` with
a traceback summary, ``timed out: …`` or ``skipped: reason``; the script goes on after a failure and
exits 1 at the end if any section failed or timed out):

``tests``
    pytest on the test functions of ``tests/`` with CUDA paths (found by scanning them for "cuda");
    the dry run only collects them.
``gradients``
    every scheme (MomentumNet, RevNet, HamiltonianNet, MidpointNet, LeapfrogNet) × strategy
    (``mode="reversible"``, ``"checkpoint"``, ``exact=True``, ``memory_budget=0.5``) × float32 / float64
    × functions with and without BatchNorm + dropout: gradients against ``mode="autograd"`` on the
    device (and ``mode="autograd"`` on the device against float64 on the CPU); bf16 autocast; one
    ``torch.compile`` case. Max relative error per case, pass / fail at a stated tolerance.
``suite``
    the benchmark suite's quick preset (``benchmarks/run.py --quick``) on the device, every contender;
    peers that are not importable are reported as "not installed".
``throughput``
    training throughput and the largest batch that fits (doubling, then bisection until out of memory,
    with a time cap per model): torchvision ResNet-50 / ResNet-101 at 224 px against their
    ``convert_to_momentum`` conversions, the zoo's resnet18 / momentum_resnet18 at 32 px, a Llama decoder
    (12 layers, hidden 512, sequence 2048) original / with Hugging Face activation checkpointing /
    converted; ``torch.cuda.max_memory_allocated`` for each.
``ddp``
    one DistributedDataParallel step on two processes (NCCL) if there are two GPUs; else "skipped: one
    GPU" (the dry run on the CPU runs it with gloo).

Outputs (``--out``, default ``benchmarks/results/``): ``gpu-<date>[-quick][-dry-run].json`` (environment
with device name, driver, torch version, git commit and a digest of the sources; every figure) and
``.md``; the suite's own ``…-suite.json`` / ``…-suite.md`` (``python benchmarks/run.py --report
…-suite.json`` redoes its tables and plots) and ``…-peers.log``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import faulthandler
import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))  # gpu_checks and the suite package
sys.path.insert(0, str(REPO))  # revnets, from the checkout

import gpu_checks  # noqa: E402
import torch  # noqa: E402

import revnets  # noqa: E402

SECTIONS = ("tests", "gradients", "suite", "throughput", "ddp")
WEIGHTS = {"full": {"tests": 50, "gradients": 70, "suite": 110, "throughput": 170, "ddp": 20},
           "quick": {"tests": 20, "gradients": 35, "suite": 30, "throughput": 50, "ddp": 15},
           "dry": {"tests": 60, "gradients": 60, "suite": 60, "throughput": 60, "ddp": 60}}
"""Seconds per section at the default budget; with another budget, shares of what is left."""
DEFAULT_BUDGET = {"full": 420.0, "quick": 150.0, "dry": 300.0}
"""Seconds for all sections: the full run's 420 s leave room for start-up and overruns within 8 minutes."""


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--quick", action="store_true", help="at most 3 minutes: fewer models and sections")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes (seconds on the CPU); pytest collects only")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="folder of the outputs")
    parser.add_argument("--name", default=None, help="file name stem (default gpu-<date>[-quick][-dry-run])")
    parser.add_argument("--budget", type=float, default=None, help="seconds for all sections (default 420, "
                        "quick 150, dry run 300)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="run only these")
    parser.add_argument("--commit", default=None, help="the commit to record (default: git rev-parse HEAD)")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend (default inductor; aot_eager for a dry run on the CPU)")
    parser.add_argument("--peers-python", default=None,
                        help="interpreter in which the suite's peers are importable (default this one)")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------------------
# environment


def version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    """HEAD, noting files under revnets/ or benchmarks/ that differ from it; None without git."""
    try:
        def git(*args):
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True,
                                  timeout=30).stdout.strip()

        dirty = git("status", "--porcelain", "--", "revnets", "benchmarks")
        return git("rev-parse", "HEAD") + (" (revnets/ or benchmarks/ modified)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def source_digest() -> str:
    """sha256 (16 hex digits) of revnets/ and benchmarks/ sources: which code ran, even without git."""
    digest = hashlib.sha256()
    for path in sorted([*REPO.glob("revnets/**/*.py"), *REPO.glob("revnets/**/*.cpp"), *HERE.glob("**/*.py")]):
        if ".peers-venv" not in path.parts:
            digest.update(path.relative_to(REPO).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def driver_version() -> str:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30, check=True)
        return done.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        pass
    try:
        import ctypes

        value = ctypes.c_int()
        ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(value))
        return f"unknown (no nvidia-smi); CUDA driver API {value.value // 1000}.{value.value % 1000 // 10}"
    except (OSError, AttributeError):
        return "unknown"


def environment(device: torch.device, commit: str | None) -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device), "torch": torch.__version__, "cuda_runtime": torch.version.cuda,
        "python": platform.python_version(), "platform": platform.platform(), "revnets": revnets.__version__,
        "commit": commit or git_commit() or "unknown: no git checkout here (pass --commit)",
        "source_digest": source_digest(), "cpu": gpu_checks.cpu_model(), "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "versions": {p: version(p) or "not installed" for p in ("torchvision", "transformers", "numpy", "pytest",
                                                                 "momentumnet", "revlib", "memcnn")},
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device_name=torch.cuda.get_device_name(device), device_count=torch.cuda.device_count(),
                    device_memory_bytes=props.total_memory, capability=f"{props.major}.{props.minor}",
                    driver=driver_version(), cudnn=torch.backends.cudnn.version(),
                    allocator_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "default"),
                    tf32={"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
                    cudnn_benchmark=torch.backends.cudnn.benchmark)
    else:
        info.update(device_name=info["cpu"], device_count=0, driver="n/a (CPU)")
    return info


# --------------------------------------------------------------------------------------------------
# running the sections


def run_section(name: str, call, budget: float, record: dict) -> None:
    """Run one section with its budget, recording status, seconds and, on failure, the traceback."""
    started = time.monotonic()
    clock = gpu_checks.Clock(budget)
    try:
        with gpu_checks.hard_limit(budget * 1.25 + 30):
            record["status"] = call(clock, record) or "ok"
    except gpu_checks.SectionTimeout as error:
        record["status"] = f"timed out: {error}"
    except Exception as error:  # the section's failure; the others go on
        record["status"] = f"failed: {type(error).__name__}: {str(error)[:300]}"
        record["traceback"] = gpu_checks.traceback_summary(error)
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    record["seconds"] = round(time.monotonic() - started, 1)


def section_calls(args, device: torch.device, size: gpu_checks.Sizes, stem: str, log) -> dict:
    backend = args.compile_backend or ("aot_eager" if size.preset == "dry" and device.type == "cpu" else "inductor")
    c = gpu_checks
    return {
        "tests": lambda clock, rec: c.run_tests(device, size, clock, rec, log),
        "gradients": lambda clock, rec: c.run_gradients(device, size, clock, rec, log, backend),
        "suite": lambda clock, rec: c.run_suite(device, size, clock, rec, log, args.out, stem, backend,
                                                args.peers_python),
        "throughput": lambda clock, rec: c.run_throughput(device, size, clock, rec, log),
        "ddp": lambda clock, rec: c.run_ddp(device, size, clock, rec, log),
    }


def failed(results: dict) -> list[str]:
    return [n for n, s in results["sections"].items() if s["status"].startswith(("failed", "timed out"))]


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is unavailable on this machine: nothing was run (use --device cpu --dry-run).")
        return 2
    preset = "dry" if args.dry_run else "quick" if args.quick else "full"
    size = gpu_checks.sizes(preset)
    if preset == "dry" and device.type == "cpu":
        torch.set_num_threads(1)  # tiny tensors: one thread is faster, and immune to a loaded machine
    budget = args.budget or DEFAULT_BUDGET[preset]
    started = time.monotonic()
    faulthandler.dump_traceback_later(budget * 1.25 + 300, exit=True)  # the last resort against a hang
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H%M%SZ")
    stem = args.name or f"gpu-{stamp}" + ("-quick" if args.quick else "") + ("-dry-run" if args.dry_run else "")
    args.out.mkdir(parents=True, exist_ok=True)

    def log(line: str) -> None:
        print(f"[{time.monotonic() - started:6.1f} s] {line}", flush=True)

    results = {"schema": "revnets-gpu-run/1", "config": {
        "device": str(device), "preset": preset, "budget_s": budget, "sections": args.sections,
        "argv": sys.argv[1:] if argv is None else argv, "sizes": dataclasses.asdict(size)},
        "environment": environment(device, args.commit), "sections": {}}
    env = results["environment"]
    log(f"revnets GPU run ({preset}): {env['device_name']}, driver {env['driver']}, torch {env['torch']}, "
        f"commit {env['commit']}, budget {budget:.0f} s")
    calls = section_calls(args, device, size, stem, log)
    todo = [s for s in SECTIONS if s in args.sections]
    for name in SECTIONS:
        results["sections"][name] = {"status": "skipped: not selected (--sections)"} if name not in todo else \
            {"status": "not reached"}
    if "ddp" in todo and device.type == "cuda" and torch.cuda.device_count() < 2:
        todo.remove("ddp")  # known now: its time goes to the others
        results["sections"]["ddp"] = {"status": "skipped: one GPU", "gpus": torch.cuda.device_count()}
    weights = WEIGHTS[preset]
    write(results, args.out, stem)
    for i, name in enumerate(todo):
        left = budget - (time.monotonic() - started)
        share = max(left, 0.0) * weights[name] / sum(weights[n] for n in todo[i:])
        record = results["sections"][name] = {"status": "running", "budget_s": round(share, 1)}
        log(f"{name}: {share:.0f} s budget")
        if share < 1:
            record["status"] = "skipped: no time left in the run's budget"
        else:
            run_section(name, calls[name], share, record)
        log(f"{name}: {record['status']} ({record.get('seconds', 0)} s)")
        results["elapsed_s"] = round(time.monotonic() - started, 1)
        write(results, args.out, stem)
    faulthandler.cancel_dump_traceback_later()
    results["failed_sections"] = failed(results)
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    paths = write(results, args.out, stem)
    log(f"saved {paths[0]} and {paths[1].name}; failed sections: {', '.join(results['failed_sections']) or 'none'}")
    return 1 if results["failed_sections"] else 0


# --------------------------------------------------------------------------------------------------
# outputs


def write(results: dict, out: Path, stem: str) -> tuple[Path, Path]:
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    json_path.write_text(json.dumps(results, indent=1, default=str))
    md_path.write_text(markdown(results))
    return json_path, md_path


def _mib(value) -> str:
    return "" if value is None else f"{value / 2**20:.1f}"


def _err(row: dict) -> str:
    if row.get("status") != "ok":
        return row.get("status", "")[:60]
    return f"{row['max_rel_error']:.1e} {'✓' if row['pass'] else '✗ > ' + format(row['tolerance'], '.0e')}"


def markdown(results: dict) -> str:
    env, sections = results["environment"], results["sections"]
    lines = [f"# revnets GPU run ({results['config']['preset']}) — {env['date']}", "",
             f"Device **{env['device_name']}** ({env['device']}, {env.get('device_count')} visible), driver "
             f"{env['driver']}, CUDA runtime {env['cuda_runtime']}; torch {env['torch']}, Python {env['python']}, "
             f"transformers {env['versions']['transformers']}, torchvision {env['versions']['torchvision']}; "
             f"revnets {env['revnets']} at {env['commit']} (source digest {env['source_digest']}). "
             f"Elapsed {results.get('elapsed_s')} s of a {results['config']['budget_s']:.0f} s budget.", "",
             "| section | status | seconds |", "|---|---|---|"]
    lines += [f"| {n} | {s['status'][:160]} | {s.get('seconds', '')} |" for n, s in sections.items()]
    lines.append("")
    for name, render in (("tests", tests_md), ("gradients", gradients_md), ("suite", suite_md),
                         ("throughput", throughput_md), ("ddp", ddp_md)):
        record = sections.get(name, {})
        lines += [f"## {name}", "", f"Status: {record.get('status')}", ""]
        with contextlib.suppress(Exception):  # a partial record: what it has
            lines += render(record)
        if record.get("traceback"):
            lines += ["```", record["traceback"].strip(), "```", ""]
    return "\n".join(lines) + "\n"


def tests_md(record: dict) -> list[str]:
    lines = [f"{len(record.get('selected', []))} test functions selected ({record.get('selection')}). "
             f"{record.get('note', '')} pytest: {record.get('summary', '')}", ""]
    cases = record.get("cases") or []
    if cases:
        lines += ["| test | outcome | s | message |", "|---|---|---|---|"]
        lines += [f"| {c['test']} | {c['outcome']} | {c['seconds']:.1f} | {(c['message'] or '')[:120]} |"
                  for c in cases]
    return [*lines, ""]


def gradients_md(record: dict) -> list[str]:
    sizes, cases = record["sizes"], record["cases"]
    strategies = list(gpu_checks.STRATEGIES)
    lines = [f"Figure: {record['figure']}; tolerance {record['tolerance']}; depth {sizes['depth']}, width "
             f"{sizes['width']}, batch {sizes['batch']}; functions {record['functions']}. Counts: "
             f"{record.get('counts')}.", "", "| dtype | functions | scheme | " + " | ".join(strategies) + " |",
             "|---" * (3 + len(strategies)) + "|"]
    grid = [c for c in cases if "autocast" not in c and "compiled" not in c]
    keys = list(dict.fromkeys((c["dtype"], c["functions"], c["scheme"]) for c in grid))
    for key in keys:
        cells = {c["strategy"]: _err(c) for c in grid if (c["dtype"], c["functions"], c["scheme"]) == key}
        lines.append(f"| {' | '.join(key)} | " + " | ".join(cells.get(s, "") for s in strategies) + " |")
    lines += ["", f"bf16 autocast (tolerance {record['autocast_factor']} × autocast's own error), and "
              "torch.compile:", "", "| case | reference | autocast's own error | max rel. error |", "|---|---|---|---|"]
    for c in cases:
        if "autocast" in c or "compiled" in c:
            label = f"{c.get('scheme')} {c.get('strategy')}" + (f", compiled ({c['compiled']})" if "compiled" in c
                                                                  else ", bf16")
            own = c.get("autocast_error")
            lines.append(f"| {label} | {c.get('reference', '')} | {'' if own is None else f'{own:.1e}'} | {_err(c)} |")
    return [*lines, ""]


def suite_md(record: dict) -> list[str]:
    results = record.get("results", {})
    lines = [f"Files: {', '.join(record.get('files', []))}. Peers: {results.get('peers')}. Seconds per section: "
             f"{results.get('section_seconds')}. Left out: {results.get('skipped_sections') or 'none'}.", ""]
    text = record.get("markdown") or record.get("markdown_error", "")
    return lines + [("##" + line) if line.startswith("#") else line for line in text.splitlines()] + [""]


def throughput_md(record: dict) -> list[str]:
    lines = [f"Memory: {record['memory_figure']}. Largest batch: doubling then bisection until out of memory, "
             "within a time cap per model (capped = not narrowed down before the cap).", "",
             "| model | variant | precision | batch | per second | memory MiB | largest batch | its memory MiB | "
             "first failure | capped | s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in record["models"]:
        if row["status"] != "ok":
            lines.append(f"| {row['model']} | {row['variant']} | {row['precision']} | {row['status'][:150]} |"
                         " | | | | | | |")
            continue
        t, s = row["throughput"], row["search"]
        rate = f"{t['items_per_second']:.0f} {row['unit']}" if "items_per_second" in t else t.get("oom", "")[:60]
        memory = t.get("max_memory_allocated") or t.get("cpu_tracked_peak")
        at_largest = [e.get("max_memory_allocated") for e in s["tried"]
                      if e["fits"] and e["batch"] == s["largest_batch"]]
        failure = f"{s['first_oom']}: {(s.get('limit') or '')[:50]}" if s["first_oom"] else ""
        lines.append(f"| {row['model']} | {row['variant']} | {row['precision']} | {t['batch']} | {rate} | "
                     f"{_mib(memory)} | {s['largest_batch']} | {_mib(at_largest[0] if at_largest else None)} | "
                     f"{failure} | {s['capped']} | {row['seconds']} |")
    return [*lines, ""]


def ddp_md(record: dict) -> list[str]:
    if "model" not in record:
        return []
    return [f"{record['backend']}: {record['model']}. Max relative gradient error against one process "
            f"(tolerance {record['tolerance']}): rank 0 {record['rank0']['error']:.1e}, rank 1 "
            f"{record['rank1']['error']:.1e}; parameters equal across ranks: {record['params_equal_across_ranks']}; "
            f"step {record['rank0']['seconds'] * 1e3:.1f} ms, memory rank 0 "
            f"{_mib(record['rank0'].get('max_memory_allocated') or record['rank0'].get('cpu_tracked_peak'))} MiB.",
            ""]


if __name__ == "__main__":
    sys.exit(main())
