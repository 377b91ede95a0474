"""The loops every memory strategy is made of: a stack's layers run forward, and inverted, by one
:class:`LayerPass`, the small typed context that evaluates an update (seeding the random number
generators, calling the layer's functions on the views of the state) for all of them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from torch import Tensor

from ..steps.base import State, Step, Update
from .arithmetic import Arithmetic, FloatArithmetic
from .compiled import function_caller
from .replay import LayerSeeds
from .stack import Functions

# Non-finite values never leave a state: an update ``s_i <- a·s_i + c·u`` with ``a != 0`` keeps NaN/inf in
# ``s_i`` (inf + finite = inf, inf − inf = NaN), and so does its inverse ``(s_i − c·u)/a``. A run whose last
# state is finite therefore had finite states throughout: the forward checks only its output. The backward
# checks its reconstruction after every layer when the state is large (a check costs about 1 % of a
# layer, and keeping an older state for the diagnosis would cost a state of memory: at 2^16 elements it was
# 2 of the 11 state-sized tensors at the backward's peak), and every ``CHECK_EVERY`` layers when it is
# small (at most ``CHECK_EVERY_LAYER_NUMEL`` elements per component: there a check costs as much as a
# small layer and the older state little memory); only once NaN/inf was found are the layers in between
# run again, checked one by one, to name the first that produced it.
CHECK_EVERY = 8
CHECK_EVERY_LAYER_NUMEL = 1 << 14


@dataclass(frozen=True)
class LayerPass:
    """One pass over layers of a stack: everything an update's evaluation needs besides the state.

    Attributes:
        step: the step declaration of the layers.
        args, kwargs: the extra arguments every function receives.
        arithmetic: floating point or fixed point (:mod:`revnets.autograd.arithmetic`).
        seeds: if given, the generators are seeded before each update that calls functions, so that a
            recomputation draws the forward's random numbers; the caller enters ``seeds.forked()``.
        compiler: if given, the key of a ``torch.compile`` backend (:func:`~revnets.autograd.compiled.outer_backend`):
            the functions are called compiled with it.
    """

    step: Step
    args: tuple
    kwargs: dict[str, Any]
    arithmetic: Arithmetic
    seeds: LayerSeeds | None = None
    compiler: int | None = None

    def evaluate(self, k: int, j: int, update: Update, views: Sequence[Tensor], functions: Functions) -> Tensor:
        """``u(views)`` of update ``j`` at layer ``k``: the layer's ``functions`` called on ``views`` (the
        state's floating-point views; the target's is hidden from ``u``), after seeding the generators."""
        if self.seeds is not None and update.calls_functions:
            self.seeds.seed(k, j)
        if self.compiler is not None and update.calls_functions:
            functions = [partial(function_caller(self.compiler, type(f)), f) for f in functions]
        return update.increment(views, functions, self.args, self.kwargs, where=f"layer {k}")

    def increment(self, k: int, j: int, update: Update, tensors: Sequence[Tensor], functions: Functions) -> Tensor:
        """What update ``j`` adds at layer ``k`` to the state ``tensors`` (no graph of its own): the copied
        component (``Update.copy``), or the functions' value on the views of ``tensors``."""
        if update.source is not None:
            return self.arithmetic.copy_increment(update, tensors)
        if type(self.arithmetic) is FloatArithmetic:  # the functions see the state itself
            return self.evaluate(k, j, update, tensors, functions)
        views = [c if i == update.target else self.arithmetic.view(c) for i, c in enumerate(tensors)]
        return self.evaluate(k, j, update, views, functions)

    def forward(self, layers: Sequence[Functions], first: int, tensors: Sequence[Tensor],
                buffers: Sequence[Any]) -> tuple[tuple, tuple]:
        """Run ``layers`` (numbered from ``first``) on the state ``(tensors, buffers)``; returns the output state."""
        step, arithmetic = self.step, self.arithmetic
        tensors, buffers = list(tensors), list(buffers)
        for k, functions in enumerate(layers, start=first):
            where = f"layer {k}"
            for j, update in enumerate(step.updates):
                t = update.target
                increment = self.increment(k, j, update, tensors, functions)
                tensors[t], buffers[t] = arithmetic.apply(j, update, tensors[t], buffers[t], increment, where)
            if step.order is not None:
                tensors, buffers = list(step.permute(tensors)), list(step.permute(buffers))
        return tuple(tensors), tuple(buffers)

    def inverse(self, layers: Sequence[Functions], first: int, tensors: Sequence[Tensor], buffers: Sequence[Any], *,
                during: str = "while inverting") -> tuple[tuple, tuple]:
        """Reconstruct the input state of ``layers`` (numbered from ``first``) from their output state (no
        graph), checking the state after every layer; ``during`` says in error messages how it was evaluated."""
        step, arithmetic = self.step, self.arithmetic
        if not arithmetic.all_finite(tuple(tensors)):
            raise FloatingPointError("the state to invert holds NaN/inf: no input can be reconstructed from it (the "
                                     "forward that produced it already went wrong)")
        tensors, buffers = list(tensors), list(buffers)
        for k in reversed(range(first, first + len(layers))):
            where = f"layer {k}"
            tensors, buffers = list(step.unpermute(tuple(tensors))), list(step.unpermute(tuple(buffers)))
            increments = []
            for j in reversed(range(len(step.updates))):
                update = step.updates[j]
                t = update.target
                increment = self.increment(k, j, update, tuple(tensors), layers[k - first])
                increments.append(increment)
                tensors[t], buffers[t] = arithmetic.undo(j, update, tensors[t], buffers[t], increment, where)
            arithmetic.check_finite(tuple(tensors), increments, where, during)
        return tuple(tensors), tuple(buffers)


def first_non_finite_layer(layer_pass: LayerPass, layers: Sequence[Functions], first: int, state: State) -> str:
    """Where a floating-point forward of ``layers`` (numbered from ``first``) whose output holds NaN/inf
    first produced it: run it again from its input ``state`` (with the same random numbers: ``layer_pass``
    carries the forward's seeds, inside ``seeds.forked()``), checking every layer."""
    arithmetic = layer_pass.arithmetic
    if not arithmetic.all_finite(state):
        return "the stack's input already holds NaN/inf"
    tensors, buffers = state, (None,) * len(state)
    for k, functions in enumerate(layers, start=first):
        tensors, buffers = layer_pass.forward((functions,), k, tensors, buffers)
        if not arithmetic.all_finite(tensors):
            return (f"the state first became non-finite at layer {k} "
                    "(a function returned NaN/inf or the state overflowed)")
    return ("its output held NaN/inf, but a second run of the same forward did not: a function is not deterministic "
            "(randomness from outside torch's generators, or state changed by the first run)")
