"""A converted Hugging Face model inside the ``transformers`` Trainer: GPT-2 built from a config,
converted to momentum stacks, a few steps with gradient accumulation (and dropout); its losses and
weights match ``mode="autograd"``. Nothing of :mod:`revnets.training` is needed: a reversible stack is
a plain ``nn.Module`` and the Trainer's own loop drives it."""

from __future__ import annotations

import pytest
import torch

import revnets

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # what transformers' Trainer runs on
pytestmark = pytest.mark.usefixtures("one_thread")

STEPS, ACCUMULATION, BATCH, LENGTH, VOCAB = 4, 2, 2, 16, 64


def _dataset() -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(0, VOCAB, (STEPS * ACCUMULATION * BATCH, LENGTH), generator=torch.Generator().manual_seed(1))
    return [{"input_ids": row, "labels": row} for row in ids]


def _train(mode: str, folder) -> tuple[list[float], dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=3, n_embd=32, n_head=4, n_positions=LENGTH, vocab_size=VOCAB,
                                     resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1, use_cache=False)
    model = revnets.convert_to_momentum(transformers.GPT2LMHeadModel(config), gamma=0.9, mode=mode)
    arguments = transformers.TrainingArguments(
        output_dir=str(folder), max_steps=STEPS, per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=ACCUMULATION, learning_rate=1e-3, logging_steps=1, save_strategy="no",
        report_to=[], use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0,
    )
    trainer = transformers.Trainer(model=model, args=arguments, train_dataset=_dataset())
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    return losses, {key: value.detach().clone() for key, value in model.state_dict().items()}


def test_a_converted_gpt2_trains_in_the_transformers_trainer_as_autograd_does(tmp_path):
    losses, weights = _train("reversible", tmp_path / "reversible")
    reference_losses, reference_weights = _train("autograd", tmp_path / "autograd")
    assert len(losses) == STEPS
    assert losses == pytest.approx(reference_losses, rel=1e-5)
    for key, value in reference_weights.items():
        torch.testing.assert_close(weights[key], value, rtol=1e-4, atol=1e-6, msg=key)
    assert reference_losses[-1] < reference_losses[0]
