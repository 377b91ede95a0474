"""The checks and measurements of ``benchmarks/gpu.py`` (its docstring says how to run them).

Every section function takes the device, the run's sizes (:class:`Sizes`), a :class:`Clock` (its
time budget), a ``record`` dict that it fills as it goes (what is in it survives a failure or a
time-out of the section) and a ``log`` callable; it returns the section's status: ``"ok"``,
``"partial: …"`` (items left out for time), ``"failed: …"`` or ``"skipped: …"``. The same functions run
on CUDA and, with tiny sizes, on the CPU (``--dry-run``); besides the standard library only torch,
torchvision, transformers and revnets are imported, and the suite's package (``benchmarks/suite``); pytest
runs in a subprocess.
"""

from __future__ import annotations

import _thread
import ast
import contextlib
import dataclasses
import functools
import gc
import importlib.util
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

import revnets
from revnets.memory import StorageTracker

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
SCHEMES = ("MomentumNet", "RevNet", "HamiltonianNet", "MidpointNet", "LeapfrogNet")
STRATEGIES = {"autograd": {"mode": "autograd"}, "reversible": {}, "checkpoint": {"mode": "checkpoint"},
              "exact": {"exact": True}, "memory_budget=0.5": {"memory_budget": 0.5}}
FUNCTIONS = ("mlp", "bn-dropout")
"""``mlp``: Linear-Tanh-Linear; ``bn-dropout``: Linear-BatchNorm-Tanh-Dropout(0.1)-Linear (training mode)."""
TOLERANCE = {"float32": 1e-4, "float64": 1e-8}
"""Largest accepted max|g − g_ref| / max|g_ref| against ``mode="autograd"`` on the same device."""
AUTOCAST_FACTOR = 1.5
"""Under bf16 autocast: a strategy's error against autograd under the same autocast must stay below this
times the error autocast itself makes (autograd under autocast against float32 autograd), as in
tests/test_training_precision.py."""
SUITE_ORDER = ("targets", "workloads", "zoo", "pareto", "budget", "depth", "batch", "width", "exact_buffer")
"""The suite's sections, most wanted first: later ones are left out when the time budget runs out."""
DRY_RUN_SUITE_SKIPS = ("batch", "width")
"""Left out of a dry run: their stacks are 64 layers deep whatever the preset, and they run the comparison
code of ``depth``, which the dry run runs."""


@dataclass(frozen=True)
class Sizes:
    """Every size of a run; :func:`sizes` gives the presets."""

    preset: str
    grad_depth: int = 8
    grad_width: int = 64
    grad_batch: int = 32
    image_side: int = 224
    zoo_side: int = 32
    vision_models: tuple[str, ...] = ("resnet50", "resnet101")
    vision_batch: int = 64
    vision_start: int = 16
    zoo_batch: int = 256
    zoo_start: int = 256
    llama: dict = dataclasses.field(default_factory=lambda: {
        "num_hidden_layers": 12, "hidden_size": 512, "intermediate_size": 1376, "num_attention_heads": 8,
        "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 2048})
    seq: int = 2048
    llama_batch: int = 4
    llama_start: int = 2
    warmup: int = 2
    steps: int = 5
    search_precision: float = 1 / 8
    """Bisection stops when (first OOM − largest fit) ≤ this × largest fit."""
    model_cap_s: float = 40.0
    synthetic_limit: int | None = None
    """Dry run: batches above this raise ``OutOfMemoryError`` (a CPU does not run out of memory; on a GPU it
    keeps the smoke test short), so that the search's out-of-memory path runs."""
    ddp_width: int = 256
    ddp_depth: int = 16
    ddp_batch: int = 64


def sizes(preset: str) -> Sizes:
    """``full``, ``quick`` (fewer models and steps, coarser search) or ``dry`` (tiny, for the CPU)."""
    if preset == "full":
        return Sizes("full")
    if preset == "quick":
        return Sizes("quick", vision_models=("resnet50",), warmup=1, steps=3, search_precision=1.0,
                     model_cap_s=15.0)
    llama = {"num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 128, "max_position_embeddings": 16}
    return Sizes("dry", grad_depth=2, grad_width=8, grad_batch=4, image_side=16, zoo_side=8,
                 vision_models=("resnet50",), vision_batch=4, vision_start=4, zoo_batch=4, zoo_start=4, llama=llama,
                 seq=16, llama_batch=2, llama_start=2,
                 warmup=0, steps=1, search_precision=0.5, model_cap_s=30.0, synthetic_limit=8, ddp_width=8,
                 ddp_depth=3, ddp_batch=8)


class Clock:
    """A time budget in seconds from now."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def expired(self) -> bool:
        return self.left() <= 0


class SectionTimeout(Exception):
    """A section (or a part of one) stopped at its hard limit by :func:`hard_limit`."""


@contextlib.contextmanager
def hard_limit(seconds: float):
    """Interrupt the main thread (KeyboardInterrupt, raised here as :class:`SectionTimeout`) after
    ``seconds``: what overruns its budget by far (a compilation, a hang between kernels) is stopped."""
    fired = threading.Event()

    def fire():
        fired.set()
        _thread.interrupt_main()

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    except KeyboardInterrupt:
        if fired.is_set():
            raise SectionTimeout(f"stopped at its hard limit of {seconds:.0f} s") from None
        raise
    finally:
        timer.cancel()


def traceback_summary(error: BaseException) -> str:
    return "".join(traceback.format_exception(type(error), error, error.__traceback__))[-3000:]


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def peak_memory(device: torch.device, out: dict):
    """``out["max_memory_allocated"]``: ``torch.cuda.max_memory_allocated`` over the block (bytes, all live
    tensors, weights included); on the CPU ``None``, and ``out["cpu_tracked_peak"]``: the peak bytes of
    the tensors the block creates (:class:`revnets.memory.StorageTracker`)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        try:
            yield
        finally:
            synchronize(device)
            out["max_memory_allocated"] = torch.cuda.max_memory_allocated(device)
        return
    tracker = StorageTracker()
    try:
        with tracker:
            yield
    finally:
        out["max_memory_allocated"] = None
        out["cpu_tracked_peak"] = tracker.peak_bytes


def is_out_of_memory(error: BaseException) -> bool:
    text = str(error)
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and any(s in text for s in ("out of memory", "ALLOC_FAILED")))


# --------------------------------------------------------------------------------------------------
# a. tests with CUDA paths (pytest) and the in-script gradient check


def cuda_test_ids(tests: Path) -> list[str]:
    """Test functions of ``tests/`` whose decorators or body mention CUDA, or use a module-level constant
    whose definition does (``DEVICES = [..., "cuda"]``, ``MISSING_GPU = "cuda:N"``); not this script's own
    test (``test_gpu_script.py``, which runs the dry run)."""
    ids = []
    for path in sorted(tests.glob("test_*.py")):
        text = path.read_text()
        if "cuda" not in text.lower() or path.name == "test_gpu_script.py":
            continue
        tree = ast.parse(text)
        constants = {target.id for node in tree.body if isinstance(node, ast.Assign)
                     and "cuda" in (ast.get_source_segment(text, node) or "").lower()
                     for target in node.targets if isinstance(target, ast.Name)}
        for node in tree.body:
            if not (isinstance(node, ast.FunctionDef) and node.name.startswith("test")):
                continue
            source = "\n".join(ast.get_source_segment(text, n) or "" for n in [*node.decorator_list, node])
            names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
            if "cuda" in source.lower() or names & constants:
                ids.append(f"{path.relative_to(tests.parent).as_posix()}::{node.name}")
    return ids


def junit_cases(path: Path) -> list[dict]:
    cases = []
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", None
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome, message = {"failure": "failed"}.get(child.tag, child.tag), (child.get("message") or "")[:400]
        cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time") or 0), "message": message})
    return cases


def run_tests(device, size: Sizes, clock: Clock, record: dict, log) -> str:
    """pytest on the test functions with CUDA paths (:func:`cuda_test_ids`); a dry run only collects them."""
    if importlib.util.find_spec("pytest") is None:
        return "skipped: pytest is not installed here"
    ids = record["selected"] = cuda_test_ids(REPO / "tests")
    record["selection"] = "test functions of tests/ that mention cuda, or use a module constant that does"
    with tempfile.TemporaryDirectory() as scratch:
        xml = Path(scratch) / "junit.xml"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--continue-on-collection-errors",
                   f"--junitxml={xml}", *ids]
        if size.preset == "dry":
            command.append("--collect-only")
            record["note"] = "dry run: the selection is collected, not run"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        log(f"tests: pytest on {len(ids)} test functions ({clock.left():.0f} s budget)")
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, start_new_session=True)
        try:
            output = process.communicate(timeout=max(clock.left(), 10))[0]
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # pytest and whatever it started
            output = process.communicate()[0]
        record["exit_code"] = process.returncode
        record["output_tail"] = output[-3000:]
        if xml.exists():
            record["cases"] = junit_cases(xml)
    summary = (output.strip().splitlines() or ["no output"])[-1]
    record["summary"] = summary
    if process.returncode == -signal.SIGKILL:
        return f"failed: pytest stopped at the time budget ({clock.seconds:.0f} s): {summary}"
    return "ok" if process.returncode == 0 else f"failed: pytest exit code {process.returncode}: {summary}"


def residual_function(kind: str, width: int) -> nn.Module:
    if kind == "mlp":
        return nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width))
    return nn.Sequential(nn.Linear(width, width), nn.BatchNorm1d(width), nn.Tanh(), nn.Dropout(0.1),
                         nn.Linear(width, width))


def scheme_net(scheme: str, kind: str, depth: int, width: int, **memory) -> revnets.ReversibleNet:
    """``scheme`` with seeded functions (the same weights whatever the strategy) on ``width`` features."""
    fw = width if scheme == "MomentumNet" else width // 2
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        fs = [residual_function(kind, fw) for _ in range(depth)]
        gs = [residual_function(kind, fw) for _ in range(depth)]
    if scheme == "MomentumNet":
        return revnets.MomentumNet(fs, gamma=0.9, **memory)
    if scheme == "RevNet":
        return revnets.RevNet(fs, gs, **memory)
    if scheme == "HamiltonianNet":
        return revnets.HamiltonianNet(fs, gs, h=0.1, **memory)
    return getattr(revnets, scheme)(fs, h=0.1, **memory)


def gradients(net: nn.Module, x: Tensor, g: Tensor, autocast: bool = False) -> Tensor:
    """Input and parameter gradients (float64, one vector) of one seeded training-mode step."""
    net.train().zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(7)  # the same dropout masks in every mode (docs/networks.md)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        y = net(x)
    (y.to(g.dtype) * g).sum().backward()
    grads = [x.grad] + [p.grad if p.grad is not None else torch.zeros_like(p) for p in net.parameters()]
    return torch.cat([t.detach().reshape(-1).double() for t in grads])


def errors(got: Tensor, ref: Tensor) -> dict:
    """max|got − ref| / max|ref| (the check's figure) and the norm-wise relative error."""
    ref = ref.to(got.device)
    return {"max_rel_error": float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-300)),
            "norm_rel_error": float((got - ref).norm() / ref.norm().clamp_min(1e-300))}


@dataclass(frozen=True)
class GradientCase:
    """One network (scheme, function kind) in one dtype on one device, with its data."""

    scheme: str
    kind: str
    size: Sizes
    device: torch.device
    dtype: torch.dtype

    def data(self) -> tuple[Tensor, Tensor]:
        generator = torch.Generator().manual_seed(1)
        x, g = (torch.randn(self.size.grad_batch, self.size.grad_width, generator=generator, dtype=torch.float64)
                for _ in "xg")
        return x.to(self.device, self.dtype), g.to(self.device, self.dtype)

    def grads(self, autocast: bool = False, device=None, dtype=None, **memory) -> Tensor:
        """Gradients of the network built with ``memory`` (on another device / dtype if given)."""
        device, dtype = device or self.device, dtype or self.dtype
        net = scheme_net(self.scheme, self.kind, self.size.grad_depth, self.size.grad_width, **memory)
        x, g = self.data()
        return gradients(net.to(device, dtype), x.to(device, dtype), g.to(device, dtype), autocast)

    def row(self, strategy: str, reference: str, **extra) -> dict:
        return {"scheme": self.scheme, "functions": self.kind, "strategy": strategy,
                "dtype": str(self.dtype).removeprefix("torch."), "reference": reference, **extra}


def _case(row: dict, run: Callable[[], dict], tolerance: float) -> dict:
    try:
        row.update(run())
        row["tolerance"] = tolerance
        row["pass"] = row["max_rel_error"] <= tolerance
        row["status"] = "ok"
    except Exception as error:  # recorded as this case's failure
        row.update({"status": f"error: {type(error).__name__}: {str(error)[:300]}", "pass": False,
                    "tolerance": tolerance})
    return row


def _against(case: GradientCase, ref: Tensor, autocast: bool = False, **memory) -> dict:
    return errors(case.grads(autocast, **memory), ref)


def _device_against_cpu(case: GradientCase, ref: Tensor) -> dict:
    return errors(ref.cpu(), case.grads(device=torch.device("cpu"), dtype=torch.float64, mode="autograd"))


def gradient_grid(device, size: Sizes, clock: Clock, rows: list) -> None:
    """Every scheme × strategy × function kind × dtype against ``mode="autograd"`` on the device; the
    ``autograd`` row itself against float64 autograd on the CPU (``mlp`` only: dropout draws other
    masks on another device)."""
    for dtype in (torch.float32, torch.float64):
        tolerance = TOLERANCE[str(dtype).removeprefix("torch.")]
        for kind in FUNCTIONS:
            for scheme in SCHEMES:
                case = GradientCase(scheme, kind, size, device, dtype)
                if clock.expired():
                    rows += [case.row(s, "", status="skipped: time budget") for s in STRATEGIES]
                    continue
                ref = case.grads(mode="autograd")
                for strategy, memory in STRATEGIES.items():
                    if strategy != "autograd":
                        row = case.row(strategy, 'mode="autograd", same device')
                        rows.append(_case(row, functools.partial(_against, case, ref, **memory), tolerance))
                    elif kind == "mlp":
                        row = case.row(strategy, 'mode="autograd", float64 on the CPU')
                        rows.append(_case(row, functools.partial(_device_against_cpu, case, ref), tolerance))
                    else:
                        rows.append(case.row(strategy, "", status="n/a: dropout masks differ across devices"))


def autocast_cases(device, size: Sizes, clock: Clock, rows: list) -> None:
    """bf16 autocast (float32 weights, bn-dropout functions): each strategy against autograd under the same
    autocast, within :data:`AUTOCAST_FACTOR` × autocast's own error."""
    for scheme in SCHEMES:
        case = GradientCase(scheme, "bn-dropout", size, device, torch.float32)
        if clock.expired():
            rows.append(case.row("all", "", autocast="bfloat16", status="skipped: time budget"))
            continue
        ref = case.grads(autocast=True, mode="autograd")
        precision = errors(ref, case.grads(mode="autograd"))["max_rel_error"]
        for strategy, memory in list(STRATEGIES.items())[1:]:
            row = case.row(strategy, 'mode="autograd" under the same autocast', autocast="bfloat16",
                           autocast_error=precision)
            rows.append(_case(row, functools.partial(_against, case, ref, True, **memory),
                              AUTOCAST_FACTOR * precision))


def compile_case(device, size: Sizes, backend: str) -> dict:
    """``torch.compile(backend)`` of Linear → MomentumNet (reversible, BatchNorm functions) → Linear
    against the eager model in ``mode="autograd"`` (float32)."""
    w = size.grad_width

    def model(mode: str) -> nn.Module:
        torch.manual_seed(0)
        fs = [nn.Sequential(nn.Linear(w, w), nn.BatchNorm1d(w), nn.Tanh(), nn.Linear(w, w))
              for _ in range(size.grad_depth)]
        return nn.Sequential(nn.Linear(w, w), revnets.MomentumNet(fs, gamma=0.9, mode=mode), nn.Linear(w, w))

    x, g = GradientCase("MomentumNet", "mlp", size, device, torch.float32).data()
    row = {"scheme": "MomentumNet", "functions": "bn (Linear-BN-Tanh-Linear) between two Linear layers",
           "strategy": "reversible", "dtype": "float32", "compiled": backend,
           "reference": 'eager, mode="autograd"'}
    torch._dynamo.reset()
    try:
        ref = gradients(model("autograd").to(device), x, g)
        return _case(row, lambda: errors(gradients(torch.compile(model("reversible").to(device), backend=backend),
                                                   x, g), ref), TOLERANCE["float32"])
    finally:
        torch._dynamo.reset()


def run_gradients(device, size: Sizes, clock: Clock, record: dict, log, backend: str = "inductor") -> str:
    record.update({"tolerance": TOLERANCE, "autocast_factor": AUTOCAST_FACTOR, "figure": "max|g - g_ref| / max|g_ref| "
                   "over the input and parameter gradients", "sizes": {"depth": size.grad_depth, "width":
                   size.grad_width, "batch": size.grad_batch}, "functions": {k: str(residual_function(k, 2))
                                                                              for k in FUNCTIONS}})
    rows = record["cases"] = []
    gradient_grid(device, size, clock, rows)
    log(f"gradients: {len(rows)} grid cases ({clock.left():.0f} s left)")
    if clock.expired():
        rows.append({"scheme": "MomentumNet", "strategy": "reversible", "compiled": backend,
                     "status": "skipped: time budget"})
    else:
        rows.append(compile_case(device, size, backend))
    autocast_cases(device, size, clock, rows)
    checked = [r for r in rows if r.get("status") == "ok" or r.get("status", "").startswith("error")]
    failed = [r for r in checked if not r["pass"]]
    skipped = [r for r in rows if r.get("status", "").startswith("skipped")]
    record["counts"] = {"checked": len(checked), "failed": len(failed), "skipped": len(skipped)}
    log(f"gradients: {len(checked)} cases checked, {len(failed)} failed, {len(skipped)} skipped for time")
    if failed:
        return f"failed: {len(failed)} of {len(checked)} cases out of tolerance or in error"
    return f"partial: {len(skipped)} cases left out for time" if skipped else "ok"


# --------------------------------------------------------------------------------------------------
# b. the benchmark suite's quick preset


def import_suite():
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    import suite.contenders
    import suite.environment
    import suite.plan
    import suite.report
    import suite.worker
    import suite.workloads

    return suite


def suite_config(suite, device: str, size: Sizes, threads: int, backend: str):
    """The suite's quick preset; for a dry run the same sections on tiny stacks."""
    options = {"compile_backend": backend, "keep_freed_memory": False}
    cfg = suite.plan.Config.preset(True, device=device, threads=threads, compile_backend=backend, options=options)
    if size.preset != "dry":
        return cfg
    spec = suite.workloads.Spec
    return dataclasses.replace(
        cfg, warmup=0, trials=1, targets=(spec("mlp", 4, 16, 8),), depths=(2,), sweep_width=8, sweep_batch=4,
        batches=(4,), widths=(8,), pareto=spec("mlp", 4, 16, 8), pareto_revnets_budgets=(0.0, 0.5),
        pareto_compile_budgets=(1.0,), budget_spec=spec("mlp", 4, 16, 8), budget_batches=(4, 8),
        workloads=(spec("resnet", 2, 4, 2, side=4),), zoo_pairs=("ResNet-18",), zoo_batches=(1, 2), encoder_depth=2,
        encoder_width=16, encoder_batches=(2,), encoder_seqs=(4,))


def importable(python: str, names: tuple[str, ...]) -> list[str]:
    """The modules among ``names`` that ``python`` finds (without importing them)."""
    code = "import importlib.util, sys; print(' '.join(n for n in sys.argv[1:] if importlib.util.find_spec(n)))"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(BENCHMARKS), str(REPO)]))
    try:
        done = subprocess.run([python, "-c", code, *names], check=False, capture_output=True, text=True,
                              timeout=60, env=env)
    except (OSError, subprocess.SubprocessError):
        return []
    return done.stdout.split()


def mark_not_installed(result, missing: set[str]):
    """Peers that are not importable: status ``not installed`` in every comparison of a suite section."""
    for comparison in result if isinstance(result, list) else []:
        for name, row in comparison.get("contenders", {}).items():
            if name in missing:
                row["status"] = "not installed"
    return result


def run_suite(device, size: Sizes, clock: Clock, record: dict, log, out: Path, stem: str,
              backend: str = "inductor", peers_python: str | None = None) -> str:
    """The suite's quick preset (every contender; the peers through the suite's subprocess worker under
    ``peers_python``, default this interpreter, where importable), sections in :data:`SUITE_ORDER` while
    the budget lasts. Also written in the suite's own format: ``<stem>-suite.json`` / ``.md``
    (``python benchmarks/run.py --report <stem>-suite.json`` redoes tables and plots)."""
    suite = import_suite()
    threads = torch.get_num_threads() if size.preset == "dry" else suite.environment.available_cpus()
    cfg = suite_config(suite, str(device), size, threads, backend)
    results = record["results"] = {"config": cfg.as_dict(), "environment": suite.environment.describe(str(device)),
                                   "sections": {}, "section_seconds": {}, "skipped_sections": {}}
    peers = suite.contenders.PEERS
    present = importable(peers_python or sys.executable, peers)
    results["peers"] = {p: "ok" if p in present else "not installed" for p in peers}
    worker, failure = None, "not run: not installed"
    if present:
        try:
            worker = suite.worker.SubprocessWorker(peers_python or sys.executable, str(device), threads,
                                                   cfg.options, log_path=out / f"{stem}-peers.log")
            results["peers"]["versions"] = worker.versions
        except Exception as error:  # the peers are then reported as failed
            failure = f"peers' worker did not start: {error}"
    runner = suite.plan.Runner(cfg, suite.worker.LocalWorker(str(device), threads, cfg.options), worker, failure,
                               log=lambda line: log("suite " + line.strip()))
    started = time.perf_counter()
    try:
        for section in SUITE_ORDER:
            if size.preset == "dry" and section in DRY_RUN_SUITE_SKIPS:
                results["skipped_sections"][section] = "skipped: dry run (64-layer stacks; depth runs the same code)"
                continue
            if clock.expired():
                results["skipped_sections"][section] = "skipped: time budget"
                continue
            log(f"suite {section} ({clock.left():.0f} s left)")
            t0 = time.perf_counter()
            try:
                with hard_limit(clock.left() + 20):
                    result = getattr(runner, section)()
                results["sections"][section] = mark_not_installed(result, set(peers) - set(present))
            except SectionTimeout as error:
                results["skipped_sections"][section] = f"timed out: {error}"
            except Exception as error:  # this suite section's failure; the next ones go on
                results.setdefault("section_errors", {})[section] = traceback_summary(error)
            results["section_seconds"][section] = round(time.perf_counter() - t0, 1)
    finally:
        if worker:
            with contextlib.suppress(Exception):  # a worker stuck in a stopped call: its pipe is closed
                worker.close()
        gc.unfreeze()  # the suite's worker froze its heap
        gc.collect()
        torch._dynamo.reset()
        results["elapsed_s"] = round(time.perf_counter() - started, 1)
        write_suite(suite, results, out, stem, record)
    return suite_status(results)


def write_suite(suite, results: dict, out: Path, stem: str, record: dict) -> None:
    import json

    (out / f"{stem}-suite.json").write_text(json.dumps(results, indent=1, default=str))
    record["files"] = [f"{stem}-suite.json"]
    try:
        record["markdown"] = suite.report.markdown(results)
        (out / f"{stem}-suite.md").write_text(record["markdown"])
        record["files"].append(f"{stem}-suite.md")
    except Exception as error:  # partial results the report cannot lay out
        record["markdown_error"] = f"{type(error).__name__}: {error}"


def suite_status(results: dict) -> str:
    comparisons = [c for items in results["sections"].values() for c in (items if isinstance(items, list) else [])]
    failed = sorted({f"{name} ({c['label']})" for c in comparisons for name, row in c.get("contenders", {}).items()
                     if row["status"].startswith("failed") and row["group"] != "peer"})
    errors = sorted(results.get("section_errors", {}))
    if failed or errors:
        return (f"failed: {len(failed)} contenders failed: {', '.join(failed[:6])}; suite sections that raised: "
                f"{', '.join(errors) or 'none'}")
    skipped = [k for k, v in results["skipped_sections"].items() if not v.startswith("skipped: dry run")]
    return f"partial: sections {', '.join(skipped)} left out for time" if skipped else "ok"


# --------------------------------------------------------------------------------------------------
# c. training throughput and the largest batch


@dataclass
class Workload:
    """One model to train: ``build()`` makes it, ``inputs(batch, device)`` a generated batch, ``loss``."""

    name: str
    variant: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int, torch.device], tuple]
    loss: Callable[[nn.Module, tuple], Tensor]
    unit: str
    items_per_sample: int
    batch: int
    start: int
    precision: str = "float32"
    optimizer: str = "SGD(lr=1e-4, momentum=0.9)"

    def describe(self) -> dict:
        return {"model": self.name, "variant": self.variant, "unit": self.unit, "precision": self.precision,
                "optimizer": self.optimizer, "items_per_sample": self.items_per_sample}


def _images(side: int, classes: int):
    def make(batch: int, device) -> tuple:
        return (torch.randn(batch, 3, side, side, device=device), torch.randint(classes, (batch,), device=device))

    return make


def _classify(model: nn.Module, batch: tuple) -> Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def vision_workloads(size: Sizes) -> list[Workload]:
    """torchvision ResNets at ``image_side`` px against their conversions; the zoo's ResNet-18 pair."""
    import torchvision

    from revnets.models import create_model

    def torchvision_model(name: str, convert: bool):
        def build():
            torch.manual_seed(0)
            model = getattr(torchvision.models, name)(weights=None)
            return revnets.convert_to_momentum(model, 0.9) if convert else model
        return build

    def zoo(name: str, mode: str):
        def build():
            torch.manual_seed(0)
            return create_model(name, num_classes=10).set_mode(mode)
        return build

    out = []
    for name in size.vision_models:
        for variant, convert in (("original", False), ("convert_to_momentum(0.9), reversible", True)):
            out.append(Workload(f"torchvision {name} {size.image_side}px", variant, torchvision_model(name, convert),
                                _images(size.image_side, 1000), _classify, "images", 1, size.vision_batch,
                                size.vision_start))
    for name, mode in (("resnet18", "autograd"), ("momentum_resnet18", "reversible")):
        out.append(Workload(f"zoo {size.zoo_side}px", f'create_model("{name}"), mode={mode}', zoo(name, mode),
                            _images(size.zoo_side, 10), _classify, "images", 1, size.zoo_batch, size.zoo_start))
    return out


def llama_workloads(size: Sizes) -> list[Workload]:
    """A Llama decoder from a config: original, with Hugging Face activation checkpointing, converted."""
    import transformers

    vocab = size.llama["vocab_size"]

    def build(variant: str):
        def make():
            torch.manual_seed(0)
            model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**size.llama, use_cache=False))
            if variant == "hf-checkpointing":
                enable = getattr(model, "activation_checkpointing_enable", None)
                if enable is not None:
                    enable({"use_reentrant": False})
                else:
                    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            return revnets.convert_to_momentum(model, 0.9) if variant == "converted" else model
        return make

    def tokens(batch: int, device) -> tuple:
        return (torch.randint(vocab, (batch, size.seq), device=device),)

    def loss(model: nn.Module, batch: tuple) -> Tensor:
        return model(input_ids=batch[0], labels=batch[0], use_cache=False).loss

    name = (f"Llama {size.llama['num_hidden_layers']} layers, hidden {size.llama['hidden_size']}, "
            f"vocab {vocab}, seq {size.seq}")
    variants = (("original", "original"), ("hf-checkpointing", "Hugging Face activation checkpointing"),
                ("converted", "convert_to_momentum(0.9), reversible"))
    return [Workload(name, label, build(key), tokens, loss, "tokens", size.seq, size.llama_batch, size.llama_start,
                     "bf16 autocast", "AdamW(lr=1e-5)") for key, label in variants]


def _optimizer(workload: Workload, model: nn.Module) -> torch.optim.Optimizer:
    if workload.optimizer.startswith("AdamW"):
        return torch.optim.AdamW(model.parameters(), lr=1e-5)
    return torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)


def train_step(workload: Workload, model: nn.Module, optimizer, batch: int, device, limit: int | None) -> float:
    """One generated batch: forward, loss, backward, optimizer step (``limit``: the dry run's synthetic OOM)."""
    if limit is not None and batch > limit:
        raise torch.OutOfMemoryError(f"batch {batch} is above the dry run's synthetic limit {limit}")
    inputs = workload.inputs(batch, device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=workload.precision.startswith("bf16")):
        loss = workload.loss(model, inputs)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def throughput(step: Callable[[int], float], workload: Workload, device, size: Sizes) -> dict:
    """Items per second over ``size.steps`` timed steps after ``size.warmup``, and the memory figure."""
    batch = workload.batch
    for _ in range(size.warmup):
        step(batch)
    out: dict = {"batch": batch, "steps": size.steps}
    memory: dict = {}
    with peak_memory(device, memory) if device.type == "cuda" else contextlib.nullcontext():
        synchronize(device)
        start = time.perf_counter()
        for _ in range(size.steps):
            out["loss"] = step(batch)
        synchronize(device)
        seconds = time.perf_counter() - start
    if device.type != "cuda":  # the tracker slows the step: one more, untimed
        with peak_memory(device, memory):
            step(batch)
    out.update(memory, seconds_per_step=seconds / size.steps,
               items_per_second=batch * workload.items_per_sample * size.steps / seconds)
    return out


def fits(step: Callable[[int], float], batch: int, device, tried: list) -> bool:
    """Whether one step at ``batch`` runs. An out-of-memory error (``entry["oom"]``) or any other error
    (``entry["error"]``: a kernel's size limit at a huge batch) is caught and the cache emptied."""
    entry: dict = {"batch": batch}
    start = time.perf_counter()
    ok = False
    try:
        # on the CPU nothing runs out of memory: no tracker (it slows the step), the step alone
        with peak_memory(device, entry) if device.type == "cuda" else contextlib.nullcontext():
            step(batch)
        ok = True
    except Exception as error:  # recorded; the search goes below this batch
        text = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200] if str(error).strip() else ''}"
        entry["oom" if is_out_of_memory(error) else "error"] = text
    release(device)
    entry.update(fits=ok, seconds=round(time.perf_counter() - start, 3))
    tried.append(entry)
    return ok


def largest_batch(step: Callable[[int], float], start: int, device, clock: Clock, precision: float) -> dict:
    """Doubling from ``start`` until out of memory (halving if ``start`` does not fit), then bisection
    until (first OOM − largest fit) ≤ ``precision`` × largest fit, while ``clock`` lasts."""
    tried: list = []
    lo, hi, batch = 0, None, start
    while not clock.expired() and batch <= 1 << 20:
        if fits(step, batch, device, tried):
            lo = batch
            if hi is not None:
                break
            batch *= 2
        else:
            hi = batch
            if lo or batch == 1:
                break
            batch //= 2

    def wide() -> bool:
        return hi is not None and lo > 0 and hi - lo > max(1, int(lo * precision))

    while wide() and not clock.expired():
        middle = (lo + hi) // 2
        if fits(step, middle, device, tried):
            lo = middle
        else:
            hi = middle
    failures = [t for t in tried if not t["fits"]]
    return {"largest_batch": lo, "first_oom": hi, "capped": hi is None or wide(), "precision": precision,
            "limit": (failures[-1].get("oom") or failures[-1].get("error")) if failures else None, "tried": tried}


def measure_workload(workload: Workload, device, size: Sizes, clock: Clock) -> dict:
    out = workload.describe()
    model = workload.build().to(device).train()
    out["parameters"] = sum(p.numel() for p in model.parameters())
    if hasattr(model, "is_gradient_checkpointing"):  # Hugging Face: checkpointing on or off, which attention
        out["hf_checkpointing"] = model.is_gradient_checkpointing
        out["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    optimizer = _optimizer(workload, model)

    def step(batch: int) -> float:
        return train_step(workload, model, optimizer, batch, device, size.synthetic_limit)

    try:
        out["throughput"] = throughput(step, workload, device, size)
    except RuntimeError as error:
        if not is_out_of_memory(error):
            raise
        out["throughput"] = {"batch": workload.batch, "oom": str(error).strip().splitlines()[0][:200]}
    release(device)
    out["search"] = largest_batch(step, workload.start, device, clock, size.search_precision)
    out["search"]["time_cap_s"] = round(clock.seconds, 1)
    return out


def run_throughput(device, size: Sizes, clock: Clock, record: dict, log) -> str:
    """Every workload in turn, each with an equal share of what is left of the budget (at most
    ``size.model_cap_s``); a model that fails is recorded with its error and the others go on."""
    vision = vision_workloads(size)  # the zoo's small models and the Llama decoder first: the time they leave
    workloads = vision[-2:] + llama_workloads(size) + vision[:-2]  # goes to the torchvision ResNets' searches
    record["memory_figure"] = ("torch.cuda.max_memory_allocated (bytes, weights and optimizer state included)"
                               if device.type == "cuda" else "CPU: StorageTracker peak of the tensors a step creates")
    rows = record["models"] = []
    for i, workload in enumerate(workloads):
        share = Clock(max(min(size.model_cap_s, clock.left() / (len(workloads) - i)), 0.0))
        if clock.expired():
            rows.append({**workload.describe(), "status": "skipped: time budget"})
            continue
        start = time.perf_counter()
        try:
            row = {**measure_workload(workload, device, size, share), "status": "ok"}
            if row["search"]["largest_batch"] == 0 and any("error" in t for t in row["search"]["tried"]):
                row["status"] = f"failed: no batch ran: {row['search']['limit']}"
        except Exception as error:  # this model's failure, the next ones go on
            row = {**workload.describe(), "status": f"failed: {type(error).__name__}: {str(error)[:300]}",
                   "traceback": traceback_summary(error)}
        release(device)
        row["seconds"] = round(time.perf_counter() - start, 1)
        rows.append(row)
        log("throughput " + describe_row(row))
    failed = [r for r in rows if r["status"].startswith("failed")]
    skipped = [r for r in rows if r["status"].startswith("skipped")]
    if failed:
        return f"failed: {len(failed)} of {len(rows)} models failed"
    return f"partial: {len(skipped)} models left out for time" if skipped else "ok"


def describe_row(row: dict) -> str:
    head = f"{row['model']} / {row['variant']}"
    if row["status"] != "ok":
        return f"{head}: {row['status']}"
    t, s = row["throughput"], row["search"]
    memory = t.get("max_memory_allocated") or t.get("cpu_tracked_peak")
    rate = f"{t['items_per_second']:.0f} {row['unit']}/s at batch {t['batch']}" if "items_per_second" in t else \
        f"OOM at batch {t['batch']}"
    memory = f", {memory / 2**30:.2f} GiB" if memory else ""
    return (f"{head}: {rate}{memory}; largest batch {s['largest_batch']} (first OOM {s['first_oom']}"
            f"{', capped' if s['capped'] else ''}), {row['seconds']} s")


# --------------------------------------------------------------------------------------------------
# d. two processes, DistributedDataParallel


def ddp_model(size: Sizes) -> revnets.MomentumNet:
    torch.manual_seed(0)
    fs = [nn.Sequential(nn.Linear(size.ddp_width, size.ddp_width), nn.Tanh(), nn.Linear(size.ddp_width, size.ddp_width))
          for _ in range(size.ddp_depth)]
    return revnets.MomentumNet(fs, gamma=0.9).double()


def ddp_data(size: Sizes) -> Tensor:
    return torch.randn(size.ddp_batch, size.ddp_width, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def ddp_worker(rank: int, world: int, port: int, backend: str, device_type: str, size: Sizes, folder: str) -> None:
    """One rank: a reversible MomentumNet (float64) under DDP on half the batch, one SGD step."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if device_type == "cpu":
        torch.set_num_threads(1)
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        model = nn.parallel.DistributedDataParallel(ddp_model(size).to(device),
                                                    device_ids=[rank] if device.type == "cuda" else None)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        x = ddp_data(size).chunk(world)[rank].to(device)
        memory: dict = {}
        with peak_memory(device, memory):
            start = time.perf_counter()
            model(x).pow(2).sum().mul(world / size.ddp_batch).backward()
            grads = [p.grad.detach().cpu().clone() for p in model.module.parameters()]
            optimizer.step()
            synchronize(device)
            seconds = time.perf_counter() - start
        torch.save({"grads": grads, "params": [p.detach().cpu() for p in model.module.parameters()],
                    "seconds": seconds, **memory}, Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ddp(device, size: Sizes, clock: Clock, record: dict, log) -> str:
    """Two processes (NCCL on two GPUs, gloo on the CPU): DDP's averaged gradients against one process's
    gradients of the whole batch, and the parameters equal across ranks after the step."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if device.type == "cuda":
        record["gpus"] = torch.cuda.device_count()
        if record["gpus"] < 2:
            return "skipped: one GPU"
    if not dist.is_available():
        return "skipped: torch.distributed is not available in this build"
    backend = record["backend"] = "nccl" if device.type == "cuda" else "gloo"
    with tempfile.TemporaryDirectory() as folder:
        context = mp.start_processes(ddp_worker, args=(2, _free_port(), backend, device.type, size, folder),
                                     nprocs=2, join=False, start_method="spawn")
        while not context.join(timeout=1):
            if clock.expired():
                for process in context.processes:
                    process.kill()
                return f"failed: the two ranks did not finish within {clock.seconds:.0f} s"
        ranks = [torch.load(Path(folder) / f"rank{r}.pt") for r in range(2)]
    reference = ddp_model(size).set_mode("autograd").to(device)
    reference(ddp_data(size).to(device)).pow(2).sum().div(size.ddp_batch).backward()
    expected = torch.cat([p.grad.reshape(-1).cpu() for p in reference.parameters()])
    for r, rank in enumerate(ranks):
        rank["error"] = errors(torch.cat([g.reshape(-1) for g in rank["grads"]]), expected)["max_rel_error"]
        record[f"rank{r}"] = {k: rank.get(k) for k in ("seconds", "max_memory_allocated", "cpu_tracked_peak",
                                                          "error")}
    record["tolerance"] = 1e-10
    record["params_equal_across_ranks"] = all(torch.equal(a, b) for a, b in zip(*(r["params"] for r in ranks)))
    record["model"] = (f"MomentumNet reversible, float64, depth {size.ddp_depth}, width {size.ddp_width}, "
                       f"batch {size.ddp_batch} split over 2 ranks, one SGD step")
    ok = record["params_equal_across_ranks"] and all(r["error"] <= 1e-10 for r in ranks)
    log(f"ddp ({backend}): gradient error {max(r['error'] for r in ranks):.1e}, parameters equal "
        f"{record['params_equal_across_ranks']}")
    return "ok" if ok else "failed: DDP gradients differ from the single-process reference or ranks diverged"
