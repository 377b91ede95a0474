"""The experiment contract, its registry, and the one results writer every experiment shares.

An experiment is a module that registers one :class:`Experiment`:

* ``name`` (what ``revnets reproduce NAME`` takes) and ``claim`` (one line: the paper's claim);
* ``config_type``, a dataclass whose defaults are the default run and whose ``seeds`` field is the
  number of seeds (``0 … seeds−1``); ``smoke`` holds the overrides of ``--smoke`` (tiny, seconds);
* ``run(config) -> results``: a JSON-serialisable dict with a ``summary`` (see :func:`summary_entry`)
  and whatever the figure needs;
* ``plot(results, out_dir) -> path``: the paper's figure drawn from ``results`` alone (so it can be
  redrawn from ``results.json``).

:func:`reproduce` runs one, writes ``results.json`` (claim, config, seeds, environment, git commit,
wall time, summary, details) and the figure, and returns the record. The CLI, the docs and the tests
all read :func:`list_experiments`, as the model zoo's registry does for models.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import platform
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

RESULTS_FILE = "results.json"


@dataclass(frozen=True)
class Experiment:
    """One reproducible experiment (see the module docstring).

    Attributes:
        name: the CLI name (``"rings"``, ``"small-data"``...).
        claim: the paper's claim in one line (``revnets reproduce --help`` lists it).
        paper: where the claim comes from (paper, figure or table).
        config_type: the dataclass of settings; its defaults are the default run.
        run: ``run(config) -> results`` (a JSON-serialisable dict with a ``summary``).
        plot: ``plot(results, out_dir) -> Path`` of the PNG written.
        smoke: overrides of ``config_type``'s defaults for ``--smoke`` (seconds, for tests).
        needs_data_dir: ``None`` if ``--data-dir`` is not used, else a sentence saying what it must hold.
    """

    name: str
    claim: str
    paper: str
    config_type: type
    run: Callable[[Any], dict[str, Any]]
    plot: Callable[[dict[str, Any], Path], Path]
    smoke: dict[str, Any] = field(default_factory=dict)
    needs_data_dir: str | None = None

    def make_config(self, *, smoke: bool = False, **options: Any) -> Any:
        """The config: defaults, then the ``smoke`` overrides if asked, then ``options`` (``None`` = unset).

        Raises:
            ValueError: an option this experiment does not take (naming the ones it takes).
        """
        names = {f.name for f in dataclasses.fields(self.config_type)}
        given = {key: value for key, value in options.items() if value is not None}
        unknown = sorted(set(given) - names)
        if unknown:
            flags = ", ".join("--" + key.replace("_", "-") for key in unknown)
            settings = ", ".join(sorted(names))
            raise ValueError(f"experiment {self.name!r} does not take {flags}; its settings are: {settings}")
        settings = {**(self.smoke if smoke else {}), **given}
        return self.config_type(**settings)


_EXPERIMENTS: dict[str, Experiment] = {}


def register_experiment(experiment: Experiment) -> Experiment:
    """Add ``experiment`` to the registry (a name can be registered once); returns it."""
    if experiment.name in _EXPERIMENTS:
        raise ValueError(f"an experiment named {experiment.name!r} is already registered")
    if not any(f.name == "seeds" for f in dataclasses.fields(experiment.config_type)):
        raise TypeError(f"{experiment.config_type.__name__} must have a 'seeds' field")
    _EXPERIMENTS[experiment.name] = experiment
    return experiment


def list_experiments() -> list[str]:
    """The registered experiment names, in registration order (the order of the docs)."""
    return list(_EXPERIMENTS)


def get_experiment(name: str) -> Experiment:
    """The experiment ``name``.

    Raises:
        ValueError: for an unknown name, listing the valid ones (and the closest).
    """
    if name not in _EXPERIMENTS:
        close = difflib.get_close_matches(name, _EXPERIMENTS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown experiment {name!r}{hint}; valid experiments: {', '.join(_EXPERIMENTS)}")
    return _EXPERIMENTS[name]


# --------------------------------------------------------------------------------------------------
# Summary statistics, environment, results.json, the printed table


def summary_entry(metric: str, per_seed: Sequence[float]) -> dict[str, Any]:
    """``{"metric", "mean", "std", "per_seed"}`` of one network: ``std`` is the sample standard
    deviation (``n − 1`` in the denominator; 0 for a single seed). A diverged seed (inf/NaN) makes
    the mean and std non-finite, written as ``null`` in JSON, and stays visible in ``per_seed``."""
    values = [float(v) for v in per_seed]
    if not values:
        raise ValueError(f"no values for metric {metric!r}")
    mean = math.fsum(values) / len(values) if all(map(math.isfinite, values)) else math.nan
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"metric": metric, "mean": mean, "std": std, "per_seed": values}


def git_commit() -> str | None:
    """``git rev-parse HEAD`` of the checkout holding this package, or ``None`` outside a git checkout."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True,
            timeout=10, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = result.stdout.strip()
    return commit if result.returncode == 0 and commit else None


def environment(device: str | None = None, threads: int | None = None) -> dict[str, Any]:
    """Versions, platform, intra-op threads (``threads``, default: the current setting) and device."""
    cuda = torch.cuda.is_available()
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": threads or torch.get_num_threads(),
        "device": device or ("cuda" if cuda else "cpu"),
        "cuda_device": torch.cuda.get_device_name(0) if cuda else None,
    }


def _json_safe(value: Any) -> Any:
    """``value`` with NaN/inf as ``None`` and paths/tuples as strings/lists (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def format_table(summary: dict[str, dict[str, Any]]) -> str:
    """The summary as a fixed-width table: network, metric, mean ± std, seeds."""
    rows = [(net, entry["metric"], _mean_std(entry), str(len(entry["per_seed"]))) for net, entry in summary.items()]
    header = ("network", "metric", "mean ± std", "seeds")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) if i < 3 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _mean_std(entry: dict[str, Any]) -> str:
    """``mean ± std`` with the std to two significant digits and the mean to the same decimal place;
    the value alone for one seed (a std of one value means nothing), ``± 0`` when the seeds agree; accuracies in %."""
    mean, std = entry["mean"], entry["std"]
    if mean is None:
        return "n/a"
    scale, unit = (100, " %") if "accuracy" in entry["metric"] else (1, "")
    mean, std = scale * mean, scale * (std or 0.0)
    if len(entry["per_seed"]) < 2:
        return f"{mean:.4g}{unit}"
    if std <= 1e-9 * max(abs(mean), 1.0):  # equal seeds up to the rounding of the mean's own sum
        return f"{mean:.4g} ± 0{unit}"
    decimals = min(max(1 - math.floor(math.log10(std)), 0), 8)
    if abs(mean) >= 1e5 or abs(mean) < 10 ** -decimals:
        return f"{mean:.3e} ± {std:.2g}{unit}"
    return f"{mean:.{decimals}f} ± {std:.{decimals}f}{unit}"


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend (figures are only written to files)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, out: str | Path, filename: str) -> Path:
    """Lay out ``fig``, write it as ``<out>/<filename>`` (90 dpi, creating ``out``), close it; return the path."""
    import matplotlib.pyplot as plt

    path = Path(out) / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def load_results(path: str | Path) -> dict[str, Any]:
    """The results dict a ``results.json`` was written from (``details`` plus ``summary``): what
    ``plot`` takes, so ``get_experiment(name).plot(load_results(p), out)`` redraws a figure."""
    record = json.loads(Path(path).read_text())
    return {**record["details"], "summary": record["summary"]}


def prepare_output_dir(out: Path, *, overwrite: bool) -> None:
    """Make ``out`` ready for an experiment's files: a new or empty directory is used as it is; one
    holding an earlier experiment's ``results.json`` only with ``overwrite`` (its results.json and
    figure are then written over; nothing is deleted); anything else is refused.

    Raises:
        ValueError: ``out`` is a file or link, a non-empty directory without a ``results.json`` of
            revnets, or an earlier output without ``overwrite``.
    """
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ValueError(f"--out {out} is {'a symbolic link' if out.is_symlink() else 'a file'}, not a folder: "
                         "revnets does not write over what it did not create; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        try:
            earlier = json.loads((out / RESULTS_FILE).read_text())
        except (OSError, ValueError):
            earlier = None
        if not isinstance(earlier, dict) or "experiment" not in earlier:
            raise ValueError(f"--out {out} is a folder that is not empty and holds no earlier results of revnets "
                             f"({RESULTS_FILE}): choose a new or empty --out")
        if not overwrite:
            raise ValueError(f"--out {out} holds the results of an earlier run ({earlier['experiment']}): pass "
                             "--overwrite to write over its results.json and figure, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)


def reproduce(
    name: str, out: str | Path, *, smoke: bool = False, command: str | None = None, overwrite: bool = False,
    **options: Any
) -> dict[str, Any]:
    """Run experiment ``name`` with ``options`` (config fields; ``None`` = default), write
    ``<out>/results.json`` and the figure, and return the record written. ``out`` must be new or
    empty, or hold an earlier run's results with ``overwrite`` (:func:`prepare_output_dir`).

    The record: ``experiment``, ``claim``, ``paper``, ``smoke``, ``config``, ``seeds`` (the list used),
    ``environment``, ``git_commit``, ``command`` (as given by the caller), ``wall_time_s``, ``figure``
    (file name), ``summary``
    (``{network: {metric, mean, std, per_seed}}``) and ``details`` (the rest of the results).
    """
    experiment = get_experiment(name)
    config = experiment.make_config(smoke=smoke, **options)
    out = Path(out)
    prepare_output_dir(out, overwrite=overwrite)
    start = time.perf_counter()
    results = experiment.run(config)
    wall_time = time.perf_counter() - start
    if "summary" not in results:
        raise RuntimeError(f"experiment {name!r} returned no summary")
    figure = experiment.plot(results, out)
    record = {
        "experiment": name,
        "claim": experiment.claim,
        "paper": experiment.paper,
        "smoke": smoke,
        "config": dataclasses.asdict(config),
        "seeds": list(range(config.seeds)),
        "environment": environment(results.get("device"), getattr(config, "threads", None)),
        "git_commit": git_commit(),
        "command": command,
        "wall_time_s": wall_time,
        "figure": Path(figure).name,
        "summary": results["summary"],
        "details": {k: v for k, v in results.items() if k != "summary"},
    }
    record = _json_safe(record)
    (out / RESULTS_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record
