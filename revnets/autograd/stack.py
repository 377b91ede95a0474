"""What the engine runs: a step declaration (:class:`revnets.steps.Step`) and the functions of each layer."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _NormBase
from torch.utils import _pytree as pytree

from ..steps.base import State, Step
from .replay import keeps_running_stats, running_stat_modules, submodules

Functions = tuple[Callable[..., Tensor], ...]
"""The functions of one layer: ``(f,)`` for one-function schemes, ``(F, G)`` for couplings."""


def layer_parameters(functions: Functions) -> tuple[Tensor, ...]:
    """The parameters of the modules among ``functions`` (``Module.parameters()`` order; a parameter
    reached twice is listed twice), as the modules hold them now (see :func:`~revnets.autograd.replay.submodules`)."""
    found: list[Tensor] = []
    for module in submodules(functions):
        for p in module._parameters.values():
            if p is not None:
                found.append(p)
    return tuple(found)


ParameterSlot = tuple[dict, str, Tensor]
"""Where a module holds a parameter: ``(module._parameters, name, parameter)``."""


class StackParameters(NamedTuple):
    """What :meth:`Stack.parameters` finds in one walk over the functions' modules.

    Attributes:
        params: the distinct trainable parameters (of the functions, then the coefficients).
        layer_params: for each layer, the indices in ``params`` of those it uses (coefficients included).
        layer_slots: for each layer, where its modules hold their trainable parameters, so that a backward can
            check in a few lookups that they still hold the tensors the forward used (:func:`slots_changed`).
        layer_norms: for each layer, its normalisation modules with running statistics.
    """

    params: tuple[Tensor, ...]
    layer_params: tuple[tuple[int, ...], ...]
    layer_slots: tuple[tuple[ParameterSlot, ...], ...]
    layer_norms: tuple[tuple[_NormBase, ...], ...]


def slots_changed(slots: Sequence[ParameterSlot]) -> bool:
    """Whether a module no longer holds, under the same name, the parameter it held (``torch.func.functional_call``
    substitutes them in place of the module's own, and restores them after the call)."""
    return any(holder.get(name) is not p for holder, name, p in slots)


@dataclass(frozen=True)
class Stack:
    """What the engine runs.

    Attributes:
        step: builds the step declaration; called again wherever a graph must be rebuilt, so that
            learnable coefficients (such as γ) enter the graph freshly each time.
        layers: the functions of each layer, in order (``(f,)`` for one-function schemes, ``(F, G)``
            for couplings).
        coefficients: parameters read by ``step`` itself (shared by every layer), e.g. the logit of
            a learnable γ.
    """

    step: Callable[[], Step]
    layers: tuple[Functions, ...]
    coefficients: tuple[Tensor, ...] = ()

    def parameters(self) -> StackParameters:
        """The distinct trainable parameters, for each layer the indices of those it uses, where its modules hold
        them and its normalisation modules: one walk over the modules."""
        index: dict[int, int] = {}
        params: list[Tensor] = []

        def indices(tensors: Sequence[Tensor]) -> tuple[int, ...]:
            found: dict[int, None] = {}  # ordered, each index once
            for p in tensors:
                if p.requires_grad:
                    i = index.setdefault(id(p), len(params))
                    if i == len(params):
                        params.append(p)
                    found[i] = None
            return tuple(found)

        shared = indices(self.coefficients)
        layer_params, layer_slots, layer_norms = [], [], []
        for fns in self.layers:
            modules = submodules(fns)
            slots = tuple((m._parameters, name, p) for m in modules for name, p in m._parameters.items()
                          if p is not None and p.requires_grad)
            layer_params.append(indices([p for _, _, p in slots]) + shared)
            layer_slots.append(slots)
            layer_norms.append(tuple(m for m in modules if keeps_running_stats(m)))
        return StackParameters(tuple(params), tuple(layer_params), tuple(layer_slots), tuple(layer_norms))

    def has_trainable_parameters(self) -> bool:
        """Whether a parameter of the functions or a coefficient requires grad (stops at the first)."""
        return any(p.requires_grad for p in self.coefficients) or any(
            p.requires_grad for fns in self.layers for p in layer_parameters(fns))

    def norm_modules(self) -> tuple[_NormBase, ...]:
        """The normalisation layers with running statistics among the functions' modules."""
        return running_stat_modules(f for fns in self.layers for f in fns)

    def part(self, first: int, end: int | None = None) -> Stack:
        """The stack of layers ``first … end − 1`` (same step and coefficients)."""
        return Stack(self.step, self.layers[first:end], self.coefficients)


@dataclass(frozen=True)
class Arguments:
    """The extra arguments of every function, flattened once (``torch.utils._pytree``) so that an autograd
    function can take their tensors as inputs and rebuild the rest around them.

    Attributes:
        args, kwargs: as given.
        leaves, spec: the flattened ``(args, kwargs)`` and how to rebuild them.
        tensors: the tensors among ``leaves``, in order.
    """

    args: tuple
    kwargs: dict
    leaves: tuple
    spec: pytree.TreeSpec
    tensors: tuple[Tensor, ...]

    @classmethod
    def of(cls, args: Sequence = (), kwargs: dict | None = None) -> Arguments:
        kwargs = {} if kwargs is None else dict(kwargs)
        leaves, spec = pytree.tree_flatten((tuple(args), kwargs))
        return cls(tuple(args), kwargs, tuple(leaves), spec, tuple(v for v in leaves if isinstance(v, Tensor)))

    def rebuild(self, tensors: Sequence[Tensor]) -> tuple[tuple, dict]:
        """``(args, kwargs)`` with ``tensors`` in place of their tensor leaves."""
        supply = iter(tensors)
        leaves = [next(supply) if isinstance(v, Tensor) else v for v in self.leaves]
        return pytree.tree_unflatten(leaves, self.spec)


@dataclass(frozen=True)
class StackCall:
    """One call of a stack: what is run, on what, with which arguments, and whether it records a graph.

    Attributes:
        stack: the step and the layers' functions.
        state: the input state, a tuple of tensors.
        arguments: the extra arguments of every function.
        needs_graph: grad mode is on and an input, an argument or a parameter requires grad.
    """

    stack: Stack
    state: State
    arguments: Arguments
    needs_graph: bool

    @classmethod
    def of(cls, stack: Stack, state: Sequence[Tensor], args: Sequence = (), kwargs: dict | None = None) -> StackCall:
        """The call of ``stack`` on ``state`` with ``args`` and ``kwargs``."""
        state, arguments = tuple(state), Arguments.of(args, kwargs)
        needs_graph = torch.is_grad_enabled() and (any(t.requires_grad for t in (*state, *arguments.tensors))
                                                   or stack.has_trainable_parameters())
        return cls(stack, state, arguments, needs_graph)

    def on(self, stack: Stack, state: Sequence[Tensor]) -> StackCall:
        """The same arguments for another stack (a part of this one) and state."""
        return replace(self, stack=stack, state=tuple(state))
