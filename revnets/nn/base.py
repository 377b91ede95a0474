"""The common user-facing contract of every reversible network."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import Tensor, nn

from ..autograd import engine
from ..autograd.engine import ExactState, Stack, check_mode
from ..autograd.exact import FRAC_BITS_DEFAULT
from ..steps.base import State, Step, join_channels, split_channels


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


def set_mode(model: nn.Module, mode: str, *, memory_budget: float | None = None) -> nn.Module:
    """Switch every stack inside ``model`` that has a memory strategy to ``mode``; returns ``model``.

    A stack is any submodule with ``check_mode_allowed(mode)`` and ``set_mode(mode)`` (every
    :class:`ReversibleNet`, the plain stages of the model zoo). ``memory_budget`` (if given) is set
    on every :class:`ReversibleNet` too (see :attr:`ReversibleNet.memory_budget`). All are checked
    before any is changed, so on error the model is left as it was.

    Raises:
        ValueError: unknown ``mode``, a bad ``memory_budget``, a stack that cannot run in them, or no
            stack in ``model``.
    """
    check_mode(mode)
    stacks = [m for m in model.modules() if callable(getattr(m, "check_mode_allowed", None))]
    if not stacks:
        raise ValueError(f"{type(model).__name__} contains no reversible stack whose mode could be set")
    budgeted = [m for m in stacks if isinstance(m, ReversibleNet)]
    if memory_budget is not None:
        check_memory_budget(memory_budget)
        for stack in budgeted:
            stack.check_memory_budget_allowed(memory_budget)
    for stack in stacks:
        stack.check_mode_allowed(mode)
    for stack in stacks:
        stack.set_mode(mode)
    if memory_budget is not None:
        for stack in budgeted:
            stack.memory_budget = memory_budget
    return model


def check_memory_budget(memory_budget: float) -> float:
    """Return ``memory_budget`` if it is a number in [0, 1], else raise a :class:`ValueError` saying so."""
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float)) or not 0 <= memory_budget <= 1:
        raise ValueError(
            "memory_budget must be a number in [0, 1], the fraction of the stack's autograd activation memory "
            f"that may be kept (0: fully reversible, 1: plain autograd); got {memory_budget!r}"
        )
    return float(memory_budget)


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

    Args:
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

    def __init__(
        self, *, mode: str = "reversible", exact: bool = False, frac_bits: int = FRAC_BITS_DEFAULT,
        memory_budget: float = 0.0,
    ):
        super().__init__()
        self.mode = check_mode(mode)
        if not isinstance(exact, bool):
            raise TypeError(f"exact must be True or False; got {exact!r}")
        if exact and mode != "reversible":
            raise ValueError(f"exact=True holds the state in fixed point for exact inversion and needs mode='reversible'; got mode={mode!r}")
        if not (isinstance(frac_bits, int) and 0 <= frac_bits <= 40):
            raise ValueError(f"frac_bits must be an integer in [0, 40]; got {frac_bits!r}")
        self.exact = exact
        self.frac_bits = frac_bits
        self.check_memory_budget_allowed(check_memory_budget(memory_budget))
        self.memory_budget = float(memory_budget)

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
    def set_mode(self, mode: str) -> ReversibleNet:
        """Switch the memory strategy (``"reversible"``, ``"autograd"``, ``"checkpoint"``); returns self."""
        self.check_mode_allowed(mode)
        self.mode = mode
        return self

    def check_memory_budget_allowed(self, memory_budget: float) -> None:
        """Raise ``ValueError`` if this network cannot keep part of its graph (exact mode)."""
        if self.exact and memory_budget > 0:
            raise ValueError(
                f"memory_budget={memory_budget!r} keeps floating-point graphs of the last layers, which exact=True "
                "(fixed-point state, bit-exact inversion) cannot mix with; use memory_budget=0 or exact=False"
            )

    def check_mode_allowed(self, mode: str) -> None:
        """Raise ``ValueError`` if this network cannot run in ``mode`` (unknown mode, exact needs reversible...)."""
        check_mode(mode)
        if self.exact and mode != "reversible":
            raise ValueError(f"exact=True needs mode='reversible'; got mode={mode!r}")
        self.validate_mode(mode)

    def validate_mode(self, mode: str) -> None:
        """Hook for schemes that are not invertible in some configuration."""

    @property
    def depth(self) -> int:
        return len(self.layers())

    def stack(self) -> Stack:
        return Stack(self.step, self.layers(), self.coefficients())

    def forward_state(self, state: State, *args, **kwargs) -> State:
        """Run the layers on an explicit state (tuple of tensors) under the current mode."""
        frac_bits = self.frac_bits if self.exact else None
        return engine.run(
            self.stack(), state, args, kwargs, mode=self.mode, frac_bits=frac_bits, keep_input=self.keep_input,
            memory_budget=self.memory_budget,
        )

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
