"""``memory``: training memory of ResNets against Momentum ResNets (Sander et al. 2021).

(a) **Depth** (the authors' memory plot): ``x ∈ ℝ^{batch×d}`` through ``depth`` untied residual
functions ``f_n = Linear(d, hidden)–Tanh–Linear(hidden, d)``; the ResNet is the plain PyTorch loop
``x ← x + f_n(x)`` (autograd stores every layer's input), the Momentum ResNet is
:class:`revnets.MomentumNet` in ``mode="reversible"`` with ``γ = 1 − 1/(50·depth)`` (as the authors'
plot), which stores no activation: its backward rebuilds them by inversion. Defaults follow the
paper's toy memory plot as we read it (``d = 500``, hidden 8, batch 500); the authors' own script
uses ``d = 2``, hidden 1 and 400,000 points.

(b) **Transformers** (Fig. 2 of the seed): an ``nn.TransformerEncoder`` (12 layers, width 64, 4 heads,
feed-forward 256, no dropout) against the same encoder converted by
:func:`revnets.convert_to_momentum` (γ = 0.9, reversible), each with a token embedding and a
per-position classifier, trained (Adam) for one epoch of a synthetic sequence task (predict
``(token + 1) mod vocab`` at every position); peak memory over the epoch against batch size and
against sequence length.

**Instrument.** The peak of live tensor bytes created inside the measured window
(:class:`revnets.memory.StorageTracker`, device independent: it counts every storage an ATen op
creates, whoever holds it, until it is freed); on CUDA also ``torch.cuda.max_memory_allocated``
above what was allocated before. Parameters exist before the window and are not counted; gradients
and optimiser states created inside it are. Each Adam step is the trainer's
(:func:`revnets.training.step.training_step`): the previous step's gradients are freed before the
forward, and the graph before the update. The authors measured process memory (``memory_profiler``),
which adds the interpreter and libraries (their ~190 MiB floor): compare slopes, not offsets.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..convert import convert_to_momentum
from ..nn import MomentumNet
from ..training.step import training_step
from ._common import bar, mib, peak_memory, resolve_device, threads, training_step_memory
from .base import Experiment, pyplot, register_experiment, save_figure, summary_entry


@dataclass
class MemoryConfig:
    """Settings of the memory experiment (defaults: the paper's toy for (a), a small encoder for (b))."""

    seeds: int = 1
    depths: list[int] = field(default_factory=lambda: [25, 50, 100, 200, 400])
    features: int = 500
    hidden: int = 8
    batch_size: int = 500
    transformer_layers: int = 12
    width: int = 64
    heads: int = 4
    feedforward: int = 256
    vocab: int = 32
    transformer_gamma: float = 0.9
    batch_sizes: list[int] = field(default_factory=lambda: [8, 16, 32, 64])
    sequence_length: int = 64
    sequence_lengths: list[int] = field(default_factory=lambda: [32, 64, 128, 256])
    sequence_batch: int = 16
    epoch_batches: int = 3
    device: str = "auto"
    threads: int | None = None


class PlainResNet(nn.Module):
    """``x ← x + f_n(x)`` for ``n = 0 … N−1`` in plain PyTorch (autograd stores every layer's input)."""

    def __init__(self, functions: list[nn.Module]):
        super().__init__()
        self.functions = nn.ModuleList(functions)

    def forward(self, x: Tensor) -> Tensor:
        for f in self.functions:
            x = x + f(x)
        return x


def depth_memory(network: str, depth: int, config: MemoryConfig, seed: int, device: torch.device) -> int:
    """Peak bytes of one training step of the depth-``depth`` toy ``network`` (``"resnet"`` or ``"momentum"``)."""
    torch.manual_seed(seed)
    functions = [nn.Sequential(nn.Linear(config.features, config.hidden), nn.Tanh(),
                               nn.Linear(config.hidden, config.features)) for _ in range(depth)]
    if network == "resnet":
        model: nn.Module = PlainResNet(functions)
    else:
        model = MomentumNet(functions, 1 - 1 / (50 * depth), mode="reversible")
    model.to(device)
    x = torch.randn(config.batch_size, config.features, device=device)
    memory = training_step_memory(model, lambda m: m(x).square().mean())
    return memory.peak


class SequenceModel(nn.Module):
    """Embedding → encoder → per-position linear classifier: ``(B, S)`` tokens to ``(B, S, vocab)`` logits."""

    def __init__(self, encoder: nn.Module, vocab: int, width: int, max_length: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(0.02 * torch.randn(max_length, width))
        self.encoder = encoder
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(tokens) + self.position[: tokens.shape[1]]
        return self.head(self.encoder(h))


def transformer_pair(config: MemoryConfig, seed: int, max_length: int) -> dict[str, SequenceModel]:
    """The Transformer and its Momentum conversion, from the same initial weights."""
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(config.width, config.heads, config.feedforward, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, config.transformer_layers, enable_nested_tensor=False)
    plain = SequenceModel(encoder, config.vocab, config.width, max_length)
    momentum = copy.deepcopy(plain)
    momentum.encoder = convert_to_momentum(plain.encoder, config.transformer_gamma, mode="reversible")
    return {"transformer": plain, "momentum_transformer": momentum}


def epoch_memory(model: SequenceModel, batch: int, length: int, config: MemoryConfig, seed: int,
                 device: torch.device) -> int:
    """Peak bytes over one training epoch (``epoch_batches`` Adam steps) at ``batch × length`` tokens."""
    model.to(device).train()
    generator = torch.Generator().manual_seed(seed)
    data = torch.randint(config.vocab, (config.epoch_batches, batch, length), generator=generator).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def loss_fn(tokens: Tensor) -> Tensor:
        return nn.functional.cross_entropy(model(tokens).flatten(0, 1), ((tokens + 1) % config.vocab).flatten())

    def epoch() -> None:
        for tokens in data:
            training_step(optimizer, loss_fn, tokens)

    memory = peak_memory(epoch, device)
    return memory.peak


def run(config: MemoryConfig) -> dict[str, Any]:
    """(a) peak MiB vs depth; (b) peak MiB over an epoch vs batch size and vs sequence length."""
    device = resolve_device(config.device)
    depth_mib: dict[str, dict[int, list[float]]] = {n: {d: [] for d in config.depths} for n in ("resnet", "momentum")}
    batch_mib = {n: {b: [] for b in config.batch_sizes} for n in ("transformer", "momentum_transformer")}
    length_mib = {n: {s: [] for s in config.sequence_lengths} for n in ("transformer", "momentum_transformer")}
    total = config.seeds * (2 * len(config.depths) + 2 * len(config.batch_sizes) + 2 * len(config.sequence_lengths))
    max_length = max([config.sequence_length, *config.sequence_lengths])
    with threads(config.threads), bar(total, "memory") as progress:
        for seed in range(config.seeds):
            for network, by_depth in depth_mib.items():
                for depth in config.depths:
                    by_depth[depth].append(mib(depth_memory(network, depth, config, seed, device)))
                    progress.update()
            for name, model in transformer_pair(config, seed, max_length).items():
                for batch in config.batch_sizes:
                    batch_mib[name][batch].append(
                        mib(epoch_memory(model, batch, config.sequence_length, config, seed, device)))
                    progress.update()
                for length in config.sequence_lengths:
                    length_mib[name][length].append(
                        mib(epoch_memory(model, config.sequence_batch, length, config, seed, device)))
                    progress.update()
    deepest, largest = config.depths[-1], config.batch_sizes[-1]
    summary = {name: summary_entry(f"peak_train_mib_depth{deepest}", depth_mib[name][deepest]) for name in depth_mib}
    summary.update({name: summary_entry(f"peak_epoch_mib_batch{largest}", batch_mib[name][largest])
                    for name in batch_mib})
    instrument = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "StorageTracker peak live bytes"
    return {"summary": summary, "instrument": instrument, "depth_mib": depth_mib, "batch_mib": batch_mib,
            "length_mib": length_mib, "sequence_length": config.sequence_length,
            "sequence_batch": config.sequence_batch, "device": str(device)}


def plot(results: dict[str, Any], out: Path) -> Path:
    """Three panels: peak MiB vs depth (toy); vs batch size and vs sequence length (Transformers)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = [
        (results["depth_mib"], "depth", "(a) toy ResNet vs Momentum ResNet", {"resnet": "ResNet",
                                                                             "momentum": "Momentum ResNet"}),
        (results["batch_mib"], f"batch size (sequence {results['sequence_length']})", "(b) one training epoch",
         {"transformer": "Transformer", "momentum_transformer": "Momentum Transformer"}),
        (results["length_mib"], f"sequence length (batch {results['sequence_batch']})", "(c) one training epoch",
         {"transformer": "Transformer", "momentum_transformer": "Momentum Transformer"}),
    ]
    for ax, (data, xlabel, title, names) in zip(axes, panels):
        for key, label in names.items():
            xs = [int(x) for x in data[key]]
            ys = [sum(v) / len(v) for v in data[key].values()]
            ax.plot(xs, ys, "o-", label=label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("peak memory (MiB)")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(f"Training memory ({results['instrument']}, {results['device']})", fontsize=10)
    return save_figure(fig, out, "memory.png")


EXPERIMENT = register_experiment(Experiment(
    name="memory",
    claim="Training memory grows with depth for a ResNet, not for a Momentum ResNet; a Momentum Transformer "
          "needs less memory than a Transformer as batch size and sequence length grow.",
    paper="Sander et al. 2021, memory plot and Fig. 2",
    config_type=MemoryConfig,
    run=run,
    plot=plot,
    smoke={"depths": [2, 4, 8], "features": 16, "batch_size": 8, "transformer_layers": 3, "width": 16,
           "heads": 2, "feedforward": 32, "batch_sizes": [2, 4], "sequence_length": 8,
           "sequence_lengths": [4, 8], "sequence_batch": 2, "epoch_batches": 1},
))
