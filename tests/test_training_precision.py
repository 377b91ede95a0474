"""Mixed precision in the trainer: reversible gradients against the autocast reference (plain autograd
under the same autocast), on CPU with bfloat16 and, where a GPU is present, on CUDA; whole short runs
in every ``--precision``."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from revnets.training import TrainConfig, forward_backward, train
from revnets.training.data import load_datasets, training_loader
from revnets.training.devices import grad_scaler
from revnets.training.loop import build_model

pytest.importorskip("sklearn")
pytestmark = pytest.mark.usefixtures("one_thread")

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _gradients(config: TrainConfig, device: str) -> dict[str, torch.Tensor]:
    """Gradients of the trainer's step (``forward_backward``) for ``config``: same weights (seed 0,
    and ``exact`` does not change them) and the same batch whatever the mode and precision."""
    datasets = load_datasets(config)
    images, labels = next(iter(training_loader(datasets, config, world=1, rank=0, pin_memory=False)))
    torch.manual_seed(0)
    model = build_model(config, datasets.channels, datasets.classes).to(device).train()
    forward_backward(model, images.to(device), labels.to(device), config,
                     scaler=grad_scaler(config.precision, torch.device(device)))
    return {key: p.grad for key, p in model.named_parameters()}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("name", "options", "precision"),
    [
        ("hamiltonian38", {}, "bf16"),
        ("momentum_resnet18", {"gamma": 0.9}, "bf16"),
        ("hamiltonian38", {"exact": True}, "bf16"),
        ("hamiltonian38", {}, "16-mixed"),
    ],
    ids=["hamiltonian-bf16", "momentum-bf16", "hamiltonian-exact-bf16", "hamiltonian-float16"],
)
def test_reversible_gradients_match_the_autocast_reference(device, name, options, precision):
    """The reversible step's gradients differ from the autocast reference (autograd under the same
    autocast) by less than 1.5 times what that reference differs from float32 (all gradients as one
    vector; each parameter's within twice its own): the strategy adds about as much error as the
    precision itself, not more. The recomputation replays the forward's autocast state, so both
    evaluate the functions in the same low precision; what differs is the rounding of the reconstructed
    states, which autocast makes low-precision (convolutions and BatchNorm return bfloat16). At
    initialisation BatchNorm amplifies every rounding: bfloat16 alone moves the gradients by about 20 %.
    Measured on torch 2.14 (CPU): reversible 12 % vs precision 22 % (Hamiltonian-38), 1.5 % vs 19 %
    (Momentum ResNet-18), exact mode 20 % vs 22 %, float16 3.7 % vs 8 %."""
    base = TrainConfig(name, "digits", batch_size=32, precision=precision, model_options=options)
    reference_options = {key: value for key, value in options.items() if key != "exact"}
    reversible = _gradients(base, device)
    reference = _gradients(replace(base, mode="autograd", model_options=reference_options), device)
    full = _gradients(replace(base, mode="autograd", model_options=reference_options, precision="32"), device)
    scale = 1.0 if precision == "bf16" else float(grad_scaler(precision, torch.device(device)).get_scale())
    for key, gradient in reversible.items():
        assert gradient.dtype == torch.float32, key  # parameters and their gradients stay float32
        precision_error = _relative_error(reference[key] / scale, full[key])
        assert _relative_error(gradient, reference[key]) <= 2 * precision_error + 1e-3, key

    def whole(gradients):
        return torch.cat([g.flatten() for g in gradients.values()])

    precision_error = _relative_error(whole(reference) / scale, whole(full))
    assert _relative_error(whole(reversible), whole(reference)) <= 1.5 * precision_error


@pytest.mark.parametrize("precision", ["bf16", "16-mixed"])
def test_short_runs_train_in_every_precision(precision):
    _, history = train(TrainConfig("hamiltonian38", "digits", epochs=2, batch_size=32, limit=128,
                                   precision=precision, warmup_epochs=0.5))
    assert all(torch.isfinite(torch.tensor(row.train_loss)) for row in history)
    assert history[-1].train_loss < history[0].train_loss
