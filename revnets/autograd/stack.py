"""What the engine runs: a step declaration (:class:`revnets.steps.Step`) and the functions of each layer."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _NormBase
from torch.utils import _pytree as pytree

from ..steps.base import State, Step
from .replay import running_stat_modules, submodules

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

    def parameters(self) -> tuple[tuple[Tensor, ...], tuple[tuple[int, ...], ...]]:
        """The distinct trainable parameters, and for each layer the indices of those it uses."""
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
        per_layer = tuple(indices(layer_parameters(fns)) + shared for fns in self.layers)
        return tuple(params), per_layer

    def trainable_parameter_ids(self) -> set[int]:
        """The ids of the distinct trainable parameters (those :meth:`parameters` returns), without indexing them."""
        return {id(p) for fns in self.layers for p in layer_parameters(fns) if p.requires_grad} | {
            id(p) for p in self.coefficients if p.requires_grad}

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
