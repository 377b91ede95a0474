"""``revnets demo`` (and, to come, ``revnets reproduce NAME``): the papers' experiments."""

from __future__ import annotations

import typer
from tqdm import tqdm

from ..experiments.rings import train_rings


def demo(
    steps: int = typer.Option(1000, help="Adam steps per network."),
    gamma: float = typer.Option(0.99, help="Momentum term of the Momentum ResNet."),
    seed: int = typer.Option(0, help="Random seed (data and weights)."),
) -> None:
    """Nested rings (Sander et al. 2021, Fig. 1): a ResNet against a Momentum ResNet, both 15 steps deep
    with shared weights, trained on generated data; prints train/test accuracy."""
    results = []
    for g in (0.0, gamma):
        label = "Momentum ResNet" if g > 0 else "ResNet"
        with tqdm(total=steps, desc=f"{label} (gamma={g})", unit="step") as bar:
            _, result = train_rings(g, steps=steps, seed=seed, progress=lambda _: bar.update())
        results.append(result)
    typer.echo(f"\n{'network':<18}{'gamma':>7}{'train acc':>11}{'test acc':>10}")
    for r in results:
        typer.echo(f"{r.name:<18}{r.gamma:>7.2f}{100 * r.train_accuracy:>10.1f}%{100 * r.test_accuracy:>9.1f}%")
