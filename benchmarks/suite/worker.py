"""The process boundary: contenders live in a worker, which is asked for one trial at a time.

:class:`LocalWorker` runs contenders in this process; :class:`SubprocessWorker` runs the same code
(``python -m suite.worker``) under another interpreter — the peers' environment (:mod:`.peers`) —
and talks to it in JSON lines, so that the peers are never imported into the main environment and
still take part in the same interleaved trials (each side times its own calls: the pipe is not in
the numbers). Both answer:

* ``setup(spec, names)``: build the stack and the named contenders, run each once (a failure is
  returned as that contender's error, with its cause, not raised); ``compile…`` contenders are
  compiled here (two calls);
* ``trial(name)``: seconds of one step;
* ``memory(name)``: :func:`.measure.memory`, plus ``grad_rel_error`` against the plain loop of the
  same stack where the contender computes the same function.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import torch

from . import measure
from .contenders import registry
from .workloads import Spec, build

SUITE_ROOT = Path(__file__).resolve().parent.parent
"""``benchmarks/``: the working directory of a subprocess worker (``suite`` is importable there)."""


class LocalWorker:
    """Contenders run in this process."""

    def __init__(self, device: str = "cpu", threads: int | None = None, options: dict | None = None):
        self.device = device
        self.options = options or {}
        if threads:
            torch.set_num_threads(threads)
        self.instances: dict = {}
        self.reference = None

    def setup(self, spec: dict, names: list[str]) -> dict[str, str | None]:
        self.instances = {}
        self.reference = None
        gc.unfreeze()  # the previous comparison's objects can be collected again (see below)
        gc.collect()
        torch._dynamo.reset()
        stack = build(Spec(**spec), self.device)
        self.stack = stack
        contenders = registry()
        errors: dict[str, str | None] = {}
        for name in names:
            contender = contenders[name]
            reason = contender.not_applicable(stack)
            if reason:
                errors[name] = f"n/a: {reason}"
                continue
            try:
                instance = contender.build(stack, self.options)
                for _ in range(2 if name.startswith("compile") else 1):
                    measure.time_step(instance, self.device)
                self.instances[name] = instance
                errors[name] = None
            except Exception as error:  # reported as this contender's failure
                errors[name] = f"failed: {type(error).__name__}: {error}"
        # Everything alive now (modules, imports, compiled graphs) is moved out of the collector's
        # generations until the next set-up: the gc.collect() before every timed call then scans only
        # new objects (a full collection of torch's heap took 0.6 s on a loaded machine).
        gc.freeze()
        return errors

    def trial(self, name: str) -> float:
        return measure.time_step(self.instances[name], self.device)

    def _reference_grads(self):
        if self.reference is None:
            loop = registry()["loop"].build(self.stack, self.options)
            _, self.reference = measure.memory(loop, self.device)
        return self.reference

    def memory(self, name: str, allocator: bool = False) -> dict:
        contender = registry()[name]
        # Compiled graphs are also measured at the allocator: the dispatch-mode tracker may not see
        # inside them the way it sees eager code.
        allocator = allocator or name.startswith("compile")
        result, grads = measure.memory(self.instances[name], self.device, allocator)
        if contender.same_scheme and grads is not None and name != "loop":
            reference = self._reference_grads()
            if reference is not None and reference.shape == grads.shape:
                result["grad_rel_error"] = float((grads - reference).norm() / reference.norm())
        return result

    def close(self) -> None:
        self.instances = {}


class SubprocessWorker:
    """The same worker in a subprocess of another interpreter (one request at a time)."""

    def __init__(self, python: str, device: str = "cpu", threads: int | None = None, options: dict | None = None,
                 log_path: Path | None = None):
        self.log_path = log_path or Path(os.devnull)
        self._log = open(self.log_path, "w")  # closed in close()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SUITE_ROOT), str(SUITE_ROOT.parent)]))
        self.process = subprocess.Popen(
            [python, "-m", "suite.worker",
             json.dumps({"device": device, "threads": threads, "options": options or {}})],
            cwd=SUITE_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True, env=env,
        )
        self.versions = self._call("versions")

    def _call(self, method: str, *args):
        if self.process.poll() is not None:
            raise RuntimeError(f"peer worker exited with {self.process.returncode}; see {self.log_path}")
        self.process.stdin.write(json.dumps([method, args]) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"peer worker died (exit {self.process.wait()}); see {self.log_path}")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(answer["error"])
        return answer["ok"]

    def setup(self, spec: dict, names: list[str]) -> dict[str, str | None]:
        return self._call("setup", spec, names)

    def trial(self, name: str) -> float:
        return self._call("trial", name)

    def memory(self, name: str, allocator: bool = False) -> dict:
        return self._call("memory", name, allocator)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(timeout=60)
        self._log.close()


def _serve(settings: dict) -> None:
    """The subprocess side: answer JSON-line requests on stdin until it closes."""
    from .contenders import PEERS, version

    if settings["options"].get("keep_freed_memory", True):
        from .environment import keep_freed_memory

        keep_freed_memory()
    worker = LocalWorker(settings["device"], settings["threads"], settings["options"])
    out = sys.stdout
    sys.stdout = sys.stderr  # anything a peer prints goes to the log, not into the protocol
    methods = {
        "setup": worker.setup, "trial": worker.trial, "memory": worker.memory,
        "versions": lambda: {"python": sys.executable, "torch": torch.__version__,
                             **{p: version(p) for p in PEERS}},
    }
    for line in sys.stdin:
        method, args = json.loads(line)
        try:
            answer = {"ok": methods[method](*args)}
        except Exception:  # sent back to the caller
            answer = {"error": traceback.format_exc()}
        out.write(json.dumps(answer) + "\n")
        out.flush()


if __name__ == "__main__":
    _serve(json.loads(sys.argv[1]))
