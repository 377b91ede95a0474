"""The common user-facing contract of every reversible network."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, TypedDict

from torch import Tensor, nn

from ..autograd import engine
from ..autograd.arithmetic import ExactState
from ..autograd.exact import FRAC_BITS_DEFAULT
from ..autograd.stack import Stack
from ..autograd.strategy import Exact, MemoryStrategy, check_memory_budget, check_mode, memory_strategy
from ..steps.base import State, Step, join_channels, split_channels

if TYPE_CHECKING:
    from typing_extensions import Unpack


class MemoryKeywords(TypedDict, total=False):
    """The memory-strategy keywords every reversible network takes (see :class:`ReversibleNet`):
    ``mode``, ``exact``, ``frac_bits``, ``memory_budget`` (spelled into a strategy by
    :func:`~revnets.autograd.strategy.memory_strategy`), or a ready ``strategy`` instead of them."""

    mode: str
    exact: bool
    frac_bits: int
    memory_budget: float
    strategy: MemoryStrategy


def as_module_list(functions: Iterable[Callable[..., Tensor]], name: str) -> nn.ModuleList:
    """Register the functions of a stack; plain callables are wrapped so they can sit in a ModuleList.

    The same module may appear several times (shared weights).

    Raises:
        TypeError: ``functions`` is one module (an ``nn.Sequential`` is one function, not a list of
            layers: which one was meant cannot be told) or not iterable, or an item is not callable.
    """
    if isinstance(functions, nn.Module) and not isinstance(functions, nn.ModuleList):
        kind = type(functions).__name__
        raise TypeError(
            f"{name} must be a list with one function per layer; got a single {kind}. For a stack of one "
            f"layer that is this {kind}, pass [module]; for one layer per child of it, pass list(module) "
            "(or an nn.ModuleList)"
        )
    if not isinstance(functions, Iterable):
        raise TypeError(f"{name} must be a list with one function per layer; got {type(functions).__name__}")
    modules = []
    for i, f in enumerate(functions):
        if isinstance(f, nn.Module):
            modules.append(f)
        elif callable(f):
            modules.append(_Function(f))
        else:
            raise TypeError(f"{name}[{i}] must be a callable (an nn.Module or a function); got {type(f).__name__}")
    return nn.ModuleList(modules)


def set_mode(model: nn.Module, mode: str | MemoryStrategy, *, memory_budget: float | None = None) -> nn.Module:
    """Switch every stack inside ``model`` that has a memory strategy to ``mode``; returns ``model``.

    A stack is any submodule with ``check_mode_allowed(mode)`` and ``set_mode(mode)`` (every
    :class:`ReversibleNet`, the plain stages of the model zoo). ``mode`` is a name of
    :data:`~revnets.autograd.strategy.MODES` or a :class:`~revnets.autograd.strategy.MemoryStrategy`
    (which the plain stages take by its ``mode``). ``memory_budget`` (if given) is set on every
    :class:`ReversibleNet` too (see :attr:`ReversibleNet.memory_budget`). All are checked before any is
    changed, so on error the model is left as it was.

    Raises:
        ValueError: unknown ``mode``, a bad ``memory_budget``, a stack that cannot run in them, or no
            stack in ``model``.
    """
    name = mode.mode if isinstance(mode, MemoryStrategy) else check_mode(mode)
    stacks = [m for m in model.modules() if callable(getattr(m, "check_mode_allowed", None))]
    if not stacks:
        raise ValueError(f"{type(model).__name__} contains no reversible stack whose mode could be set")
    if memory_budget is not None:
        check_memory_budget(memory_budget)
    strategies = {}
    for stack in stacks:
        if isinstance(stack, ReversibleNet):
            strategies[stack] = stack.strategy_for(mode, memory_budget)
        else:
            stack.check_mode_allowed(name)
    for stack in stacks:
        if isinstance(stack, ReversibleNet):
            stack.strategy = strategies[stack]
        else:
            stack.set_mode(name)
    return model


class _Function(nn.Module):
    """A parameter-free callable registered as a module."""

    def __init__(self, function: Callable[..., Tensor]):
        super().__init__()
        self.function = function

    def forward(self, *args, **kwargs):
        return self.function(*args, **kwargs)

    def extra_repr(self) -> str:
        return getattr(self.function, "__name__", repr(self.function))


class ReversibleNet(nn.Module):
    """Base class: a stack of invertible layers run by the shared engine.

    A subclass declares its scheme with :meth:`step`, its layers with :meth:`layers`, how an input
    becomes a state (:meth:`init_state`) and how a state becomes the output (:meth:`output`).
    With no layers (depth 0) the network is the identity, in every mode, as an empty ``nn.Sequential`` is.

    Keyword args (:class:`MemoryKeywords`, the memory strategy; one object holds them:
    :attr:`strategy`, a :class:`~revnets.autograd.strategy.MemoryStrategy`):
        strategy: a ready strategy (``Reversible(memory_budget=…)``, ``Exact(frac_bits=…)``,
            ``Checkpoint()``, ``Autograd()``), instead of the four keywords below.
        mode: ``"reversible"`` (default: activations are not stored; the backward inverts layer by
            layer), ``"autograd"`` (plain backpropagation, the reference) or ``"checkpoint"`` (store
            layer inputs, recompute each layer once).
        exact: hold the state in fixed point with ``frac_bits`` fractional bits so that inversion is
            bit-exact at any depth (needs ``mode="reversible"``).
        frac_bits: fractional bits of the fixed-point state when ``exact=True``; values must stay
            within ``±2^(46 − frac_bits)`` (an :class:`OverflowError` says so otherwise).
        memory_budget: the fraction in [0, 1] of the stack's autograd activation memory that reversible
            mode may keep: the last ``round(memory_budget · depth)`` layers keep their graphs (plain
            backpropagation, no recomputation) and the others are inverted. 0 (default) is fully
            reversible, 1 is plain autograd; time falls from about 4/3 of autograd's to autograd's as
            the budget grows, gradients are the same. Layers are assumed to hold equal activation
            memory (a stack repeats one block). Floating point only (``exact=True`` needs 0).

    Attribute ``keep_input`` (default ``False``): in floating-point reversible mode, also keep the
    input state and evaluate the first layer on it instead of on its reconstruction — one state
    more in memory, in exchange for no inversion rounding in the first layer (useful when the input
    has exactly constant channels, e.g. zero padding, that a normalisation layer would amplify).
    """

    keep_input: bool = False

    def __init__(self, **memory: Unpack[MemoryKeywords]):
        super().__init__()
        unknown = sorted(set(memory) - set(MemoryKeywords.__annotations__))
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected keyword argument(s) {', '.join(unknown)}")
        strategy = memory.pop("strategy", None)
        if strategy is None:
            strategy = memory_strategy(**memory)
        elif memory:
            raise ValueError(f"pass either strategy= or the keywords it replaces ({', '.join(sorted(memory))}), "
                             "not both")
        elif not isinstance(strategy, MemoryStrategy):
            raise TypeError(f"strategy must be a revnets.autograd.MemoryStrategy; got {type(strategy).__name__}")
        self.strategy = strategy

    # -- the declaration a subclass provides -------------------------------------------------------
    def step(self) -> Step:
        raise NotImplementedError

    def layers(self) -> tuple[tuple[Callable[..., Tensor], ...], ...]:
        raise NotImplementedError

    def coefficients(self) -> tuple[Tensor, ...]:
        """Parameters the step itself reads (shared by all layers); none by default."""
        return ()

    def init_state(self, x: Tensor) -> State:
        raise NotImplementedError

    def output(self, state: State) -> Tensor:
        raise NotImplementedError

    # -- shared behaviour -----------------------------------------------------------------------------
    def set_mode(self, mode: str | MemoryStrategy) -> ReversibleNet:
        """Switch the memory strategy (a name of :data:`~revnets.autograd.strategy.MODES`, keeping
        ``exact`` and ``frac_bits``, or a :class:`~revnets.autograd.strategy.MemoryStrategy`); returns self."""
        self.strategy = self.strategy_for(mode)
        return self

    def strategy_for(self, mode: str | MemoryStrategy, memory_budget: float | None = None) -> MemoryStrategy:
        """The strategy ``set_mode(mode)`` would give this network (with ``memory_budget`` if given), checked.

        Raises:
            ValueError: an unknown mode, one this network cannot run in, or a budget it cannot keep.
        """
        if isinstance(mode, MemoryStrategy):
            strategy = mode if memory_budget is None else memory_strategy(
                mode.mode, exact=mode.exact, frac_bits=getattr(mode, "frac_bits", FRAC_BITS_DEFAULT),
                memory_budget=memory_budget)
        else:
            check_mode(mode)
            if self.exact and mode != "reversible":
                raise ValueError(f"exact=True needs mode='reversible'; got mode={mode!r}")
            strategy = memory_strategy(mode, exact=self.exact, frac_bits=self.frac_bits,
                                       memory_budget=memory_budget or 0.0)
        self.validate_mode(strategy.mode)
        return strategy

    def check_mode_allowed(self, mode: str | MemoryStrategy) -> None:
        """Raise ``ValueError`` if this network cannot run in ``mode`` (unknown mode, exact needs reversible...)."""
        self.strategy_for(mode)

    def validate_mode(self, mode: str) -> None:
        """Hook for schemes that are not invertible in some configuration."""

    @property
    def mode(self) -> str:
        """The name of the memory strategy: ``"reversible"``, ``"autograd"`` or ``"checkpoint"``."""
        return self.strategy.mode

    @property
    def exact(self) -> bool:
        """Whether the state is held in fixed point (:class:`~revnets.autograd.strategy.Exact`)."""
        return self.strategy.exact

    @property
    def frac_bits(self) -> int:
        """Fractional bits of the fixed-point state (exact mode's, else the default used by :meth:`exact_state`)."""
        return self.strategy.frac_bits if isinstance(self.strategy, Exact) else FRAC_BITS_DEFAULT

    @property
    def memory_budget(self) -> float:
        """The fraction in [0, 1] of autograd's activation memory the reversible strategy keeps (0 otherwise)."""
        return self.strategy.memory_budget

    @memory_budget.setter
    def memory_budget(self, value: float) -> None:
        self.strategy = self.strategy_for(self.strategy, value)

    @property
    def depth(self) -> int:
        return len(self.layers())

    def stack(self) -> Stack:
        return Stack(self.step, self.layers(), self.coefficients())

    def forward_state(self, state: State, *args, **kwargs) -> State:
        """Run the layers on an explicit state (tuple of tensors) under the current strategy."""
        return engine.run(self.stack(), state, args, kwargs, strategy=self.strategy, keep_input=self.keep_input)

    def inverse_state(self, state: State, *args, **kwargs) -> State:
        """Reconstruct the input state of the layers from their output state (no graph).

        Normalisation layers keep their running statistics; randomness is not replayed, so call it
        on deterministic functions (``eval()`` mode for dropout).
        """
        return engine.invert(self.stack(), state, args, kwargs)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        """``x`` of shape ``(B, ...)`` to an output of the same shape; ``args``/``kwargs`` reach every function."""
        return self.output(self.forward_state(self.init_state(x), *args, **kwargs))

    def exact_state(self, x: Tensor) -> ExactState:
        """The fixed-point state of input ``x`` (``frac_bits`` fractional bits, empty buffers)."""
        return ExactState.from_float(self.init_state(x), self.frac_bits)

    def forward_exact(self, state: ExactState, *args, **kwargs) -> ExactState:
        """Run the layers in fixed point (no graph); :meth:`inverse_exact` undoes it bit for bit."""
        return engine.run_exact(self.stack(), state, args, kwargs)

    def inverse_exact(self, state: ExactState, *args, **kwargs) -> ExactState:
        """The bit-exact inverse of :meth:`forward_exact`."""
        return engine.invert_exact(self.stack(), state, args, kwargs)

    def extra_repr(self) -> str:
        budget = f", memory_budget={self.memory_budget}" if self.memory_budget else ""
        return f"depth={self.depth}, mode={self.mode!r}, exact={self.exact}{budget}"


class TwoStreamNet(ReversibleNet):
    """A scheme whose state is the two halves of the input along dim 1: ``(B, C, ...) -> 2 × (B, C/2, ...)``."""

    def init_state(self, x: Tensor) -> State:
        return split_channels(x)

    def output(self, state: State) -> Tensor:
        return join_channels(state)

    def inverse(self, y: Tensor, *args, **kwargs) -> Tensor:
        """Reconstruct the input ``x`` from the output ``y = self(x, *args, **kwargs)``."""
        return join_channels(self.inverse_state(split_channels(y, name="y"), *args, **kwargs))
