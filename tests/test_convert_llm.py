"""convert_to_momentum on the Llama-family decoders people fine-tune (transformers 5, tiny configs):
found by how the model calls its layers, per-layer arguments (Gemma's and Qwen's alternating
sliding-window and full-attention masks) reaching each layer, cached generation equal to uncached
generation, reversible gradients equal to autograd's (also through PEFT LoRA and with a memory budget),
and whatever a momentum stack cannot do refused with the reason."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import revnets
from revnets.convert import find_residual_stacks

transformers = pytest.importorskip("transformers")

from revnets.convert.huggingface import LayerSlot  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS, VOCAB, WINDOW = 4, 64, 3
# The decoders' RMSNorm computes in float32 whatever the input dtype: a float64 reconstruction that differs
# from the forward's state by float64 rounding can round differently there, so reversible gradients equal
# autograd's to float32 precision (test_float64_norms_give_float64_agreement pins that cause).
FLOAT32_INSIDE = 1e-6
ALTERNATING = ["sliding_attention", "full_attention"] * (LAYERS // 2)
FAMILIES = {  # (config class, causal-LM class, options): sliding windows shorter than the sequences used
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": WINDOW}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"layer_types": ALTERNATING, "use_sliding_window": True,
                                                   "sliding_window": WINDOW}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"layer_types": ALTERNATING, "use_sliding_window": True,
                                                   "sliding_window": WINDOW}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"layer_types": ALTERNATING, "sliding_window": WINDOW,
                                                     "head_dim": 8}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"layer_types": ALTERNATING, "sliding_window": WINDOW,
                                                         "head_dim": 8}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
}


def build(family: str, **options) -> nn.Module:
    config_class, model_class, defaults = FAMILIES[family]
    torch.manual_seed(0)
    settings = {"num_hidden_layers": LAYERS, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
                "num_key_value_heads": 2, "vocab_size": VOCAB, "max_position_embeddings": 64, "pad_token_id": 0,
                "bos_token_id": 1, "eos_token_id": 2}
    config = getattr(transformers, config_class)(**{**settings, **defaults, **options})
    return getattr(transformers, model_class)(config)


def token_ids(batch: int = 2, seq: int = 9) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))


def logits(model: nn.Module, ids: torch.Tensor, **options) -> torch.Tensor:
    return model(ids, use_cache=False, **options).logits


@pytest.mark.parametrize("family", list(FAMILIES))
def test_decoders_are_found_and_gamma_zero_reproduces_them(family):
    """At γ = 0 the momentum stack is the model's own loop: equal to float64 rounding only if every layer
    gets its own arguments (a sliding-window layer given the full mask, or the reverse, differs)."""
    original = build(family).double().eval()
    assert find_residual_stacks(original) == ["model.layers"]
    converted = revnets.convert_to_momentum(original, 0.0, mode="autograd").eval()
    slots = converted.model.layers
    assert len(slots) == LAYERS and all(isinstance(s, LayerSlot) for s in slots)
    [stack] = [m for m in converted.modules() if isinstance(m, revnets.MomentumNet)]
    assert stack.depth == LAYERS
    ids, mask = token_ids(), torch.ones(2, 9, dtype=torch.long)
    mask[0, :2] = 0  # left padding
    with torch.no_grad():
        for extra in ({}, {"attention_mask": mask}):
            torch.testing.assert_close(logits(converted, ids, **extra), logits(original, ids, **extra),
                                       rtol=1e-12, atol=1e-12, equal_nan=True)  # Gemma 2: NaN where fully padded


def test_each_layer_gets_the_arguments_the_model_gives_it():
    """The same Qwen3 with all layers' masks made full-attention gives other logits: the stack does not
    hand every layer the first layer's mask."""
    sliding = build("qwen3").double().eval()
    full = build("qwen3", layer_types=["sliding_attention"] + ["full_attention"] * (LAYERS - 1)).double().eval()
    full.load_state_dict(sliding.state_dict())
    ids = token_ids()
    with torch.no_grad():
        a = logits(revnets.convert_to_momentum(sliding, 0.0, mode="autograd"), ids)
        b = logits(revnets.convert_to_momentum(full, 0.0, mode="autograd"), ids)
    assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
def test_cached_generation_gives_the_tokens_of_uncached_generation(family):
    converted = revnets.convert_to_momentum(build(family), 0.9).double().eval()
    ids = token_ids()
    with torch.no_grad():
        cached = converted.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True)
        uncached = converted.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False)
    with torch.inference_mode():
        inference = converted.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True)
    assert cached.shape == (2, 17)
    assert torch.equal(cached, uncached) and torch.equal(cached, inference)


def test_a_cache_while_recording_a_graph_is_refused_with_the_reason():
    converted = revnets.convert_to_momentum(build("llama"), 0.9)
    ids = token_ids()
    with pytest.raises(ValueError, match=r"model.layers \(4 LlamaDecoderLayer layers.*while recording a graph.*"
                                         r"write the cache twice.*torch.no_grad\(\)"):
        converted(ids, use_cache=True)
    converted(ids, use_cache=False).logits.sum().backward()  # training without a cache
    revnets.set_mode(converted, "autograd")  # plain autograd never runs a layer twice: a cache is harmless
    converted(ids, use_cache=True).logits.sum().backward()


@pytest.mark.parametrize(("family", "budget"), [("llama", 0.0), ("gemma3", 0.0), ("qwen3", 0.5)])
def test_reversible_gradients_equal_autograd(family, budget):
    model = build(family, attention_dropout=0.1).double().train()
    model = revnets.convert_to_momentum(model, 0.9)
    revnets.set_mode(model, "reversible", memory_budget=budget)
    embeddings = model.get_input_embeddings()(token_ids()).detach().requires_grad_()
    params = [p for p in model.parameters() if p.requires_grad]

    def gradients():
        out = model(inputs_embeds=embeddings, use_cache=False).logits
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=out.dtype)
        return torch.autograd.grad((out * weights).sum(), [embeddings, *params], allow_unused=True)  # the table

    state = torch.get_rng_state()
    reversible = gradients()
    torch.set_rng_state(state)  # the same dropout masks
    revnets.set_mode(model, "autograd")
    reference = gradients()
    assert reversible[0].abs().sum() > 0
    for got, want in zip(reversible, reference, strict=True):
        assert (got is None) == (want is None)
        if got is not None:
            assert (got - want).norm() <= FLOAT32_INSIDE * want.norm(), float((got - want).norm() / want.norm())


def test_lora_trains_in_reversible_mode_with_the_gradients_of_autograd_mode():
    peft = pytest.importorskip("peft")
    model = revnets.convert_to_momentum(build("llama"), 0.9).double()
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False))
    trainable = [p for p in lora.parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name, p in lora.named_parameters() if p.requires_grad)
    ids = token_ids()

    def gradients():
        return torch.autograd.grad(lora(input_ids=ids, labels=ids, use_cache=False).loss, trainable)

    reversible = gradients()
    revnets.set_mode(lora, "autograd")
    for got, want in zip(reversible, gradients(), strict=True):
        assert (got - want).norm() <= FLOAT32_INSIDE * want.norm(), float((got - want).norm() / want.norm())


def test_float64_norms_give_float64_agreement(monkeypatch):
    """With Llama's RMSNorm computing in its input's dtype, the only rounding left is the inversion's:
    reversible gradients equal autograd's to float64 precision."""
    from transformers.models.llama import modeling_llama

    def rms_norm(self, hidden_states):
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", rms_norm)
    model = revnets.convert_to_momentum(build("llama"), 0.9).double()
    ids, params = token_ids(), [p for p in model.parameters() if p.requires_grad]
    reversible = torch.autograd.grad(model(input_ids=ids, labels=ids, use_cache=False).loss, params)
    revnets.set_mode(model, "autograd")
    reference = torch.autograd.grad(model(input_ids=ids, labels=ids, use_cache=False).loss, params)
    for got, want in zip(reversible, reference, strict=True):
        assert (got - want).norm() <= 1e-12 * want.norm() + 1e-15, float((got - want).norm() / want.norm())


def test_a_loop_that_changes_the_hidden_states_between_layers_is_refused():
    converted = revnets.convert_to_momentum(build("llama"), 0.9)
    slots = converted.model.layers
    hidden = torch.randn(1, 5, 32)
    with pytest.raises(ValueError, match="layer 1 of 4 was called out of order or on other hidden states"):
        slots[1](hidden)  # without layer 0 first
    out = slots[0](hidden)
    with pytest.raises(ValueError, match="changes the hidden states between layers"):
        slots[1](out * 2)


def test_layer_lists_that_are_not_a_residual_stack_are_refused():
    model = build("llama")
    mixed = nn.ModuleList([model.model.layers[0], model.model.norm])
    model.model.add_module("mixed", mixed)
    with pytest.raises(ValueError, match=r"cannot convert model.mixed .*mixes layer classes"):
        revnets.convert_to_momentum(model, sub_layers=["model.mixed"])
    model.model.mixed = nn.ModuleList([model.model.rotary_emb])
    with pytest.raises(ValueError, match=r"takes 'x' first, not hidden_states"):
        revnets.convert_to_momentum(model, sub_layers=["model.mixed"])
    assert find_residual_stacks(model) == ["model.layers"]


@pytest.mark.parametrize("scheme", ["midpoint", "leapfrog"])
def test_chang_schemes_from_a_layer_list(scheme):
    """Midpoint and Leapfrog stacks started at rest, f = ±(layer − identity): with the default h their
    first step is the original first layer (a one-layer model is reproduced), they train with reversible
    gradients equal to autograd's, and they generate with a cache."""
    one_layer = build("llama", num_hidden_layers=1).double().eval()
    ids = token_ids()
    reproduced = revnets.convert_to_reversible(one_layer, scheme, mode="autograd").eval()
    with torch.no_grad():
        torch.testing.assert_close(logits(reproduced, ids), logits(one_layer, ids), rtol=1e-12, atol=1e-12)
    model = revnets.convert_to_reversible(build("qwen3").double(), scheme)
    [stack] = [m for m in model.modules() if isinstance(m, revnets.ReversibleNet)]
    assert type(stack).__name__.lower().startswith(scheme) and stack.start == "rest" and stack.depth == LAYERS
    params = [p for p in model.parameters() if p.requires_grad]
    reversible = torch.autograd.grad(model(input_ids=ids, labels=ids, use_cache=False).loss, params)
    revnets.set_mode(model, "autograd")
    reference = torch.autograd.grad(model(input_ids=ids, labels=ids, use_cache=False).loss, params)
    for got, want in zip(reversible, reference, strict=True):
        assert (got - want).norm() <= FLOAT32_INSIDE * want.norm(), float((got - want).norm() / want.norm())
    revnets.set_mode(model, "reversible")
    with torch.no_grad():
        model.eval()
        cached = model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=True)
        assert torch.equal(cached, model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=False))


def test_bad_schemes_are_refused():
    with pytest.raises(ValueError, match="scheme must be one of 'momentum', 'midpoint', 'leapfrog'; got 'euler'"):
        revnets.convert_to_reversible(build("llama"), "euler")
    with pytest.raises(ValueError, match="the momentum scheme takes gamma"):
        revnets.convert_to_reversible(build("llama"), "momentum", h=0.5)


def test_bf16_autocast_reversible_error_is_within_the_precision_s_own():
    """Under bfloat16 autocast the reversible backward's gradients differ from autograd mode's (both
    bfloat16) by less than bfloat16 itself differs from float32 (the reconstructed states are rounded)."""
    model = revnets.convert_to_momentum(build("llama"), 0.9)
    ids, params = token_ids(), [p for p in model.parameters() if p.requires_grad]

    def gradients(mode: str, precision: torch.dtype | None) -> torch.Tensor:
        revnets.set_mode(model, mode)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision is not None):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])

    reversible, autograd = gradients("reversible", torch.bfloat16), gradients("autograd", torch.bfloat16)
    float32 = gradients("autograd", None)
    reversible_error = float((reversible - autograd).norm() / autograd.norm())
    precision_error = float((autograd - float32).norm() / float32.norm())
    assert 0 < precision_error and reversible_error <= 1.5 * precision_error, (reversible_error, precision_error)
