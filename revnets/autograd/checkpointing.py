"""The checkpoint strategy: :func:`torch.utils.checkpoint.checkpoint` (non-reentrant) around every layer
of a stack, and :func:`checkpoint_call` around a block no reversible stack can hold (a stage's
shape-changing first block, a stem), with the engine's guarantees: the recomputation leaves running
statistics alone, replays the forward's random numbers from one seed, and refuses substituted parameters."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..steps.base import State
from .arithmetic import FloatArithmetic
from .passes import LayerPass
from .replay import LayerSeeds, accelerator_devices, preserved_running_stats, running_stat_modules
from .reversible import substituted_parameters
from .stack import Functions, StackCall, layer_parameters


def checkpoint_layers(call: StackCall, *, protect_running_stats: bool) -> State:
    """Every layer of ``call`` under non-reentrant :func:`~torch.utils.checkpoint.checkpoint`.

    ``protect_running_stats`` (eager): the recomputation runs under :class:`preserved_running_stats`
    (checkpoint's ``context_fn``), so that normalisation layers count each batch once, and random
    numbers follow :class:`LayerSeeds` (checkpoint keeps no generator snapshot per layer). Dynamo
    cannot trace either; when compiling without normalisation layers in training mode neither is
    needed (the compiled graph replays its own random numbers).
    """
    stack, state = call.stack, call.state
    layer_pass = LayerPass(stack.step(), call.arguments.args, call.arguments.kwargs, FloatArithmetic())
    options = {}
    if protect_running_stats:
        layer_pass = LayerPass(layer_pass.step, layer_pass.args, layer_pass.kwargs, layer_pass.arithmetic,
                               LayerSeeds.draw(accelerator_devices(state)))
        options = {"preserve_rng_state": False,
                   "context_fn": functools.partial(_recomputation_contexts, stack.norm_modules())}
    for k, functions in enumerate(stack.layers):
        layer = functools.partial(_checkpointed_layer, layer_pass, functions, k, layer_parameters(functions))
        state = checkpoint(layer, *state, use_reentrant=False, **options)
    return state


checkpoint_layers_eagerly = torch.compiler.disable(checkpoint_layers)
""":func:`checkpoint_layers` run eagerly (a graph break under ``torch.compile``): with normalisation
layers in training mode, a traced checkpoint would recompute their running-statistic updates."""


def checkpoint_call(module: nn.Module, *args: Tensor, forward: Callable[..., Tensor] | None = None) -> Tensor:
    """``module(*args)`` (or ``forward(*args)``, a function of ``module``'s parameters) under
    :func:`torch.utils.checkpoint.checkpoint` (non-reentrant), with the guarantees of
    ``mode="checkpoint"``: the recomputation leaves the running statistics of ``module``'s
    normalisation layers alone, replays random numbers from one seed (:class:`LayerSeeds`), and
    refuses parameters substituted since the forward. For the blocks a reversible model cannot invert
    (a stage's shape-changing first block, a stem): only their inputs are held until the backward.
    """
    function = module if forward is None else forward
    norms = running_stat_modules((module,))
    parameters = layer_parameters((module,))
    if torch.compiler.is_compiling() and not any(m.training for m in norms):
        return checkpoint(_checkpointed_call, function, module, None, parameters, *args, use_reentrant=False)
    return _checkpoint_call_eagerly(function, module, norms, parameters, *args)


@torch.compiler.disable
def _checkpoint_call_eagerly(function, module: nn.Module, norms: tuple, parameters: tuple, *args: Tensor) -> Tensor:
    seeds = LayerSeeds.draw(accelerator_devices(a for a in args if isinstance(a, Tensor)))
    return checkpoint(_checkpointed_call, function, module, seeds, parameters, *args, use_reentrant=False,
                      preserve_rng_state=False, context_fn=functools.partial(_recomputation_contexts, norms))


def _checkpointed_call(function, module: nn.Module, seeds: LayerSeeds | None, forward_parameters: tuple,
                       *args: Tensor) -> Tensor:
    _check_same_parameters((module,), forward_parameters)
    if seeds is None:
        return function(*args)
    with seeds.forked():
        seeds.seed(0, 0)
        return function(*args)


def _check_same_parameters(functions: Functions, forward_parameters: tuple) -> None:
    """Raise if the modules no longer hold the parameters of the forward (e.g. after ``functional_call``)."""
    current = layer_parameters(functions)
    if len(current) != len(forward_parameters) or any(a is not b for a, b in zip(current, forward_parameters)):
        raise substituted_parameters("checkpoint")


def _recomputation_contexts(norm_modules) -> tuple[contextlib.AbstractContextManager, preserved_running_stats]:
    """Checkpoint's (forward, recomputation) contexts: the recomputation leaves running statistics alone."""
    return contextlib.nullcontext(), preserved_running_stats(norm_modules)


def _checkpointed_layer(layer_pass: LayerPass, functions: Functions, k: int, forward_parameters: tuple,
                        *state: Tensor) -> State:
    """Layer ``k`` as checkpoint runs it: in the forward, and again in the backward, where its modules must
    still hold the parameters of the forward (``forward_parameters``, a tuple checkpoint keeps as is)."""
    _check_same_parameters(functions, forward_parameters)
    seeds = layer_pass.seeds
    with seeds.forked() if seeds is not None else contextlib.nullcontext():
        return layer_pass.forward((functions,), k, state, (None,) * len(state))[0]
