"""convert_to_momentum on Hugging Face GPT-2, BERT and ViT (tiny models built from configs; the
Llama-family decoders are in test_convert_llm.py).

γ = 0 reproduces the model with and without padding masks, reversible gradients equal autograd
ones, and whatever a momentum stack cannot do (caches, per-layer outputs) is refused loudly.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import revnets
from revnets import MomentumNet
from revnets.convert import find_residual_stacks

transformers = pytest.importorskip("transformers")

from revnets.convert.huggingface import LayerSlot  # noqa: E402

LAYERS = 3
VOCAB = 64


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second thread only adds synchronisation


def gpt2(dropout: float = 0.0, attn: str = "sdpa", lm_head: bool = True, **options) -> nn.Module:
    config = transformers.GPT2Config(
        n_layer=LAYERS, n_embd=32, n_head=4, n_positions=16, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, attn_implementation=attn, **options,
    )
    return (transformers.GPT2LMHeadModel if lm_head else transformers.GPT2Model)(config)


def bert(dropout: float = 0.0) -> nn.Module:
    config = transformers.BertConfig(
        num_hidden_layers=LAYERS, hidden_size=32, num_attention_heads=4, intermediate_size=64, vocab_size=VOCAB,
        max_position_embeddings=16, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )
    return transformers.BertModel(config)


def vit(dropout: float = 0.0) -> nn.Module:
    config = transformers.ViTConfig(
        num_hidden_layers=LAYERS, hidden_size=32, num_attention_heads=4, intermediate_size=64, image_size=16,
        patch_size=4, num_channels=3, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )
    return transformers.ViTModel(config)


def build(family: str, **options) -> nn.Module:
    torch.manual_seed(0)
    return {"gpt2": gpt2, "bert": bert, "vit": vit}[family](**options)


def layer_list_name(model: nn.Module) -> str:
    if isinstance(model, transformers.GPT2LMHeadModel):
        return "transformer.h"
    if isinstance(model, transformers.GPT2Model):
        return "h"
    return "layers" if isinstance(getattr(model, "layers", None), nn.ModuleList) else "encoder.layer"


def token_ids(batch: int = 2, seq: int = 7) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))


def padding_mask(family: str, batch: int = 2, seq: int = 7) -> torch.Tensor:
    """Sequence 0 is padded: on the left for GPT-2 (generation style), on the right for BERT."""
    mask = torch.ones(batch, seq, dtype=torch.long)
    if family == "gpt2":
        mask[0, :3] = 0
    else:
        mask[0, -3:] = 0
    return mask


def hidden(model: nn.Module, **inputs) -> torch.Tensor:
    """The model's output tensor (GPT-2: without a cache)."""
    if isinstance(model, (transformers.GPT2Model, transformers.GPT2LMHeadModel)):
        inputs["use_cache"] = False
    out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def stacks(model: nn.Module) -> list[MomentumNet]:
    return [m for m in model.modules() if isinstance(m, MomentumNet)]


# -- structure -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "bert", "vit"])
def test_layer_lists_are_found_and_become_one_stack(family):
    original = build(family)
    name = layer_list_name(original)
    assert find_residual_stacks(original) == [name]
    for sub_layers in (None, [name]):
        converted = revnets.convert_to_momentum(original, 0.9, sub_layers=sub_layers)
        layers = converted.get_submodule(name)
        assert isinstance(layers, nn.ModuleList) and len(layers) == LAYERS
        assert all(isinstance(slot, LayerSlot) for slot in layers)
        [stack] = stacks(converted)
        assert stack.depth == LAYERS and stack.gamma == 0.9 and stack.mode == "reversible"
    # the weights carry over: <list>.<n>.<rest> is now <list>.0.stack.functions.<n>.block.<rest>
    weights = dict(original.named_parameters())
    prefix = f"{name}.0.stack.functions."
    renamed = {
        (name + "." + key.removeprefix(prefix).replace(".block.", ".", 1) if key.startswith(prefix) else key): value
        for key, value in converted.named_parameters()
    }
    assert renamed.keys() == weights.keys()
    assert all(torch.equal(renamed[key], value) for key, value in weights.items())


# -- γ = 0 reproduces the model ------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "attn"), [("gpt2", "sdpa"), ("gpt2", "eager"), ("bert", None), ("vit", None)])
def test_gamma_zero_reproduces_the_original_with_and_without_padding(family, attn):
    original = build(family, **({"attn": attn} if attn else {})).eval()
    converted = revnets.convert_to_momentum(original, 0.0, mode="autograd").eval()
    if family == "vit":
        x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            torch.testing.assert_close(hidden(converted, pixel_values=x), hidden(original, pixel_values=x))
        return
    ids, mask = token_ids(), padding_mask(family)
    with torch.no_grad():
        for extra in ({}, {"attention_mask": mask}):
            want = hidden(original, input_ids=ids, **extra)
            torch.testing.assert_close(hidden(converted, input_ids=ids, **extra), want, rtol=1e-5, atol=1e-5)
        # the padding mask reaches the layers: it changes sequence 0 at its real tokens, not sequence 1
        masked, unmasked = hidden(converted, input_ids=ids, attention_mask=mask), hidden(converted, input_ids=ids)
    real = mask[0].bool()
    assert (masked[0, real] - unmasked[0, real]).abs().max() > 1e-3
    torch.testing.assert_close(masked[1], unmasked[1])


def test_gpt2_cross_attention_gamma_zero_and_encoder_gradients():
    original = build("gpt2", lm_head=False, add_cross_attention=True).double().eval()
    ids = token_ids()
    memory = torch.randn(2, 5, 32, dtype=torch.float64, requires_grad=True)
    memory_mask = torch.ones(2, 5, dtype=torch.long)
    memory_mask[1, -2:] = 0
    inputs = {"input_ids": ids, "encoder_hidden_states": memory, "encoder_attention_mask": memory_mask}
    converted = revnets.convert_to_momentum(original, 0.0, mode="autograd")
    torch.testing.assert_close(hidden(converted, **inputs), hidden(original, **inputs), rtol=1e-12, atol=1e-12)
    reversible = revnets.convert_to_momentum(original, 0.9)
    (got,) = torch.autograd.grad(hidden(reversible, **inputs).sum(), memory)
    (want,) = torch.autograd.grad(hidden(revnets.set_mode(reversible, "autograd"), **inputs).sum(), memory)
    assert got.abs().sum() > 0
    assert (got - want).norm() <= 1e-9 * want.norm()


# -- reversible gradients --------------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "dropout"), [("gpt2", 0.1), ("bert", 0.0), ("vit", 0.0)])
def test_reversible_gradients_equal_autograd(family, dropout):
    model = revnets.convert_to_momentum(build(family, dropout=dropout), 0.9).double().train()
    if family == "vit":
        inputs = {"pixel_values": torch.randn(2, 3, 16, 16, dtype=torch.float64)}
    else:
        embeddings = model.get_input_embeddings()(token_ids()).detach()
        inputs = {"inputs_embeds": embeddings, "attention_mask": padding_mask(family)}
    leaf = next(iter(inputs.values())).requires_grad_()
    params = [p for p in model.parameters() if p.requires_grad]

    def gradients():
        out = hidden(model, **inputs)
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=out.dtype)
        return torch.autograd.grad((out * weights).sum(), [leaf, *params], allow_unused=True)  # BERT's pooler

    state = torch.get_rng_state()
    reversible = gradients()
    torch.set_rng_state(state)  # the same dropout masks for the reference
    revnets.set_mode(model, "autograd")
    reference = gradients()
    assert reversible[0].abs().sum() > 0
    stack_params = {id(p) for p in stacks(model)[0].parameters()}
    assert all(g is not None for g, p in zip(reversible[1:], params) if id(p) in stack_params)
    for got, want in zip(reversible, reference, strict=True):
        assert (got is None) == (want is None)
        if got is None:
            continue
        # (the floor is for gradients that are 0 up to rounding, such as those of the attention key biases)
        assert (got - want).norm() <= 1e-9 * want.norm() + 1e-13, float((got - want).norm() / want.norm())


# -- refusals --------------------------------------------------------------------------------------------


def test_gpt2_caches_are_refused_with_the_fix():
    converted = revnets.convert_to_momentum(build("gpt2"), 0.9).eval()
    ids = token_ids()
    fix = r"transformer.h \(3 GPT2Block layers.*pass use_cache=False .*config.use_cache = False"
    with pytest.raises(ValueError, match=fix):
        converted(ids)  # GPT-2's config has use_cache=True
    with pytest.raises(ValueError, match=fix):
        converted(ids, use_cache=True)
    past = transformers.DynamicCache(config=converted.config)
    for name in ("past_key_values", "cache"):  # transformers 5.x renamed the argument
        with pytest.raises(ValueError, match="key/value cache"):
            converted(ids, **{name: past}, use_cache=False)
    stack = converted.transformer.h[0]
    hidden = torch.randn(1, ids.shape[1], converted.config.n_embd)
    with pytest.raises(ValueError, match="key/value cache"):
        stack(hidden, past)  # a layer's cache given by position, as the model's own loop does
    with pytest.raises(ValueError, match="key/value cache"):
        stack(hidden, layer_cache=past)  # under a name no release used yet: recognised by its class
    converted(ids, use_cache=False)
    converted.config.use_cache = False
    converted(ids)


@pytest.mark.parametrize("family", ["gpt2", "bert", "vit"])
def test_per_layer_outputs_are_refused(family):
    converted = revnets.convert_to_momentum(build(family), 0.9).eval()
    inputs = {"pixel_values": torch.randn(1, 3, 16, 16)} if family == "vit" else {"input_ids": token_ids()}
    if family == "gpt2":
        inputs["use_cache"] = False
    with pytest.raises(ValueError, match="with output_attentions.* requested: per-layer outputs"):
        converted(**inputs, output_attentions=True)
    with pytest.raises(ValueError, match="with output_hidden_states requested"):
        converted(**inputs, output_hidden_states=True)
    converted(**inputs)  # the refused calls leave nothing behind
    converted.config.output_hidden_states = True
    with pytest.raises(ValueError, match="with output_hidden_states requested"):
        converted(**inputs)


def test_head_masks_and_gradient_checkpointing_are_refused():
    converted = revnets.convert_to_momentum(build("bert"), 0.9)
    ids = token_ids()
    with pytest.raises(ValueError, match="encoder.layer .* with head_mask"):
        converted(ids, head_mask=torch.ones(LAYERS, 4))
    enable = getattr(converted, "activation_checkpointing_enable", None) or converted.gradient_checkpointing_enable
    enable()
    with pytest.raises(ValueError, match="gradient checkpointing enabled.*checkpointing_disable"):
        converted.train()(ids)


def test_converted_layer_lists_are_refused():
    converted = revnets.convert_to_momentum(build("bert"))
    with pytest.raises(ValueError, match=r"cannot convert encoder.layer .*already reversible"):
        revnets.convert_to_momentum(converted, sub_layers=["encoder.layer"])
    assert find_residual_stacks(converted) == []


def test_the_original_model_is_left_untouched():
    original = build("gpt2").eval()
    before = {k: v.clone() for k, v in original.state_dict().items()}
    ids = token_ids()
    with torch.no_grad():
        want = original(ids).logits
    converted = revnets.convert_to_momentum(original, 0.9)
    converted(ids, use_cache=False).logits.sum().backward()
    assert len(original.transformer.h) == LAYERS
    assert all(type(block).__name__ == "GPT2Block" for block in original.transformer.h)
    assert all(p.grad is None for p in original.parameters())
    for key, value in original.state_dict().items():
        assert torch.equal(value, before[key])
    with torch.no_grad():
        out = original(ids, output_hidden_states=True)  # caches and hidden states still work there
    torch.testing.assert_close(out.logits, want)
    assert out.past_key_values is not None and len(out.hidden_states) == LAYERS + 1
