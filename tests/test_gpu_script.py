"""``benchmarks/gpu.py``, the one-command GPU run, in its CPU dry run: every section runs (tiny sizes, pytest
collects only, a synthetic out-of-memory limit for the largest-batch search, DDP on gloo) and the JSON and
Markdown it writes have the schema the GPU run's readers expect, each section with values or an explicit
"skipped: reason"."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("tests", "gradients", "suite", "throughput", "ddp")
STRATEGIES = {"autograd", "reversible", "checkpoint", "exact", "memory_budget=0.5"}
SCHEMES = {"MomentumNet", "RevNet", "HamiltonianNet", "MidpointNet", "LeapfrogNet"}

pytest.importorskip("torchvision")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[dict, str, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("gpu-dry-run")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--device", "cpu", "--dry-run",
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    [path] = out.glob("gpu-*-dry-run.json")
    return json.loads(path.read_text()), path.with_suffix(".md").read_text(), done


def present(record: dict) -> bool:
    """A section ran (``ok`` or ``partial``) or says why not."""
    status = record["status"]
    return status in ("ok",) or status.startswith(("partial: ", "skipped: "))


def test_the_dry_run_passes_and_names_the_environment(dry_run):
    results, markdown, done = dry_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert results["schema"] == "revnets-gpu-run/1"
    assert results["config"]["preset"] == "dry" and results["config"]["device"] == "cpu"
    env = results["environment"]
    for key in ("device_name", "driver", "torch", "commit", "source_digest", "python", "date"):
        assert env[key], key
    assert results["failed_sections"] == []
    assert list(results["sections"]) == list(SECTIONS)
    for name, record in results["sections"].items():
        assert present(record), (name, record["status"])
        assert f"## {name}" in markdown
    assert "[" in done.stdout and "saved" in done.stdout  # progress lines


def test_tests_section_selects_the_device_tests(dry_run):
    record = dry_run[0]["sections"]["tests"]
    assert record["status"] == "ok" and record["exit_code"] == 0
    assert any("test_training_precision.py::" in test for test in record["selected"])
    assert not any("test_gpu_script.py" in test for test in record["selected"])
    assert "collected" in record["summary"]


def test_gradients_cover_every_scheme_and_strategy(dry_run):
    record = dry_run[0]["sections"]["gradients"]
    assert record["status"] == "ok" and record["counts"]["failed"] == 0
    cases = record["cases"]
    grid = [c for c in cases if "autocast" not in c and "compiled" not in c]
    assert {c["scheme"] for c in grid} == SCHEMES and {c["strategy"] for c in grid} == STRATEGIES
    assert {c["dtype"] for c in grid} == {"float32", "float64"} and {c["functions"] for c in grid} == {
        "mlp", "bn-dropout"}
    checked = [c for c in cases if c["status"] == "ok"]
    assert all(c["pass"] and c["max_rel_error"] <= c["tolerance"] for c in checked)
    assert len([c for c in cases if c.get("autocast") == "bfloat16"]) == 20
    [compiled] = [c for c in cases if "compiled" in c]
    assert compiled["status"] == "ok" and compiled["pass"]


def test_suite_runs_every_section_and_reports_missing_peers(dry_run):
    record = dry_run[0]["sections"]["suite"]
    results = record["results"]
    assert set(results["sections"]) == {"targets", "workloads", "zoo", "pareto", "budget", "depth", "exact_buffer"}
    assert set(results["skipped_sections"]) == {"batch", "width"}  # 64-layer stacks: not in a dry run
    for peer, status in results["peers"].items():
        if peer != "versions" and status != "ok":
            rows = [c["contenders"][peer] for c in results["sections"]["targets"]]
            assert status == "not installed" and all(r["status"] == "not installed" for r in rows)
    assert any(name.endswith("-suite.json") for name in record["files"])


def test_throughput_measures_every_model_and_finds_the_synthetic_limit(dry_run):
    record = dry_run[0]["sections"]["throughput"]
    models = record["models"]
    variants = {(m["model"].split()[0], m["variant"].split("(")[0].split(",")[0]) for m in models}
    assert ("torchvision", "original") in variants and ("torchvision", "convert_to_momentum") in variants
    assert {m["variant"] for m in models if m["model"].startswith("Llama")} == {
        "original", "Hugging Face activation checkpointing", "convert_to_momentum(0.9), reversible"}
    assert [m["hf_checkpointing"] for m in models if m["model"].startswith("Llama")] == [False, True, False]
    assert len([m for m in models if m["model"].startswith("zoo")]) == 2
    for m in models:
        assert m["status"] == "ok", m
        assert m["throughput"]["items_per_second"] > 0 and "max_memory_allocated" in m["throughput"]
        search = m["search"]
        assert search["largest_batch"] == 8 and search["first_oom"] == 12 and not search["capped"]
        assert any("oom" in t for t in search["tried"])  # the out-of-memory path ran


def test_ddp_runs_two_processes(dry_run):
    record = dry_run[0]["sections"]["ddp"]
    assert record["status"] == "ok" and record["backend"] == "gloo"
    assert record["params_equal_across_ranks"] and record["rank1"]["error"] <= record["tolerance"]
