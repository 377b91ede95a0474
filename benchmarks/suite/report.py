"""Markdown tables, the verdicts on the issue's targets, and plots, all computed from a run's JSON.

Ratios are medians of the per-trial ratios, each trial's two times coming from the same
interleaved round (paired), with their interquartile range and min–max. The
floor of a reversible backward is, per trial, ``loop + loop-nograd`` (plain autograd plus one
no-grad forward of the same stack, measured in the same round).
"""

from __future__ import annotations

from pathlib import Path

from . import measure

MIB = 2**20


def _times(row: dict) -> list[float] | None:
    return row.get("times_s") if row.get("status") == "ok" else None


def _ratio(comparison: dict, num: str, den: str | tuple[str, str]) -> dict | str:
    """Paired ratio of two contenders (``den`` may be a pair whose per-trial times are added)."""
    rows = comparison["contenders"]
    names = [num, *(den if isinstance(den, tuple) else (den,))]
    for n in names:
        if n not in rows:
            return f"{n} not run"
        if _times(rows[n]) is None:
            return f"{n}: {rows[n].get('status', 'not timed')}"
    denominator = [sum(ts) for ts in zip(*(rows[n]["times_s"] for n in names[1:]))]
    return measure.ratio(rows[num]["times_s"], denominator)


def _fmt_ratio(r: dict | str) -> str:
    if isinstance(r, str):
        return f"not measured ({r})"
    return f"{r['ratio']:.2f}× (IQR {r['iqr'][0]:.2f}–{r['iqr'][1]:.2f}, min–max {r['min']:.2f}–{r['max']:.2f})"


TARGETS = (
    # (section, comparison index in it, numerator, denominator, threshold, strict, description)
    ("targets", 0, "revnets-reversible", ("loop", "loop-nograd"), 1.05, False,
     "reversible ≤ 1.05 × floor (plain autograd + one no-grad forward)"),
    ("targets", 0, "revnets-reversible", "torch-checkpoint", 1.0, True, "reversible faster than torch checkpoint"),
    ("targets", 0, "revnets-reversible", "revlib", 1.0, True, "reversible faster than revlib"),
    ("targets", 0, "revnets-exact", "loop", 1.6, False, "exact ≤ 1.6 × plain loop"),
    ("targets", 1, "revnets-reversible", "loop", 2.0, False, "reversible ≤ 2.0 × plain loop"),
    ("targets", 1, "revnets-reversible", "revlib", 1.0, True, "reversible faster than revlib"),
    ("targets", 1, "revnets-autograd", "loop", 1.05, False, 'mode="autograd" ≤ 1.05 × plain loop'),
    ("targets", 1, "revnets-exact", "loop", 1.6, False, "exact ≤ 1.6 × plain loop"),
    ("compiled", 0, "compile-reversible", "compile@1", 1.45, False,
     "torch.compile(reversible) ≤ 1.45 × torch.compile(plain loop)"),
)


def verdicts(results: dict) -> list[dict]:
    """One row per target of the issues: the measured ratio with its spread and met / missed."""
    rows = []
    for section, index, num, den, threshold, strict, description in TARGETS:
        comparisons = results["sections"].get(section, [])
        if index >= len(comparisons):
            continue
        comparison = comparisons[index]
        r = _ratio(comparison, num, den)
        if isinstance(r, str):
            verdict = "not measured"
        else:
            met = r["ratio"] < threshold if strict else r["ratio"] <= threshold
            verdict = "met" if met else "**missed**"
            if r["iqr"][0] <= threshold <= r["iqr"][1]:
                verdict += " (the IQR straddles the threshold)"
        rows.append({"config": comparison["label"], "target": description, "threshold": threshold,
                     "measured": r, "verdict": verdict})
    return rows


def _mib(memory: dict | None, key: str) -> str:
    if not memory or key not in memory:
        return "–"
    return f"{memory[key] / MIB:.2f}"


def comparison_table(comparison: dict, baseline: str = "loop") -> list[str]:
    lines = [f"**{comparison['label']}**", "",
             (f"| contender | median s (IQR) | vs {baseline} (IQR of paired ratios) | held after fwd MiB | "
             "peak fwd+bwd MiB | grad rel. err. vs loop |"),
             "|---|---|---|---|---|---|"]
    for name, row in comparison["contenders"].items():
        if row["status"] != "ok":
            lines.append(f"| {row['label']} | {row['status'][:160]} | | | | |")
            continue
        t = row.get("time")
        time_cell = f"{t['median']:.4f} ({t['iqr'][0]:.4f}–{t['iqr'][1]:.4f})" if t else "–"
        r = _ratio(comparison, name, baseline) if t and name != baseline else None
        ratio_cell = "1" if name == baseline else ("–" if r is None or isinstance(r, str)
                                                    else f"{r['ratio']:.2f}× ({r['iqr'][0]:.2f}–{r['iqr'][1]:.2f})")
        memory = row.get("memory")
        err = memory.get("grad_rel_error") if memory else None
        extra = ""
        if memory and "allocator_held_after_forward" in memory:
            extra = (f" (allocator: {memory['allocator_held_after_forward'] / MIB:.2f} held, "
                     f"{memory['allocator_peak'] / MIB:.2f} peak)")
        lines.append(f"| {row['label']} | {time_cell} | {ratio_cell} | {_mib(memory, 'held_after_forward')}{extra} | "
                     f"{_mib(memory, 'peak')} | {'–' if err is None else f'{err:.1e}'} |")
    return [*lines, ""]


def growth(comparisons: list[dict], name: str, key: str = "depth") -> float | None:
    """Least-squares growth of held-after-forward bytes per unit of ``key`` (per layer for depth)."""
    xs, ys = [], []
    for c in comparisons:
        m = c["contenders"][name].get("memory") or {}
        if "held_after_forward" in m:
            xs.append(c["spec"][key])
            ys.append(m["held_after_forward"])
    return measure.fit_line(xs, ys)[1] if len(xs) >= 2 else None


def sweep_table(comparisons: list[dict], key: str, title: str) -> list[str]:
    """Contenders × sweep values: time ratio vs the loop, and held-after-forward MiB."""
    values = [c["spec"][key] for c in comparisons]
    names = list(comparisons[0]["contenders"]) if comparisons else []
    per = {"depth": "layer", "batch": "sample", "width": "unit of width"}[key]
    lines = [f"**{title}** — time vs plain loop (IQR) / held after forward MiB", "",
             "| contender | " + " | ".join(f"{key} {v}" for v in values) + f" | held KiB per {per} |",
             "|---" * (len(values) + 2) + "|"]
    for name in names:
        g = growth(comparisons, name, key)
        cells = []
        for c in comparisons:
            row = c["contenders"][name]
            if row["status"] != "ok":
                cells.append(next((w for w in ("n/a", "not run") if row["status"].startswith(w)), "failed"))
                continue
            r = _ratio(c, name, "loop")
            ratio = "–" if isinstance(r, str) else f"{r['ratio']:.2f}× ({r['iqr'][0]:.2f}–{r['iqr'][1]:.2f})"
            cells.append(f"{ratio} / {_mib(row.get('memory'), 'held_after_forward')}")
        lines.append(f"| {comparisons[0]['contenders'][name]['label']} | " + " | ".join(cells)
                     + f" | {'–' if g is None else f'{g / 1024:.2f}'} |")
    if key == "depth" and comparisons:
        spec = comparisons[0]["spec"]
        g = growth(comparisons, "loop")
        expected = 2 * spec["batch"] * spec["width"] * 4
        if g is not None:
            ok = abs(g / expected - 1) < 0.01
            lines += ["", (f"Instrument check: the plain loop's held memory grows by {g / 1024:.2f} KiB per layer; "
                           f"expected "
                      f"{expected / 1024:.2f} (it saves x_n and tanh(·), two B×W float32 tensors) — "
                      f"{'PASS' if ok else 'FAIL'}.")]
    return [*lines, ""]


def budget_rows(results: dict) -> list[dict]:
    comparisons = results["sections"].get("budget", [])
    if not comparisons:
        return []
    budget = results["config"]["budget_gib"] * 2**30
    out = []
    for name, first in comparisons[0]["contenders"].items():
        rows = [c["contenders"][name] for c in comparisons]
        if any(r["status"] != "ok" or "peak" not in r.get("memory", {}) for r in rows):
            out.append({"name": name, "label": first["label"], "status": rows[0]["status"]})
            continue
        batches = [c["spec"]["batch"] for c in comparisons]
        peaks = [r["memory"].get("cuda_peak", r["memory"]["peak"]) for r in rows]
        out.append({"name": name, "label": first["label"], "status": "ok",
                    **measure.largest_batch(batches, peaks, budget)})
    return out


def markdown(results: dict) -> str:
    env, cfg, sections = results["environment"], results["config"], results["sections"]
    lines = [f"# revnets benchmark suite — {'quick' if cfg['quick'] else 'full'} run", "",
             (f"{env['date']}, {env['cpu']} ({env['cpus_available']} CPUs available, {env['torch_threads']} torch "
             f"threads), device {env['device']}{', ' + env['gpu'] if 'gpu' in env else ''}; torch {env['torch']}, "
             f"Python {env['python']}; revnets {env['revnets']} at {env['commit']}."),
             (f"Load average (1, 5, 15 min) at start {env['load_average_at_start']}, at end "
             f"{env.get('load_average_at_end')}: on a loaded machine the times are noisy; rerun on a quiet one."),
             f"{cfg['warmup']} warm-up + {cfg['trials']} timed trials per comparison, interleaved (order rotated every "
             f"trial). Elapsed {results.get('elapsed_s')} s. Peers: "
             + ", ".join(f"{k} {v}" for k, v in results.get("peers", {}).get("versions", {}).items()
                        if k not in ("python", "torch"))
             + ".", ""]
    peers = results.get("peers", {})
    failed = {k: v for k, v in peers.items() if k not in ("path", "versions") and v != "ok"}
    if failed:
        lines += ["Peers that failed to install or import: " + "; ".join(f"{k}: {v}" for k, v in failed.items()), ""]
    rows = verdicts(results)
    if rows:
        lines += ["## Targets", "", "| config | target | measured | verdict |", "|---|---|---|---|"]
        lines += [f"| {r['config']} | {r['target']} | {_fmt_ratio(r['measured'])} | {r['verdict']} |" for r in rows]
        lines += [""]
        for c in sections.get("targets", []):
            lines += comparison_table(c)
    if sections.get("compiled"):
        lines += ["## Compiled (`torch.compile` of the model, ratios to the compiled plain loop)", "",
                  *comparison_table(sections["compiled"][0], baseline="compile@1")]
    for key, title in (("depth", "Depth sweep"), ("batch", "Batch sweep"), ("width", "Width sweep")):
        if sections.get(key):
            spec_key = {"depth": "depth", "batch": "batch", "width": "width"}[key]
            s = dict(sections[key][0]["spec"], **{spec_key: "·"})
            label = f"{s['workload']} W{s['width']} B{s['batch']} depth {s['depth']}"
            lines += [f"## {title}", "", *sweep_table(sections[key], spec_key, label)]
    if sections.get("pareto"):
        lines += ["## Time vs memory (Pareto)", "", *comparison_table(sections["pareto"][0])]
    if sections.get("budget"):
        spec = sections["budget"][0]["spec"]
        lines += [(f"## Largest batch in {cfg['budget_gib']:g} GiB ({spec['workload']} W{spec['width']} "
                  f"depth {spec['depth']})"),
                  "",
                  ("Peak fwd+bwd fitted as fixed + per-sample × batch over batches "
                  f"{[c['spec']['batch'] for c in sections['budget']]} (beyond them the fit is an extrapolation; "
                  "optimiser state not included)."), "",
                  "| contender | MiB/sample | fixed MiB | fit residual MiB | largest batch |", "|---|---|---|---|---|"]
        for r in budget_rows(results):
            if r["status"] != "ok":
                lines.append(f"| {r['label']} | {r['status'][:120]} | | | |")
            else:
                lines.append(f"| {r['label']} | {r['per_sample_bytes'] / MIB:.3f} | {r['fixed_bytes'] / MIB:.1f} | "
                             f"{r['fit_max_residual_bytes'] / MIB:.2f} | {r['largest_batch']} |")
        lines.append("")
    if sections.get("workloads"):
        lines += ["## Workloads", ""]
        for c in sections["workloads"]:
            lines += comparison_table(c)
    zoo = sections.get("zoo")
    if zoo:
        batches = zoo["models"][0]["batches"] if zoo["models"] else ""
        lines += [f"## Model zoo (one training step, 3×32×32, batches {batches}; budget {zoo['budget_gib']:g} GiB)",
                  "",
                  ("| network | model (mode) | held after fwd at largest batch MiB | peak MiB/sample | fixed MiB | "
                  "fit residual MiB | largest batch in budget | vs plain |"), "|---|---|---|---|---|---|---|---|"]
        plain_batch: dict[str, int] = {}
        for m in zoo["models"]:
            plain_batch.setdefault(m["network"], m["largest_batch"])  # the plain model comes first
            gain = m["largest_batch"] / max(plain_batch[m["network"]], 1)
            lines.append(f"| {m['network']} | {m['model']} ({m['mode']}) | "
                         f"{m['held_after_forward_bytes'][-1] / MIB:.1f} | "
                         f"{m['per_sample_bytes'] / MIB:.2f} | {m['fixed_bytes'] / MIB:.1f} | "
                         f"{m['fit_max_residual_bytes'] / MIB:.2f} | {m['largest_batch']} | {gain:.1f}× |")
        e = zoo["encoder"]
        lines += ["", (f"Converted `nn.TransformerEncoder` (depth {e['depth']}, width {e['width']}, 4 heads) vs the "
                  "original, training step memory (MiB):"), "",
                  "| batch | seq | model | held after fwd | peak fwd+bwd |", "|---|---|---|---|---|"]
        for r in zoo["encoders"]:
            lines.append(f"| {r['batch']} | {r['seq']} | {r['model']} | {_mib(r, 'held_after_forward')} | "
                         f"{_mib(r, 'peak')} |")
        lines.append("")
    if sections.get("exact_buffer"):
        lines += ["## Exact mode's information buffer", "", "| depth | bits per element per layer | floor log2(1/γ) |",
                  "|---|---|---|"]
        lines += [f"| {b['depth']} | {b['bits_per_element_per_layer']:.4f} | {b['floor']:.4f} |"
                  for b in sections["exact_buffer"]]
        lines.append("")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# plots


def _series(comparisons: list[dict], key: str, value) -> dict[str, tuple[list, list]]:
    out: dict[str, tuple[list, list]] = {}
    for c in comparisons:
        for name, row in c["contenders"].items():
            y = value(c, name, row) if row["status"] == "ok" else None
            if y is not None:
                out.setdefault(row["label"], ([], []))
                out[row["label"]][0].append(c["spec"][key])
                out[row["label"]][1].append(y)
    return out


def _held(c, name, row):
    m = row.get("memory") or {}
    return m["held_after_forward"] / MIB if "held_after_forward" in m else None


def _time_ratio(c, name, row):
    r = _ratio(c, name, "loop")
    return None if isinstance(r, str) else r["ratio"]


def plots(results: dict, folder: Path, name: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    sections = results["sections"]

    def save(fig, suffix):
        path = folder / f"{name}-{suffix}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=72)
        plt.close(fig)
        made.append(path)

    depth = sections.get("depth")
    if depth:
        for suffix, value, ylabel, logy in (("memory-vs-depth", _held, "held after forward (MiB)", True),
                                            ("time-ratio-vs-depth", _time_ratio, "time / plain loop", False)):
            fig, ax = plt.subplots(figsize=(7, 4.5))
            for label, (xs, ys) in _series(depth, "depth", value).items():
                ax.plot(xs, ys, marker="o", label=label)
            ax.set_xscale("log", base=2)
            if logy:
                ax.set_yscale("log")
            ax.set_xlabel("depth")
            ax.set_ylabel(ylabel)
            ax.set_title(depth[0]["label"].rsplit(" depth", 1)[0])
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
            save(fig, suffix)
    rows = [r for r in budget_rows(results) if r["status"] == "ok"]
    if rows:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.barh([r["label"] for r in rows], [r["largest_batch"] for r in rows])
        ax.set_xlabel(f"largest batch in {results['config']['budget_gib']:g} GiB (peak fwd+bwd)")
        ax.tick_params(axis="y", labelsize=7)
        save(fig, "largest-batch")
    pareto = sections.get("pareto")
    if pareto:
        c = pareto[0]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        curve = []
        for n, row in c["contenders"].items():
            if row["status"] != "ok" or (ratio := _time_ratio(c, n, row)) is None:
                continue
            held = _held(c, n, row)
            r = _ratio(c, n, "loop")
            marker = {"revnets": "o", "baseline": "s", "peer": "^"}[row["group"]]
            x = held if held is not None else float("nan")
            ax.errorbar([x], [ratio], yerr=[[max(0.0, ratio - r["iqr"][0])], [max(0.0, r["iqr"][1] - ratio)]],
                        marker=marker, capsize=3)
            ax.annotate(row["label"].replace("activation_memory_budget", "budget"), (x, ratio), fontsize=6)
            if n.startswith("revnets@"):
                curve.append((x, ratio))
        if curve:  # revnets' memory_budget curve
            ax.plot(*zip(*sorted(curve)), color="gray", linewidth=0.8, zorder=0)
        ax.set_xlabel("held after forward (MiB)")
        ax.set_ylabel("time / plain loop (IQR)")
        ax.set_title(f"Pareto: {c['label']}")
        ax.grid(alpha=0.3)
        save(fig, "pareto")
    return made


def write(results: dict, folder: Path, name: str) -> None:
    folder = Path(folder)
    (folder / f"{name}.md").write_text(markdown(results))
    try:
        plots(results, folder, name)
    except ImportError as error:
        print(f"plots skipped: {error}")
