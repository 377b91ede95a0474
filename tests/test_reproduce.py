"""``revnets reproduce NAME`` and ``revnets demo``: every experiment end to end under ``--smoke``,
the results.json schema, and the errors for bad names and missing data directories."""

import json
import math
import sys

import pytest
import torch
from typer.testing import CliRunner

from revnets.cli.app import app
from revnets.experiments import get_experiment, list_experiments, load_results, reproduce
from revnets.experiments.base import format_table, summary_entry

pytestmark = pytest.mark.usefixtures("one_thread")

EXPECTED = ["rings", "cubic", "linear", "l2o", "memory", "gamma", "small-data", "deep", "finetune", "cifar",
            "lm-finetune"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def check_record(record: dict, name: str, out) -> None:
    """The results.json contract: provenance fields and ``summary.<network>.{metric, mean, std, per_seed}``."""
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == record
    for key in ("claim", "config", "seeds", "environment", "git_commit", "wall_time_s", "summary", "figure"):
        assert key in record, key
    assert record["experiment"] == name and record["claim"] == get_experiment(name).claim
    assert record["git_commit"] is None or len(record["git_commit"]) == 40
    assert {"torch", "python", "platform", "threads", "device"} <= set(record["environment"])
    assert record["seeds"] == list(range(record["config"]["seeds"]))
    assert record["wall_time_s"] > 0
    assert record["summary"], "empty summary"
    for network, entry in record["summary"].items():
        assert set(entry) == {"metric", "mean", "std", "per_seed"}, network
        assert isinstance(entry["metric"], str) and entry["metric"]
        assert len(entry["per_seed"]) >= 1
        assert all(v is None or math.isfinite(v) for v in entry["per_seed"])
        for value in (entry["mean"], entry["std"]):
            assert value is None or math.isfinite(value)
    figure = out / record["figure"]
    assert figure.suffix == ".png" and figure.read_bytes()[:8] == PNG_MAGIC


def test_registry_names_are_the_issues():
    assert list_experiments() == EXPECTED


@pytest.mark.parametrize("name", EXPECTED)
def test_every_experiment_runs_under_smoke(name, tmp_path):
    record = reproduce(name, tmp_path, smoke=True)
    check_record(record, name, tmp_path)
    # the figure can be redrawn from results.json alone
    redrawn = get_experiment(name).plot(load_results(tmp_path / "results.json"), tmp_path / "again")
    assert redrawn.read_bytes()[:8] == PNG_MAGIC


def test_lm_finetune_smoke_has_every_contender_with_finite_losses(tmp_path):
    record = reproduce("lm-finetune", tmp_path, smoke=True, seeds=1)
    contenders = ["original", "checkpointed", "momentum", "midpoint", "leapfrog"]
    assert list(record["summary"]) == contenders
    details = record["details"]
    steps = record["config"]["finetune_steps"]
    for name in contenders:
        assert record["summary"][name]["metric"] == "eval_loss"
        (train,), (evals,) = details["train_loss"][name], details["eval_loss"][name]
        assert len(train) == steps and len(evals) == len(details["eval_steps"])
        assert all(math.isfinite(v) and v > 0 for v in [*train, *evals])
        assert details["memory_mib"][name] > 0
    # the checkpointed original computes the original: same losses; both start from the same weights
    assert details["eval_loss"]["checkpointed"][0] == pytest.approx(details["eval_loss"]["original"][0], rel=1e-4)
    assert details["memory_fraction"]["original"] == 1


def test_lm_finetune_without_transformers_names_the_hf_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    with pytest.raises(ValueError, match=r"revnets\[hf\]"):
        reproduce("lm-finetune", tmp_path, smoke=True)


def test_cli_reproduce_rings_two_rings(tmp_path):
    result = CliRunner().invoke(app, ["reproduce", "rings", "--smoke", "--rings", "2", "--seeds", "1",
                                      "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["config"]["rings"] == 2 and record["seeds"] == [0]
    assert set(record["summary"]) == {"resnet", "momentum"}
    assert record["command"].startswith("revnets reproduce rings")
    assert "test_accuracy" in result.output and "resnet" in result.output


def test_cli_help_lists_every_experiment_and_claim():
    result = CliRunner().invoke(app, ["reproduce", "--help"], env={"COLUMNS": "300"})
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for name in EXPECTED:
        assert f"{name}:" in text
    assert "Nested rings" in text


def test_unknown_experiment_lists_the_valid_ones():
    result = CliRunner().invoke(app, ["reproduce", "ringz", "--smoke"], env={"COLUMNS": "300"})
    assert result.exit_code != 0
    text = " ".join(result.output.split())
    assert "unknown experiment 'ringz'" in text
    assert "valid experiments: " + ", ".join(EXPECTED) in text
    with pytest.raises(ValueError, match="valid experiments: rings, cubic"):
        get_experiment("nope")


@pytest.mark.parametrize("args, expected", [
    (["cifar"], "cifar-10-batches-py"),
    (["finetune"], "<dir>/train/<class name>"),
    (["cifar", "--smoke", "--data-dir", "MISSING"], "cifar-100-python"),
    (["small-data", "--smoke", "--data-dir", "MISSING"], "stl10_binary"),
    (["rings", "--smoke", "--rings", "3"], "--rings must be 2 or 4"),
    (["cubic", "--smoke", "--rings", "2"], "does not take --rings"),
])
def test_bad_settings_say_what_is_expected(args, expected, tmp_path):
    args = [str(tmp_path / "missing") if a == "MISSING" else a for a in args]
    result = CliRunner().invoke(app, ["reproduce", *args, "--out", str(tmp_path / "out")], env={"COLUMNS": "300"})
    assert result.exit_code != 0
    assert expected in " ".join(result.output.split())


def test_cli_demo_runs(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--smoke", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "momentum" in result.output and "test_accuracy" in result.output
    assert (tmp_path / "rings.png").exists() and (tmp_path / "results.json").exists()


def test_cli_out_is_never_a_file_or_a_foreign_folder(tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("precious")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "a.txt").write_text("keep")
    for out, message in ((file, "is a file, not a folder"), (foreign, "holds no earlier results")):
        for overwrite in ([], ["--overwrite"]):
            result = CliRunner().invoke(app, ["demo", "--smoke", "--out", str(out), *overwrite], env={"COLUMNS": "300"})
            assert result.exit_code != 0 and message in " ".join(result.output.replace("│", " ").split())
    assert file.read_text() == "precious" and sorted(p.name for p in foreign.iterdir()) == ["a.txt"]
    out = tmp_path / "run"
    assert CliRunner().invoke(app, ["demo", "--smoke", "--out", str(out)]).exit_code == 0
    result = CliRunner().invoke(app, ["demo", "--smoke", "--out", str(out)], env={"COLUMNS": "300"})
    assert result.exit_code != 0 and "pass --overwrite" in " ".join(result.output.replace("│", " ").split())
    (out / "my_notes.md").write_text("mine")
    assert CliRunner().invoke(app, ["demo", "--smoke", "--out", str(out), "--overwrite"]).exit_code == 0
    assert (out / "my_notes.md").read_text() == "mine"


@pytest.mark.parametrize(("args", "command"), [
    (["demo", "--smoke"], "revnets demo --smoke"),
    (["demo", "--smoke", "--seeds", "1"], "revnets demo --seeds 1 --smoke"),
    (["reproduce", "rings", "--smoke"], "revnets reproduce rings --smoke"),
    (["reproduce", "cubic", "--smoke", "--threads", "2"], "revnets reproduce cubic --threads 2 --smoke"),
])
def test_results_record_the_command_as_typed(tmp_path, args, command):
    assert CliRunner().invoke(app, [*args, "--out", str(tmp_path)]).exit_code == 0
    assert json.loads((tmp_path / "results.json").read_text())["command"] == command


def test_threads_option_reaches_the_experiment_and_is_restored(tmp_path):
    before = torch.get_num_threads()
    result = CliRunner().invoke(app, ["reproduce", "lm-finetune", "--smoke", "--threads", "2", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["config"]["threads"] == 2 and record["environment"]["threads"] == 2
    assert torch.get_num_threads() == before
    refused = CliRunner().invoke(app, ["reproduce", "cubic", "--smoke", "--threads", "0", "--out", str(tmp_path / "x")])
    assert refused.exit_code != 0 and "--threads" in refused.output


@pytest.mark.parametrize(("per_seed", "metric", "shown"), [
    ([0.9582], "test_accuracy", "95.82 %"),  # one seed: no "± 0"
    ([0.9, 0.95, 0.97], "test_accuracy", "94.0 ± 3.6 %"),  # mean to the std's decimal place
    ([1.23456, 1.23466], "loss", "1.234610 ± 0.000071"),
    ([0.5, 0.5], "loss", "0.5 ± 0"),
    ([354 / 359] * 3, "test_accuracy", "98.61 ± 0 %"),  # equal seeds whose mean rounds: no "± 0.00000000"
])
def test_the_table_gives_mean_and_std_to_the_same_precision(per_seed, metric, shown):
    table = format_table({"net": summary_entry(metric, per_seed)})
    assert f"  {shown}  " in table, table
