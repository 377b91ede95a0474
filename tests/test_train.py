"""Training a zoo model on a shipped dataset, from Python and from the command line."""

from __future__ import annotations

import copy
import dataclasses
import json
import re

import pytest
import torch
from typer.testing import CliRunner

from revnets.cli.app import app
from revnets.models import create_model, list_models
from revnets.training import TrainConfig, forward_backward, train
from revnets.training.data import load_datasets, training_loader
from revnets.training.loop import build_model

pytest.importorskip("sklearn")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("hamiltonian38", {"smoothness": 2e-4, "label_smoothing": 0.1}),
        ("momentum_resnet18", {"model_options": {"gamma": 0.9}}),
        ("revnet18", {}),
    ],
)
def test_one_training_step_reversible_gradients_equal_autograd_in_float64(name, options):
    """The trainer's step (its loss, the forward and backward of forward_backward) on the same batch
    and the same weights: reversible and autograd gradients agree to float64 rounding, and so do the
    BatchNorm running statistics the step leaves. One step cannot drift, unlike losses after many
    float32 SGD steps."""
    config = TrainConfig(name, "digits", batch_size=16, **options)
    datasets = load_datasets(config)
    images, labels = next(iter(training_loader(datasets, config, world=1, rank=0, pin_memory=False)))
    torch.manual_seed(0)
    reversible = build_model(config, datasets.channels, datasets.classes).double().train()
    reference = copy.deepcopy(reversible).set_mode("autograd")
    loss, _ = forward_backward(reversible, images.double(), labels, config)
    reference_loss, _ = forward_backward(reference, images.double(), labels, config)
    torch.testing.assert_close(loss, reference_loss, rtol=1e-12, atol=0)
    for (key, p), q in zip(reversible.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=key)
    for (key, b), c in zip(reversible.named_buffers(), reference.buffers(), strict=True):
        torch.testing.assert_close(b, c, rtol=1e-12, atol=0, msg=key)


def test_hamiltonian_learns_digits():
    """The README's command: Hamiltonian-38, 3 epochs of digits (chance is 10 %)."""
    _, history = train(TrainConfig("hamiltonian38", "digits", epochs=3, batch_size=64, lr=0.1))
    assert history[-1].eval_accuracy > 0.9, history
    assert history[-1].train_loss < history[0].train_loss


def test_cli_writes_a_run_that_reloads(tmp_path):
    out = tmp_path / "run"
    args = ["train", "--model", "momentum_resnet18", "--dataset", "digits", "--epochs", "1", "--batch-size", "32",
            "--limit", "64", "--gamma", "0.5", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "test acc" in result.output
    saved = json.loads((out / "config.json").read_text())
    assert saved["config"]["model_options"] == {"gamma": 0.5}
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from safetensors.torch import load_model

    model = create_model("momentum_resnet18", num_classes=10, in_channels=1, gamma=0.5)
    load_model(model, str(out / "model.safetensors"))
    trained, _ = train(TrainConfig("momentum_resnet18", "digits", epochs=1, batch_size=32, limit=64,
                                   model_options={"gamma": 0.5}))
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(model.eval()(x), trained.eval()(x))


DIGITS = {"model": "resnet18", "dataset": "digits"}
MISSING_GPU = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"model": "resnet18", "dataset": "cubic"}, "regression task"),
        ({"model": "resnet18", "dataset": "rings"}, r"inputs of shape \(2,\), not images"),
        ({**DIGITS, "model_options": {"gamma": 0.5}}, "does not take the options"),
        ({**DIGITS, "limit": 0}, "limit must be >= 1"),
        ({**DIGITS, "epochs": 0}, "epochs and batch_size must be >= 1"),
        ({**DIGITS, "mode": "reversible"}, "mode='reversible' needs invertible blocks"),
        ({**DIGITS, "optimizer": "adam"}, "optimizer must be one of sgd, adamw"),
        ({**DIGITS, "precision": "fp8"}, "precision must be one of 32, bf16, 16-mixed"),
        ({**DIGITS, "schedule": "multistep"}, "needs milestones"),
        ({**DIGITS, "mode": "autograd", "smoothness": 1e-4}, "has no smoothness_penalty"),
        ({**DIGITS, "mode": "autograd", "device": MISSING_GPU}, "CUDA is not available|there are"),
        ({**DIGITS, "mode": "autograd", "device": "tpu"}, "--device must be one of auto, cpu, cuda, cuda:N, mps"),
    ],
)
def test_bad_configurations_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        train(TrainConfig(**options))


def test_cli_fine_tunes_on_an_image_folder(tmp_path):
    pytest.importorskip("PIL")
    from PIL import Image

    for split in ("train", "val"):
        for name, colour in (("blue", (0, 0, 255)), ("red", (255, 0, 0))):
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (10 + i, 12), colour).save(folder / f"{i}.png")
    out = tmp_path / "run"
    args = ["train", "--model", "revnet18", "--dataset", "imagefolder", "--root", str(tmp_path), "--image-size", "8",
            "--eval-split", "val", "--epochs", "1", "--batch-size", "4", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "config.json").read_text())
    assert saved["config"]["dataset_options"] == {"image_size": 8}
    row = json.loads((out / "metrics.jsonl").read_text())
    assert 0 <= row["eval_accuracy"] <= 1


def test_cli_reports_bad_input():
    result = CliRunner().invoke(app, ["train", "--model", "resnet18", "--dataset", "cubic"])
    assert result.exit_code != 0 and "regression task" in result.output


def _help(*command: str) -> str:
    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    return " ".join(result.output.replace("│", " ").split())


def test_help_shows_every_default_and_announces_only_real_commands():
    text = _help("train")
    assert " . " not in text and " .[" not in text  # a default in brackets swallowed as markup left " ."
    for option, default in (("--mode", "reversible"), ("--device", "auto"), ("--optimizer", "sgd"),
                            ("--schedule", "cosine"), ("--epochs", "10"), ("--grad-clip", "none: no clipping")):
        assert re.search(rf"{option} .*?\[default: \(?{re.escape(default)}\)?\]", text), option
    assert "<reversible|autograd|checkpoint>" in text and "`revnets models` lists them" in text
    top = _help()
    top_output = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "300"}).output
    listed = set(re.findall(r"^│ (\w+) ", top_output, re.MULTILINE))
    assert "compare" not in top and {"train", "reproduce", "demo", "models", "datasets"} <= listed


def test_every_option_of_train_is_a_field_of_train_config():
    """The options are generated from TrainConfig: each field (but the option dicts) is an option."""
    text = _help("train")
    for spec in dataclasses.fields(TrainConfig):
        if spec.metadata["cli"]:
            assert "--" + spec.name.replace("_", "-") in text, spec.name
            assert " ".join(spec.metadata["help"].split()[:4]) in text, spec.name


def test_models_and_datasets_are_listed():
    result = CliRunner().invoke(app, ["models"])
    assert result.exit_code == 0
    names = [line.split()[0] for line in result.output.splitlines()]
    assert names == list_models()
    assert all(len(line.split()) > 2 for line in result.output.splitlines())  # each with what it is
    result = CliRunner().invoke(app, ["datasets"])
    assert result.exit_code == 0 and "cifar10" in result.output and "--root DIR (or --download)" in result.output


def test_a_missing_dataset_directory_gives_advice_the_cli_can_follow(tmp_path):
    result = CliRunner().invoke(app, ["train", "--model", "resnet18", "--dataset", "cifar10", "--root",
                                      str(tmp_path / "missing"), "--mode", "autograd"], env={"COLUMNS": "300"})
    text = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code != 0 and "revnets train: --download" in text, text
