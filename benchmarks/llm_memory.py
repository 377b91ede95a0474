"""A converted Llama against the original: memory and time of one training step (CPU, no download).

A ``transformers.LlamaForCausalLM`` built from a configuration (hidden 512, 8 heads, 4 key/value heads,
MLP 1376, vocabulary 2048, float32, random weights, SDPA attention) runs one training step —
parameters' ``.grad`` set to ``None``, ``loss = model(input_ids=ids, labels=ids, use_cache=False).loss``,
``loss.backward()``; no optimiser step — as four contenders built from the same weights in one process:

* ``original``: the model as built (plain autograd);
* ``original + HF checkpointing``: a copy with
  ``activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})``
  (every decoder layer under ``torch.utils.checkpoint``);
* ``reversible``: ``revnets.convert_to_momentum(model, 0.9)`` (the layer list is one momentum stack);
* ``reversible, budget 0.25``: the same with ``revnets.set_mode(m, "reversible", memory_budget=0.25)``.

Measured per configuration (depth, sequence length, batch), with :class:`revnets.memory.StorageTracker`
(bytes of the tensor storages the step creates and are alive; device independent, not load dependent):

* **peak**: the peak live bytes during the whole step (forward, loss, backward; the parameter
  gradients are created inside it, so they count; the weights exist before it and do not);
* **held after forward**: live bytes right after the forward, before the backward: what the model and the
  loss keep for the backward (only the loss is kept of the output, so the logits count only where saved);
* **what sets the peak**: the phase and the op at the peak, and the live storages then split into
  parameter gradients, vocabulary-sized tensors (≥ B·(T−1)·V floats: logits, their softmax, its gradient)
  and the rest (activations, a recomputed layer, temporaries).

Sweeps (``--sweeps``, all by default): depth 2–16 at sequence 512; sequence 256–2048 at depth 12; batch 1–8
at depth 12, sequence 256 (all batch 1 otherwise); and ``frozen``: the depth sweep again with the decoder
layers' parameters frozen (only the embedding, final norm and LM head train, as in LoRA fine-tuning
without the adapters), where the peak is set by activations rather than by the parameter gradients.

The memory step is each contender's first and is also its warm-up (its numbers equal the later steps';
checked when this script was written). At the timed configurations the contenders then run ``rounds``
more steps each, interleaved (one step of each per round, the order rotated from round to round), timed
with ``time.perf_counter`` without the tracker, the garbage collector off during a step: seconds per step
(median, IQR) and the per-round (paired) ratio to the original.

    python benchmarks/llm_memory.py                 # every sweep: ~5 min on 2 idle cores, far longer if busy
    python benchmarks/llm_memory.py --quick         # small sizes, under a minute
    python benchmarks/llm_memory.py --sweeps depth frozen              # some sweeps only
    python benchmarks/llm_memory.py --report benchmarks/results/llm-memory.json   # tables and plots again
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
import time
import weakref
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the suite package (environment)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # revnets, from a checkout

from suite import environment

import revnets
from revnets.memory import StorageTracker, mib

REPO = Path(__file__).resolve().parent.parent
CONTENDERS = ("original", "original + HF checkpointing", "reversible", "reversible, budget 0.25")
MODEL = {"hidden_size": 512, "intermediate_size": 1376, "num_attention_heads": 8, "num_key_value_heads": 4,
         "vocab_size": 2048, "max_position_embeddings": 4096}
PRESETS = {
    "full": {"depths": [2, 4, 8, 12, 16], "depth_sequence": 512, "sequences": [256, 512, 1024, 2048],
             "sequence_depth": 12, "batches": [1, 2, 4, 8], "batch_depth": 12, "batch_sequence": 256,
             "timed": [[12, 256, 1], [12, 512, 1], [12, 1024, 1]], "rounds": 7},
    "quick": {"depths": [1, 2, 4], "depth_sequence": 128, "sequences": [64, 128, 256], "sequence_depth": 2,
              "batches": [1, 2], "batch_depth": 2, "batch_sequence": 64, "timed": [[2, 128, 1]], "rounds": 5},
}


# --------------------------------------------------------------------------------------------------
# models and one step


def build_contenders(depth: int) -> dict[str, torch.nn.Module]:
    """The four contenders, from one seeded ``LlamaForCausalLM`` of ``depth`` layers, in training mode."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(num_hidden_layers=depth, **MODEL)
    original = transformers.LlamaForCausalLM(config).train()
    checkpointed = copy.deepcopy(original)
    checkpointed.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    budget = revnets.set_mode(revnets.convert_to_momentum(original, 0.9), "reversible", memory_budget=0.25)
    models = (original, checkpointed, revnets.convert_to_momentum(original, 0.9), budget)
    return {name: model.train() for name, model in zip(CONTENDERS, models)}


def clear_grads(model: torch.nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


def step(model: torch.nn.Module, ids: torch.Tensor, tracker: PeakTracker | None = None) -> int:
    """One forward (loss on ``labels=ids``) and backward; returns the tracker's live bytes after the forward."""
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    held = 0
    if tracker is not None:
        held = tracker.live_bytes
        tracker.phase = "backward"
    loss.backward()
    return held


class PeakTracker(StorageTracker):
    """A :class:`StorageTracker` that also remembers what was alive at the peak: for every live storage
    its bytes, a weak reference, and the op and shape that created it; and the phase and op at the peak."""

    def __init__(self) -> None:
        super().__init__()
        self.phase, self.peak_phase, self.peak_op = "forward", "", ""
        self.labels: dict[int, str] = {}
        self.at_peak: dict[int, tuple[int, weakref.ref, str]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        before = self.peak_bytes
        out = super().__torch_dispatch__(func, types, args, kwargs)
        name = func.overloadpacket.__name__
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and id(t.untyped_storage()) in self._live:
                self.labels.setdefault(id(t.untyped_storage()), f"{name}{tuple(t.shape)}")
        if self.peak_bytes > before:
            self.peak_phase, self.peak_op = self.phase, name
            self.at_peak = {k: (n, self._refs[k], self.labels.get(k, "?")) for k, n in self._live.items()}
        return out

    def _release(self, key: int) -> None:
        super()._release(key)
        self.labels.pop(key, None)


def measure_memory(model: torch.nn.Module, ids: torch.Tensor, vocab: int) -> dict:
    """Peak and held-after-forward bytes of one step of ``model``, and what was alive at the peak."""
    clear_grads(model)
    gc.collect()
    with PeakTracker() as tracker:
        held = step(model, ids, tracker)
    grads = {id(p.grad.untyped_storage()): p.grad.untyped_storage() for p in model.parameters() if p.grad is not None}
    vocab_sized = ids.shape[0] * (ids.shape[1] - 1) * vocab * 4
    split = {"gradients": 0, "vocabulary-sized": 0, "other": 0}
    for n, ref, _ in tracker.at_peak.values():
        storage = ref()
        is_grad = storage is not None and grads.get(id(storage)) is storage
        split["gradients" if is_grad else "vocabulary-sized" if n >= vocab_sized else "other"] += n
    largest = sorted(tracker.at_peak.values(), key=lambda e: -e[0])[:10]
    result = {"peak": tracker.peak_bytes, "held_after_forward": held, "peak_phase": tracker.peak_phase,
              "peak_op": tracker.peak_op, "at_peak": split,
              "largest_at_peak": [[label, n] for n, _, label in largest],
              "gradient_bytes": sum(p.grad.untyped_storage().nbytes() for p in model.parameters()
                                    if p.grad is not None)}
    clear_grads(model)
    return result


def timed_step(model: torch.nn.Module, ids: torch.Tensor) -> float:
    """Seconds of one step (gradients cleared before the clock starts, collector off during it)."""
    clear_grads(model)
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        step(model, ids)
        seconds = time.perf_counter() - start
    finally:
        gc.enable()
    clear_grads(model)
    return seconds


# --------------------------------------------------------------------------------------------------
# the sweeps


def points_of(preset: dict, sweeps: list[str]) -> list[tuple[int, int, int, bool]]:
    """The distinct (depth, sequence, batch, decoder layers frozen) configurations of ``sweeps``, by depth."""
    points = set()
    if "depth" in sweeps:
        points |= {(d, preset["depth_sequence"], 1, False) for d in preset["depths"]}
    if "sequence" in sweeps:
        points |= {(preset["sequence_depth"], s, 1, False) for s in preset["sequences"]}
    if "batch" in sweeps:
        points |= {(preset["batch_depth"], preset["batch_sequence"], b, False) for b in preset["batches"]}
    if "frozen" in sweeps:
        points |= {(d, preset["depth_sequence"], 1, True) for d in preset["depths"]}
    return sorted(points)


def measure_point(models: dict, point: tuple[int, int, int, bool], rounds: int) -> dict:
    """Memory of every contender at one configuration, then ``rounds`` interleaved timed steps each.

    With ``frozen``, the decoder layers' parameters do not require grad (only the embedding, the final norm
    and the LM head train: the memory of fine-tuning with frozen weights, LoRA without its adapters)."""
    depth, sequence, batch, frozen = point
    for model in models.values():
        model.model.layers.requires_grad_(not frozen)
    torch.manual_seed(1)
    ids = torch.randint(0, MODEL["vocab_size"], (batch, sequence))
    start = time.perf_counter()
    memory = {name: measure_memory(model, ids, MODEL["vocab_size"]) for name, model in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(timed_step(models[name], ids))
    parameters = sum(p.numel() for p in models["original"].parameters())
    result = {"depth": depth, "sequence": sequence, "batch": batch, "frozen": frozen, "parameters": parameters,
              "memory": memory, "seconds": times, "wall_s": round(time.perf_counter() - start, 1),
              "load_average_after": environment.load()}
    line = ", ".join(f"{n} {mib(m['peak']):.1f}/{mib(m['held_after_forward']):.1f}" for n, m in memory.items())
    print(f"depth {depth} seq {sequence} batch {batch}{' frozen' if frozen else ''}: peak/held MiB {line} "
          f"({result['wall_s']} s)", flush=True)
    return result


def run(preset: dict, sweeps: list[str]) -> list[dict]:
    timed = {(*p, False) for p in preset["timed"]}
    results, models, built = [], None, None
    for point in points_of(preset, sweeps):
        if built != point[0]:
            models = None
            gc.collect()
            models, built = build_contenders(point[0]), point[0]
        results.append(measure_point(models, point, preset["rounds"] if point in timed else 0))
    return results


# --------------------------------------------------------------------------------------------------
# report


def stats(values: list[float]) -> dict:
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return {"median": float(median), "q1": float(q1), "q3": float(q3), "min": min(values), "max": max(values)}


def time_rows(point: dict) -> list[str]:
    """Markdown rows: seconds per step and the paired ratio to the original, per contender."""
    base = point["seconds"]["original"]
    load = (point.get("load_average_after") or ["?"])[0]
    rows = []
    for name, seconds in point["seconds"].items():
        s, r = stats(seconds), stats([a / b for a, b in zip(seconds, base)])
        rows.append(f"| depth {point['depth']}, seq {point['sequence']}, batch {point['batch']} | {name} | "
                    f"{s['median']:.2f} ({s['q1']:.2f}–{s['q3']:.2f}) | {r['median']:.2f}× "
                    f"({r['q1']:.2f}–{r['q3']:.2f}; {r['min']:.2f}–{r['max']:.2f}) | {load} |")
    return rows


def memory_table(points: list[dict], key: str) -> list[str]:
    """Markdown: one row per point of a sweep (``key`` varies), cells 'peak / held after forward' in MiB."""
    lines = [f"| {key} | gradients | " + " | ".join(CONTENDERS) + " |", "|" + "---|" * (len(CONTENDERS) + 2)]
    for p in points:
        cells = [f"{mib(p['memory'][n]['peak']):.1f} / {mib(p['memory'][n]['held_after_forward']):.1f}"
                 for n in CONTENDERS]
        grads = mib(p["memory"]["original"]["gradient_bytes"])
        lines.append(f"| {p[key]} | {grads:.1f} | " + " | ".join(cells) + " |")
    return lines


def peak_rows(points: list[dict]) -> list[str]:
    """Markdown: what sets each peak (phase, op, split of the live bytes at the peak, MiB)."""
    lines = ["| depth, seq, batch (layers frozen) | contender | phase at peak | op | gradients | vocabulary-sized "
             "| other |",
             "|---|---|---|---|---|---|---|"]
    for p in points:
        for name in CONTENDERS:
            m = p["memory"][name]
            split = " | ".join(f"{mib(m['at_peak'][k]):.1f}" for k in ("gradients", "vocabulary-sized", "other"))
            frozen = ", frozen" if p.get("frozen") else ""
            lines.append(f"| {p['depth']}, {p['sequence']}, {p['batch']}{frozen} | {name} | {m['peak_phase']} | "
                         f"{m['peak_op']} | {split} |")
    return lines


SWEEPS = {  # name: (varying key, fixed settings, filter on a point)
    "depth": ("depth", "sequence {depth_sequence}, batch 1",
              lambda p, c: p["sequence"] == c["depth_sequence"] and p["batch"] == 1 and p["depth"] in c["depths"]),
    "sequence": ("sequence", "depth {sequence_depth}, batch 1",
                 lambda p, c: p["depth"] == c["sequence_depth"] and p["batch"] == 1
                 and p["sequence"] in c["sequences"]),
    "batch": ("batch", "depth {batch_depth}, sequence {batch_sequence}",
              lambda p, c: p["depth"] == c["batch_depth"] and p["sequence"] == c["batch_sequence"]
              and p["batch"] in c["batches"]),
    "frozen": ("depth", "decoder layers frozen, sequence {depth_sequence}, batch 1",
               lambda p, c: p["sequence"] == c["depth_sequence"] and p["batch"] == 1 and p["depth"] in c["depths"]),
}


def sweep(points: list[dict], preset: dict, which: str) -> list[dict]:
    """The points of one sweep, in order of the varying key."""
    key, _, keep = SWEEPS[which]
    chosen = [p for p in points if p.get("frozen", False) == (which == "frozen") and keep(p, preset)]
    return sorted(chosen, key=lambda p: p[key])


def markdown(data: dict) -> str:
    env, preset, points = data["environment"], data["preset"], data["points"]
    out = ["# A converted Llama against the original: one training step", "",
           f"`{data['command']}` — {env['date']}, {env['cpu']}, {env['cpus_available']} CPUs, "
           f"torch threads {env['torch_threads']}, torch {env['torch']}, transformers {env['transformers']}, "
           f"Python {env['python']}, revnets {env['revnets']} at `{env['commit']}`; load average (1, 5, 15 min) "
           f"{env['load_average_at_start']} at start, {env['load_average_at_end']} at end; wall {data['wall_s']} s.",
           "", f"Model: LlamaForCausalLM {json.dumps(MODEL)}, float32, random weights. Memory in MiB of tensor "
           "storages created by the step (StorageTracker); cells: peak of the step / held after the forward; "
           "'gradients': bytes of all parameter gradients (in every peak)."]
    for which, (key, fixed, _) in SWEEPS.items():
        chosen = sweep(points, preset, which) if which in data["sweeps"] else []
        if chosen:
            out += ["", f"## Memory vs {key} ({fixed.format(**preset)})", "", *memory_table(chosen, key)]
    out += ["", "## What sets the peak (MiB alive at the peak)", "", *peak_rows(points)]
    timed = [p for p in points if p["seconds"]["original"]]
    if timed:
        out += ["", f"## Time of one step ({preset['rounds']} interleaved rounds after the memory step; "
                "seconds: median (IQR); ratio: median of per-round ratios to the original (IQR; min–max))", "",
                "| configuration | contender | s / step | ratio to original | load (1 min) after |",
                "|---|---|---|---|---|"]
        for p in timed:
            out += time_rows(p)
    return "\n".join(out) + "\n"


COLOURS = {"original": "tab:red", "original + HF checkpointing": "tab:orange", "reversible": "tab:blue",
           "reversible, budget 0.25": "tab:green"}


def panel(ax, points: list[dict], key: str, title: str, above_gradients: bool = False) -> None:
    """Peak MiB (solid) and held after forward (dashed) against ``key``, one colour per contender; with
    ``above_gradients``, the peak minus all parameter gradients' bytes instead (what the step adds to them)."""
    xs = [p[key] for p in points]
    for i, name in enumerate(CONTENDERS):
        memory, size = [p["memory"][name] for p in points], 9 - 1.6 * i  # shrinking markers: overlaps stay visible
        peaks = [mib(m["peak"] - (m["gradient_bytes"] if above_gradients else 0)) for m in memory]
        ax.plot(xs, peaks, "o-", color=COLOURS[name], markersize=size, label=f"{name}: peak")
        if not above_gradients:
            ax.plot(xs, [mib(m["held_after_forward"]) for m in memory], "s--", color=COLOURS[name], markersize=size,
                    alpha=0.8, label=f"{name}: held after forward")
    if not above_gradients:
        ax.plot(xs, [mib(p["memory"]["original"]["gradient_bytes"]) for p in points], ":", color="grey",
                label="parameter gradients")
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel({"depth": "decoder layers", "sequence": "sequence length (tokens)"}[key])
    ax.set_ylabel("MiB, peak minus parameter gradients" if above_gradients else "MiB of tensors created by the step")
    ax.set_title(title, fontsize=9)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)


def figure(panels: list[tuple[list[dict], str, str, bool]], path: Path, title: str) -> None:
    """One row of :func:`panel` s, a shared legend below, written to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.6), squeeze=False)
    for ax, args in zip(axes[0], panels):
        panel(ax, *args)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(data: dict, out: Path, figures: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(data))
    preset, stem, points = data["preset"], data["figure_stem"], data["points"]
    figures.mkdir(parents=True, exist_ok=True)
    title = "LlamaForCausalLM (hidden 512, vocabulary 2048, float32), one training step (forward + backward)"
    for key, frozen in (("depth", "frozen"), ("sequence", None)):
        chosen = sweep(points, preset, key) if key in data["sweeps"] else []
        fixed = SWEEPS[key][1].format(**preset)
        panels = [(chosen, key, f"all parameters trained, {fixed}", False),
                  (chosen, key, f"peak above the gradients, {fixed}", True)]
        if frozen in data["sweeps"]:
            panels.append((sweep(points, preset, frozen), key, SWEEPS[frozen][1].format(**preset), False))
        if len(chosen) > 1:
            figure(panels, figures / f"{stem}_{key}.png", title)
    print(f"wrote {out.with_suffix('.json')}, {out.with_suffix('.md')}, figures in {figures}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, about a minute")
    parser.add_argument("--sweeps", nargs="+", choices=list(SWEEPS), default=["depth", "sequence", "batch", "frozen"])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--out", type=Path, help="results prefix (default benchmarks/results/llm-memory[-quick])")
    parser.add_argument("--figures", type=Path, help="folder of the plots (default docs/figures; quick: beside --out)")
    parser.add_argument("--report", type=Path, help="rewrite the tables and plots from this JSON, measure nothing")
    args = parser.parse_args()
    name = "llm-memory-quick" if args.quick else "llm-memory"
    out = args.out or REPO / "benchmarks" / "results" / name
    figures = args.figures or (out.parent if args.quick else REPO / "docs" / "figures")
    if args.report:
        report(json.loads(args.report.read_text()), out if args.out else args.report.with_suffix(""), figures)
        return
    torch.set_num_threads(args.threads)
    allocator = environment.keep_freed_memory()
    import transformers

    env = environment.describe("cpu")
    env.update(transformers=transformers.__version__, allocator=allocator)
    preset = PRESETS["quick" if args.quick else "full"]
    start = time.perf_counter()
    points = run(preset, args.sweeps)
    env["load_average_at_end"] = environment.load()
    data = {"command": " ".join(["python benchmarks/llm_memory.py", *sys.argv[1:]]), "environment": env,
            "model": MODEL, "preset": preset, "sweeps": args.sweeps, "contenders": list(CONTENDERS),
            "figure_stem": "llm-memory-quick" if args.quick else "llm_memory",
            "wall_s": round(time.perf_counter() - start, 1), "points": points}
    report(data, out, figures)


if __name__ == "__main__":
    main()
