"""The invertible building block shared by every scheme.

A reversible network keeps a *state*: a tuple of tensors ``s = (s_0, ..., s_{m-1})``. One layer
(a :class:`Step`) rewrites the state with a short sequence of :class:`Update` s, each of the form

    s_i  <-  a * s_i + c * u(s_j for j != i)

where ``a`` (the scale) is a non-zero scalar, ``c`` (the gain) a scalar, and ``u`` may call the layer's functions on
the *other* components. Because ``u`` does not read ``s_i``, the update is inverted in closed form,

    s_i  =  (s_i' - c * u(s_j for j != i)) / a,

and the ``u`` evaluated for the inverse is exactly the one whose vector-Jacobian product the backward
pass needs: every function is evaluated once per layer during the memory-free backward.
A step may end with a permutation of the components (the two-step schemes swap the roles of the
previous and current states).

Every scheme in :mod:`revnets.steps` is such a declaration; the engine in :mod:`revnets.autograd`
executes them and knows nothing about any particular scheme.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

State = tuple[Tensor, ...]
"""The state of a reversible stack: a tuple of tensors (``None`` marks the component being updated)."""

UpdateFn = Callable[
    [tuple[Tensor | None, ...], Sequence[Callable[..., Tensor]], tuple[Any, ...], dict[str, Any]], Tensor
]
"""``u(state, layer_functions, args, kwargs) -> Tensor``: the increment of one update.

``state[target]`` is ``None`` while ``u`` is evaluated: ``u`` must read the other components only.
``layer_functions`` are the functions of the current layer, ``args``/``kwargs`` the extra arguments
given to the network's forward, passed on to every function.
"""

Scale = float | Tensor
"""A non-zero scalar: a Python number or a 0-dim tensor (a learnable coefficient such as γ)."""


@dataclass(frozen=True)
class Update:
    """``s[target] <- scale * s[target] + gain * update(s without s[target])``.

    Attributes:
        target: index of the state component that is rewritten.
        update: the increment ``u``; it must return a tensor of the shape of ``s[target]``.
        scale: the factor ``a`` applied to the old value; must be non-zero for the update to be
            invertible. A Python number or a 0-dim tensor (learnable).
        gain: the factor ``c`` applied to the increment (a Python number or a 0-dim tensor). Kept
            apart from ``u`` so that ``a·s + c·u`` runs as one fused kernel when both are numbers.
        source: for an update that adds another component, ``u(s) = s[source]`` (such as
            ``x ← x + v``), that component's index (build it with :meth:`copy`): the engine then
            calls no function, seeds no generator and, in fixed point, adds the integers themselves.
    """

    target: int
    update: UpdateFn
    scale: Scale = 1.0
    gain: Scale = 1.0
    source: int | None = None

    @classmethod
    def copy(cls, target: int, source: int, *, scale: Scale = 1.0, gain: Scale = 1.0) -> Update:
        """``s[target] <- scale * s[target] + gain * s[source]``."""
        return cls(target, lambda s, fns, a, k: s[source], scale=scale, gain=gain, source=source)

    @property
    def calls_functions(self) -> bool:
        """Whether ``u`` calls the layer's functions (only those may draw random numbers)."""
        return self.source is None

    def increment(
        self,
        state: State,
        functions: Sequence[Callable[..., Tensor]],
        args: tuple,
        kwargs: dict,
        *,
        where: str = "a layer",
    ) -> Tensor:
        """Evaluate ``u`` (without the gain) on the state with the target hidden; check its shape.

        ``where`` names the layer in error messages.
        """
        visible = tuple(None if j == self.target else s for j, s in enumerate(state))
        increment = self.update(visible, functions, args, kwargs)
        target = state[self.target]
        if not isinstance(increment, Tensor) or increment.shape != target.shape:
            got = tuple(increment.shape) if isinstance(increment, Tensor) else type(increment).__name__
            raise ValueError(
                f"{where}: a function returned {got} but the state component it updates has shape "
                f"{tuple(target.shape)}; reversible layers must return a tensor of their input's shape"
            )
        return increment

    def gained(self, increment: Tensor) -> Tensor:
        """``gain * increment``."""
        return increment if _is_one(self.gain) else self.gain * increment

    def _is_interpolation(self, state: Tensor, increment: Tensor) -> bool:
        """``scale + gain == 1`` with both numbers and one dtype (no mixed precision): ``a·s + (1−a)·u`` is
        one ``lerp`` kernel, and so is its inverse."""
        return (
            not isinstance(self.scale, Tensor)
            and not isinstance(self.gain, Tensor)
            and self.scale + self.gain == 1
            and state.dtype == increment.dtype
        )

    def combine(self, old: Tensor, increment: Tensor) -> Tensor:
        """The updated component ``scale * old + gain * increment``."""
        if self._is_interpolation(old, increment):
            return torch.lerp(increment, old, self.scale)
        base = old if _is_one(self.scale) else self.scale * old
        if isinstance(self.gain, Tensor):
            return base + self.gain * increment
        return base + increment if self.gain == 1 else torch.add(base, increment, alpha=self.gain)

    def uncombine(self, new: Tensor, increment: Tensor) -> Tensor:
        """The old component ``(new - gain * increment) / scale``."""
        if self._is_interpolation(new, increment):
            return torch.lerp(increment, new, 1 / self.scale)
        if isinstance(self.gain, Tensor):
            difference = new - self.gain * increment
        else:
            difference = new - increment if self.gain == 1 else torch.sub(new, increment, alpha=self.gain)
        return difference if _is_one(self.scale) else difference.div_(self.scale)

    def scale_gradient(self, gradient: Tensor) -> Tensor:
        """The gradient reaching the old component, ``scale * gradient`` (the scale treated as constant)."""
        return times_constant(self.scale, gradient)

    def gain_gradient(self, gradient: Tensor) -> Tensor:
        """The gradient reaching the increment, ``gain * gradient`` (the gain treated as constant)."""
        return times_constant(self.gain, gradient)


@dataclass(frozen=True)
class Step:
    """One invertible layer: updates applied in order, then an optional permutation of the state.

    Attributes:
        updates: the updates, applied first to last.
        order: if given, the output state is ``tuple(state[i] for i in order)``.
    """

    updates: tuple[Update, ...]
    order: tuple[int, ...] | None = None

    def permute(self, state: tuple) -> tuple:
        """Apply the output permutation (to a state or to its gradients)."""
        return state if self.order is None else tuple(state[i] for i in self.order)

    def unpermute(self, state: tuple) -> tuple:
        """Undo :meth:`permute`."""
        if self.order is None:
            return state
        restored: list = [None] * len(state)
        for position, source in enumerate(self.order):
            restored[source] = state[position]
        return tuple(restored)


def _is_one(scale: Scale) -> bool:
    return not isinstance(scale, Tensor) and scale == 1


def times_constant(factor: Scale, value: Tensor) -> Tensor:
    """``factor · value`` with ``factor`` treated as a constant (detached); ``value`` itself when ``factor`` is 1."""
    if _is_one(factor):
        return value
    return (factor.detach() if isinstance(factor, Tensor) else factor) * value


def split_channels(x: Tensor, *, name: str = "x") -> State:
    """Split ``x`` of shape ``(B, C, ...)`` into two halves ``(B, C/2, ...)`` along dim 1."""
    if x.dim() < 2:
        raise ValueError(f"{name} must have a channel dimension (dim 1) to split; got shape {tuple(x.shape)}")
    channels = x.shape[1]
    if channels % 2:
        raise ValueError(
            f"{name} has {channels} channels on dim 1; two-stream schemes split dim 1 into two equal halves, "
            "so the channel count must be even"
        )
    return tuple(torch.chunk(x, 2, dim=1))


def join_channels(state: State) -> Tensor:
    """Inverse of :func:`split_channels`: concatenate the two halves along dim 1."""
    return torch.cat(state, dim=1)
