"""``convert_to_momentum``: the Momentum ResNet paper's drop-in replacement for existing models.

Every residual stack found (or named) in a model becomes a :class:`~revnets.MomentumNet` whose
functions are the stack's blocks with the identity taken out, ``f_n(x) = block_n(x) − x``:

* a ResNet stage (``nn.Sequential`` of torchvision/timm ``BasicBlock``/``Bottleneck``, recognised by
  their ``downsample`` attribute) keeps its first block (which may change shape or stride) and turns
  the others into one momentum stack;
* ``nn.TransformerEncoder`` / ``nn.TransformerDecoder`` (and both halves of ``nn.Transformer``) turn
  all their layers into one momentum stack; masks, key-padding masks and the encoder memory reach
  every layer, and the final norm is kept;
* the layer list of a Hugging Face model (GPT-2, BERT, ViT, Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3...:
  ``h``, ``encoder.layer``, ``layers``; see :mod:`revnets.convert.huggingface`)
  becomes one momentum stack that the model's own loop calls (see :mod:`revnets.convert.huggingface`).

With ``γ = 0`` the converted model computes the original one (``x + (block(x) − x)``), so
pretrained weights carry over; training then raises γ.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import partial

import torch
from torch import Tensor, nn

from ..autograd import MemoryStrategy, check_mode, checkpoint_call, memory_strategy
from ..nn.base import ReversibleNet
from ..nn.momentum import MomentumNet
from ..nn.twostep import LeapfrogNet, MidpointNet
from . import huggingface
from .blocks import BlockResidual, block_layout
from .residual import ResidualFunction

SCHEMES = ("momentum", "midpoint", "leapfrog")
"""The schemes a converter builds: a Momentum ResNet stack (Sander et al. 2021), or Chang et al.'s (2018)
Midpoint and Leapfrog networks started at rest (``start="rest"``)."""

DEFAULT_STEP_SIZES = {"midpoint": 0.5, "leapfrog": 1.0}
"""Step sizes with which a two-step scheme's first step from rest is the original first block."""


@dataclass(frozen=True)
class _Settings:
    """What every converted stack of one conversion shares: its scheme (with γ or h) and memory strategy.

    The residual functions are ``f = block − identity``, except for Leapfrog, whose update subtracts
    ``h²·f``: there ``f = identity − block``, so that with the default ``h`` every scheme's first step
    from rest is the original first block (``Y_1 = block_0(Y_0)``)."""

    scheme: str
    gamma: float | Fraction
    h: float
    strategy: MemoryStrategy

    @property
    def sign(self) -> int:
        """The sign of the residual functions: ``f = sign·(block − identity)``."""
        return -1 if self.scheme == "leapfrog" else 1

    def stack(self, functions: Sequence[nn.Module]) -> ReversibleNet:
        """The reversible stack of ``functions`` (residual functions cut out of blocks) under the scheme."""
        if self.scheme == "momentum":
            return MomentumNet(functions, self.gamma, strategy=self.strategy)
        net = MidpointNet if self.scheme == "midpoint" else LeapfrogNet
        return net(functions, h=self.h, start="rest", strategy=self.strategy)

    def residual_stack(self, blocks: Sequence[nn.Module]) -> ReversibleNet:
        """The reversible stack of ``blocks`` computing ``x + F(x)``: ``f = sign·(block − identity)``; a
        torchvision/zoo ResNet block's ``f`` has the lean backward of :class:`~revnets.convert.blocks.BlockResidual`."""
        return self.stack([BlockResidual(block) if self.sign == 1 and block_layout(block) is not None
                           else ResidualFunction(block, sign=self.sign) for block in blocks])


class MomentumTransformerEncoder(nn.Module):
    """``nn.TransformerEncoder`` with its layers run as a momentum stack; same ``forward`` signature.

    ``src`` is ``(B, S, E)`` (``batch_first``) or ``(S, B, E)``; output of the same shape. PyTorch's
    nested-tensor fast path is not used: padded positions are computed like the others.
    """

    def __init__(self, encoder: nn.TransformerEncoder, settings: _Settings):
        super().__init__()
        self.layers = settings.residual_stack(list(encoder.layers))
        self.norm = encoder.norm

    def forward(
        self, src: Tensor, mask: Tensor | None = None, src_key_padding_mask: Tensor | None = None,
        is_causal: bool | None = None,
    ) -> Tensor:
        out = self.layers(src, src_mask=mask, src_key_padding_mask=src_key_padding_mask, is_causal=bool(is_causal))
        return out if self.norm is None else self.norm(out)


class MomentumTransformerDecoder(nn.Module):
    """``nn.TransformerDecoder`` with its layers run as a momentum stack; same ``forward`` signature.

    ``memory`` (the encoder output) reaches every layer and receives its gradient.
    """

    def __init__(self, decoder: nn.TransformerDecoder, settings: _Settings):
        super().__init__()
        self.layers = settings.residual_stack(list(decoder.layers))
        self.norm = decoder.norm

    def forward(
        self, tgt: Tensor, memory: Tensor, tgt_mask: Tensor | None = None, memory_mask: Tensor | None = None,
        tgt_key_padding_mask: Tensor | None = None, memory_key_padding_mask: Tensor | None = None,
        tgt_is_causal: bool | None = None, memory_is_causal: bool = False,
    ) -> Tensor:
        out = self.layers(
            tgt, memory, tgt_mask=tgt_mask, memory_mask=memory_mask, tgt_key_padding_mask=tgt_key_padding_mask,
            memory_key_padding_mask=memory_key_padding_mask, tgt_is_causal=bool(tgt_is_causal),
            memory_is_causal=memory_is_causal,
        )
        return out if self.norm is None else self.norm(out)


def _is_resnet_stage(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and len(module) > 0 and all(hasattr(b, "downsample") for b in module)


def _convert_resnet_stage(stage: nn.Sequential, name: str, settings: _Settings) -> nn.Module:
    """Keep the first block; the others (which must keep the shape) become one momentum stack."""
    first, *rest = list(stage)
    for i, block in enumerate(rest, start=1):
        if not hasattr(block, "downsample"):
            raise ValueError(
                f"cannot convert {name}[{i}] ({type(block).__name__}): not a recognised residual block "
                "(torchvision/timm BasicBlock or Bottleneck, which have a `downsample` attribute)"
            )
        if block.downsample is not None:
            raise ValueError(
                f"cannot convert {name}[{i}] ({type(block).__name__}): it changes shape (it has a downsample "
                "shortcut), and only the first block of a stage may"
            )
    if not rest:
        return stage
    return ConvertedStage(first, settings.residual_stack(rest), mode=settings.strategy.mode)


class ModeSwitchedSequence(nn.Sequential):
    """Modules run in order, with a ``mode`` of their own that ``revnets.set_mode`` switches with the stacks:
    the part of a converted model that cannot be inverted, run under
    :func:`~revnets.autograd.checkpoint_call` in ``"reversible"`` and ``"checkpoint"`` mode when a graph is
    recorded (:meth:`checkpointed`), plainly otherwise."""

    def __init__(self, *modules: nn.Module, mode: str):
        super().__init__(*modules)
        self.mode = check_mode(mode)

    def check_mode_allowed(self, mode: str) -> None:
        check_mode(mode)

    def set_mode(self, mode: str) -> ModeSwitchedSequence:
        self.mode = check_mode(mode)
        return self

    def checkpointed(self) -> bool:
        return self.mode != "autograd" and torch.is_grad_enabled()


class ConvertedStage(ModeSwitchedSequence):
    """A converted ResNet stage: ``(first block, reversible stack)``, named as the original (``0``, ``1``).

    The first block changes shape or stride, so it cannot be inverted; in ``"reversible"`` and
    ``"checkpoint"`` mode it runs under :func:`~revnets.autograd.checkpoint_call`, holding only
    its input until the backward, so that the converted model always holds less than the original.
    """

    def __init__(self, first: nn.Module, stack: ReversibleNet, *, mode: str):
        super().__init__(first, stack, mode=mode)
        object.__setattr__(self, "stem", None)  # set by a CheckpointedStem that hands its work over; not a child

    def forward(self, x: Tensor) -> Tensor:
        first, stack = self
        if not self.checkpointed():
            return stack(first(x))
        stem = self.stem
        if stem is not None and stem.checkpointed():  # x: the images; the stem passed them on
            def segment(images: Tensor) -> Tensor:  # the stem keeps its own checkpoint inside the segment
                return first(checkpoint_call(stem, images, forward=partial(nn.Sequential.forward, stem)))

            return stack(checkpoint_call(nn.Sequential(*stem, first), x, forward=segment))  # transient module
        return stack(checkpoint_call(first, x))


class CheckpointedStem(ModeSwitchedSequence):
    """The stem of a converted ImageNet ResNet (conv, BN, ReLU, max-pool, as ``0 … 3``): in ``"reversible"``
    and ``"checkpoint"`` mode, with grad, one :func:`~revnets.autograd.checkpoint_call` segment.

    ``(B, 3, H, W) → (B, 64, H/4, W/4)``. Through autograd the stem holds its ``(B, 64, H/2, W/2)``
    convolution output, its BN/ReLU output and the max-pool's int64 indices until the backward: 8.4 MiB
    per 224-px image, a sixth of a converted ResNet's step peak; checkpointed it holds the images.

    When the first stage (``stage``, a :class:`ConvertedStage`) checkpoints too, the stem passes the images on
    unchanged and the stage runs the stem and its first block as ONE segment, holding only the images
    instead of the stem's ``(B, 64, H/4, W/4)`` output (0.77 MiB per 224-px image) through the first stage's
    reversible backward, the peak of the step (as the zoo's ResNets do). The stem keeps its own checkpoint
    inside that segment (evaluated once more), so recomputing the segment holds no more than recomputing
    the block alone. Outputs and gradients are those of the separate calls.
    """

    def __init__(self, *modules: nn.Module, mode: str, stage: ConvertedStage | None = None):
        super().__init__(*modules, mode=mode)
        object.__setattr__(self, "stage", stage)  # not a child: the stage stays where the model has it
        if stage is not None:
            object.__setattr__(stage, "stem", self)

    def forward(self, x: Tensor) -> Tensor:
        if not self.checkpointed():
            return super().forward(x)
        if self.stage is not None and self.stage.checkpointed():
            return x  # the stage runs the stem inside its first segment
        return checkpoint_call(self, x, forward=super().forward)


STEMS = {"torchvision.models.resnet": ("conv1", "bn1", "relu", "maxpool"),
         "timm.models.resnet": ("conv1", "bn1", "act1", "maxpool")}
"""The stem a torchvision / timm ``ResNet`` runs, in order, before ``layer1``."""


def _checkpoint_stem(model: nn.Module, settings: _Settings) -> None:
    """Run the stem of a converted torchvision/timm ``ResNet`` as one :class:`CheckpointedStem`, put where
    its first module was (``model.conv1``) and joined to ``model.layer1``'s first segment; the others become
    ``nn.Identity``."""
    names = STEMS.get(type(model).__module__) if type(model).__name__ == "ResNet" else None
    if names is None or not isinstance(getattr(model, "layer1", None), ConvertedStage):
        return
    modules = [getattr(model, name) for name in names]
    setattr(model, names[0], CheckpointedStem(*modules, mode=settings.strategy.mode, stage=model.layer1))
    for name in names[1:]:
        setattr(model, name, nn.Identity())


def _convert(module: nn.Module, name: str, settings: _Settings) -> nn.Module:
    """The converted replacement of ``module`` (the submodule at ``name``)."""
    if isinstance(module, (ReversibleNet, MomentumTransformerEncoder, MomentumTransformerDecoder)):
        raise ValueError(f"cannot convert {name} ({type(module).__name__}): it is already reversible")
    if isinstance(module, nn.Transformer):
        module.encoder = _convert(module.encoder, f"{name}.encoder", settings)
        module.decoder = _convert(module.decoder, f"{name}.decoder", settings)
        return module
    if isinstance(module, nn.TransformerEncoder):
        return MomentumTransformerEncoder(module, settings)
    if isinstance(module, nn.TransformerDecoder):
        return MomentumTransformerDecoder(module, settings)
    if isinstance(module, nn.Sequential):
        return _convert_resnet_stage(module, name, settings)
    if huggingface.holds_transformers_layers(module):
        return huggingface.convert_layer_list(module, name, settings)
    raise ValueError(
        f"cannot convert {name} ({type(module).__name__}): expected a ResNet stage (nn.Sequential of "
        "torchvision/timm residual blocks), nn.TransformerEncoder, nn.TransformerDecoder, nn.Transformer "
        "or the layer list of a Hugging Face model (GPT-2, BERT, ViT, Llama-family decoders...)"
    )


def find_residual_stacks(model: nn.Module) -> list[str]:
    """Names of the stacks :func:`convert_to_momentum` converts when ``sub_layers`` is not given.

    Transformers and Transformer encoders/decoders, ResNet stages of at least two blocks and the layer
    lists of Hugging Face models (GPT-2, BERT, ViT, Llama-family decoders...); a stack inside one already
    found is not listed again.
    ``""`` stands for ``model`` itself.
    """
    found: list[str] = []
    for name, module in model.named_modules():
        if any(outer == "" or name.startswith(f"{outer}.") for outer in found):
            continue
        transformer = isinstance(module, (nn.Transformer, nn.TransformerEncoder, nn.TransformerDecoder))
        if transformer or (_is_resnet_stage(module) and len(module) > 1) or huggingface.is_layer_list(module):
            found.append(name)
    return found


def convert_to_momentum(
    model: nn.Module,
    gamma: float | Fraction = 0.9,
    *,
    mode: str = "reversible",
    exact: bool = False,
    sub_layers: Sequence[str] | None = None,
) -> nn.Module:
    """A deep copy of ``model`` whose residual stacks are Momentum ResNet stacks (Sander et al. 2021):
    :func:`convert_to_reversible` with ``scheme="momentum"``.

    Args:
        model: the model to convert (left unchanged).
        gamma: momentum γ ∈ [0, 1] of every stack; γ = 0 reproduces ``model`` (it then needs
            ``mode="autograd"`` or ``"checkpoint"``: a γ = 0 stack cannot be inverted).
        mode: memory strategy of the stacks (see :class:`revnets.MomentumNet`).
        exact: hold the stacks' state in fixed point (see :class:`revnets.MomentumNet`).
        sub_layers: dotted names of the submodules to convert (``["layer1", "layer2"]``,
            ``["encoder"]``, ``["transformer.h"]``); by default every stack :func:`find_residual_stacks` finds.

    Raises:
        ValueError: a name in ``sub_layers`` is not a submodule, a submodule cannot be converted (the
            message says which and why), or no stack was found.
    """
    return convert_to_reversible(model, "momentum", gamma=gamma, mode=mode, exact=exact, sub_layers=sub_layers)


def convert_to_reversible(
    model: nn.Module,
    scheme: str = "momentum",
    *,
    gamma: float | Fraction = 0.9,
    h: float | None = None,
    mode: str = "reversible",
    exact: bool = False,
    sub_layers: Sequence[str] | None = None,
) -> nn.Module:
    """A deep copy of ``model`` whose residual stacks are reversible stacks of ``scheme``.

    ``"momentum"``: :class:`~revnets.MomentumNet` with ``gamma`` (γ = 0 reproduces ``model``).
    ``"midpoint"`` / ``"leapfrog"``: Chang et al.'s (2018) :class:`~revnets.MidpointNet` /
    :class:`~revnets.LeapfrogNet` started at rest (``Y_{−1} = Y_0``, output ``Y_N``) with step size ``h``
    (default 0.5 / 1.0, with which the first step is the original first block; the later ones are not the
    original blocks: such a model is fine-tuned into its new dynamics, as Gal, Haber et al. (2025) do for
    language models). ``mode``, ``exact`` and ``sub_layers`` as in :func:`convert_to_momentum`.

    Raises:
        ValueError: an unknown ``scheme``, ``h`` given to the momentum scheme, or what
            :func:`convert_to_momentum` raises.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {', '.join(map(repr, SCHEMES))}; got {scheme!r}")
    if scheme == "momentum" and h is not None:
        raise ValueError("h is the step size of the midpoint and leapfrog schemes; the momentum scheme takes gamma")
    h = DEFAULT_STEP_SIZES.get(scheme, 1.0) if h is None else h
    settings = _Settings(scheme, gamma, h, memory_strategy(mode, exact=exact))
    converted = copy.deepcopy(model)
    for name in _names_to_convert(converted, sub_layers):
        try:
            module = converted.get_submodule(name)
        except AttributeError:
            children = ", ".join(n for n, _ in converted.named_children())
            raise ValueError(
                f"sub_layers names {name!r}, which is not a submodule of {type(model).__name__} "
                f"(its children: {children})"
            ) from None
        replacement = _convert(module, name or type(model).__name__, settings)
        if not name:
            converted = replacement
        elif replacement is not module:
            converted.set_submodule(name, replacement)
    _checkpoint_stem(converted, settings)
    return converted


def _names_to_convert(model: nn.Module, sub_layers: Sequence[str] | None) -> list[str]:
    """``sub_layers`` checked, or every stack :func:`find_residual_stacks` finds (refusing none)."""
    if sub_layers is None:
        names = find_residual_stacks(model)
        if not names:
            raise ValueError(
                f"found no residual stack in {type(model).__name__} (ResNet stages, nn.Transformer*, Hugging Face "
                "layer lists): name the stacks to convert with sub_layers=[...]"
            )
        return names
    if isinstance(sub_layers, str) or not all(isinstance(n, str) for n in sub_layers):
        raise TypeError(f"sub_layers must be a list of submodule names; got {sub_layers!r}")
    return list(sub_layers)
