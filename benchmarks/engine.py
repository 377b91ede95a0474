"""Speed and memory of the revnets engine (MomentumNet), side by side with plain baselines and peers.

Configuration (the issue's): width W = 256, batch B = 512, f_n = Linear(W, W) → Tanh → Linear(W, W),
MomentumNet γ = 0.9, depth 64 for timing, CPU, ``torch.set_num_threads(available cores)``.

1. Time of one forward + backward (``y = net(x); y.backward(g)``) for every contender, interleaved
   across trials (the order is rotated every trial, so drift and position effects cancel); warm-up
   trials are dropped; median and interquartile range; ratios to revnets' ``mode="autograd"``
   measured in the same run (ratio of medians, with the IQR of the per-trial paired ratios).
2. Memory (see ``benchmarks/memory.py``), at several depths:
   (a) bytes autograd packs for the backward (saved-tensor hooks; parameters and the input counted
       apart), (b) bytes held after the forward (live storages created by ATen ops, tracked with a
       TorchDispatchMode and weak references; cross-checked with the allocator events of the
       profiler), (c) peak live bytes during forward + backward (same two instruments), and the
       bytes of the parameter gradients, which any method must produce.
3. Exact mode's information buffer: bits per element per layer (``ExactState.buffer_bits()``).
4. Sanity checks: the memory tracker on a plain autograd ResNet must grow linearly with depth, by
   the two activations each layer saves; revnets' gradients must match plain autograd.

Usage::

    python benchmarks/engine.py            # full run (about 3-5 minutes on 2 CPU cores)
    python benchmarks/engine.py --quick    # fewer trials and depths (under a minute)
    python benchmarks/engine.py --out results.json --no-peers
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime
import gc
import importlib
import importlib.metadata
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import revnets  # noqa: E402
from revnets.memory import StorageTracker, allocator_held, mib, saved_tensors, storage_bytes  # noqa: E402

BASELINE = "autograd"
SAME_SCHEME = ("reversible", "checkpoint", "exact", "momentumnet")
"""Contenders computing the same function as the baseline (their gradients are compared with it)."""
TARGETS = {"reversible": 1.35, "exact": 1.6}
"""Targets of the issue: time of fwd+bwd relative to revnets' autograd mode."""


@dataclass
class Config:
    width: int = 256
    batch: int = 512
    depth: int = 64
    gamma: float = 0.9
    warmup: int = 3
    trials: int = 15
    memory_depths: tuple[int, ...] = (16, 64, 256)
    memory_batch: int = 512
    sanity_depths: tuple[int, ...] = (2, 4, 8, 16)
    seed: int = 0
    threads: int = 1
    peers: bool = True
    allocator_check: bool = True

    @classmethod
    def quick(cls, **changes) -> Config:
        return dataclasses.replace(
            cls(warmup=1, trials=5, memory_depths=(16, 64), sanity_depths=(2, 4, 8)), **changes
        )


# --------------------------------------------------------------------------------------------------
# The networks under test


def make_functions(depth: int, width: int, seed: int) -> list[nn.Module]:
    """The residual functions f_n = Linear(W, W) → Tanh → Linear(W, W), seeded."""
    torch.manual_seed(seed)
    return [nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width)) for _ in range(depth)]


class PlainResNet(nn.Module):
    """x ← x + f_n(x): the plain residual network, optionally with torch.utils.checkpoint per block."""

    def __init__(self, functions: list[nn.Module], use_checkpoint: bool = False):
        super().__init__()
        self.functions = nn.ModuleList(functions)
        self.use_checkpoint = use_checkpoint

    def forward(self, x: Tensor) -> Tensor:
        for f in self.functions:
            if self.use_checkpoint:
                x = checkpoint(_residual, f, x, use_reentrant=False)
            else:
                x = _residual(f, x)
        return x


def _residual(f: nn.Module, x: Tensor) -> Tensor:
    return x + f(x)


@dataclass
class Contender:
    """One way of running the same depth-N stack of functions.

    ``width_factor``: the input is (B, width_factor·W); the two-stream peers (revlib, memcnn) run the
    same 64 functions on two W-wide streams, so the same FLOPs with a state twice as large.
    """

    name: str
    label: str
    build: Callable[[list[nn.Module], float], nn.Module]
    width_factor: int = 1
    group: str = "revnets"
    note: str = ""


def revnets_contenders() -> list[Contender]:
    def mode(m):
        return lambda fs, gamma: revnets.MomentumNet(fs, gamma=gamma, mode=m)

    return [
        Contender("autograd", "revnets MomentumNet mode=autograd", mode("autograd")),
        Contender("reversible", "revnets MomentumNet mode=reversible", mode("reversible")),
        Contender("checkpoint", "revnets MomentumNet mode=checkpoint", mode("checkpoint")),
        Contender("exact", "revnets MomentumNet exact=True", lambda fs, gamma: revnets.MomentumNet(fs, gamma=gamma, exact=True)),
    ]


def baseline_contenders() -> list[Contender]:
    return [
        Contender("plain", "plain ResNet, autograd", lambda fs, g: PlainResNet(fs), group="baseline"),
        Contender(
            "plain+ckpt",
            "plain ResNet, torch checkpoint/block",
            lambda fs, g: PlainResNet(fs, use_checkpoint=True),
            group="baseline",
            note="torch.utils.checkpoint(use_reentrant=False) around every block",
        ),
    ]


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def peer_contenders(log: Callable[[str], None]) -> tuple[list[Contender], dict[str, str]]:
    """Peers that import; others are reported as not installed and skipped."""
    found: list[Contender] = []
    status: dict[str, str] = {}

    def available(module: str) -> bool:
        try:
            importlib.import_module(module)
        except Exception as error:  # noqa: BLE001 - any import failure means "skip this peer"
            status[module] = f"not installed ({type(error).__name__}: {error})"
            log(f"  peer {module}: not installed ({type(error).__name__}: {error}) - skipped")
            return False
        status[module] = _version(module)
        return True

    if available("momentumnet"):
        import momentumnet

        found.append(
            Contender(
                "momentumnet",
                f"momentumnet {_version('momentumnet')} use_backprop=False",
                lambda fs, gamma: momentumnet.MomentumNet(fs, gamma=gamma, use_backprop=False),
                group="peer",
                note="same momentum step and functions",
            )
        )
    if available("revlib"):
        import revlib

        found.append(
            Contender(
                "revlib",
                f"revlib {_version('revlib')} ReversibleSequential",
                lambda fs, gamma: revlib.ReversibleSequential(*fs),
                width_factor=2,
                group="peer",
                note="additive RevNet coupling, default memory mode (autograd_function); "
                "the same functions on two W-wide streams (input B x 2W)",
            )
        )
    if available("memcnn"):
        import memcnn

        def build_memcnn(fs, gamma):
            if len(fs) % 2:
                raise ValueError("memcnn's additive coupling takes the functions in pairs (F, G): depth must be even")
            return nn.Sequential(
                *(
                    memcnn.InvertibleModuleWrapper(
                        memcnn.AdditiveCoupling(Fm=fs[i], Gm=fs[i + 1]), keep_input=False, keep_input_inverse=False
                    )
                    for i in range(0, len(fs), 2)
                )
            )

        found.append(
            Contender(
                "memcnn",
                f"memcnn {_version('memcnn')} AdditiveCoupling",
                build_memcnn,
                width_factor=2,
                group="peer",
                note="InvertibleModuleWrapper(AdditiveCoupling(F=f_2k, G=f_2k+1), keep_input=False): "
                "depth/2 couplings = the same functions on two W-wide streams (input B x 2W)",
            )
        )
    return found, status


# --------------------------------------------------------------------------------------------------
# Running one forward + backward


@dataclass
class Instance:
    """A contender built on a given stack of functions, with its input and output gradient."""

    contender: Contender
    model: nn.Module
    params: list[Tensor]
    x: Tensor
    grad_output: Tensor

    def fresh_input(self) -> Tensor:
        # memcnn frees its inputs' storage in place (keep_input=False): give each call its own copy.
        return self.x.detach().clone().requires_grad_()

    def clear_grads(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self, x: Tensor) -> None:
        """One forward and backward pass (what is timed)."""
        self.model(x).backward(self.grad_output)


def instantiate(contender: Contender, functions: list[nn.Module], cfg: Config, batch: int) -> Instance:
    model = contender.build(functions, cfg.gamma)
    params = list(dict.fromkeys(p for p in model.parameters() if p.requires_grad))
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    shape = (batch, contender.width_factor * cfg.width)
    x = torch.randn(shape, generator=generator)
    grad_output = torch.randn(shape, generator=generator)
    return Instance(contender, model, params, x, grad_output)


# --------------------------------------------------------------------------------------------------
# 1. Speed


def quantiles(values: list[float]) -> tuple[float, float, float]:
    """(25th percentile, median, 75th percentile)."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def measure_speed(instances: list[Instance], cfg: Config, log) -> dict:
    times: dict[str, list[float]] = {i.contender.name: [] for i in instances}
    total = cfg.warmup + cfg.trials
    for trial in range(total):
        shift = trial % len(instances)
        for inst in instances[shift:] + instances[:shift]:
            x = inst.fresh_input()
            inst.clear_grads()
            gc.collect()
            gc.disable()
            try:
                start = time.perf_counter()
                inst.step(x)
                elapsed = time.perf_counter() - start
            finally:
                gc.enable()
            times[inst.contender.name].append(elapsed)
        if sys.stdout.isatty():
            log(f"  trial {trial + 1}/{total}{' (warm-up)' if trial < cfg.warmup else ''}", end="\r")
    base = times[BASELINE][cfg.warmup :]
    results = {}
    for inst in instances:
        name = inst.contender.name
        timed = times[name][cfg.warmup :]
        q1, med, q3 = quantiles(timed)
        paired = [t / b for t, b in zip(timed, base, strict=True)]
        r1, _, r3 = quantiles(paired)
        results[name] = {
            "label": inst.contender.label,
            "group": inst.contender.group,
            "median_s": med,
            "iqr_s": [q1, q3],
            "ratio_to_autograd": med / statistics.median(base),
            "paired_ratio_iqr": [r1, r3],
            "target_ratio": TARGETS.get(name),
            "warmup_s": times[name][: cfg.warmup],
            "timed_s": timed,
        }
    return results


# --------------------------------------------------------------------------------------------------
# 2. Memory


def measure_memory(inst: Instance, cfg: Config) -> tuple[dict, Tensor]:
    """(a) saved for backward, (b) held after forward, (c) peak during fwd+bwd, for one instance.

    Returns the numbers and the gradients (input, then parameters) of the tracked pass, flattened.
    """
    inst.clear_grads()
    x = inst.fresh_input()
    gc.collect()
    with StorageTracker() as tracker:
        with saved_tensors(exclude=[*inst.params, x]) as saved:  # the forward only: recomputations
            y = inst.model(x)  # inside the backward also pack tensors, but only for the moment
        gc.collect()
        held = tracker.recount()
        held_running = tracker.live_bytes
        forward_peak = tracker.peak_bytes
        y.backward(inst.grad_output)
        del y
        gc.collect()
    grads = [x.grad] + [p.grad for p in inst.params]
    result = {
        "saved_bytes": saved.bytes,
        "saved_params_and_input_bytes": saved.excluded_bytes,
        "held_after_forward_bytes": held,
        "held_after_forward_running_bytes": held_running,
        "forward_peak_bytes": forward_peak,
        "peak_fwd_bwd_bytes": tracker.peak_bytes,
        "param_grad_bytes": storage_bytes(p.grad for p in inst.params if p.grad is not None),
        "param_bytes": storage_bytes(inst.params),
        "state_bytes": inst.x.numel() * inst.x.element_size(),
    }
    flat = torch.cat([torch.zeros(0) if g is None else g.reshape(-1) for g in grads])
    del x, grads
    if cfg.allocator_check:
        inst.clear_grads()
        x = inst.fresh_input()
        y, alloc_held, _ = allocator_held(lambda: inst.model(x))
        del y, x
        inst.clear_grads()
        x = inst.fresh_input()
        _, _, alloc_peak = allocator_held(lambda: inst.step(x))
        del x
        result["allocator_held_after_forward_bytes"] = alloc_held
        result["allocator_peak_fwd_bwd_bytes"] = alloc_peak
    inst.clear_grads()
    gc.collect()
    return result, flat


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least squares y = a + b·x: (a, b, largest absolute residual)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    a = my - b * mx
    return a, b, max(abs(y - (a + b * x)) for x, y in zip(xs, ys))


def sanity_check_tracker(cfg: Config, log) -> dict:
    """The tracker on a plain autograd ResNet: held after forward = c + depth · (x_n + tanh output)."""
    depths = list(cfg.sanity_depths)
    held = []
    for depth in depths:
        contender = baseline_contenders()[0]
        inst = instantiate(contender, make_functions(depth, cfg.width, cfg.seed), cfg, cfg.memory_batch)
        held.append(measure_memory(inst, dataclasses.replace(cfg, allocator_check=False))[0]["held_after_forward_bytes"])
    a, b, residual = fit_line(depths, held)
    expected = 2 * cfg.memory_batch * cfg.width * 4  # each block saves its input x_n and the Tanh output
    ok = abs(b / expected - 1) < 0.01 and residual < 0.01 * max(held)
    log(
        f"  plain ResNet, autograd, depths {depths}: held after forward {[round(mib(h), 3) for h in held]} MiB\n"
        f"  slope {mib(b):.4f} MiB/layer (expected {mib(expected):.4f}: x_n and tanh(.) of B x W float32), "
        f"intercept {mib(a):.3f} MiB, largest residual {residual:.0f} B -> {'PASS' if ok else 'FAIL'}"
    )
    return {"depths": depths, "held_bytes": held, "slope_bytes_per_layer": b, "expected_slope": expected,
            "intercept_bytes": a, "max_residual_bytes": residual, "linear": ok}


# --------------------------------------------------------------------------------------------------
# 3. Exact mode's information buffer


def buffer_bits(cfg: Config, depth: int, batch: int) -> dict:
    net = revnets.MomentumNet(make_functions(depth, cfg.width, cfg.seed), gamma=cfg.gamma, exact=True)
    x = torch.randn(batch, cfg.width, generator=torch.Generator().manual_seed(cfg.seed + 1))
    with torch.no_grad():
        out = net.forward_exact(net.exact_state(x))
    bits = out.buffer_bits()
    floor = math.log2(1 / cfg.gamma) if cfg.gamma < 1 else 0.0
    return {"depth": depth, "batch": batch, "bits": bits, "bits_per_element_per_layer": bits / (x.numel() * depth),
            "floor_log2_1_over_gamma": floor, "bytes": bits / 8}


# --------------------------------------------------------------------------------------------------
# Environment and output


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "revnets"], cwd=HERE.parent, capture_output=True,
                               text=True, check=True).stdout.strip()
        return rev + (" (revnets/ modified)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(cfg: Config, peer_status: dict, malloc: str) -> dict:
    return {
        "malloc": malloc,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "logical_cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "revnets": revnets.__version__,
        "revnets_git": git_revision(),
        "peers": peer_status,
        "mkldnn": torch.backends.mkldnn.is_available(),
    }


def keep_freed_memory() -> str:
    """Stop glibc from handing freed memory back to the kernel (mallopt), and say what was done.

    On VMs with free-page reporting (this benchmark's firecracker VM reports free 8 MiB blocks to
    the host), pages given back are slow to fault in again: single fwd+bwd passes of 0.2 s took up
    to 30 s at random. Keeping the heap (no mmap for blocks below 32 MiB, no trimming) removes that
    noise for every contender alike; it changes no memory number measured here (those count tensor
    storages and allocator events, not resident pages).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return "default allocator (not glibc)"
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    ok = all(
        libc.mallopt(option, value)
        for option, value in ((m_mmap_threshold, 32 << 20), (m_trim_threshold, 1 << 30), (m_top_pad, 64 << 20))
    )
    return ("glibc mallopt: M_MMAP_THRESHOLD=32 MiB, M_TRIM_THRESHOLD=1 GiB, M_TOP_PAD=64 MiB (freed memory stays in the process)"
            if ok else "glibc mallopt failed: default allocator")


def log(message: str = "", end: str = "\n") -> None:
    print(message, end=end, flush=True)


def print_speed_table(speed: dict, cfg: Config) -> None:
    log(f"\nfwd+bwd time, depth {cfg.depth}, B={cfg.batch}, W={cfg.width}, {cfg.trials} timed trials "
        f"after {cfg.warmup} warm-up, interleaved")
    header = f"{'contender':<44} {'median s':>9} {'IQR s':>15} {'vs autograd':>11} {'paired IQR':>13}  target"
    log(header)
    log("-" * len(header))
    for name, r in speed.items():
        target = r["target_ratio"]
        verdict = "" if target is None else f"<= {target:.2f}x {'PASS' if r['ratio_to_autograd'] <= target else 'FAIL'}"
        log(f"{r['label']:<44} {r['median_s']:>9.4f} {r['iqr_s'][0]:>7.4f}-{r['iqr_s'][1]:<7.4f} "
            f"{r['ratio_to_autograd']:>10.2f}x {r['paired_ratio_iqr'][0]:>6.2f}-{r['paired_ratio_iqr'][1]:<6.2f}  {verdict}")


def print_memory_table(memory: dict, cfg: Config) -> None:
    allocator = cfg.allocator_check
    for depth, rows in memory.items():
        log(f"\nmemory, depth {depth}, B={cfg.memory_batch}, W={cfg.width} (MiB; state x = "
            f"{mib(cfg.memory_batch * cfg.width * 4):.2f} MiB)")
        header = (f"{'contender':<44} {'(a) saved':>9} {'(b) held':>9}" + (f" {'alloc':>7}" if allocator else "")
                  + f" {'(c) peak':>9}" + (f" {'alloc':>7}" if allocator else "") + f" {'grads':>7} {'grad err':>9}")
        log(header)
        log("-" * len(header))
        for name, r in rows.items():
            if "error" in r:
                log(f"{r['label']:<44} error: {r['error'][:120]}")
                continue
            line = f"{r['label']:<44} {mib(r['saved_bytes']):>9.2f} {mib(r['held_after_forward_bytes']):>9.2f}"
            if allocator:
                line += f" {mib(r['allocator_held_after_forward_bytes']):>7.2f}"
            line += f" {mib(r['peak_fwd_bwd_bytes']):>9.2f}"
            if allocator:
                line += f" {mib(r['allocator_peak_fwd_bwd_bytes']):>7.2f}"
            line += f" {mib(r['param_grad_bytes']):>7.2f}"
            if "grad_rel_error_vs_autograd" in r:
                line += f" {r['grad_rel_error_vs_autograd']:>9.1e}"
            log(line)


def depth_growth(memory: dict) -> dict:
    """Per contender: least-squares growth of (b) held-after-forward and (a) saved bytes per layer."""
    depths = sorted(memory)
    growth = {}
    for name in memory[depths[0]]:
        rows = [memory[d].get(name, {}) for d in depths]
        if any("held_after_forward_bytes" not in r for r in rows):
            continue
        _, held_slope, _ = fit_line(depths, [r["held_after_forward_bytes"] for r in rows])
        _, saved_slope, _ = fit_line(depths, [r["saved_bytes"] for r in rows])
        growth[name] = {"label": rows[0]["label"], "held_bytes_per_layer": held_slope, "saved_bytes_per_layer": saved_slope,
                        "held_first_bytes": rows[0]["held_after_forward_bytes"],
                        "held_last_bytes": rows[-1]["held_after_forward_bytes"]}
    return growth


# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer trials and depths (under a minute)")
    parser.add_argument("--out", type=Path, default=None, help="JSON file for config, environment and numbers "
                        "(default: benchmarks/results/engine[-quick].json)")
    parser.add_argument("--no-peers", action="store_true", help="skip momentumnet, revlib and memcnn")
    parser.add_argument("--no-allocator-check", action="store_true", help="skip the profiler cross-check (faster)")
    parser.add_argument("--default-malloc", action="store_true", help="leave glibc's malloc settings alone")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: available cores)")
    args = parser.parse_args(argv)

    malloc = "default allocator (--default-malloc)" if args.default_malloc else keep_freed_memory()
    threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    torch.set_num_threads(threads)
    changes = {"threads": threads, "peers": not args.no_peers, "allocator_check": not args.no_allocator_check}
    cfg = Config.quick(**changes) if args.quick else Config(**changes)
    out = args.out or HERE / "results" / ("engine-quick.json" if args.quick else "engine.json")
    started = time.perf_counter()

    log(f"revnets {revnets.__version__} engine benchmark{' (quick)' if args.quick else ''}")
    log(f"hardware: {cpu_model()}, {threads} torch threads (torch.set_num_threads), torch {torch.__version__}")
    log(f"allocator: {malloc}")
    log(f"config: {dataclasses.asdict(cfg)}")

    contenders = revnets_contenders() + baseline_contenders()
    peer_status: dict[str, str] = {}
    if cfg.peers:
        log("peers:")
        peers, peer_status = peer_contenders(log)
        contenders += peers
    results: dict = {"config": dataclasses.asdict(cfg), "environment": environment(cfg, peer_status, malloc)}

    log("\nsanity check of the memory tracker:")
    results["tracker_sanity"] = sanity_check_tracker(cfg, log)

    # 1. speed
    functions = make_functions(cfg.depth, cfg.width, cfg.seed)
    instances = []
    for contender in contenders:
        try:
            inst = instantiate(contender, functions, cfg, cfg.batch)
            inst.step(inst.fresh_input())  # fails early rather than in the timed loop
            inst.clear_grads()
            instances.append(inst)
        except Exception as error:  # noqa: BLE001 - a failing peer is reported and skipped
            log(f"  {contender.label}: failed ({type(error).__name__}: {error}) - skipped")
            results.setdefault("failures", {})[contender.name] = traceback.format_exc()
    log(f"\ntiming {len(instances)} contenders ...")
    results["speed"] = measure_speed(instances, cfg, log)
    print_speed_table(results["speed"], cfg)
    del instances, functions
    gc.collect()

    # 2. memory
    memory: dict[int, dict] = {}
    for depth in cfg.memory_depths:
        log(f"measuring memory at depth {depth} ...")
        functions = make_functions(depth, cfg.width, cfg.seed)
        memory[depth] = {}
        reference = None
        for contender in contenders:
            row = memory[depth][contender.name] = {"label": contender.label}
            try:
                inst = instantiate(contender, functions, cfg, cfg.memory_batch)
                numbers, grads = measure_memory(inst, cfg)
                row.update(numbers)
                if contender.name == BASELINE:
                    reference = grads
                elif contender.name in SAME_SCHEME and reference is not None:
                    row["grad_rel_error_vs_autograd"] = float((grads - reference).norm() / reference.norm())
            except Exception as error:  # noqa: BLE001 - reported in the table and the JSON
                row["error"] = f"{type(error).__name__}: {error}"
            finally:
                inst = grads = None
                gc.collect()
        del functions
    results["memory"] = {str(d): rows for d, rows in memory.items()}
    print_memory_table(memory, cfg)

    growth = depth_growth(memory)
    results["memory_growth"] = growth
    log(f"\nheld after forward vs depth {list(memory)} (least-squares growth per layer):")
    for name, g in growth.items():
        log(f"  {g['label']:<44} {g['held_bytes_per_layer'] / 1024:>9.2f} KiB/layer   "
            f"({mib(g['held_first_bytes']):.2f} -> {mib(g['held_last_bytes']):.2f} MiB)")

    # 3. exact mode's buffer
    log("\nexact mode information buffer (forward_exact(exact_state(x)).buffer_bits()):")
    floor_done = False
    results["exact_buffer"] = []
    for depth in sorted({cfg.depth, *cfg.memory_depths}):
        b = buffer_bits(cfg, depth, cfg.memory_batch)
        results["exact_buffer"].append(b)
        log(f"  depth {depth:>4}: {b['bits_per_element_per_layer']:.4f} bits/element/layer "
            f"({b['bytes'] / 2**10:.1f} KiB in all)" + ("" if floor_done else f"; floor log2(1/γ) = {b['floor_log2_1_over_gamma']:.4f}"))
        floor_done = True
    target_lines = []
    for name in ("reversible", "exact"):
        if name in growth:
            g = growth[name]
            target_lines.append(f"{name}: +{g['held_bytes_per_layer'] / 1024:.2f} KiB/layer held after forward")
    if "exact" in growth and results["exact_buffer"]:
        per_layer = results["exact_buffer"][-1]["bytes"] / results["exact_buffer"][-1]["depth"]
        target_lines.append(f"exact's buffer alone: {per_layer / 1024:.2f} KiB/layer (the information floor, not a leak)")
    log("\ndepth independence (target: held after forward constant in depth for reversible and exact): "
        + "; ".join(target_lines))

    results["elapsed_s"] = time.perf_counter() - started
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=str))
    log(f"\nsaved {out} ({results['elapsed_s']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
