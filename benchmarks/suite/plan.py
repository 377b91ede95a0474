"""The sections of a run and the quick / full presets.

Every section is made of *comparisons*: one :class:`~.workloads.Spec`, a list of contenders, all
set up first (failures recorded), then ``warmup + trials`` interleaved trials (trial k runs the
contenders in the list's order rotated by k; the peers' calls go to their worker, in the same
rotation), then one memory measurement per contender. Raw times are kept in the JSON; ratios and
verdicts are computed from them by :mod:`.report`.

Sections: ``targets`` (the issue's speed targets), ``compiled`` (``torch.compile`` of the model:
revnets' reversible and exact stacks against the compiled plain loop), ``depth`` / ``batch`` /
``width`` sweeps of the MLP stack, ``pareto`` (time vs memory over memory budgets), ``budget``
(largest batch in a memory budget), ``workloads`` (Momentum ResNet, Hamiltonian, Momentum
Transformer), ``zoo`` (model-zoo memory and the converted ``nn.TransformerEncoder``),
``exact_buffer`` (exact mode's information buffer per layer against its floor log2(1/γ)).
"""

from __future__ import annotations

import dataclasses
import gc
import math
import time
from dataclasses import dataclass, field

import torch

import revnets

from . import measure
from .contenders import PEERS, Instance, registry
from .workloads import GAMMA, ZOO_PAIRS, Spec, build, encoder_pair, zoo_model

TARGET_CONTENDERS = ["loop", "loop-nograd", "torch-checkpoint", "torch-checkpoint-full", "handwritten-reversible",
                     "revnets-autograd", "revnets-reversible", "revnets-checkpoint", "revnets-exact", *PEERS]
SWEEP_CONTENDERS = ["loop", "torch-checkpoint", "revnets-autograd", "revnets-reversible", "revnets-exact", *PEERS]
WORKLOAD_CONTENDERS = ["loop", "torch-checkpoint", "revnets-autograd", "revnets-reversible", "revnets-checkpoint",
                       "revnets-exact", *PEERS]
BUDGET_CONTENDERS = ["loop", "torch-checkpoint", "revnets-reversible", "revnets-checkpoint", "revnets@0.5", *PEERS]
TIMING_SPEC = Spec("mlp", 64, 256, 512)
"""The issue's main configuration: W = 256, B = 512, depth 64."""
BUDGET_SPEC = Spec("mlp", 64, 256, 256)
COMPILED_CONTENDERS = ["loop", "compile@1", "revnets-reversible", "compile-reversible", "revnets-exact",
                       "compile-exact"]
COMPILED_SPEC = Spec("mlp", 32, 256, 512)
"""The compiled section's workload: W = 256, B = 512, depth 32."""
SECTIONS = ("targets", "compiled", "depth", "batch", "width", "pareto", "budget", "workloads", "zoo", "exact_buffer")


@dataclass
class Config:
    device: str = "cpu"
    threads: int | None = None
    warmup: int = 2
    trials: int = 10
    compile_backend: str = "inductor"
    allocator_check: bool = False
    sections: tuple[str, ...] = SECTIONS
    targets: tuple[Spec, ...] = (TIMING_SPEC, Spec("mlp", 64, 64, 64))
    compiled: Spec = COMPILED_SPEC
    depths: tuple[int, ...] = (8, 16, 32, 64, 128, 256, 512, 1024)
    sweep_width: int = 64
    sweep_batch: int = 64
    batches: tuple[int, ...] = (16, 64, 256, 1024)
    widths: tuple[int, ...] = (32, 64, 256, 1024)
    pareto: Spec = TIMING_SPEC
    pareto_revnets_budgets: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    pareto_compile_budgets: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    budget_spec: Spec = BUDGET_SPEC
    budget_batches: tuple[int, ...] = (256, 512, 1024)
    """Large enough that activations, not the parameter gradients, grow the peak."""
    budget_gib: float = 16.0
    workloads: tuple[Spec, ...] = (Spec("resnet", 32, 32, 32, side=16), Spec("hamiltonian", 64, 128, 256),
                                   Spec("transformer", 32, 128, 16, seq=64))
    zoo_pairs: tuple[str, ...] = ("ResNet-18", "ResNet-101", "Hamiltonian-38", "Hamiltonian-110")
    zoo_batches: tuple[int, ...] = (4, 8, 16)
    zoo_budget_gib: float = 4.0
    encoder_depth: int = 12
    encoder_width: int = 128
    encoder_batches: tuple[int, ...] = (8, 32, 128)
    encoder_seqs: tuple[int, ...] = (32, 128, 512)
    quick: bool = False
    peers: bool = True
    options: dict = field(default_factory=dict)

    @classmethod
    def preset(cls, quick: bool, **changes) -> Config:
        """The full preset (for a GPU or a long CPU run), or the quick one (under 5 minutes on 2 cores)."""
        if not quick:
            return dataclasses.replace(cls(), **changes)
        return dataclasses.replace(cls(
            quick=True, warmup=1, trials=7, depths=(8, 32, 128, 512), batches=(16, 256), widths=(32, 256),
            pareto=Spec("mlp", 16, 256, 256), pareto_compile_budgets=(1.0, 0.5, 0.0), budget_gib=1.0,
            workloads=(Spec("resnet", 16, 16, 16, side=16), Spec("hamiltonian", 32, 64, 64),
                       Spec("transformer", 16, 64, 8, seq=32)),
            zoo_pairs=("ResNet-18", "Hamiltonian-38"), zoo_batches=(2, 4, 8), zoo_budget_gib=1.0,
            encoder_depth=6, encoder_width=64, encoder_batches=(4, 16), encoder_seqs=(32, 128),
        ), **changes)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class Runner:
    """Runs comparisons on the local worker and, for the peers, on the peers' worker."""

    def __init__(self, cfg: Config, local, peers=None, peer_failure: str | None = None, log=print):
        self.cfg, self.local, self.peers, self.peer_failure, self.log = cfg, local, peers, peer_failure, log

    def _worker(self, name: str):
        return self.peers if name in PEERS else self.local

    def compare(self, spec: Spec, names: list[str], timing: bool = True, memory: bool = True) -> dict:
        """Set up, time (interleaved) and measure the memory of ``names`` on ``spec``."""
        contenders = registry()
        started = time.perf_counter()
        rows = {n: {"label": contenders[n].label, "group": contenders[n].group} for n in names}
        local = [n for n in names if n not in PEERS]
        remote = [n for n in names if n in PEERS]
        status = self.local.setup(spec.as_dict(), local)
        if remote:
            if self.peers is None:
                why = self.peer_failure or "not run"
                status.update({n: why if why.startswith("not run") else f"failed: {why}" for n in remote})
            else:
                try:
                    status.update(self.peers.setup(spec.as_dict(), remote))
                except RuntimeError as error:
                    status.update({n: f"failed: peers' worker: {str(error)[-400:]}" for n in remote})
        running = [n for n in names if status.get(n) is None]
        for n in names:
            rows[n]["status"] = status.get(n) or "ok"
        if timing:
            total = self.cfg.warmup + self.cfg.trials
            times: dict[str, list[float]] = {n: [] for n in running}
            for trial in range(total):
                k = trial % max(len(running), 1)
                for n in running[k:] + running[:k]:
                    try:
                        times[n].append(self._worker(n).trial(n))
                    except Exception as error:  # a contender failing mid-run is reported
                        rows[n]["status"] = f"failed in trial {trial + 1}: {type(error).__name__}: {str(error)[-300:]}"
                running = [n for n in running if rows[n]["status"] == "ok"]
            for n in running:
                rows[n]["warmup_s"] = times[n][: self.cfg.warmup]
                rows[n]["times_s"] = times[n][self.cfg.warmup :]
                rows[n]["time"] = measure.summary(rows[n]["times_s"])
        if memory:
            for n in running:
                if contenders[n].forward_only:
                    continue
                try:
                    rows[n]["memory"] = self._worker(n).memory(n, self.cfg.allocator_check)
                except Exception as error:  # recorded with the contender
                    rows[n]["memory"] = {"error": f"{type(error).__name__}: {str(error)[-300:]}"}
        failed = [n for n in names if rows[n]["status"] != "ok"]
        self.log(f"  {spec.label():<40} {len(running)} ran, {len(failed)} n/a or failed"
                 f" ({time.perf_counter() - started:.0f} s)")
        return {"spec": spec.as_dict(), "label": spec.label(), "contenders": rows}

    # ----------------------------------------------------------------------------------------------
    # sections

    def targets(self) -> list[dict]:
        return [self.compare(spec, TARGET_CONTENDERS) for spec in self.cfg.targets]

    def compiled(self) -> list[dict]:
        """``torch.compile`` of the model: the plain loop, revnets reversible and exact, each compiled and not."""
        return [self.compare(self.cfg.compiled, COMPILED_CONTENDERS)]

    def _sweep(self, specs) -> list[dict]:
        return [self.compare(spec, SWEEP_CONTENDERS) for spec in specs]

    def depth(self) -> list[dict]:
        c = self.cfg
        return self._sweep(Spec("mlp", d, c.sweep_width, c.sweep_batch) for d in c.depths)

    def batch(self) -> list[dict]:
        c = self.cfg
        return self._sweep(Spec("mlp", 64, c.sweep_width, b) for b in c.batches)

    def width(self) -> list[dict]:
        c = self.cfg
        return self._sweep(Spec("mlp", 64, w, c.sweep_batch) for w in c.widths)

    def pareto(self) -> list[dict]:
        c = self.cfg
        names = ["loop", "torch-checkpoint", "revlib", *(f"revnets@{b:g}" for b in c.pareto_revnets_budgets),
                 *(f"compile@{b:g}" for b in c.pareto_compile_budgets)]
        return [self.compare(c.pareto, names)]

    def budget(self) -> list[dict]:
        c = self.cfg
        return [self.compare(dataclasses.replace(c.budget_spec, batch=b), BUDGET_CONTENDERS, timing=False)
                for b in c.budget_batches]

    def workloads(self) -> list[dict]:
        return [self.compare(spec, WORKLOAD_CONTENDERS) for spec in self.cfg.workloads]

    def zoo(self) -> dict:
        """Model-zoo memory (one training step on 3×32×32 images) and the converted TransformerEncoder."""
        c, device = self.cfg, self.cfg.device
        models = []
        for label, saving, plain in (p for p in ZOO_PAIRS if p[0] in c.zoo_pairs):
            for name, mode in (plain, saving):
                peaks, helds = [], []
                for b in c.zoo_batches:
                    model = zoo_model(name, mode, device)
                    images = torch.randn(b, 3, 32, 32, device=device)
                    labels = torch.randint(10, (b,), device=device)
                    step = Instance(lambda x, m=model, t=labels: torch.nn.functional.cross_entropy(m(x), t), images,
                                    torch.ones((), device=device), [p for p in model.parameters() if p.requires_grad])
                    numbers, _ = measure.memory(step, device)
                    peaks.append(numbers.get("cuda_peak", numbers["peak"]))
                    helds.append(numbers["held_after_forward"])
                    del model, step
                    gc.collect()
                models.append({"network": label, "model": name, "mode": mode, "batches": list(c.zoo_batches),
                               "peak_bytes": peaks, "held_after_forward_bytes": helds,
                               **measure.largest_batch(list(c.zoo_batches), peaks, c.zoo_budget_gib * 2**30)})
                self.log(f"  zoo {name} ({mode}): {models[-1]['per_sample_bytes'] / 2**20:.2f} MiB/sample")
        encoders = []
        for batch in c.encoder_batches:
            for seq in c.encoder_seqs:
                for label, module in encoder_pair(c.encoder_depth, c.encoder_width, device).items():
                    x = torch.randn(batch, seq, c.encoder_width, device=device)
                    step = Instance(module, x, torch.randn_like(x), list(module.parameters()))
                    numbers, _ = measure.memory(step, device)
                    encoders.append({"model": label, "batch": batch, "seq": seq, **numbers})
        self.log(f"  encoder: {len(encoders)} measurements")
        return {"models": models, "encoders": encoders, "budget_gib": c.zoo_budget_gib,
                "encoder": {"depth": c.encoder_depth, "width": c.encoder_width}}

    def exact_buffer(self) -> list[dict]:
        """Bits of exact mode's information buffer per element per layer, at the sweep's depths."""
        c, rows = self.cfg, []
        for depth in c.depths:
            stack = build(Spec("mlp", depth, c.sweep_width, c.sweep_batch), c.device)
            net = revnets.MomentumNet(stack.functions, gamma=GAMMA, exact=True)
            with torch.no_grad():
                bits = net.forward_exact(net.exact_state(stack.x)).buffer_bits()
            rows.append({"depth": depth, "bits": bits, "bits_per_element_per_layer": bits / (stack.x.numel() * depth),
                         "floor": math.log2(1 / GAMMA)})
        self.log(f"  exact buffer at depths {list(c.depths)}")
        return rows
