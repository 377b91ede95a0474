"""The run directory of ``revnets train``: nothing lost on a kill, bitwise resume, refused ``--out``,
metrics written as each epoch ends, configuration files and recipes."""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from revnets.cli.app import app
from revnets.training import RECIPES, Interrupted, TrainConfig, resolve, resume, train
from revnets.training.checkpoint import latest_checkpoint
from revnets.training.data import crop_flip
from revnets.training.loop import Trainer, lr_factor

pytest.importorskip("sklearn")
pytestmark = pytest.mark.usefixtures("one_thread")

# 6 steps per epoch, 12 in all; crop-and-flip augmentation so that its generator is exercised too
RUN_OPTIONS = {"model": "hamiltonian38", "dataset": "digits", "epochs": 2, "batch_size": 16, "limit": 96,
               "augment": "crop-flip", "warmup_epochs": 0.5, "checkpoint_every": 1, "device": "cpu"}
RUN = [text for key, value in RUN_OPTIONS.items() for text in (f"--{key.replace('_', '-')}", str(value))]
STEPS = 12
TIMEOUT = 120


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "revnets", "train", *args]


def _environment() -> dict[str, str]:
    # the same thread count in every run: float reductions then add in the same order
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _latest_step(out: Path) -> int:
    folder = latest_checkpoint(out) if out.exists() else None
    return -1 if folder is None else int(folder.name.split("-")[1])


def _start_and_stop_at(out: Path, step: int, how: signal.Signals) -> subprocess.CompletedProcess:
    """Start a run, send ``how`` once its checkpoint of ``step`` exists; return the finished process."""
    process = subprocess.Popen(_command(*RUN, "--out", str(out)), env=_environment(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + TIMEOUT
    while _latest_step(out) < step and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    process.send_signal(how)
    stdout, stderr = process.communicate(timeout=TIMEOUT)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _resume(out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(_command("--resume", str(out)), check=False, env=_environment(), capture_output=True,
                          text=True, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    result = subprocess.run(_command(*RUN, "--out", str(out)), check=False, env=_environment(), capture_output=True,
                            text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    return out


def _assert_same_run(resumed: Path, reference: Path) -> None:
    assert (resumed / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()
    keys = ("epoch", "step", "train_loss", "train_accuracy", "eval_loss", "eval_accuracy", "lr")
    rows = [[{k: row[k] for k in keys} for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
            for out in (resumed, reference)]
    assert rows[0] == rows[1]
    csv_lines = (resumed / "metrics.csv").read_text().splitlines()
    assert len(csv_lines) == 3 and csv_lines[0].startswith("epoch,step,train_loss")


def test_sigkill_at_a_random_step_then_resume_gives_bitwise_the_uninterrupted_weights(tmp_path, uninterrupted):
    step = random.randrange(1, STEPS)
    out = tmp_path / "run"
    killed = _start_and_stop_at(out, step, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL, f"the run ended before the kill at step {step}: {killed.stderr}"
    assert not (out / "model.safetensors").exists()
    resumed = _resume(out)
    assert resumed.returncode == 0, f"kill at step {step}: {resumed.stderr}"
    _assert_same_run(out, uninterrupted)


def test_ctrl_c_checkpoints_and_prints_the_resume_command(tmp_path, uninterrupted):
    out = tmp_path / "run"
    stopped = _start_and_stop_at(out, 3, signal.SIGINT)
    assert stopped.returncode == 130, stopped.stderr
    assert f"resume with: revnets train --resume {out}\n" in stopped.stderr  # a line of its own, ended
    assert 3 <= _latest_step(out) < STEPS
    resume(out)  # in this process (one thread, as the subprocesses)
    _assert_same_run(out, uninterrupted)


def test_sigterm_checkpoints_at_the_end_of_the_step(tmp_path, uninterrupted):
    out = tmp_path / "run"
    config = TrainConfig(**RUN_OPTIONS)

    def progress(epoch, step, steps, loss):
        if (epoch, step) == (1, 4):
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Interrupted, match=f"stopped by SIGTERM after step 4: .* --resume {out}"):
        train(config, out, progress=progress)
    assert _latest_step(out) == 4
    resume(out)
    _assert_same_run(out, uninterrupted)


def _output(result) -> str:
    """A command's output with the error box's frame and line breaks removed."""
    return " ".join(result.output.replace("│", " ").split())


def test_an_existing_out_is_refused_unless_overwrite(tmp_path):
    runner = CliRunner()
    base = ["train", "--model", "hamiltonian38", "--dataset", "digits", "--epochs", "1", "--batch-size", "32",
            "--limit", "32"]
    file = tmp_path / "notes.txt"
    file.write_text("precious")
    for overwrite in ([], ["--overwrite"]):  # a file is never deleted, and --resume is no advice for it
        result = runner.invoke(app, [*base, "--out", str(file), *overwrite])
        assert result.exit_code != 0 and "is a file, not a run directory" in _output(result)
        assert "--resume" not in _output(result)
        assert file.read_text() == "precious"
    run = tmp_path / "run"
    assert runner.invoke(app, [*base, "--out", str(run)]).exit_code == 0
    result = runner.invoke(app, [*base, "--out", str(run)])
    assert result.exit_code != 0 and "pass --resume" in _output(result)
    result = runner.invoke(app, [*base, "--out", str(run), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    (run / "my_notes.md").write_text("mine")  # a run directory holding a file revnets did not write
    result = runner.invoke(app, [*base, "--out", str(run), "--overwrite"])
    assert result.exit_code != 0 and "also holds my_notes.md" in _output(result)
    assert (run / "my_notes.md").read_text() == "mine" and (run / "model.safetensors").is_file()
    other = tmp_path / "not_a_run"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    (other / "config.json").write_text('{"lr": 1}')  # a config.json that no revnets run wrote
    for overwrite in ([], ["--overwrite"]):
        result = runner.invoke(app, [*base, "--out", str(other), *overwrite])
        assert result.exit_code != 0 and "holds no revnets run" in _output(result)
        assert (other / "notes.txt").read_text() == "keep" and (other / "config.json").read_text() == '{"lr": 1}'
    link = tmp_path / "link"
    link.symlink_to(run, target_is_directory=True)
    result = runner.invoke(app, [*base, "--out", str(link), "--overwrite"])
    assert result.exit_code != 0 and "is a symbolic link" in _output(result)
    empty = tmp_path / "empty"
    empty.mkdir()  # made by the user beforehand: used as it is, no --overwrite needed
    result = runner.invoke(app, [*base, "--out", str(empty)])
    assert result.exit_code == 0, result.output
    assert (empty / "model.safetensors").is_file()


def test_resume_names_what_is_wrong_with_its_directory(tmp_path):
    runner = CliRunner()
    file = tmp_path / "notes.txt"
    file.write_text("precious")
    cases = [(file, "is a file, not a run directory"), (tmp_path / "missing", "does not exist"),
             (tmp_path, "no revnets run there")]
    for path, message in cases:
        result = runner.invoke(app, ["train", "--resume", str(path)])
        assert result.exit_code != 0 and message in _output(result), result.output
    assert file.read_text() == "precious"


def test_the_default_run_directory_is_new_each_time(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["train", "--model", "hamiltonian38", "--dataset", "digits", "--epochs", "1", "--batch-size", "32",
            "--limit", "32"]
    for _ in range(2):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2 and all((run / "model.safetensors").is_file() for run in runs)


def test_metrics_are_written_as_each_epoch_ends(tmp_path):
    seen = []
    out = tmp_path / "run"

    def progress(epoch, step, steps, loss):
        if step == 1:
            lines = [(out / name).read_text().splitlines() if (out / name).exists() else []
                     for name in ("metrics.csv", "metrics.jsonl")]
            seen.append((epoch, len(lines[0]), len(lines[1]), (out / "curves.png").exists()))

    config = TrainConfig("hamiltonian38", "digits", epochs=3, batch_size=32, limit=64)
    Trainer(config, out, progress=progress).run()
    # before epoch e's first step: a header and e - 1 rows in the CSV, e - 1 lines of JSON, curves after epoch 1
    assert seen == [(1, 0, 0, False), (2, 2, 1, True), (3, 3, 2, True)]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    assert all(row["peak_memory_bytes"] > 0 and row["images_per_second"] > 0 for row in rows)


def test_resume_keeps_the_saved_configuration(tmp_path):
    out = tmp_path / "run"
    base = ["train", "--model", "hamiltonian38", "--dataset", "digits", "--epochs", "1", "--batch-size", "32",
            "--limit", "32", "--out", str(out)]
    assert CliRunner().invoke(app, base).exit_code == 0
    result = CliRunner().invoke(app, ["train", "--resume", str(out), "--lr", "0.5"])
    allowed = "only checkpoint_every, device, download, num_workers, tensorboard"
    assert result.exit_code != 0 and allowed in _output(result)
    result = CliRunner().invoke(app, ["train", "--resume", str(tmp_path)])
    assert result.exit_code != 0 and "no revnets run there" in _output(result)


@pytest.mark.parametrize("suffix", [".toml", ".yaml"])
def test_a_configuration_file_is_resolved_and_written_into_the_run(tmp_path, suffix):
    if suffix == ".yaml":
        pytest.importorskip("yaml")
    text = {
        ".toml": 'recipe = "chang-cifar"\ndataset = "digits"\nmodel = "hamiltonian38"\nepochs = 1\nbatch-size = 32\n'
                 'limit = 32\nmilestones = [1]\n[dataset_options]\nnormalize = false\n',
        ".yaml": "recipe: chang-cifar\ndataset: digits\nmodel: hamiltonian38\nepochs: 1\nbatch-size: 32\nlimit: 32\n"
                 "milestones: [1]\ndataset_options: {normalize: false}\n",
    }[suffix]
    path = tmp_path / f"options{suffix}"
    path.write_text(text)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--config", str(path), "--lr", "0.05", "--out", str(out)])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "config.json").read_text())["config"]
    # recipe, then file, then command line
    assert saved["smoothness"] == RECIPES["chang-cifar"]["smoothness"] == 2e-4
    assert saved["schedule"] == "multistep" and saved["milestones"] == [1]
    assert saved["batch_size"] == 32 and saved["lr"] == 0.05 and saved["dataset_options"] == {"normalize": False}
    assert TrainConfig.from_dict(saved) == resolve({"lr": 0.05}, config_file=path)


def test_bad_configuration_files_and_recipes_are_named(tmp_path):
    path = tmp_path / "options.toml"
    path.write_text('model = "hamiltonian38"\ndataset = "digits"\nlearning_rate = 0.1\n')
    with pytest.raises(ValueError, match="unknown configuration key.*learning_rate"):
        resolve({}, config_file=path)
    with pytest.raises(ValueError, match="unknown recipe 'sander'; known recipes: sander-cifar, chang-cifar"):
        resolve({}, recipe="sander")
    ini = tmp_path / "options.ini"
    ini.write_text("")
    with pytest.raises(ValueError, match="suffix must be .toml, .yaml, .yml or .json"):
        resolve({}, config_file=ini)
    with pytest.raises(ValueError, match="no model given"):
        resolve({"dataset": "digits"})


@pytest.mark.parametrize(("name", "text", "message"), [
    ("options.yaml", 'model: hamiltonian38\ndataset: digits\nlr: "fast"\n', r"lr must be a number; got 'fast'"),
    ("options.toml", 'model = "hamiltonian38"\ndataset = "digits"\nepochs = "two"\n',
     r"epochs must be an integer; got 'two'"),
    ("options.yaml", "model: hamiltonian38\ndataset: digits\nmode: fast\n",
     "mode must be one of reversible, autograd, checkpoint; got 'fast'"),
    ("options.yaml", "model: hamiltonian38\ndataset: [digits\nlr: 0.1\n", "is not valid YAML: .*line 3"),
    ("options.toml", 'model = "hamiltonian38\n', "is not valid TOML: .*line 1"),
    ("options.json", '{"model": "hamiltonian38",}', "is not valid JSON"),
    ("options.yaml", "- model\n- dataset\n", "must hold a table of options"),
])
def test_configuration_file_errors_name_the_file_and_the_key(tmp_path, name, text, message):
    pytest.importorskip("yaml")
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=f"configuration file {path}.*{message}"):
        resolve({}, config_file=path)
    result = CliRunner().invoke(app, ["train", "--config", str(path)], env={"COLUMNS": "300"})
    assert (result.exit_code == 2 and result.exception is None) or isinstance(result.exception, SystemExit)
    assert f"configuration file {path}" in _output(result) and "Traceback" not in result.output


def test_numbers_written_as_strings_are_read_as_numbers(tmp_path):
    """YAML 1.1 reads 5e-4 as a string: such values are numbers for the fields that hold numbers."""
    path = tmp_path / "options.yaml"
    path.write_text("model: hamiltonian38\ndataset: digits\nweight_decay: 5e-4\nmilestones: 80,120\n"
                    "precision: 32\nschedule: multistep\n")
    config = resolve({}, config_file=path)
    assert config.weight_decay == 5e-4 and config.milestones == (80, 120) and config.precision == "32"
    with pytest.raises(ValueError, match=r"grad_clip must be a number or none; got \[1\]"):
        TrainConfig("hamiltonian38", "digits", grad_clip=[1])
    with pytest.raises(ValueError, match="sync_bn must be true or false; got 1"):
        TrainConfig("hamiltonian38", "digits", sync_bn=1)


def test_warmup_then_schedules():
    config = TrainConfig("m", "d", epochs=4, warmup_epochs=1, schedule="cosine")
    factor = lr_factor(config, steps_per_epoch=10)
    assert [factor(s) for s in (0, 4, 9)] == pytest.approx([1 / 11, 5 / 11, 10 / 11])
    assert factor(10) == pytest.approx(1) and factor(25) == pytest.approx(0.5) and factor(40) == pytest.approx(0)
    steps = lr_factor(TrainConfig("m", "d", epochs=4, schedule="multistep", milestones=(2, 3), lr_decay=0.5), 10)
    assert [steps(s) for s in (0, 19, 20, 30, 39)] == pytest.approx([1, 1, 0.5, 0.25, 0.25])


def test_crop_flip_shifts_and_mirrors_each_image():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    augmented = crop_flip(images, torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(0)
    offsets = torch.randint(0, 3, (2, 2), generator=generator)
    flips = torch.rand(2, generator=generator) < 0.5
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1))
    for b in range(2):
        expected = padded[b, :, offsets[0, b] : offsets[0, b] + 8, offsets[1, b] : offsets[1, b] + 8]
        torch.testing.assert_close(augmented[b], expected.flip(-1) if flips[b] else expected)


def test_the_data_order_does_not_depend_on_num_workers(tmp_path):
    """Worker processes only load images: order and augmentation come from the main process."""
    weights = []
    for workers in (0, 2):
        out = tmp_path / f"workers-{workers}"
        config = TrainConfig("hamiltonian38", "digits", epochs=1, batch_size=32, limit=64, augment="crop-flip",
                             num_workers=workers)
        Trainer(config, out).run()
        weights.append((out / "model.safetensors").read_bytes())
    assert weights[0] == weights[1]


def test_tensorboard_logs_or_names_the_missing_package(tmp_path):
    config = TrainConfig("hamiltonian38", "digits", epochs=1, batch_size=32, limit=32, tensorboard=True)
    try:
        import tensorboard  # noqa: F401
    except ModuleNotFoundError:
        with pytest.raises(ValueError, match="--tensorboard needs the tensorboard package"):
            Trainer(config, tmp_path / "run")
        assert not (tmp_path / "run").exists()  # refused before anything is written
        return
    Trainer(config, tmp_path / "run").run()
    assert any(path.name.startswith("events.out.tfevents") for path in (tmp_path / "run" / "tensorboard").iterdir())


def test_batchnorm_statistics_are_recomputed_after_each_epoch():
    """With ``bn_recalibration=2`` the stem's running mean is the average of its two batch means over
    the first two batches of the epoch's data order, not an exponential average of the training steps."""
    config = TrainConfig("hamiltonian38", "digits", epochs=1, batch_size=32, limit=128, bn_recalibration=2)
    trainer = Trainer(config, None)
    trainer.run()
    trainer.train_loader.sampler.set_position(1, 0)
    batches = [images for images, _ in itertools.islice(trainer.train_loader, 2)]
    with torch.no_grad():
        means = [trainer.model.stem[0](images).mean(dim=(0, 2, 3)) for images in batches]
    torch.testing.assert_close(trainer.model.stem[1].running_mean, (means[0] + means[1]) / 2)


def test_a_new_checkpoint_removes_older_checkpoints_only(tmp_path):
    from revnets.training.checkpoint import save_checkpoint

    weights = {"w": torch.zeros(2)}
    save_checkpoint(tmp_path, 1, weights, {"step": 1})
    (tmp_path / "checkpoints" / "my-best").mkdir()  # a folder of the user's, beside revnets' own
    (tmp_path / "checkpoints" / "step-00000007.tmp").mkdir()  # an unfinished one a kill left behind
    save_checkpoint(tmp_path, 2, weights, {"step": 2})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "my-best", "step-00000002"]
