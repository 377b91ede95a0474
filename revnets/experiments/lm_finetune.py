"""``lm-finetune``: a pretrained language model converted to a reversible one fine-tunes to the
original's loss with a fraction of its activation memory.

Sander et al. (2021) propose momentum residual networks as a drop-in replacement for the residual
stacks of existing networks, transformers included, so that a pretrained model can be converted and
fine-tuned with a memory-free backward. Gal, Haber et al. (2025, "Reversing LLMs") convert pretrained
language models to Chang et al.'s (2018) reversible two-step schemes (midpoint, leapfrog) and
fine-tune them into the new dynamics. This experiment tests both in miniature, with nothing
downloaded:

1. **Corpus.** Python's own help topics (``pydoc_data.topics.topics``, ~465 KB of English technical
   text in CPython 3.11), read as bytes (vocabulary 256, no tokenizer). The *fine-tuning text* is the
   built-in types' reference: every topic whose name starts with ``types`` or ``bltin-``, and
   ``string-methods`` (12 topics, ~110 KB); the *pretraining text* is the 67 others (~356 KB, mostly the
   language reference). The last ``eval_fraction`` of each fine-tuning topic is held out; its
   non-overlapping ``context``-byte windows are the evaluation set.
2. **Pretraining** (once per seed, shared by every contender): a ``transformers.LlamaForCausalLM``
   built from a ``LlamaConfig`` (6 layers, width 128, 4 heads, 2 key/value heads, MLP 344,
   ~1.15 M parameters), AdamW on random ``context``-byte windows of the pretraining text, linear
   warm-up then cosine decay, gradients clipped to norm 1.
3. **Contenders**, each fine-tuned from the same pretrained weights on the same batches (same
   optimiser and schedule) for ``finetune_steps`` steps, ``use_cache=False``:
   ``original`` (plain autograd); ``checkpointed`` (the original with Hugging Face activation
   checkpointing, ``activation_checkpointing_enable``, non-reentrant); ``momentum``
   (:func:`revnets.convert_to_momentum`, γ = 0.9); ``midpoint`` and ``leapfrog``
   (:func:`revnets.convert_to_reversible`, default step sizes). The converted ones train with the
   reversible backward. Train loss every step; evaluation loss (nats per byte) at ``eval_points``
   steps including step 0 (the conversion's cost before any fine-tuning).
4. **Memory per step**: peak live tensor bytes of one forward + backward at the fine-tuning batch
   (:func:`~revnets.experiments._common.training_step_memory`, :class:`revnets.memory.StorageTracker`;
   parameter gradients created inside the step count), once per contender from the pretrained weights;
   and, to see how it scales, the same for freshly initialised models of ``memory_depths`` layers.

Every step is :func:`revnets.training.step.training_step`. Needs the ``hf`` extra (``transformers``).
"""

from __future__ import annotations

import copy
import platform
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..convert import convert_to_momentum, convert_to_reversible
from ..training.step import training_step
from ._common import bar, cosine, count_parameters, mib, resolve_device, threads, training_step_memory
from .base import Experiment, pyplot, register_experiment, save_figure, summary_entry

CONTENDERS = {
    "original": "original (autograd)",
    "checkpointed": "original, HF activation checkpointing",
    "momentum": "Momentum (γ = 0.9), converted",
    "midpoint": "Midpoint (Chang et al.), converted",
    "leapfrog": "Leapfrog (Chang et al.), converted",
}
FINETUNE_PREFIXES = ("types", "bltin-")
FINETUNE_TOPICS = ("string-methods",)


@dataclass
class LMFinetuneConfig:
    """Settings of the language-model fine-tuning experiment (defaults: the ≤ 10-minute CPU run)."""

    seeds: int = 1
    layers: int = 6
    hidden: int = 128
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 344
    context: int = 128
    batch_size: int = 16
    pretrain_steps: int = 400
    pretrain_lr: float = 3e-3
    finetune_steps: int = 150
    finetune_lr: float = 2e-3
    weight_decay: float = 0.01
    warmup: float = 0.1
    grad_clip: float = 1.0
    gamma: float = 0.9
    eval_fraction: float = 0.15
    eval_windows: int = 128
    eval_points: int = 6
    memory_depths: list[int] = field(default_factory=lambda: [6, 12, 24])
    device: str = "auto"
    threads: int | None = 1

    def __post_init__(self) -> None:
        if min(self.seeds, self.pretrain_steps, self.finetune_steps, self.eval_windows) < 1 or self.eval_points < 2:
            raise ValueError("seeds, pretrain_steps, finetune_steps and eval_windows must be >= 1, eval_points >= 2")
        if not self.memory_depths or min(self.memory_depths) < 1:
            raise ValueError(f"memory_depths must be depths >= 1; got {self.memory_depths}")
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in (0, 1); got {self.eval_fraction}")


# --------------------------------------------------------------------------------------------------
# Corpus: Python's help topics, as bytes


def is_finetune_topic(name: str) -> bool:
    """Whether help topic ``name`` belongs to the fine-tuning text (the built-in types' reference)."""
    return name.startswith(FINETUNE_PREFIXES) or name in FINETUNE_TOPICS


def as_bytes(text: str) -> Tensor:
    """``text`` as its UTF-8 bytes: ``(len,)`` int64 token ids in ``[0, 256)``."""
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


def corpus(eval_fraction: float) -> dict[str, Any]:
    """The three texts as byte tensors — ``pretrain``, ``finetune`` and ``eval`` (each ``(len,)`` int64)
    — and the topic names of each part. Topics are taken in sorted order, joined by blank lines; each
    fine-tuning topic's last ``eval_fraction`` (cut at a character) goes to ``eval``."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    tuning = [name for name in names if is_finetune_topic(name)]
    if not tuning:
        raise ValueError("pydoc_data.topics has no built-in types topics (types*, bltin-*, string-methods)")
    heads, tails = [], []
    for name in tuning:
        cut = round(len(topics[name]) * (1 - eval_fraction))
        heads.append(topics[name][:cut])
        tails.append(topics[name][cut:])
    pretrain = [topics[name] for name in names if not is_finetune_topic(name)]
    return {
        "pretrain": as_bytes("\n\n".join(pretrain)),
        "finetune": as_bytes("\n\n".join(heads)),
        "eval": as_bytes("\n\n".join(tails)),
        "finetune_topics": tuning,
        "pretrain_topic_count": len(pretrain),
    }


def random_windows(data: Tensor, batch: int, context: int, generator: torch.Generator) -> Tensor:
    """``batch`` windows of ``context`` consecutive bytes of ``data (len,)`` at random offsets: ``(batch, context)``."""
    starts = torch.randint(0, len(data) - context + 1, (batch,), generator=generator)
    return torch.stack([data[s:s + context] for s in starts.tolist()])


def eval_windows(data: Tensor, context: int, limit: int) -> Tensor:
    """Up to ``limit`` non-overlapping ``context``-byte windows of ``data``, evenly spaced: ``(N, context)``."""
    count = len(data) // context
    if count < 1:
        raise ValueError(f"the evaluation text ({len(data)} bytes) is shorter than one context of {context}")
    chosen = torch.linspace(0, count - 1, min(limit, count)).round().long().unique()
    return data[: count * context].view(count, context)[chosen]


# --------------------------------------------------------------------------------------------------
# Model, contenders, training


def require_transformers() -> Any:
    """The ``transformers`` module.

    Raises:
        ValueError: ``transformers`` is not installed (naming the ``hf`` extra).
    """
    try:
        import transformers
    except ImportError as error:
        raise ValueError("lm-finetune needs transformers, which is not installed: "
                         "pip install 'revnets[hf]' (the hf extra)") from error
    return transformers


def make_llama(config: LMFinetuneConfig, seed: int) -> nn.Module:
    """A freshly initialised byte-level ``LlamaForCausalLM`` (vocabulary 256) from ``seed``."""
    transformers = require_transformers()
    torch.manual_seed(seed)
    llama_config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=config.hidden, intermediate_size=config.intermediate,
        num_hidden_layers=config.layers, num_attention_heads=config.heads, num_key_value_heads=config.kv_heads,
        max_position_embeddings=config.context, tie_word_embeddings=False, use_cache=False,
    )
    return transformers.LlamaForCausalLM(llama_config)


def contender(pretrained: nn.Module, name: str, config: LMFinetuneConfig) -> nn.Module:
    """A copy of ``pretrained`` as contender ``name`` (one of :data:`CONTENDERS`)."""
    if name == "original":
        return copy.deepcopy(pretrained)
    if name == "checkpointed":
        model = copy.deepcopy(pretrained)
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})
        return model
    if name == "momentum":
        return convert_to_momentum(pretrained, config.gamma)
    return convert_to_reversible(pretrained, name)


def lm_loss(model: nn.Module, ids: Tensor) -> Tensor:
    """Mean next-byte cross-entropy (nats) of ``model`` on ``ids (B, S)`` (the model shifts the labels)."""
    return model(input_ids=ids, labels=ids, use_cache=False).loss


@torch.no_grad()
def evaluate(model: nn.Module, windows: Tensor, batch_size: int) -> float:
    """Mean next-byte cross-entropy (nats per byte) over ``windows (N, S)``, in eval mode; back to train mode."""
    model.eval()
    total = 0.0
    for start in range(0, len(windows), batch_size):
        chunk = windows[start:start + batch_size]
        total += lm_loss(model, chunk).item() * len(chunk)
    model.train()
    return total / len(windows)


def train_lm(model: nn.Module, text: Tensor, steps: int, lr: float, config: LMFinetuneConfig, seed: int, *,
             windows: Tensor | None = None, eval_at: tuple[int, ...] = (), desc: str = "train") -> dict[str, Any]:
    """AdamW on ``steps`` random batches ``(batch_size, context)`` of ``text (len,)`` drawn from ``seed``,
    with linear warm-up over ``warmup·steps`` then cosine decay; one :func:`training_step` each.

    Returns ``{"train_loss": [steps], "eval_loss": [len(eval_at)], "seconds_per_step"}``: the
    evaluation loss on ``windows (N, S)`` after each step count in ``eval_at`` (0: before training).
    """
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=config.weight_decay)
    warmup = max(1, round(config.warmup * steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * cosine(max(step - warmup, 0), steps - warmup))
    losses, evals, seconds = [], [], 0.0
    model.train()
    with bar(steps, desc) as progress:
        for step in range(steps + 1):
            if step in eval_at and windows is not None:
                evals.append(evaluate(model, windows, config.batch_size))
            if step == steps:
                break
            ids = random_windows(text, config.batch_size, config.context, generator).to(device)
            start = time.perf_counter()
            losses.append(training_step(optimizer, lambda x: lm_loss(model, x), ids, grad_clip=config.grad_clip,
                                        schedule=schedule).item())
            seconds += time.perf_counter() - start
            progress.update()
    return {"train_loss": losses, "eval_loss": evals, "seconds_per_step": seconds / steps}


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s parameters: what their gradients take once they all exist."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def step_memory(model: nn.Module, ids: Tensor) -> dict[str, float | None]:
    """MiB of one forward + backward of ``model`` on ``ids (B, S)``: the tracker's peak; on CUDA, the allocator's."""
    memory = training_step_memory(model, lambda m: lm_loss(m, ids))
    return {"peak_mib": mib(memory.peak_bytes), "cuda_peak_mib": mib(memory.cuda_peak_bytes)}


# --------------------------------------------------------------------------------------------------
# The experiment


def depth_memory(config: LMFinetuneConfig,
                 device: torch.device) -> tuple[dict[str, dict[int, float]], dict[int, float]]:
    """Peak MiB of one training step of each contender at every depth of ``memory_depths`` (fresh models:
    memory does not depend on the weights), at the fine-tuning batch; and the parameters' MiB at each depth."""
    ids = torch.randint(0, 256, (config.batch_size, config.context), generator=torch.Generator().manual_seed(0))
    memory: dict[str, dict[int, float]] = {name: {} for name in CONTENDERS}
    parameters = {}
    for depth in config.memory_depths:
        model = make_llama(replace(config, layers=depth), 0).to(device)
        parameters[depth] = mib(parameter_bytes(model))
        for name in CONTENDERS:
            memory[name][depth] = step_memory(contender(model, name, config), ids.to(device))["peak_mib"]
    return memory, parameters


def eval_steps(config: LMFinetuneConfig) -> list[int]:
    """The fine-tuning steps after which the evaluation loss is measured: 0 … ``finetune_steps``, evenly."""
    return sorted({round(i * config.finetune_steps / (config.eval_points - 1)) for i in range(config.eval_points)})


def run_seed(config: LMFinetuneConfig, seed: int, texts: dict[str, Any], windows: Tensor,
             device: torch.device) -> dict[str, Any]:
    """Pretrain from ``seed``, then fine-tune every contender from those weights on the same batches;
    memory per step of each contender (seed 0 only: it does not depend on the seed)."""
    pretrained = make_llama(config, seed).to(device)
    pretraining = train_lm(pretrained, texts["pretrain"], config.pretrain_steps, config.pretrain_lr, config,
                           seed=10_000 + seed, desc=f"pretraining, seed {seed}")
    at = tuple(eval_steps(config))
    probe = random_windows(texts["finetune"], config.batch_size, config.context,
                           torch.Generator().manual_seed(12345)).to(device)
    runs, memory = {}, {}
    for name, label in CONTENDERS.items():
        model = contender(pretrained, name, config)
        if seed == 0:
            memory[name] = step_memory(model, probe)
        runs[name] = train_lm(model, texts["finetune"], config.finetune_steps, config.finetune_lr, config,
                              seed=20_000 + seed, windows=windows, eval_at=at, desc=f"{label}, seed {seed}")
    return {"pretrain_loss": pretraining["train_loss"], "runs": runs, "memory": memory,
            "parameters": count_parameters(pretrained), "parameter_bytes": parameter_bytes(pretrained)}


def run(config: LMFinetuneConfig) -> dict[str, Any]:
    """Every seed's pretraining and fine-tuning runs; summary: final evaluation loss per contender."""
    require_transformers()
    device = resolve_device(config.device)
    texts = corpus(config.eval_fraction)
    windows = eval_windows(texts["eval"], config.context, config.eval_windows).to(device)
    with threads(config.threads):
        seeds = [run_seed(config, seed, texts, windows, device) for seed in range(config.seeds)]
        by_depth, parameters_by_depth = depth_memory(config, device)
    runs = {name: [s["runs"][name] for s in seeds] for name in CONTENDERS}
    memory = seeds[0]["memory"]
    original = memory["original"]["peak_mib"]
    return {
        "summary": {name: summary_entry("eval_loss", [r["eval_loss"][-1] for r in runs[name]]) for name in CONTENDERS},
        "contenders": CONTENDERS,
        "eval_steps": eval_steps(config),
        "train_loss": {name: [r["train_loss"] for r in runs[name]] for name in CONTENDERS},
        "eval_loss": {name: [r["eval_loss"] for r in runs[name]] for name in CONTENDERS},
        "seconds_per_step": {name: [r["seconds_per_step"] for r in runs[name]] for name in CONTENDERS},
        "pretrain_loss": [s["pretrain_loss"] for s in seeds],
        "memory_mib": {name: m["peak_mib"] for name, m in memory.items()},
        "cuda_memory_mib": {name: m["cuda_peak_mib"] for name, m in memory.items()},
        "memory_fraction": {name: m["peak_mib"] / original for name, m in memory.items()},
        "memory_batch": [config.batch_size, config.context],
        "memory_mib_by_depth": by_depth,
        "parameter_mib_by_depth": parameters_by_depth,
        "parameters": seeds[0]["parameters"],
        "parameter_mib": mib(seeds[0]["parameter_bytes"]),
        "corpus": {
            "source": f"pydoc_data.topics of Python {platform.python_version()}",
            "pretrain_bytes": len(texts["pretrain"]), "pretrain_topics": texts["pretrain_topic_count"],
            "finetune_bytes": len(texts["finetune"]), "finetune_topics": texts["finetune_topics"],
            "eval_bytes": len(texts["eval"]), "eval_windows": len(windows),
        },
        "device": str(device),
    }


def smoothed(values: list[float], window: int) -> list[float]:
    """Trailing moving average of ``values`` over up to ``window`` points (same length)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def mean_curve(curves: list[list[float]]) -> list[float]:
    """Pointwise mean of equally long ``curves`` (one per seed)."""
    return [sum(points) / len(points) for points in zip(*curves)]


def train_panel(ax: Any, results: dict[str, Any], colours: dict[str, str]) -> None:
    """Fine-tuning train loss per contender (mean over seeds, moving average over a tenth of the run); the
    frame ends at 1.4× the original's first value (a converted model's higher start is cut)."""
    curves = {name: smoothed(mean_curve(results["train_loss"][name]), max(1, len(results["train_loss"][name][0]) // 10))
              for name in results["contenders"]}
    for name, label in results["contenders"].items():
        ax.plot(range(1, len(curves[name]) + 1), curves[name], color=colours[name], lw=1.3,
                label=f"{label}: {curves[name][-1]:.3f}")
    low = min(min(curve) for curve in curves.values())
    ax.set_ylim(0.95 * low, max(1.4 * curves["original"][0], 1.05 * low))
    ax.set(xlabel="fine-tuning step", ylabel="train loss (nats per byte)")
    ax.set_title("(a) loss on the fine-tuning text (moving average; legend: at the end)", fontsize=10)
    ax.legend(fontsize=8)


def eval_panel(ax: Any, results: dict[str, Any], colours: dict[str, str]) -> None:
    """Held-out loss per contender (mean over seeds) at the evaluation steps, zoomed on the end of the run;
    every contender's value before fine-tuning (step 0) is in its legend entry."""
    for name, label in results["contenders"].items():
        evals = mean_curve(results["eval_loss"][name])
        ax.plot(results["eval_steps"], evals, "o-", color=colours[name], ms=5, lw=1.2,
                label=f"{label}: {evals[0]:.2f} → {evals[-1]:.3f}")
    finals = [entry["mean"] for entry in results["summary"].values() if entry["mean"] is not None]
    if finals:  # zoom on where the contenders are compared
        low, top = min(finals), max(mean_curve(results["eval_loss"]["original"])[0], *finals)
        ax.set_ylim(low - 0.3 * (top - low), top + 0.8 * (top - low) + 1e-3)
    ax.set(xlabel="fine-tuning step", ylabel="held-out loss (nats per byte)")
    ax.set_title("(b) held-out loss (legend: before → after fine-tuning)", fontsize=10)
    ax.legend(fontsize=8)


def memory_panel(ax: Any, results: dict[str, Any], colours: dict[str, str]) -> None:
    """Peak memory of one training step per contender (bars), with its fraction of the original's."""
    names = list(results["contenders"])
    memory = [results["memory_mib"][name] for name in names]
    ax.bar(range(len(names)), memory, color=[colours[name] for name in names])
    for i, name in enumerate(names):
        ax.annotate(f"{memory[i]:.1f}\n{100 * results['memory_fraction'][name]:.0f} %", (i, memory[i]),
                    ha="center", va="bottom", fontsize=8)
    ax.axhline(results["parameter_mib"], color="k", ls=":", label="parameter gradients")
    ax.set_xticks(range(len(names)), [name.replace("checkpointed", "check-\npointed") for name in names], fontsize=8)
    ax.set(ylim=(0, 1.2 * max(memory)), ylabel="peak tensor memory of one step (MiB)")
    batch, length = results["memory_batch"]
    ax.set_title(f"(c) memory of one training step, batch {batch} × {length} bytes", fontsize=10)
    ax.legend(fontsize=8)


def depth_panel(ax: Any, results: dict[str, Any], colours: dict[str, str]) -> None:
    """Peak memory of one training step against the number of layers (fresh models), per contender."""
    markers = dict(zip(results["contenders"], "os^vD"))
    for i, (name, label) in enumerate(results["contenders"].items()):
        by_depth = results["memory_mib_by_depth"][name]
        ax.plot([int(d) for d in by_depth], list(by_depth.values()), "-", marker=markers[name], color=colours[name],
                ms=9 - 1.5 * i, label=label.split(",")[0] if name != "checkpointed" else "checkpointed")
    parameters = results["parameter_mib_by_depth"]
    depths = [int(d) for d in parameters]
    ax.plot(depths, list(parameters.values()), "k:", label="parameter gradients")
    ax.set(xticks=depths, yscale="log", xlabel="layers (freshly initialised)",
           ylabel="peak tensor memory of one step (MiB)")
    ax.set_title("(d) the same step against depth", fontsize=10)
    ax.legend(fontsize=7)


def plot(results: dict[str, Any], out: Path) -> Path:
    """(a) fine-tuning train loss and (b) held-out loss per contender; (c) memory of one training step
    per contender, with its fraction of the original's; (d) that memory against depth."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    colours = {name: f"C{i}" for i, name in enumerate(results["contenders"])}
    train_panel(axes[0, 0], results, colours)
    eval_panel(axes[0, 1], results, colours)
    memory_panel(axes[1, 0], results, colours)
    depth_panel(axes[1, 1], results, colours)
    fig.suptitle(f"Byte-level Llama ({results['parameters'] / 1e6:.2f} M parameters) pretrained on Python's help "
                 "topics, fine-tuned on its built-in types' topics (mean over seeds)", fontsize=10)
    return save_figure(fig, out, "lm_finetune.png")


EXPERIMENT = register_experiment(Experiment(
    name="lm-finetune",
    claim="A pretrained transformer converted to a reversible one (momentum, midpoint, leapfrog) fine-tunes to "
          "the original's loss with a fraction of its activation memory.",
    paper="Sander et al. 2021 (drop-in replacement for transformers); Gal, Haber et al. 2025 (Reversing LLMs)",
    config_type=LMFinetuneConfig,
    run=run,
    plot=plot,
    smoke={"layers": 2, "hidden": 32, "heads": 2, "kv_heads": 1, "intermediate": 64, "context": 32,
           "batch_size": 4, "pretrain_steps": 3, "finetune_steps": 4, "eval_windows": 4, "eval_points": 3,
           "memory_depths": [1, 2]},
))
