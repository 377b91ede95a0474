"""A converted Hugging Face model inside the ``transformers`` Trainer: GPT-2 and a Qwen3 decoder
(alternating sliding-window and full-attention layers) built from configs, converted to momentum stacks,
a few steps with gradient accumulation (and dropout); its losses and weights match ``mode="autograd"``.
Nothing of :mod:`revnets.training` is needed: a reversible stack is a plain ``nn.Module`` and the
Trainer's own loop drives it."""

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


def _model(family: str) -> torch.nn.Module:
    if family == "gpt2":
        config = transformers.GPT2Config(n_layer=3, n_embd=32, n_head=4, n_positions=LENGTH, vocab_size=VOCAB,
                                         resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1, use_cache=False)
        return transformers.GPT2LMHeadModel(config)
    config = transformers.Qwen3Config(
        num_hidden_layers=4, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=LENGTH, attention_dropout=0.1, use_cache=False,
        layer_types=["sliding_attention", "full_attention"] * 2, use_sliding_window=True, sliding_window=4,
    )
    return transformers.Qwen3ForCausalLM(config)


Weights = dict[str, torch.Tensor]


def _train(mode: str, folder, family: str) -> tuple[list[float], Weights, Weights]:
    """The logged losses, the final weights and the initial weights of a short Trainer run."""
    torch.manual_seed(0)
    model = revnets.convert_to_momentum(_model(family), gamma=0.9, mode=mode)
    initial = {key: value.detach().clone() for key, value in model.state_dict().items()}
    arguments = transformers.TrainingArguments(
        output_dir=str(folder), max_steps=STEPS, per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=ACCUMULATION, learning_rate=1e-3, logging_steps=1, save_strategy="no",
        report_to=[], use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0,
    )
    trainer = transformers.Trainer(model=model, args=arguments, train_dataset=_dataset())
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    return losses, {key: value.detach().clone() for key, value in model.state_dict().items()}, initial


@pytest.mark.parametrize("family", ["gpt2", "qwen3"])
def test_a_converted_model_trains_in_the_transformers_trainer_as_autograd_does(tmp_path, family):
    losses, weights, initial = _train("reversible", tmp_path / "reversible", family)
    reference_losses, reference_weights, _ = _train("autograd", tmp_path / "autograd", family)
    assert len(losses) == STEPS
    assert losses == pytest.approx(reference_losses, rel=1e-5)
    # Each weight moved as in autograd mode, to 1e-3 of how far it moved: Adam divides by the gradients'
    # running RMS, so an element whose gradient is ~0 turns float32 differences of the gradients into
    # differences of its update as large as lr (seen: one element of 16,384, 1.1e-4, in Qwen3's q_proj).
    for key, value in reference_weights.items():
        moved = (value - initial[key]).norm()
        assert (weights[key] - value).norm() <= 1e-3 * moved + 1e-7, key
    assert reference_losses[-1] < reference_losses[0]
