"""convert_to_momentum: equivalence at γ = 0, exact gradients, mask forwarding, strict errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import revnets
from revnets import MomentumNet
from revnets.convert import MomentumTransformerDecoder, MomentumTransformerEncoder, find_residual_stacks
from revnets.models import create_model


def momentum_stacks(model: nn.Module) -> list[MomentumNet]:
    return [m for m in model.modules() if isinstance(m, MomentumNet)]


def grads(model: nn.Module, inputs: tuple[torch.Tensor, ...], **kwargs) -> list[torch.Tensor]:
    out = model(*inputs, **kwargs)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=out.dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    return list(torch.autograd.grad((out * weights).sum(), [*inputs, *params]))


def assert_same_gradients(got, want, rtol=1e-10):
    for g, w in zip(got, want, strict=True):
        assert (g - w).norm() <= rtol * w.norm() + 1e-300, float((g - w).norm() / w.norm())


# -- ResNets -------------------------------------------------------------------------------------------


def test_zoo_resnet_converts_to_the_registered_momentum_structure():
    converted = revnets.convert_to_momentum(create_model("resnet18"), 0.9)
    assert find_residual_stacks(create_model("resnet18")) == ["layer1", "layer2", "layer3", "layer4"]
    assert [s.depth for s in momentum_stacks(converted)] == [1, 1, 1, 1]
    assert all(s.mode == "reversible" and s.gamma == 0.9 for s in momentum_stacks(converted))


@pytest.mark.parametrize("train", [False, True])
def test_gamma_zero_reproduces_the_original(train):
    torch.manual_seed(0)
    original = create_model("resnet34", num_classes=4).train(train)
    converted = revnets.convert_to_momentum(original, 0.0, mode="autograd")
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(converted(x), original(x), rtol=1e-5, atol=1e-5)


def test_conversion_leaves_the_original_untouched_and_carries_the_weights():
    original = create_model("resnet18")
    before = {k: v.clone() for k, v in original.state_dict().items()}
    converted = revnets.convert_to_momentum(original)
    assert original.layer1[1].__class__.__name__ == "BasicBlock"
    for key, value in original.state_dict().items():
        assert torch.equal(value, before[key])
    carried = converted.state_dict()
    assert torch.equal(carried["layer2.1.functions.0.block.conv1.weight"], before["layer2.1.conv1.weight"])


def test_converted_resnet_reversible_gradients_equal_autograd():
    torch.manual_seed(0)
    model = revnets.convert_to_momentum(create_model("resnet18", num_classes=3), 0.7).double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, requires_grad=True)
    reversible = grads(model, (x,))
    reference = grads(revnets.set_mode(model, "autograd"), (x,))
    assert_same_gradients(reversible, reference, rtol=1e-9)


@pytest.mark.parametrize(
    "name", ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2", "resnext50_32x4d"]
)
def test_torchvision_resnets_at_gamma_zero(name):
    models = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    original = getattr(models, name)(num_classes=10).eval()
    converted = revnets.convert_to_momentum(original, 0.0, mode="autograd")
    blocks = sum(len(getattr(original, f"layer{i}")) for i in range(1, 5))
    assert sum(s.depth for s in momentum_stacks(converted)) == blocks - 4
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), original(x), rtol=1e-4, atol=1e-5)


def test_torchvision_resnet_trains_reversibly():
    models = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    model = revnets.convert_to_momentum(models.resnet18(num_classes=5), 0.9).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    assert_same_gradients(grads(model, (x,)), grads(revnets.set_mode(model, "autograd"), (x,)), rtol=1e-9)


def test_timm_resnet_at_gamma_zero():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    original = timm.create_model("resnet26", pretrained=False, num_classes=10).eval()
    converted = revnets.convert_to_momentum(original, 0.0, mode="autograd")
    assert len(momentum_stacks(converted)) == 4
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), original(x), rtol=1e-4, atol=1e-5)


# -- Transformers ----------------------------------------------------------------------------------


def encoder(
    batch_first: bool, dropout: float = 0.0, norm_first: bool = False, layers: int = 3
) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=dropout, batch_first=batch_first, norm_first=norm_first)
    return nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(16), enable_nested_tensor=False)


def masks(seq: int, batch: int):
    causal = nn.Transformer.generate_square_subsequent_mask(seq)
    padding = torch.zeros(batch, seq, dtype=torch.bool)
    padding[0, -2:] = True  # the first sequence has two padded positions
    return causal, padding


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [True, False])
def test_encoder_gamma_zero_reproduces_the_original_with_masks(batch_first, norm_first):
    torch.manual_seed(0)
    original = encoder(batch_first, norm_first=norm_first)
    converted = revnets.convert_to_momentum(original, 0.0, mode="autograd")
    assert isinstance(converted, MomentumTransformerEncoder)
    x = torch.randn(2, 6, 16) if batch_first else torch.randn(6, 2, 16)
    causal, padding = masks(6, 2)
    for kwargs in ({}, {"mask": causal}, {"src_key_padding_mask": padding},
                   {"mask": causal, "src_key_padding_mask": padding}):
        want = original(x, **kwargs)
        torch.testing.assert_close(converted(x, **kwargs), want, rtol=1e-5, atol=1e-5)
    # the masks matter at every layer: the output with them differs from the output without
    assert not torch.allclose(converted(x, mask=causal), converted(x), atol=1e-3)


def test_encoder_eval_fast_path_does_not_break_the_converted_model():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True)
    original = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    converted = revnets.convert_to_momentum(original, 0.0, mode="autograd").eval()
    x = torch.randn(2, 6, 16)
    _, padding = masks(6, 2)
    with torch.no_grad():
        want = original(x, src_key_padding_mask=padding)  # PyTorch's nested-tensor fast path
        got = converted(x, src_key_padding_mask=padding)
    keep = ~padding
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-5, atol=1e-5)
    reversible = revnets.convert_to_momentum(original, 0.9).eval()
    with torch.no_grad():
        assert torch.isfinite(reversible(x, src_key_padding_mask=padding)).all()


def test_encoder_reversible_gradients_with_masks_and_dropout():
    torch.manual_seed(0)
    model = revnets.convert_to_momentum(encoder(True, dropout=0.2), 0.8).double()
    x = torch.randn(2, 6, 16, dtype=torch.float64, requires_grad=True)
    causal, padding = masks(6, 2)
    kwargs = {"mask": causal.double(), "src_key_padding_mask": padding}
    state = torch.get_rng_state()
    reversible = grads(model, (x,), **kwargs)
    torch.set_rng_state(state)  # same dropout masks for the reference
    reference = grads(revnets.set_mode(model, "autograd"), (x,), **kwargs)
    assert_same_gradients(reversible, reference, rtol=1e-9)


def test_encoder_stack_inverts():
    torch.manual_seed(0)
    model = revnets.convert_to_momentum(encoder(True, layers=4), 0.9).double().eval()
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    causal, _ = masks(6, 2)
    with torch.no_grad():
        state = model.layers.forward_state(model.layers.init_state(x), src_mask=causal.double())
        rebuilt = model.layers.inverse(*state, src_mask=causal.double())
    torch.testing.assert_close(rebuilt, x, rtol=0, atol=1e-10)


def test_decoder_memory_gets_its_gradient():
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    original = nn.TransformerDecoder(layer, 3)
    model = revnets.convert_to_momentum(original, 0.6).double()
    assert isinstance(model, MomentumTransformerDecoder)
    tgt = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    memory = torch.randn(2, 7, 16, dtype=torch.float64, requires_grad=True)
    causal = nn.Transformer.generate_square_subsequent_mask(5, dtype=torch.float64)
    memory_padding = torch.zeros(2, 7, dtype=torch.bool)
    memory_padding[1, -3:] = True
    kwargs = {"tgt_mask": causal, "memory_key_padding_mask": memory_padding}
    reversible = grads(model, (tgt, memory), **kwargs)
    reference = grads(revnets.set_mode(model, "autograd"), (tgt, memory), **kwargs)
    assert reversible[1].abs().sum() > 0
    assert_same_gradients(reversible, reference, rtol=1e-9)


def test_full_transformer_gamma_zero_with_every_mask():
    torch.manual_seed(0)
    original = nn.Transformer(16, 4, 2, 2, 32, dropout=0.0, batch_first=True)
    converted = revnets.convert_to_momentum(original, 0.0, mode="autograd")
    assert isinstance(converted.encoder, MomentumTransformerEncoder)
    assert isinstance(converted.decoder, MomentumTransformerDecoder)
    src, tgt = torch.randn(2, 6, 16), torch.randn(2, 5, 16)
    src_padding = torch.zeros(2, 6, dtype=torch.bool)
    src_padding[0, -1] = True
    kwargs = {
        "tgt_mask": nn.Transformer.generate_square_subsequent_mask(5),
        "src_key_padding_mask": src_padding,
        "memory_key_padding_mask": src_padding,
    }
    torch.testing.assert_close(converted(src, tgt, **kwargs), original(src, tgt, **kwargs), rtol=1e-5, atol=1e-5)
    revnets.convert_to_momentum(original, 0.9)(src, tgt, **kwargs).sum().backward()


# -- strictness --------------------------------------------------------------------------------------


def test_unknown_sub_layer_is_named():
    with pytest.raises(ValueError, match="sub_layers names 'layer9'.*its children: head, stem, layer1"):
        revnets.convert_to_momentum(create_model("resnet18"), sub_layers=["layer9"])


def test_shape_changing_block_inside_a_stage_is_refused():
    model = create_model("resnet18")
    model.layer1 = nn.Sequential(*model.layer1, *model.layer2)  # layer2's first block changes shape
    with pytest.raises(ValueError, match=r"layer1\[2\] \(BasicBlock\).*changes shape"):
        revnets.convert_to_momentum(model, sub_layers=["layer1"])


def test_unrecognised_modules_are_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"cannot convert head \(Linear\)"):
        revnets.convert_to_momentum(create_model("resnet18"), sub_layers=["head"])
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)))
    with pytest.raises(ValueError, match=r"1\[1\] \(Linear\): not a recognised residual block"):
        revnets.convert_to_momentum(model, sub_layers=["1"])
    with pytest.raises(ValueError, match="found no residual stack in Sequential"):
        revnets.convert_to_momentum(model)
    with pytest.raises(ValueError, match="already reversible"):
        revnets.convert_to_momentum(revnets.convert_to_momentum(create_model("resnet18")), sub_layers=["layer1.1"])


def test_blocks_returning_tuples_are_refused():
    class TupleBlock(nn.Module):
        downsample = None

        def forward(self, x):
            return x, None

    class Identity(nn.Identity):
        downsample = None

    model = nn.Sequential(nn.Sequential(Identity(), TupleBlock(), TupleBlock()))
    converted = revnets.convert_to_momentum(model)
    with pytest.raises(TypeError, match="TupleBlock returned tuple"):
        converted(torch.randn(2, 3))


def test_bad_settings():
    with pytest.raises(ValueError, match="mode must be one of"):
        revnets.convert_to_momentum(create_model("resnet18"), mode="fast")
    with pytest.raises(ValueError, match="gamma must be in"):
        revnets.convert_to_momentum(create_model("resnet18"), 1.5)
    with pytest.raises(ValueError, match="gamma=0 is a plain ResNet"):
        revnets.convert_to_momentum(create_model("resnet18"), 0.0)
    with pytest.raises(TypeError, match="sub_layers must be a list"):
        revnets.convert_to_momentum(create_model("resnet18"), sub_layers="layer1")
