"""The one engine that runs every reversible scheme: its entry points.

A :class:`~revnets.autograd.stack.Stack` is a step declaration (:class:`revnets.steps.Step`) and the
functions of each layer. :func:`run` calls it under a memory strategy
(:mod:`revnets.autograd.strategy`: :class:`~revnets.autograd.strategy.Reversible`,
:class:`~revnets.autograd.strategy.Exact`, :class:`~revnets.autograd.strategy.Checkpoint`,
:class:`~revnets.autograd.strategy.Autograd`); :func:`invert`, :func:`run_exact` and
:func:`invert_exact` run or invert it without a graph.

Where each part lives: the state arithmetic (floating and fixed point) in
:mod:`~revnets.autograd.arithmetic`, the forward and inverse loops in :mod:`~revnets.autograd.passes`,
the memory-free backward in :mod:`~revnets.autograd.backward`, its autograd nodes in
:mod:`~revnets.autograd.reversible`, the checkpoint strategy in :mod:`~revnets.autograd.checkpointing`,
random-number, autocast and running-statistic replay in :mod:`~revnets.autograd.replay`, bit-exact
fixed-point operations in :mod:`~revnets.autograd.exact`.

Every recomputation replays the random number generators and the autocast state of the forward and
never updates normalisation running statistics a second time. Gradients are returned through
autograd (``loss.backward()`` and :func:`torch.autograd.grad` alike), never accumulated into
``.grad`` as a side effect.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..steps.base import State
from .arithmetic import ExactState, FixedPointArithmetic, FloatArithmetic
from .passes import LayerPass
from .replay import LayerSeeds, accelerator_devices, preserved_running_stats
from .stack import Stack, StackCall

if TYPE_CHECKING:
    from .strategy import MemoryStrategy


def run(stack: Stack, state: State, args: tuple = (), kwargs: dict | None = None, *, strategy: MemoryStrategy,
        keep_input: bool = False) -> State:
    """Run ``stack`` on ``state`` under ``strategy``.

    Args:
        stack: the step declaration and the layers' functions.
        state: the input state, a tuple of tensors.
        args: extra positional arguments passed to every function (tensors among them, also nested in
            lists, tuples and dicts, receive gradients).
        kwargs: extra keyword arguments passed to every function, likewise.
        strategy: the memory strategy (:func:`~revnets.autograd.strategy.memory_strategy` builds it from
            the public keywords).
        keep_input: floating-point reversible strategy: also keep the input state, and evaluate the
            first layer's functions on it rather than on its reconstruction (one state more in memory;
            inversion rounding then never reaches the first layer).

    Returns:
        The output state, a tuple of tensors of the input's shapes.
    """
    state = tuple(state)
    if not stack.layers:
        return state
    return strategy.run(StackCall.of(stack, state, args, kwargs), keep_input=keep_input)


def forward_without_graph(call: StackCall) -> State:
    """The layers of ``call`` in floating point, for a call that records no graph."""
    layer_pass = LayerPass(call.stack.step(), call.arguments.args, call.arguments.kwargs, FloatArithmetic())
    return layer_pass.forward(call.stack.layers, 0, call.state, (None,) * len(call.state))[0]


def autograd_layers(call: StackCall, first: int = 0, seeds: LayerSeeds | None = None) -> State:
    """Layers ``first …`` of ``call`` under plain autograd (numbered from ``first``, on ``call.state``), their
    random numbers drawn as :class:`LayerSeeds` says (``seeds``, or new ones; under ``torch.compile``, the
    compiler's random numbers instead)."""
    layers, state = call.stack.layers[first:], call.state
    layer_pass = LayerPass(call.stack.step(), call.arguments.args, call.arguments.kwargs, FloatArithmetic())
    if torch.compiler.is_compiling():
        return layer_pass.forward(layers, first, state, (None,) * len(state))[0]
    seeds = LayerSeeds.draw(accelerator_devices(state)) if seeds is None else seeds
    with seeds.forked():
        seeded = LayerPass(layer_pass.step, layer_pass.args, layer_pass.kwargs, layer_pass.arithmetic, seeds)
        return seeded.forward(layers, first, state, (None,) * len(state))[0]


def invert(stack: Stack, state: State, args: tuple = (), kwargs: dict | None = None) -> State:
    """Reconstruct the input state of ``stack`` from its output state (floating point, no graph).

    Normalisation layers do not update their running statistics. Randomness inside the functions
    (dropout in training mode) is not replayed: invert deterministic functions (``eval()``).

    Raises:
        FloatingPointError: a non-finite value was met; the message names the layer.
    """
    state = tuple(state)
    with torch.no_grad(), preserved_running_stats(stack.norm_modules()):
        layer_pass = LayerPass(stack.step(), tuple(args), {} if kwargs is None else kwargs, FloatArithmetic())
        return layer_pass.inverse(stack.layers, 0, state, (None,) * len(state))[0]


def run_exact(stack: Stack, state: ExactState, args: tuple = (), kwargs: dict | None = None) -> ExactState:
    """Run ``stack`` in fixed point on ``state`` (no graph); invert the result with :func:`invert_exact`."""
    with torch.no_grad():
        layer_pass = _exact_pass(stack, state, args, kwargs)
        tensors, buffers = layer_pass.forward(stack.layers, 0, state.tensors, state.buffers)
    return ExactState(tensors, buffers, state.frac_bits, state.dtype)


def invert_exact(stack: Stack, state: ExactState, args: tuple = (), kwargs: dict | None = None) -> ExactState:
    """The bit-exact inverse of :func:`run_exact`."""
    with torch.no_grad(), preserved_running_stats(stack.norm_modules()):
        layer_pass = _exact_pass(stack, state, args, kwargs)
        tensors, buffers = layer_pass.inverse(stack.layers, 0, state.tensors, state.buffers)
    return ExactState(tensors, buffers, state.frac_bits, state.dtype)


def _exact_pass(stack: Stack, state: ExactState, args: tuple, kwargs: dict | None) -> LayerPass:
    step = stack.step()
    return LayerPass(step, tuple(args), {} if kwargs is None else kwargs,
                     FixedPointArithmetic.for_step(step, state.frac_bits, state.dtype))
