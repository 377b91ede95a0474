"""Hugging Face ``transformers`` layer lists as reversible stacks (used by ``convert_to_momentum`` and
``convert_to_reversible``).

A ``transformers`` model (GPT-2, BERT, ViT, Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3, and any model
built the same way) runs its layers in a loop over an ``nn.ModuleList``::

    for i, layer in enumerate(self.layers):
        hidden_states = layer(hidden_states, attention_mask=masks[config.layer_types[i]], **kwargs)

and each layer may receive arguments of its own (Gemma's and Qwen's alternating sliding-window and full
attention masks). The list is replaced by a list of as many :class:`LayerSlot` s, which the model's loop
calls exactly as it called its layers: slot ``k`` records the arguments the loop gives layer ``k`` and
hands the hidden states on unchanged, and the last slot runs all the layers as one
:class:`~revnets.MomentumNet` with ``f_k(x) = layer_k(x, <layer k's arguments>) − x``. Every layer thus
gets the arguments the model's loop would give it; tensors among them that require grad receive their
gradients. The model's own ``forward`` is untouched; only its parameter names gain the stack's prefix
(``layers.0.stack.functions.<k>.block.…`` for ``layers.<k>.…``).

Detection relies on how the model calls its layers, not on a list of classes: a layer list is a
``ModuleList`` of one ``transformers`` layer class whose ``forward`` takes ``hidden_states`` first, and
at run time each slot checks that the loop called the slots in order and handed each one the hidden
states the previous one returned (a model that changes them between layers, or reads more than the
hidden states from a layer's output, is refused), and each layer must return its output tensor alone
(the ``transformers`` 5 convention). Whatever a momentum stack cannot do faithfully is refused with
an error naming the stack, never done silently wrong:

* a key/value cache (``use_cache=True``, a cache object under any name or position) while the forward
  records a graph for a reversible or checkpointed backward: that backward runs every layer again, on
  inputs rebuilt by inversion, and would write the cache twice. Without a graph (``torch.no_grad``,
  ``torch.inference_mode``: ``model.generate``) each layer runs once and writes its keys and values
  once, so caches are allowed there, and cached generation gives the tokens of uncached generation;
* ``output_attentions`` / ``output_hidden_states`` (also set by the config): the hidden state
  after layer ``n`` is the momentum position ``x_n``, not a layer output the model's hooks can
  record, and a reversible forward keeps neither;
* head masks and layer-level gradient checkpointing (the stack already frees activations).

``transformers`` is never imported by ``revnets`` itself: models are recognised by their modules.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .residual import ResidualFunction

_CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value", "layer_past")
"""Names a layer's cache argument has had across ``transformers`` releases (5.x renamed
``past_key_values`` to ``cache``); a value of a cache class is refused under any name as well."""
_OUTPUT_FLAGS = ("output_attentions", "output_hidden_states")
_HEAD_MASKS = ("head_mask", "layer_head_mask", "cross_attn_layer_head_mask")


def _is_transformers_module(module: nn.Module) -> bool:
    return type(module).__module__.split(".")[0] == "transformers"


def holds_transformers_layers(module: nn.Module) -> bool:
    """``module`` is a non-empty ``nn.ModuleList`` of ``transformers`` modules or an already converted one:
    :func:`convert_layer_list` converts it or says why not."""
    return (
        isinstance(module, nn.ModuleList)
        and len(module) > 0
        and all(_is_transformers_module(m) or isinstance(m, LayerSlot) for m in module)
    )


def layer_list_problem(layers: nn.ModuleList) -> str | None:
    """Why ``layers`` (a list of ``transformers`` modules) is not a layer list a momentum stack can run,
    or ``None`` if it is one: one class, ``forward(hidden_states, ...)``. (That a layer returns its hidden
    states alone, and that the model hands them unchanged to the next layer, is checked as it runs:
    a layer returning a tuple, or a loop reading more than the hidden states, is refused there.)"""
    if any(isinstance(m, LayerSlot) for m in layers):
        return "it is already reversible"
    classes = sorted({type(m).__name__ for m in layers})
    if len(classes) != 1:
        return f"it mixes layer classes ({', '.join(classes)}), which one stack of repeated layers cannot hold"
    signature = inspect.signature(layers[0].forward)
    first = next(iter(signature.parameters), None)
    if first != "hidden_states":
        return f"{classes[0]}.forward takes {first!r} first, not hidden_states: not a layer of a residual stack"
    if "output_attentions" in signature.parameters:
        return ("this transformers version's layers take output_attentions and the model collects per-layer "
                "outputs in its own loop, which a momentum stack cannot reproduce; use transformers>=5")
    return None


def is_layer_list(module: nn.Module) -> bool:
    """``module`` is a layer list :func:`convert_layer_list` converts (what auto-detection looks for)."""
    return holds_transformers_layers(module) and layer_list_problem(module) is None


class LayerFunction(ResidualFunction):
    """``f_k(x, calls) = layer_k(x, *args_k, **kwargs_k) − x``, where ``calls[k] = (args_k, kwargs_k)``
    are the arguments the model's loop gave layer ``k`` (every function of the stack receives all of
    them, and takes its own)."""

    def __init__(self, layer: nn.Module, index: int, sign: int = 1):
        super().__init__(layer, sign)
        self.index = index

    def forward(self, x: Tensor, calls: tuple[tuple[tuple, dict[str, Any]], ...]) -> Tensor:
        args, kwargs = calls[self.index]
        return super().forward(x, *args, **kwargs)


@dataclass
class _Call:
    """One pass of the model's loop over the slots: the input hidden states, each layer's arguments,
    and what the last slot called handed on."""

    hidden_states: Tensor
    arguments: list[tuple[tuple, dict[str, Any]]] = field(default_factory=list)


class LayerSlot(nn.Module):
    """Slot ``index`` of a converted layer list (see the module docs). Slot 0 owns the reversible stack
    (``stack``); the others reach it through slot 0, so that its parameters are registered once."""

    def __init__(self, index: int, count: int, name: str, layer_class: str, owner: LayerSlot | None = None,
                 stack: nn.Module | None = None):
        super().__init__()
        self.index, self.count, self.name, self.layer_class = index, count, name, layer_class
        if owner is None:
            self.stack = stack
            self._call: _Call | None = None
        self._owner = [owner] if owner is not None else []  # a list: not a registered submodule

    @property
    def owner(self) -> LayerSlot:
        return self._owner[0] if self._owner else self

    def extra_repr(self) -> str:
        return f"{self.index + 1} of {self.count} ({self.layer_class})"

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
        owner = self.owner
        owner._check_call(hidden_states, args, kwargs)
        if self.index == 0:
            owner._call = _Call(hidden_states)
        call = owner._call
        in_order = call is not None and len(call.arguments) == self.index
        if not in_order or (self.index and hidden_states is not call.hidden_states):
            owner._call = None
            raise owner._refuse(
                "as the model called it",
                f"layer {self.index} of {self.count} was called out of order or on other hidden states than the "
                "previous layer returned: the model changes the hidden states between layers (or calls a layer "
                "on its own), which a momentum stack cannot reproduce",
            )
        call.arguments.append((args, kwargs))
        if self.index < self.count - 1:
            return hidden_states  # handed on unchanged: the last slot runs the stack
        owner._call = None
        return owner.stack(call.hidden_states, tuple(call.arguments))

    def _refuse(self, what: str, why: str) -> ValueError:
        return ValueError(f"cannot run {self.name} ({self.count} {self.layer_class} layers converted to a "
                          f"momentum stack) {what}: {why}")

    def _check_call(self, hidden_states: Tensor, args: tuple, kwargs: dict) -> None:
        """Refuse what the momentum stack cannot do faithfully (see the module docs)."""
        recording = _requested_outputs()
        if recording:
            raise self._refuse(
                f"with {', '.join(f'output_{key}' for key in recording)} requested",
                "per-layer outputs cannot be recorded from a momentum stack (the hidden state after layer n is the "
                "momentum position x_n, not that layer's output, and a reversible forward keeps no attentions); "
                "pass output_attentions=False and output_hidden_states=False and keep them False in the config",
            )
        arguments = self._bound(hidden_states, args, kwargs)
        named = any(arguments.get(key) is not None for key in _CACHE_ARGUMENTS)
        if (named or arguments.get("use_cache") or any(_is_cache(v) for v in arguments.values())) and \
                self._records_graph_to_rerun(hidden_states):
            raise self._refuse(
                "with a key/value cache (use_cache=True or past_key_values) while recording a graph",
                f"the {self.stack.mode} backward runs the layers again (on inputs rebuilt by inversion), which "
                "would write the cache twice; pass use_cache=False to the model (or set model.config.use_cache = "
                "False) for training, and generate under torch.no_grad() or torch.inference_mode(), where "
                "caches are allowed",
            )
        for flag in _OUTPUT_FLAGS:
            if arguments.get(flag):
                raise self._refuse(f"with {flag}=True", "per-layer outputs are not available from a momentum stack")
        for key in _HEAD_MASKS:
            if arguments.get(key) is not None:
                why = "head masks select heads of each layer, which the layers of a momentum stack do not expose"
                raise self._refuse(f"with {key}", why)
        if self.training and any(getattr(f.block, "gradient_checkpointing", False) for f in self.stack.functions):
            raise self._refuse(
                "with gradient checkpointing enabled",
                "the momentum stack already frees its activations; turn checkpointing off "
                "(model.activation_checkpointing_disable(), formerly gradient_checkpointing_disable())",
            )

    def _records_graph_to_rerun(self, hidden_states: Tensor) -> bool:
        """Whether this call records a graph whose backward runs the layers again (not plain autograd)."""
        if not torch.is_grad_enabled() or self.stack.mode == "autograd":
            return False
        return hidden_states.requires_grad or any(p.requires_grad for p in self.stack.parameters())

    def _bound(self, hidden_states: Tensor, args: tuple, kwargs: dict) -> dict[str, Any]:
        """The call's arguments by name, as the layers' ``forward`` takes them (its ``**kwargs`` spread)."""
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
        return arguments


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
    """The list of :class:`LayerSlot` s that runs ``layers`` as one reversible stack (``settings.stack``
    builds it from the layers' residual functions)."""
    classes = sorted({type(m).__name__ for m in layers})
    problem = layer_list_problem(layers)
    if problem is not None:
        raise ValueError(f"cannot convert {name} (ModuleList of {', '.join(classes)}): {problem}")
    _output_collector()
    stack = settings.stack([LayerFunction(layer, k, settings.sign) for k, layer in enumerate(layers)])
    first = LayerSlot(0, len(layers), name, classes[0], stack=stack)
    return nn.ModuleList([first, *(LayerSlot(k, len(layers), name, classes[0], owner=first)
                                   for k in range(1, len(layers)))])
