"""Memory strategies: how a stack call trades memory for computation, as objects the caller picks
(as diffrax's ``adjoint=``), each validating its own options once.

======================  =======================================  =============================================
strategy                memory held after the forward            backward
======================  =======================================  =============================================
:class:`Reversible`     the final state only (independent of     inverts layer by layer, evaluates each
                        depth); with ``memory_budget`` the last  function once more (about 4/3 of autograd)
                        layers' graphs too
:class:`Exact`          the final state in fixed point and its   as :class:`Reversible`, inverting bit for bit
                        information buffers                      (Maclaurin et al. 2015)
:class:`Checkpoint`     every layer input                        ``torch.utils.checkpoint`` per layer
:class:`Autograd`       every activation                         plain backprop (the reference)
======================  =======================================  =============================================

The public keywords (``mode="reversible"``, ``exact=True``, ``frac_bits=``, ``memory_budget=``) are
spelled into a strategy by :func:`memory_strategy`, the one place their rules are checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..steps.base import State
from .arithmetic import ExactState
from .checkpointing import checkpoint_layers, checkpoint_layers_eagerly
from .compiled import outer_backend
from .engine import autograd_layers, forward_without_graph, run_exact
from .exact import FRAC_BITS_DEFAULT
from .replay import LayerSeeds, accelerator_devices
from .reversible import run_reversible
from .stack import StackCall

MODES = ("reversible", "autograd", "checkpoint")
"""The public names of the memory strategies (``mode=``); exact mode is ``mode="reversible", exact=True``."""

MAX_FRAC_BITS = 40


def check_mode(mode: str) -> str:
    """Return ``mode`` if it is one of :data:`MODES`, else raise a :class:`ValueError` naming them."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(repr(m) for m in MODES)}; got {mode!r}")
    return mode


def check_memory_budget(memory_budget: float) -> float:
    """Return ``memory_budget`` as a float if it is a number in [0, 1], else raise a :class:`ValueError` saying so."""
    if (isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float))
            or not 0 <= memory_budget <= 1):  # NaN fails the range test too
        raise ValueError(
            "memory_budget must be a number in [0, 1], the fraction of the stack's autograd activation memory "
            f"that may be kept (0: fully reversible, 1: plain autograd); got {memory_budget!r}"
        )
    return float(memory_budget)


class MemoryStrategy:
    """How a stack call trades memory for computation (see the module docs); subclasses are frozen dataclasses.

    Attributes:
        mode: the public name of the strategy (one of :data:`MODES`).
        exact: whether the state is held in fixed point.
        memory_budget: the fraction of autograd's activation memory kept (0 but for :class:`Reversible`).
    """

    mode: ClassVar[str]
    exact: ClassVar[bool] = False
    memory_budget: float = 0.0

    def run(self, call: StackCall, *, keep_input: bool = False) -> State:
        """The output state of ``call`` (a stack with at least one layer) under this strategy."""
        raise NotImplementedError


@dataclass(frozen=True)
class Autograd(MemoryStrategy):
    """Plain backpropagation through the same updates: every activation is kept (the reference)."""

    mode: ClassVar[str] = "autograd"

    def run(self, call: StackCall, *, keep_input: bool = False) -> State:
        return autograd_layers(call) if call.needs_graph else forward_without_graph(call)


@dataclass(frozen=True)
class Checkpoint(MemoryStrategy):
    """:func:`torch.utils.checkpoint.checkpoint` (non-reentrant) around every layer: the layer inputs are
    kept and each layer is recomputed once in the backward."""

    mode: ClassVar[str] = "checkpoint"

    def run(self, call: StackCall, *, keep_input: bool = False) -> State:
        if not call.needs_graph:
            return forward_without_graph(call)
        if torch.compiler.is_compiling() and not any(m.training for m in call.stack.norm_modules()):
            # Dynamo turns each checkpoint into a region that the compiled backward recomputes.
            return checkpoint_layers(call, protect_running_stats=False)
        return checkpoint_layers_eagerly(call, protect_running_stats=True)


@dataclass(frozen=True)
class Reversible(MemoryStrategy):
    """The memory-free backward: the forward keeps only the final state; the backward inverts layer by layer.

    Attributes:
        memory_budget: the fraction in [0, 1] of the layers whose graphs are kept (the last
            ``round(memory_budget · depth)``, run as :class:`Autograd` on the output of the others, which
            run reversibly): memory held after the forward is that fraction of autograd's activations
            (layers assumed equal), time moves from the reversible floor towards autograd's, gradients
            are the same.
    """

    mode: ClassVar[str] = "reversible"
    memory_budget: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "memory_budget", check_memory_budget(self.memory_budget))

    def run(self, call: StackCall, *, keep_input: bool = False) -> State:
        if not call.needs_graph:
            return forward_without_graph(call)
        kept = round(self.memory_budget * len(call.stack.layers))
        compiler = outer_backend() if torch.compiler.is_compiling() else None
        if not kept:
            return run_reversible(call, keep_input=keep_input, compiler=compiler)
        inverted = len(call.stack.layers) - kept
        # one seed for both parts: the random numbers of memory_budget=0 (none under torch.compile)
        seeds = None if torch.compiler.is_compiling() else LayerSeeds.draw(accelerator_devices(call.state))
        state = call.state
        if inverted:
            state = run_reversible(call.on(call.stack.part(0, inverted), state), keep_input=keep_input, seeds=seeds,
                                   compiler=compiler)
        return autograd_layers(call.on(call.stack, state), first=inverted, seeds=seeds)


@dataclass(frozen=True)
class Exact(MemoryStrategy):
    """Reversible with the state in fixed point: int64 tensors ``q = round(s·2^frac_bits)``, increments
    quantised, multiplication by a scale ``n/d`` pushing the lost bits into an information buffer
    (Maclaurin et al. 2015), so that inversion is bit-exact at any depth. The gradients are those of the
    real-valued scheme along the exact trajectory (quantisation treated as the identity).

    Attributes:
        frac_bits: fractional bits ``F`` in [0, 40]; values must stay within ``±2^(46 − F)`` (an
            :class:`OverflowError` says so otherwise).
    """

    mode: ClassVar[str] = "reversible"
    exact: ClassVar[bool] = True
    frac_bits: int = FRAC_BITS_DEFAULT

    def __post_init__(self) -> None:
        if isinstance(self.frac_bits, bool) or not isinstance(self.frac_bits, int) \
                or not 0 <= self.frac_bits <= MAX_FRAC_BITS:
            raise ValueError(f"frac_bits must be an integer in [0, {MAX_FRAC_BITS}]; got {self.frac_bits!r}")

    def run(self, call: StackCall, *, keep_input: bool = False) -> State:
        if call.needs_graph:
            compiler = outer_backend() if torch.compiler.is_compiling() else None
            return run_reversible(call, frac_bits=self.frac_bits, compiler=compiler)
        start = ExactState.from_float(call.state, self.frac_bits)
        return run_exact(call.stack, start, call.arguments.args, call.arguments.kwargs).to_float()


def memory_strategy(mode: str = "reversible", *, exact: bool = False, frac_bits: int = FRAC_BITS_DEFAULT,
                    memory_budget: float = 0.0) -> MemoryStrategy:
    """The strategy the public keywords spell, every rule checked here once.

    Raises:
        ValueError: an unknown ``mode``; ``exact=True`` with another mode than ``"reversible"`` or with a
            ``memory_budget``; ``frac_bits`` without ``exact=True`` or out of [0, 40]; a ``memory_budget``
            outside [0, 1] or with another mode than ``"reversible"``.
        TypeError: ``exact`` is not a bool.
    """
    check_mode(mode)
    if not isinstance(exact, bool):
        raise TypeError(f"exact must be True or False; got {exact!r}")
    budget = check_memory_budget(memory_budget)
    if exact:
        if mode != "reversible":
            raise ValueError("exact=True holds the state in fixed point for exact inversion and needs "
                             f"mode='reversible'; got mode={mode!r}")
        if budget > 0:
            raise ValueError(f"memory_budget={memory_budget!r} keeps floating-point graphs of the last layers, which "
                             "exact=True (fixed-point state, bit-exact inversion) cannot mix with; use memory_budget=0 "
                             "or exact=False")
        return Exact(frac_bits)
    if frac_bits != FRAC_BITS_DEFAULT:
        Exact(frac_bits)  # the range error first, if any
        raise ValueError(f"frac_bits={frac_bits!r} sets the fixed point of exact mode: pass exact=True with it")
    if mode == "reversible":
        return Reversible(budget)
    if budget > 0:
        raise ValueError(f"memory_budget={memory_budget!r} is the share of graphs reversible mode keeps; "
                         f"mode={mode!r} keeps {'every graph' if mode == 'autograd' else 'every layer input'}: "
                         "use mode='reversible' with it, or memory_budget=0")
    return Autograd() if mode == "autograd" else Checkpoint()
