"""``linear``: Momentum ResNets can learn any linear map up to a factor; ResNets cannot (Sander et al. 2021).

**Networks.** One learned matrix ``B`` shared by ``N`` steps of size ``h = 1/N`` (``f(x) = h·Bx``):

* ResNet: ``x ← x + h·Bx``, i.e. ``(I + hB)^N x₀ → exp(B)·x₀`` as ``N → ∞`` (the flow of ``ẋ = Bx``);
* Momentum ResNet: ``v ← γv + (1−γ)·hBx; x ← x + v``. With ``u = v/h`` this is
  ``(h/(1−γ))·u̇ + u = Bx``, i.e. ``ε ẍ + ẋ = Bx`` with ``ε = h/(1−γ)``; we set ``γ = 1 − h/ε`` to
  sweep ε at fixed depth.

**Why.** ``det exp(B) = e^{tr B} > 0``: a first-order linear flow never reverses orientation, so no
ResNet (in the limit; and with an even number of steps, not even in discrete form, since
``det (I + hB)^N ≥ 0``) learns a map with ``det A < 0``, nor ``x ↦ −x`` in 1-D. The second-order flow
maps ``x₀`` to ``φ_ε(B)·x₀``, where ``φ_ε(λ)`` is ``x(1)`` for ``ε ẍ + ẋ = λx, x(0) = 1, ẋ(0) = 0``;
``φ_ε`` takes negative values (down to −0.011, −0.383, −0.614, −0.781, −0.951 for ε = 0.1, 0.5, 1, 2,
10: the values given for Sander et al. 2021's representation result, which our closed form recomputes),
so ``φ_ε(B) = c·A`` is reachable for a small enough factor ``c > 0``: "up to a factor".
Note that in 2-D, ``−I = exp(πJ)`` (rotation by π) and every rotation are orientation preserving,
hence within the ResNet's reach too: only the ``det A < 0`` map separates the two networks there.

**Measured.** (a) 2-D: for ``A ∈ {−I, rotation by 90°, a random A with det A < 0}``, each network is
trained (Adam) to minimise the *scale-free error* ``e = 1 − ⟨Y, T⟩/(‖Y‖‖T‖)`` (a cosine distance
in ``[0, 2]``) between its outputs ``Y`` and the targets ``T = Ax`` over a batch of Gaussian ``x``
(``e = 0`` iff ``Y = cAx`` with ``c > 0``); we report ``e`` on fresh test points and the factor
``c = ⟨Y, T⟩/‖T‖²``. (b) 1-D: the
smallest reachable ``x(1)`` over λ for each ε — from the closed form of the ODE, from the discrete
depth-``N`` network scanned over λ, and after training the network to fit ``x ↦ −x`` — against
the paper's values. This task's design (matrices, loss, depth) is ours: the paper's exact protocol
is not available.

**Large ε needs a longer walk.** ``φ_ε`` is negative only for ``λ`` below a threshold that moves
away from 0 as ε grows (closed form: ``λ < −6.0`` at ε = 2, ``λ < −25.7`` at ε = 10; the minimum
sits at ``λ ≈ −20.8`` and ``λ ≈ −99.7``). Adam moves each entry of ``B`` by at most about ``lr`` per
step, and ``B`` starts near 0, so at ε = 10 the default budget (600 steps; lr 0.05 in 2-D, 0.5 in
1-D) ends before ``B`` gets there (1-D: ``λ ≈ −73`` after 600 steps and still moving, ``x(1) = −0.858``;
2-D, target −I: eigenvalues of ``B`` ≈ −15 and −50, one not yet below −25.7). A shortfall of training,
not of the representation: with 3000 steps, or lr 0.25, every 2-D target at ε = 10 is fitted to
error < 1e-6. :func:`plot` marks such an ε on the figure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..nn import MomentumNet
from ..training.step import training_step
from ._common import bar, threads
from .base import Experiment, pyplot, register_experiment, save_figure, summary_entry

PAPER_MINIMA = {0.1: -0.011, 0.5: -0.383, 1.0: -0.614, 2.0: -0.781, 10.0: -0.951}
"""Smallest reachable x(1) of ε ẍ + ẋ = λx, x(0) = 1, ẋ(0) = 0, over λ (values given for Sander et al. 2021)."""


@dataclass
class LinearConfig:
    """Settings of the linear-maps experiment (design ours; the ε at which Sander et al. 2021's 1-D minima
    are given)."""

    seeds: int = 3
    depth: int = 100
    epsilons: list[float] = field(default_factory=lambda: [0.1, 0.5, 1.0, 2.0, 10.0])
    steps: int = 600
    lr: float = 0.05
    batch_size: int = 256
    test_points: int = 4096
    init_scale: float = 0.5
    threads: int = 1


class LinearStep(nn.Module):
    """``f(x) = h·B_k x`` for a stack of independent problems: ``B`` of shape ``(K, d, d)``, ``x`` of
    shape ``(K, n, d)``. Problem ``k`` only ever touches ``B_k``, so one network trains ``K`` independent
    fits at once (Adam is element-wise, so summing their losses changes none of them)."""

    def __init__(self, b: Tensor, h: float):
        super().__init__()
        self.b = nn.Parameter(b)
        self.h = h

    def forward(self, x: Tensor) -> Tensor:
        return self.h * torch.einsum("kij,knj->kni", self.b, x)


def network_name(epsilon: float) -> str:
    """Summary key of the network at ``epsilon`` (0: the ResNet; 1: ``"momentum"``)."""
    if epsilon == 0:
        return "resnet"
    return "momentum" if epsilon == 1 else f"momentum_eps{epsilon:g}"


def make_net(function: nn.Module, epsilon: float, depth: int) -> MomentumNet:
    """Depth-``depth`` tied network: ResNet for ε = 0, else Momentum ResNet with γ = 1 − h/ε (h = 1/depth)."""
    h = 1 / depth
    gamma = 0.0 if epsilon == 0 else 1 - h / epsilon
    if not 0 <= gamma < 1:
        raise ValueError(f"epsilon must be > 1/depth = {h:g} (so that gamma = 1 - h/epsilon >= 0); got {epsilon}")
    return MomentumNet([function] * depth, gamma, mode="autograd")


def target_matrices(seed: int) -> dict[str, Tensor]:
    """``−I``, the rotation by 90°, and a random Gaussian 2×2 matrix with ``det < 0`` (scaled to spectral norm 1)."""
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(2, 2, generator=generator)
    if torch.linalg.det(a) > 0:
        a = a[[1, 0]]
    return {
        "minus_identity": -torch.eye(2),
        "rotation_90": torch.tensor([[0.0, -1.0], [1.0, 0.0]]),
        "random_det_negative": a / torch.linalg.matrix_norm(a, 2),
    }


def scale_free_error(y: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Per problem (dim 0): the cosine distance ``e = 1 − ⟨Y, T⟩/(‖Y‖‖T‖)`` ∈ [0, 2] (0 iff ``Y = cT``
    with ``c > 0``) and the factor ``c = ⟨Y, T⟩/‖T‖²``, the sums running over the problem's points and
    coordinates. Unlike a clamped ``⟨Y, T⟩₊``, it has a gradient wherever ``Y`` points away from ``T``."""
    inner, yy, tt = (y * t).sum((1, 2)), y.square().sum((1, 2)), t.square().sum((1, 2))
    return 1 - inner / (yy * tt).sqrt().clamp(min=1e-30), inner / tt


def fit_matrices(targets: Tensor, epsilon: float, config: LinearConfig, seeds: list[int]) -> tuple[Tensor, Tensor]:
    """Train the network at ``epsilon`` to reproduce ``x ↦ A_k x`` up to a factor, for every target
    ``A_k`` (``targets`` of shape ``(K, 2, 2)``; problem ``k`` initialised from ``seeds[k]``);
    return the test ``(e, c)`` of each."""
    inits = [config.init_scale * torch.randn(2, 2, generator=torch.Generator().manual_seed(s)) for s in seeds]
    generator = torch.Generator().manual_seed(17 + seeds[0])
    net = make_net(LinearStep(torch.stack(inits), 1 / config.depth), epsilon, config.depth)
    optimizer = torch.optim.Adam(net.parameters(), lr=config.lr)
    k = len(targets)
    for _ in range(config.steps):
        x = torch.randn(k, config.batch_size, 2, generator=generator)
        training_step(optimizer, lambda x: scale_free_error(net(x), x @ targets.transpose(1, 2))[0].sum(), x)
    with torch.no_grad():
        x = torch.randn(k, config.test_points, 2, generator=generator)
        return scale_free_error(net(x), x @ targets.transpose(1, 2))


def ode_minimum(epsilon: float) -> float:
    """``min_λ x(1)`` for ``ε ẍ + ẋ = λx, x(0) = 1, ẋ(0) = 0`` from the closed form
    ``x(t) = (r₂e^{r₁t} − r₁e^{r₂t})/(r₂ − r₁)``, ``r = (−1 ± √(1 + 4ελ))/(2ε)``, on a fine λ grid
    (λ ≤ 0: for λ > 0 the solution only grows)."""
    lam = -torch.cat([torch.linspace(1e-6, 60, 30_001), torch.linspace(60, 4000, 20_001)]).double()
    root = torch.sqrt((1 + 4 * epsilon * lam).to(torch.complex128))
    r1, r2 = (-1 + root) / (2 * epsilon), (-1 - root) / (2 * epsilon)
    x1 = ((r2 * torch.exp(r1) - r1 * torch.exp(r2)) / (r2 - r1)).real
    return x1[torch.isfinite(x1)].min().item()


@torch.no_grad()
def network_minimum(epsilon: float, depth: int) -> float:
    """``min_λ x_N`` of the discrete depth-``depth`` scalar network from ``x₀ = 1`` (λ scanned: one problem each)."""
    lam = -torch.linspace(0, 4 * depth, 8_001, dtype=torch.float64).view(-1, 1, 1)
    net = make_net(LinearStep(lam, 1 / depth), epsilon, depth)
    return net(torch.ones(len(lam), 1, 1, dtype=torch.float64)).min().item()


def fit_minus_identity_1d(epsilon: float, config: LinearConfig, seeds: list[int]) -> list[float]:
    """Train the scalar network to fit ``x ↦ −x`` (MSE), one problem per seed; return each learned
    ``x(1)`` (the output at ``x₀ = 1``)."""
    inits = [0.1 * torch.randn(1, 1, generator=torch.Generator().manual_seed(s)) for s in seeds]
    net = make_net(LinearStep(torch.stack(inits), 1 / config.depth), epsilon, config.depth)
    optimizer = torch.optim.Adam(net.parameters(), lr=config.lr * 10)
    x = torch.linspace(-1, 1, 64).view(1, -1, 1).expand(len(seeds), -1, -1)
    for _ in range(config.steps):
        training_step(optimizer, lambda: (net(x) + x).square().mean((1, 2)).sum())
    with torch.no_grad():
        return net(torch.ones(len(seeds), 1, 1)).flatten().tolist()


def run(config: LinearConfig) -> dict[str, Any]:
    """2-D fits for every matrix, network and seed (each network trains all of them at once); the 1-D minima."""
    epsilons = [0.0, *config.epsilons]
    seeds = list(range(config.seeds))
    by_seed = [target_matrices(seed) for seed in seeds]
    matrices = list(by_seed[0])
    targets = torch.stack([by_seed[s][m] for m in matrices for s in seeds])  # (matrices · seeds, 2, 2)
    problem_seeds = [1000 * i + s for i in range(len(matrices)) for s in seeds]
    errors: dict[str, dict[str, list[float]]] = {m: {} for m in matrices}
    factors: dict[str, dict[str, list[float]]] = {m: {} for m in matrices}
    one_d = {}
    with threads(config.threads), bar(len(epsilons), "linear maps") as progress:
        for epsilon in epsilons:
            name = network_name(epsilon)
            error, factor = fit_matrices(targets, epsilon, config, problem_seeds)
            for i, matrix in enumerate(matrices):
                errors[matrix][name] = error[i * len(seeds):(i + 1) * len(seeds)].tolist()
                factors[matrix][name] = factor[i * len(seeds):(i + 1) * len(seeds)].tolist()
            one_d[name] = {
                "epsilon": epsilon,
                "paper_minimum": PAPER_MINIMA.get(epsilon),
                "ode_minimum": ode_minimum(epsilon) if epsilon > 0 else 0.0,
                "network_minimum": network_minimum(epsilon, config.depth),
                "trained_x1": fit_minus_identity_1d(epsilon, config, seeds),
            }
            progress.update()
    summary = {network_name(e): summary_entry("scale_free_error_det_negative",
                                              errors["random_det_negative"][network_name(e)]) for e in epsilons}
    return {
        "summary": summary,
        "epsilons": {network_name(e): e for e in epsilons},
        "gammas": {network_name(e): (0.0 if e == 0 else 1 - 1 / (config.depth * e)) for e in epsilons},
        "errors": {m: {n: summary_entry("scale_free_error", v) for n, v in by.items()} for m, by in errors.items()},
        "factors": {m: {n: summary_entry("factor", v) for n, v in by.items()} for m, by in factors.items()},
        "one_d": one_d,
        "device": "cpu",
    }


def ode_landmarks(epsilon: float) -> tuple[float, float]:
    """``(λ₀, λ*)`` for ``ε ẍ + ẋ = λx, x(0) = 1, ẋ(0) = 0`` (closed form of :func:`ode_minimum`):
    ``x(1) < 0`` first for ``λ < λ₀``, and ``x(1)`` is smallest at ``λ = λ*``. Used by :func:`plot` to
    say how far from ``B ≈ 0`` a fit at ``epsilon`` has to travel."""
    lam = -torch.linspace(0, 4000, 400_001, dtype=torch.float64)
    root = torch.sqrt((1 + 4 * epsilon * lam).to(torch.complex128))
    r1, r2 = (-1 + root) / (2 * epsilon), (-1 - root) / (2 * epsilon)
    x1 = ((r2 * torch.exp(r1) - r1 * torch.exp(r2)) / (r2 - r1)).real
    x1 = torch.where(torch.isfinite(x1), x1, torch.ones_like(x1))
    negative = (x1 < 0).nonzero()
    first = lam[negative[0, 0]].item() if len(negative) else float("nan")
    return first, lam[x1.argmin()].item()


SHORTFALL = 0.01
"""A trained 1-D x(1) above the λ-scanned minimum of the same network by more than this has not
reached it: :func:`plot` marks that ε as unconverged."""


def plot(results: dict[str, Any], out: Path) -> Path:
    """(a) Scale-free error per network (categories: the ResNet and each ε, markers and error bars, no
    joining lines); (b) 1-D: smallest reachable x(1) vs ε (a continuous axis: the closed form is a
    curve, the measurements are markers). An ε at which the trained fit stops short of the reachable
    minimum is annotated with the cause: the minimum lies far from the initial ``B ≈ 0``."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 5))
    _plot_errors(left, results)
    means = _plot_one_d(right, results)
    _annotate_shortfalls(left, right, results, means)
    return save_figure(fig, out, "linear.png")


def _category_shift(i: int, count: int) -> float:
    """Offset of series ``i`` of ``count`` within a category of panel (a): side by side."""
    return 0.12 * (i - (count - 1) / 2)


def _plot_errors(ax, results: dict[str, Any]) -> None:
    """Panel (a): the scale-free error of each matrix per network, as markers with error bars."""
    names = list(results["epsilons"])
    positions = list(range(len(names)))
    labels = ["ResNet" if n == "resnet" else f"ε={results['epsilons'][n]:g}" for n in names]
    for i, (matrix, by_net) in enumerate(results["errors"].items()):
        shift = _category_shift(i, len(results["errors"]))
        means = [max(by_net[n]["mean"], 1e-8) for n in names]
        stds = [by_net[n]["std"] for n in names]
        ax.errorbar([p + shift for p in positions], means, yerr=stds, marker="o", linestyle="none",
                    capsize=3, label=matrix.replace("_", " "))
    ax.set_yscale("log")
    ax.set_xticks(positions, labels)
    ax.set_xlim(-0.5, len(names) - 0.5)
    ax.set_ylabel("scale-free error (test, mean ± std over seeds)")
    ax.set_title("(a) learning x ↦ Ax up to a factor (2-D)", fontsize=10)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3)


def _plot_one_d(ax, results: dict[str, Any]) -> dict[str, float]:
    """Panel (b): the smallest reachable x(1) against ε; returns the trained mean per network."""
    one_d = results["one_d"]
    momentum = [n for n in results["epsilons"] if n != "resnet"]
    eps = [one_d[n]["epsilon"] for n in momentum]
    if len(eps) > 1:
        grid = torch.logspace(math.log10(min(eps)), math.log10(max(eps)), 60, dtype=torch.float64).tolist()
        ax.plot(grid, [ode_minimum(e) for e in grid], "k-", lw=1, label="ODE closed form (ours)")
    else:
        ax.plot(eps, [one_d[n]["ode_minimum"] for n in momentum], "k_", ms=14, label="ODE closed form (ours)")
    ax.plot(eps, [one_d[n]["network_minimum"] for n in momentum], "bs", linestyle="none", ms=5,
            label="depth-N network, λ scanned")
    trained = [one_d[n]["trained_x1"] for n in momentum]
    means = [sum(t) / len(t) for t in trained]
    stds = [math.sqrt(sum((v - m) ** 2 for v in t) / (len(t) - 1)) if len(t) > 1 else 0.0
            for t, m in zip(trained, means)]
    ax.errorbar(eps, means, yerr=stds, fmt="g^", linestyle="none", capsize=3, ms=7,
                label="trained to fit x ↦ −x (mean ± std)")
    paper = [(one_d[n]["epsilon"], one_d[n]["paper_minimum"]) for n in momentum
             if one_d[n]["paper_minimum"] is not None]
    if paper:
        ax.plot(*zip(*paper), "ro", mfc="none", ms=10, linestyle="none", label="Sander et al. (2021)")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xscale("log")
    ax.set_xticks(eps, [f"{e:g}" for e in eps])
    ax.minorticks_off()
    ax.set_xlabel("ε")
    ax.set_ylabel("smallest reachable x(1)")
    ax.set_title("(b) 1-D: ε ẍ + ẋ = λx, x(0)=1 (ResNet: x(1) = e^λ > 0)", fontsize=10)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    return dict(zip(momentum, means))


def _annotate_shortfalls(left, right, results: dict[str, Any], means: dict[str, float]) -> None:
    """Say on both panels why a fit stopped short: the negative part of φ_ε lies far from ``B ≈ 0``."""
    one_d, names, matrices = results["one_d"], list(results["epsilons"]), results["errors"]
    arrow = {"arrowstyle": "->", "color": "darkred", "lw": 0.8}
    lines, failed_2d = [], []
    for n, m in means.items():
        e = one_d[n]["epsilon"]
        if m - one_d[n]["network_minimum"] <= SHORTFALL:
            continue
        first, best = ode_landmarks(e)
        lines.append(f"ε = {e:g}: the fit stops at {m:.3f}, above the reachable "
                     f"{one_d[n]['network_minimum']:.3f}:\nx(1) < 0 needs λ < {first:.1f} (best at "
                     f"λ ≈ {best:.1f}), far from\nthe initial B ≈ 0; training ends before B gets "
                     f"there\n(too few Adam steps), not a limit of the network.".replace("-", "−"))
        right.annotate("", xy=(e, m), xytext=(0.97, 0.93), textcoords="axes fraction", arrowprops=arrow)
        failed = [(i, by_net[n]["mean"]) for i, by_net in enumerate(matrices.values())
                  if by_net[n]["mean"] is not None and by_net[n]["mean"] > SHORTFALL]
        if failed:
            i, worst = max(failed, key=lambda f: f[1])
            failed_2d.append((e, names.index(n) + _category_shift(i, len(matrices)), worst))
    if lines:
        right.text(0.97, 0.95, "\n".join(lines), transform=right.transAxes, ha="right", va="top",
                   fontsize=7.5, color="darkred",
                   bbox={"boxstyle": "round", "fc": "white", "ec": "darkred", "lw": 0.6})
    if failed_2d:
        text = "ε = " + ", ".join(f"{e:g}" for e, _, _ in failed_2d) + ": not converged,\nsame cause as in (b)"
        left.text(0.97, 0.45, text, transform=left.transAxes, ha="right", va="top", fontsize=8, color="darkred")
        for _, column, worst in failed_2d:
            left.annotate("", xy=(column, worst), xytext=(0.93, 0.46), textcoords="axes fraction",
                          arrowprops=arrow)


EXPERIMENT = register_experiment(Experiment(
    name="linear",
    claim="Momentum ResNets can learn any linear map up to a factor (here det A < 0 in 2-D, x ↦ −x in 1-D); "
          "ResNets cannot.",
    paper="Sander et al. 2021, representation results (the exact theorem could not be checked)",
    config_type=LinearConfig,
    run=run,
    plot=plot,
    smoke={"seeds": 2, "depth": 20, "epsilons": [0.5, 1.0], "steps": 20, "test_points": 256},
))
