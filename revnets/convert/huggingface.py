"""Hugging Face ``transformers`` layer lists as momentum stacks (used by ``convert_to_momentum``).

A GPT-2, BERT or ViT model runs its blocks in a loop over an ``nn.ModuleList`` (``h``,
``encoder.layer``, ``layers``) and calls every block with the same arguments::

    for layer in self.layers:
        hidden_states = layer(hidden_states, attention_mask, **kwargs)

The list is replaced by a one-element list holding a :class:`HFMomentumStack`: the model's loop
calls it once, with the first layer's arguments, and it runs all the layers as one
:class:`~revnets.MomentumNet` with ``f_n(x, ...) = layer_n(x, ...) − x``. The arguments (attention
masks built by the model, position ids, cross-attention inputs) reach every layer. The model's own
``forward`` is untouched; only its parameter names gain the stack's prefix
(``h.0.stack.functions.<n>.block.…`` for ``h.<n>.…``).

This follows the ``transformers`` 5 layer convention: a layer returns its output tensor alone and
the model records attentions and hidden states by hooks on its layers. Whatever a momentum stack
cannot do faithfully is refused with an error naming the stack, never done silently wrong:

* key/value caches (``use_cache=True``, a cache object passed under any name — ``cache``,
  ``past_key_values`` — or position): a layer writes its keys and values
  into the cache each time it runs, and a reversible (or checkpointed) backward runs every layer
  again, on inputs rebuilt by inversion: the cache would be appended to twice;
* ``output_attentions`` / ``output_hidden_states`` (also set by the config): the hidden state
  after layer ``n`` is the momentum position ``x_n``, not a layer output the model's hooks can
  record, and a reversible forward keeps neither;
* head masks and layer-level gradient checkpointing (the stack already frees activations).

Only the layer classes of :data:`SUPPORTED_LAYERS` are converted: for them the model is known to
pass every layer the same arguments. Other models may not (per-layer sliding-window masks,
per-layer caches), so they are refused rather than guessed. ``transformers`` is never imported by
``revnets`` itself: models are recognised by their classes' names and modules.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import Tensor, nn

SUPPORTED_LAYERS = {"GPT2Block": "GPT-2", "BertLayer": "BERT", "ViTLayer": "ViT"}
"""Hugging Face layer classes converted, with their model families."""

_CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value", "layer_past")
"""Names a layer's cache argument has had across ``transformers`` releases (5.x renamed
``past_key_values`` to ``cache``); a value of a cache class is refused under any name as well."""
_OUTPUT_FLAGS = ("output_attentions", "output_hidden_states")
_HEAD_MASKS = ("head_mask", "layer_head_mask", "cross_attn_layer_head_mask")


def _is_transformers_module(module: nn.Module) -> bool:
    return type(module).__module__.split(".")[0] == "transformers"


def holds_transformers_layers(module: nn.Module) -> bool:
    """``module`` is a non-empty ``nn.ModuleList`` of ``transformers`` modules (supported or not) or an
    already converted one: :func:`convert_layer_list` converts it or says why not."""
    return (
        isinstance(module, nn.ModuleList)
        and len(module) > 0
        and all(_is_transformers_module(m) or isinstance(m, HFMomentumStack) for m in module)
    )


def is_layer_list(module: nn.Module) -> bool:
    """``module`` is a layer list :func:`convert_layer_list` converts (what auto-detection looks for)."""
    return holds_transformers_layers(module) and all(type(m).__name__ in SUPPORTED_LAYERS for m in module)


class HFMomentumStack(nn.Module):
    """All the layers of a ``transformers`` layer list run as one momentum stack.

    Called like the list's first layer, ``(hidden_states, *args, **kwargs)``, it returns the output
    tensor of the last one (at ``γ = 0``, exactly what the model's loop computes). The arguments
    reach every layer; tensors among them that require grad receive their gradient.

    Args:
        layers: the layers, all of one class of :data:`SUPPORTED_LAYERS`.
        name: the list's name in the model, for error messages.
        settings: the conversion settings (``settings.momentum_net(blocks)`` builds the stack).
    """

    def __init__(self, layers: list[nn.Module], name: str, settings: Any):
        super().__init__()
        self.name = name
        self.layer_class = type(layers[0]).__name__
        self.stack = settings.momentum_net(layers)

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
        self._check_call(hidden_states, args, kwargs)
        return self.stack(hidden_states, *args, **kwargs)

    def _refuse(self, what: str, why: str) -> ValueError:
        return ValueError(
            f"cannot run {self.name} ({len(self.stack.functions)} {self.layer_class} layers converted to a "
            f"momentum stack) {what}: {why}"
        )

    def _check_call(self, hidden_states: Tensor, args: tuple, kwargs: dict) -> None:
        recording = _requested_outputs()
        if recording:
            raise self._refuse(
                f"with {', '.join(f'output_{key}' for key in recording)} requested",
                "per-layer outputs cannot be recorded from a momentum stack (the hidden state after layer n is the "
                "momentum position x_n, not that layer's output, and a reversible forward keeps no attentions); "
                "pass output_attentions=False and output_hidden_states=False and keep them False in the config",
            )
        signature = inspect.signature(self.stack.functions[0].block.forward)
        try:
            bound = signature.bind(hidden_states, *args, **kwargs)
        except TypeError as error:
            why = f"they do not fit {self.layer_class}.forward ({error})"
            raise self._refuse("with these arguments", why) from None
        arguments = dict(bound.arguments)
        for parameter in signature.parameters.values():
            if parameter.kind is inspect.Parameter.VAR_KEYWORD:
                arguments.update(arguments.pop(parameter.name, {}))
        named = any(arguments.get(key) is not None for key in _CACHE_ARGUMENTS)
        if named or arguments.get("use_cache") or any(_is_cache(value) for value in arguments.values()):
            raise self._refuse(
                "with a key/value cache (use_cache=True or past_key_values)",
                "the backward runs the layers again (on inputs rebuilt by inversion), which would write the cache "
                "twice, so caches are not supported; pass use_cache=False to the model or set "
                "model.config.use_cache = False",
            )
        for flag in _OUTPUT_FLAGS:
            if arguments.get(flag):
                raise self._refuse(f"with {flag}=True", "per-layer outputs are not available from a momentum stack")
        for key in _HEAD_MASKS:
            if arguments.get(key) is not None:
                why = "head masks are per layer, and the stack passes every layer the same arguments"
                raise self._refuse(f"with {key}", why)
        if self.training and any(getattr(f.block, "gradient_checkpointing", False) for f in self.stack.functions):
            raise self._refuse(
                "with gradient checkpointing enabled",
                "the momentum stack already frees its activations; turn checkpointing off "
                "(model.activation_checkpointing_disable(), formerly gradient_checkpointing_disable())",
            )


def _is_cache(value: Any) -> bool:
    """``value`` is a ``transformers`` key/value cache (an instance of a ``cache_utils.Cache``
    subclass), whatever argument carries it."""
    return any(c.__name__ == "Cache" and c.__module__.startswith("transformers.") for c in type(value).__mro__)


def _output_collector() -> Any:
    """``transformers``' record of the outputs the running model captures by hooks on its layers."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        import transformers

        raise ValueError(
            f"transformers {transformers.__version__} does not record per-layer outputs by hooks "
            "(transformers.utils.output_capturing), which converted layer lists rely on to refuse "
            "output_attentions/output_hidden_states; use transformers>=5"
        ) from None
    return _active_collector


def _requested_outputs() -> list[str]:
    """The outputs (``attentions``, ``hidden_states``…) the running ``transformers`` model records."""
    collected = _output_collector().get()
    return sorted(key for key in collected or {} if not key.startswith("_"))


def convert_layer_list(layers: nn.ModuleList, name: str, settings: Any) -> nn.ModuleList:
    """A one-element ``nn.ModuleList`` holding the :class:`HFMomentumStack` of ``layers``."""
    classes = sorted({type(m).__name__ for m in layers})
    described = f"{name} (ModuleList of {', '.join(classes)})"
    if any(isinstance(m, HFMomentumStack) for m in layers):
        raise ValueError(f"cannot convert {described}: it is already reversible")
    unsupported = [c for c in classes if c not in SUPPORTED_LAYERS]
    if unsupported or len(classes) != 1:
        supported = ", ".join(f"{c} ({family})" for c, family in SUPPORTED_LAYERS.items())
        raise ValueError(
            f"cannot convert {described}: only lists of one supported Hugging Face layer class are converted "
            f"({supported}), whose models pass every layer the same arguments; other models may pass per-layer "
            "masks or caches, which one momentum stack cannot"
        )
    if "output_attentions" in inspect.signature(layers[0].forward).parameters:
        raise ValueError(
            f"cannot convert {described}: this transformers version's layers take output_attentions and the model "
            "collects per-layer outputs in its own loop, which a momentum stack cannot reproduce; use transformers>=5"
        )
    _output_collector()
    return nn.ModuleList([HFMomentumStack(list(layers), name, settings)])
