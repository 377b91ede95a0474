"""The one engine that runs every reversible scheme.

A :class:`Stack` is a step declaration (:class:`revnets.steps.Step`) and the functions of each layer.
The engine runs it under one of three memory strategies (``mode``):

``"reversible"``
    The forward runs without building a graph and keeps only the final state. The backward walks
    the layers in reverse: for each update ``s_i <- a·s_i + u(s_{j≠i})`` it evaluates ``u`` once with
    autograd on, uses that value to rebuild ``s_i`` (``(s_i' − u)/a``) and takes the vector-Jacobian
    product of the same evaluation. Memory held after the forward does not depend on depth; the
    cost is one extra evaluation of every function (about 4/3 of plain backprop). The stack is a
    chain of autograd nodes (:class:`_ReversibleFunction`, one per chunk of about
    :data:`_CHUNK_PARAMETERS` parameters) that hand each other the state outside autograd
    (:class:`_Chain`), ended by :class:`_SavedOutput`, the one node that keeps the output state:
    parameter gradients reach autograd chunk by chunk, and each state tensor is freed as soon as
    its reconstruction replaces it.
``"autograd"``
    Plain backpropagation through the same updates: the reference.
``"checkpoint"``
    :func:`torch.utils.checkpoint.checkpoint` (non-reentrant) around every layer: the layer inputs
    are stored and each layer is recomputed once in the backward.

Every recomputation replays the random number generators and the autocast state of the forward and
never updates normalisation running statistics a second time. Gradients are returned through
autograd (``loss.backward()`` and :func:`torch.autograd.grad` alike), never accumulated into
``.grad`` as a side effect.

With fixed-point arithmetic (``frac_bits`` given) the state is held as int64 tensors
``q = round(s·2^frac_bits)``; the increments are quantised, multiplication by a scale ``n/d`` pushes
the lost bits into an :class:`~revnets.autograd.exact.InformationBuffer`, and the inversion is
bit-exact at any depth. The gradients are those of the real-valued scheme evaluated along the exact
trajectory (quantisation treated as the identity).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.utils import _pytree as pytree
from torch.utils.checkpoint import checkpoint

from ..steps.base import State, Step, Update, times_constant
from .exact import (
    InformationBuffer,
    add_exact,
    dequantize,
    exact_ratio,
    quantize,
    scale_add_exact,
    scale_exact,
    unscale_exact,
    unscale_sub_exact,
)
from .replay import (
    AutocastState,
    LayerSeeds,
    accelerator_devices,
    preserved_running_stats,
    running_stat_modules,
    submodules,
)

MODES = ("reversible", "autograd", "checkpoint")

Functions = tuple[Callable[..., Tensor], ...]


def check_mode(mode: str) -> str:
    """Return ``mode`` if it is one of :data:`MODES`, else raise a :class:`ValueError` naming them."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(repr(m) for m in MODES)}; got {mode!r}")
    return mode


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
        per_layer = tuple(indices(_layer_parameters(fns)) + shared for fns in self.layers)
        return tuple(params), per_layer

    def trainable_parameter_ids(self) -> set[int]:
        """The ids of the distinct trainable parameters (those :meth:`parameters` returns), without indexing them."""
        return {id(p) for fns in self.layers for p in _layer_parameters(fns) if p.requires_grad} | {
            id(p) for p in self.coefficients if p.requires_grad}

    def has_trainable_parameters(self) -> bool:
        """Whether a parameter of the functions or a coefficient requires grad (stops at the first)."""
        return any(p.requires_grad for p in self.coefficients) or any(
            p.requires_grad for fns in self.layers for p in _layer_parameters(fns))

    def norm_modules(self):
        return running_stat_modules(f for fns in self.layers for f in fns)


# --------------------------------------------------------------------------------------------------
# Arithmetic: how an update is applied to, and removed from, a state component.


class _FloatArithmetic:
    """Floating-point state: ``a·s + u`` and ``(s' − u)/a``."""

    @staticmethod
    def view(component: Tensor) -> Tensor:
        return component

    @staticmethod
    def copy_increment(update: Update, tensors: tuple[Tensor, ...]) -> Tensor:
        """The increment of an update that adds a component (``Update.copy``): that component."""
        return tensors[update.source]

    @staticmethod
    def apply(j: int, update: Update, old: Tensor, buffer: None, increment: Tensor, where: str):
        return update.combine(old, increment), buffer

    @staticmethod
    def undo(j: int, update: Update, new: Tensor, buffer: None, increment: Tensor, where: str):
        return update.uncombine(new, increment), buffer

    @staticmethod
    def all_finite(tensors: tuple[Tensor, ...]) -> bool:
        """Whether every component is free of NaN/inf: one float32 sum per component and one
        synchronisation (an exact per-element test only if the sum overflowed)."""
        total = tensors[0].sum()
        for component in tensors[1:]:
            total = total + component.sum()
        return bool(torch.isfinite(total)) or all(bool(torch.isfinite(c).all()) for c in tensors)

    @classmethod
    def check_finite(cls, tensors: tuple[Tensor, ...], increments: list[Tensor], where: str, during: str) -> None:
        """Raise if a reconstructed state holds NaN or inf, saying why.

        ``increments``: the function values the reconstruction used; if one of them is non-finite, the
        function returned it (on finite inputs, since the state was finite one layer earlier), otherwise
        the reconstruction itself was amplified to overflow. ``during``: "while inverting" or
        "when re-evaluated in the backward".
        """
        if cls.all_finite(tensors):
            return
        if any(not torch.isfinite(u).all() for u in increments):
            raise FloatingPointError(
                f"{where}: a function returned a non-finite value (NaN/inf) {during}, on a finite input"
                + ("" if during == "while inverting" else " although the forward's values were finite")
                + ": it is not deterministic (randomness from outside torch's generators, state changed since the "
                "forward, a different path in eval mode) or it overflows on this input"
            )
        raise FloatingPointError(
            f"non-finite value met while inverting {where}: the reconstruction was amplified until it overflowed "
            "(inverting an update divides by its scale, so a scale close to 0, such as a small γ, amplifies rounding "
            "errors exponentially with depth); use a larger γ, fewer layers or float64, or exact=True, which "
            "inverts bit for bit"
        )


@dataclass(frozen=True)
class _FixedPointArithmetic:
    """Fixed-point state: ``q' = scale_exact(q, n/d) + round(c·u·2^F)`` and its exact inverse.

    An update adding a component (``x ← x + v``) makes the floating-point view of its result in the same
    pass (:func:`~revnets.autograd.exact.add_exact`); the arithmetic keeps the last such view and hands it
    out once, to the next :meth:`view` of that very tensor (the engine never modifies a state tensor in
    place: every update makes new ones), instead of dequantising again.
    """

    frac_bits: int
    dtype: torch.dtype
    ratios: tuple[Fraction, ...]
    _made_view: list = field(default_factory=lambda: [None, None], init=False, compare=False, repr=False)
    """``[tensor, view]``: the view an update made of its result ``tensor``, until handed out."""

    @classmethod
    def for_step(cls, step: Step, frac_bits: int, dtype: torch.dtype) -> _FixedPointArithmetic:
        return cls(frac_bits, dtype, tuple(exact_ratio(u.scale, name="the update's scale (γ for MomentumNet)") for u in step.updates))

    def view(self, component: Tensor) -> Tensor:
        """``dequantize(component)``: the view the last update made of it if that is ``component``, once."""
        made = self._made_view
        if made[0] is component:
            view, made[:] = made[1], (None, None)
            return view
        return dequantize(component, self.frac_bits, self.dtype)

    def _keep_view(self, tensor: Tensor, view: Tensor | None) -> None:
        self._made_view[:] = (tensor, view) if view is not None else (None, None)

    def copy_increment(self, update: Update, tensors: tuple[Tensor, ...]) -> Tensor:
        """The increment of an update that adds a component (``Update.copy``): with an integer gain, the
        fixed-point integers themselves times the gain (exact, no dequantise/quantise round trip);
        otherwise the component's floating-point view, quantised with the gain as any increment."""
        gain = update.gain
        if not isinstance(gain, Tensor) and float(gain).is_integer():
            source = tensors[update.source]
            return source if gain == 1 else source * int(gain)
        return self.view(tensors[update.source])

    def apply(self, j: int, update: Update, old: Tensor, buffer: InformationBuffer, increment: Tensor, where: str):
        if increment.dtype != torch.int64:  # a function's output: quantised, in one pass where possible
            return scale_add_exact(old, self.ratios[j], buffer, increment.detach().to(self.dtype), self.frac_bits,
                                   gain=update.gain, what=f"the output of a function at {where}",
                                   result=f"the state after {where}")  # every state is checked: old too
        if self.ratios[j] != 1:  # copy_increment: already exact
            old, buffer = scale_exact(old, self.ratios[j], buffer, input_in_range=True)
        new, view = add_exact(old, increment, self.frac_bits, self.dtype, what=f"the state after {where}")
        self._keep_view(new, view)
        return new, buffer

    def undo(self, j: int, update: Update, new: Tensor, buffer: InformationBuffer, increment: Tensor, where: str):
        if increment.dtype != torch.int64:
            return unscale_sub_exact(new, self.ratios[j], buffer, increment.detach().to(self.dtype), self.frac_bits,
                                     gain=update.gain, what=f"the output of a function at {where}")
        if self.ratios[j] != 1:
            return unscale_exact(new - increment, self.ratios[j], buffer)
        old, view = add_exact(new, increment, self.frac_bits, self.dtype, subtract=True)
        self._keep_view(old, view)
        return old, buffer

    @staticmethod
    def all_finite(tensors: tuple[Tensor, ...]) -> bool:
        """Integers are always finite; non-finite increments are caught by :func:`quantize`."""
        return True

    @staticmethod
    def check_finite(tensors: tuple[Tensor, ...], increments: list[Tensor], where: str, during: str) -> None:
        """Integers are always finite; non-finite increments are caught by :func:`quantize`."""


@dataclass(frozen=True)
class ExactState:
    """A state in fixed point, with everything needed to invert it bit for bit.

    Attributes:
        tensors: int64 tensors ``q = round(s·2^frac_bits)``, one per state component.
        buffers: the information buffer of each component (bits pushed out by scales ``|n/d| ≠ 1``).
        frac_bits: number of fractional bits ``F``.
        dtype: floating dtype in which the functions are evaluated.
    """

    tensors: tuple[Tensor, ...]
    buffers: tuple[InformationBuffer, ...]
    frac_bits: int
    dtype: torch.dtype

    @classmethod
    def from_float(cls, state: State, frac_bits: int) -> ExactState:
        """Quantise a floating-point state (empty buffers)."""
        dtype = state[0].dtype
        tensors = tuple(quantize(s.detach(), frac_bits, what="the input state") for s in state)
        return cls(tensors, tuple(InformationBuffer.empty(q) for q in tensors), frac_bits, dtype)

    def to_float(self) -> State:
        """Dequantise to the functions' dtype."""
        return tuple(dequantize(q, self.frac_bits, self.dtype) for q in self.tensors)

    def buffer_bits(self) -> int:
        """Total number of bits held in the information buffers."""
        return sum(b.bits() for b in self.buffers)

    def equal(self, other: ExactState) -> bool:
        """Bit-for-bit equality of the fixed-point tensors."""
        return all(torch.equal(a, b) for a, b in zip(self.tensors, other.tensors, strict=True))


# --------------------------------------------------------------------------------------------------
# The three loops every mode is made of.


def _replace(values: tuple, index: int, value: Any) -> tuple:
    return values[:index] + (value,) + values[index + 1 :]


def _forward_layers(step, layers, first, tensors, buffers, args, kwargs, arithmetic, seeds: LayerSeeds | None = None):
    """Run ``layers`` (numbered from ``first``) forward.

    ``seeds``: seed the generators before each update (inside ``seeds.forked()``, which the caller
    enters).
    """
    float_state = type(arithmetic) is _FloatArithmetic  # the functions see the state itself
    tensors, buffers = list(tensors), list(buffers)
    for k, functions in enumerate(layers, start=first):
        where = f"layer {k}"
        for j, update in enumerate(step.updates):
            t = update.target
            if update.source is not None:
                increment = arithmetic.copy_increment(update, tensors)
            else:
                views = tensors if float_state else [c if i == t else arithmetic.view(c) for i, c in enumerate(tensors)]
                if seeds is not None:
                    seeds.seed(k, j)
                increment = update.increment(views, functions, args, kwargs, where=where)
            tensors[t], buffers[t] = arithmetic.apply(j, update, tensors[t], buffers[t], increment, where)
        if step.order is not None:
            tensors, buffers = list(step.permute(tensors)), list(step.permute(buffers))
    return tuple(tensors), tuple(buffers)


def _inverse_layers(step, layers, tensors, buffers, args, kwargs, arithmetic, *, first: int = 0,
                    seeds: LayerSeeds | None = None, during: str = "while inverting"):
    """Reconstruct the input state of ``layers`` (numbered from ``first``) from their output state (no
    graph), checking the state after every layer. ``seeds``: replay the forward's random numbers (inside
    ``seeds.forked()``); ``during``: how error messages name the evaluation."""
    if not arithmetic.all_finite(tensors):
        raise FloatingPointError("the state to invert holds NaN/inf: no input can be reconstructed from it (the "
                                 "forward that produced it already went wrong)")
    for k in reversed(range(first, first + len(layers))):
        where = f"layer {k}"
        tensors, buffers = step.unpermute(tensors), step.unpermute(buffers)
        increments = []
        for j in reversed(range(len(step.updates))):
            update = step.updates[j]
            t = update.target
            if update.source is not None:
                increment = arithmetic.copy_increment(update, tensors)
            else:
                views = tuple(c if i == t else arithmetic.view(c) for i, c in enumerate(tensors))
                if seeds is not None:
                    seeds.seed(k, j)
                increment = update.increment(views, layers[k - first], args, kwargs, where=where)
            increments.append(increment)
            old, buffer = arithmetic.undo(j, update, tensors[t], buffers[t], increment, where)
            tensors, buffers = _replace(tensors, t, old), _replace(buffers, t, buffer)
        arithmetic.check_finite(tensors, increments, where, during)
    return tensors, buffers


# Non-finite values never leave a state: an update ``s_i <- a·s_i + c·u`` with ``a != 0`` keeps NaN/inf in
# ``s_i`` (inf + finite = inf, inf − inf = NaN), and so does its inverse ``(s_i − c·u)/a``. A run whose last
# state is finite therefore had finite states throughout: the forward checks only its output. The backward
# checks its reconstruction after every layer when the state is large (a check costs little beside the
# layer, and keeping an older state for the diagnosis would cost a state of memory), and every
# ``_CHECK_EVERY`` layers when it is small (at most ``_CHECK_EVERY_LAYER_NUMEL`` elements per component:
# there a check would cost as much as a layer); only once NaN/inf was found are the layers in between run
# again, checked one by one, to name the first that produced it.
_CHECK_EVERY = 8
_CHECK_EVERY_LAYER_NUMEL = 1 << 16


def _first_non_finite_layer(step, layers, first, state, args, kwargs, seeds: LayerSeeds) -> str:
    """Where a floating-point forward of ``layers`` (numbered from ``first``) whose output holds NaN/inf
    first produced it: run it again from its input ``state`` (with the same random numbers, inside
    ``seeds.forked()``), checking every layer."""
    arithmetic = _FloatArithmetic()
    if not arithmetic.all_finite(state):
        return "the stack's input already holds NaN/inf"
    tensors, buffers = state, (None,) * len(state)
    for k, functions in enumerate(layers, start=first):
        tensors, buffers = _forward_layers(step, (functions,), k, tensors, buffers, args, kwargs, arithmetic, seeds)
        if not arithmetic.all_finite(tensors):
            return f"the state first became non-finite at layer {k} (a function returned NaN/inf or the state overflowed)"
    return ("its output held NaN/inf, but a second run of the same forward did not: a function is not deterministic "
            "(randomness from outside torch's generators, or state changed by the first run)")


@dataclass(frozen=True)
class _BackwardUpdate:
    """What the backward needs to know of update ``index`` of a step, worked out once per backward."""

    update: Update
    index: int
    others: tuple[int, ...]
    """The components ``u`` reads (all but the target)."""
    copies: bool
    """``u`` adds another component with constant scale and gain: nothing to re-evaluate, its VJP is ``c·g``."""
    learnable_scale: bool
    learnable_gain: bool

    @classmethod
    def plan(cls, step: Step, n_state: int) -> tuple[_BackwardUpdate, ...]:
        """The updates of ``step`` in the order the backward undoes them (last first)."""
        plans = []
        for j, u in enumerate(step.updates):
            learnable_scale, learnable_gain = _is_learnable(u.scale), _is_learnable(u.gain)
            plans.append(cls(u, j, tuple(i for i in range(n_state) if i != u.target),
                             u.source is not None and not learnable_scale and not learnable_gain,
                             learnable_scale, learnable_gain))
        return tuple(reversed(plans))


def _backward_layers(run, tensors: list, buffers: list, grads: list, args, kwargs, arg_leaves, arithmetic, seeds,
                     kept_input=None):
    """The memory-free backward: invert layer by layer, one evaluation of each function.

    ``tensors``, ``buffers`` and ``grads`` (the output state, its buffers and gradients; ``None`` for a
    gradient that is zero) are lists that are rewritten in place, so that no caller keeps a state alive:
    on return they hold the reconstructed input state, its buffers and its gradients. ``kept_input``:
    the input state, if kept; in the first layer, a component is then taken from it as soon as no update
    left to undo targets it, so that the first layer's functions see the exact input.

    Returns the accumulated gradients of ``arg_leaves`` and of ``run.params`` (``None`` where unused).
    """
    stack, first = run.stack, run.first
    param_grads: list[Tensor | None] = [None] * len(run.params)
    arg_grads: list[Tensor | None] = [None] * len(arg_leaves)
    trainable_args = [i for i, a in enumerate(arg_leaves) if a.requires_grad]
    step = plans = None
    every_layer = tensors[0].numel() > _CHECK_EVERY_LAYER_NUMEL
    checked = None if every_layer else (len(stack.layers), tuple(tensors), tuple(buffers))  # last finite state
    for local in reversed(range(len(stack.layers))):
        k = first + local  # the layer's number in the whole stack (seeds, messages)
        where = f"layer {k}"
        if step is None or stack.coefficients:  # learnable coefficients enter each layer's graph afresh
            with torch.enable_grad():
                step = stack.step()
            plans = _BackwardUpdate.plan(step, len(tensors))
        layer_param_indices = run.layer_params[local]
        layer_numel = sum(run.params[i].numel() for i in layer_param_indices)
        if step.order is not None:
            for values in (tensors, buffers, grads):
                values[:] = step.unpermute(tuple(values))
        increments = []
        for plan in plans:
            update, j, t = plan.update, plan.index, plan.update.target
            if k == 0 and kept_input is not None:
                pending = {u.target for u in step.updates[: j + 1]}
                tensors[:] = [c if i in pending else kept_input[i] for i, c in enumerate(tensors)]
            g = grads[t]
            # s_t' = a·s_t + c·u(others): the gradient of s_t is a·g; u and a, c (if learnable) get VJPs.
            if plan.copies:  # u = s[source] (x <- x + v)
                increment = arithmetic.copy_increment(update, tensors)
                old, buffer = arithmetic.undo(j, update, tensors[t], buffers[t], increment, where)
                grads[update.source] = _add_scaled(grads[update.source], g, update.gain)
            else:
                if update.calls_functions:
                    seeds.seed(k, j)
                with torch.enable_grad() if g is not None else torch.no_grad():  # a zero gradient needs no VJP
                    leaves = [c if i == t else arithmetic.view(c).detach().requires_grad_(g is not None)
                              for i, c in enumerate(tensors)]
                    increment = update.increment(leaves, stack.layers[local], args, kwargs, where=where)
                    gained = update.gain * increment if plan.learnable_gain and g is not None else None
                value = increment.detach()
                increments.append(value)
                if plan.learnable_scale or g is None:  # its VJP reads the old value
                    old, buffer = arithmetic.undo(j, update, tensors[t], buffers[t], value, where)
                if g is not None:
                    factor = 1  # the gain, where it scales the VJP's results rather than g
                    if gained is not None:
                        outputs, output_grads = [gained], [g]
                    elif (not plan.learnable_scale and not isinstance(update.gain, Tensor) and g.dtype == increment.dtype
                          and g.numel() > layer_numel):
                        # c·VJP(g) rather than VJP(c·g) when g outweighs the parameters: no c·g tensor held through
                        # the VJP (the peak of the backward), the state's gradients take c in their accumulation
                        # (one kernel) and only the smaller parameter gradients are multiplied
                        factor, outputs, output_grads = update.gain, [increment], [g]
                    else:
                        increment_grad = update.gain_gradient(g)
                        if increment_grad.dtype != increment.dtype:
                            increment_grad = increment_grad.to(increment.dtype)
                        outputs, output_grads = [increment], [increment_grad]
                    if plan.learnable_scale:
                        outputs.append(update.scale)
                        output_grads.append((g * arithmetic.view(old)).sum().to(update.scale.dtype))
                    inputs = [*(leaves[i] for i in plan.others), *(run.params[i] for i in layer_param_indices),
                              *(arg_leaves[i] for i in trainable_args)]
                    results = torch.autograd.grad(outputs, inputs, output_grads, allow_unused=True)
                    del outputs, output_grads, gained, increment, leaves  # the graph is freed before the undo
                    for i, result in zip(plan.others, results):
                        grads[i] = _add_scaled(grads[i], result, factor)
                    n_others = len(plan.others)
                    for i, result in zip(layer_param_indices, results[n_others:]):
                        param_grads[i] = _add_scaled(param_grads[i], result, factor)
                    for i, result in zip(trainable_args, results[n_others + len(layer_param_indices):]):
                        arg_grads[i] = _add_scaled(arg_grads[i], result, factor)
                    if not plan.learnable_scale:
                        old, buffer = arithmetic.undo(j, update, tensors[t], buffers[t], value, where)
            grads[t] = None if g is None else update.scale_gradient(g)
            tensors[t], buffers[t] = old, buffer
        if every_layer:
            arithmetic.check_finite(tensors, increments, where, "when re-evaluated in the backward")
        elif k % _CHECK_EVERY == 0 or local == 0:
            if not arithmetic.all_finite(tensors):  # re-invert from the last finite state to name the layer
                end, finite_tensors, finite_buffers = checked
                _inverse_layers(step, stack.layers[local:end], finite_tensors, finite_buffers, args, kwargs,
                                arithmetic, first=k, seeds=seeds, during="when re-evaluated in the backward")
            checked = (local, tuple(tensors), tuple(buffers))
    return arg_grads, param_grads


def _is_learnable(scale) -> bool:
    return isinstance(scale, Tensor) and scale.requires_grad


def _add_scaled(total: Tensor | None, value: Tensor | None, factor) -> Tensor | None:
    """``total + factor·value`` for a constant ``factor`` (``None`` stands for zero), one kernel when both
    exist and ``factor`` is a number; ``value`` itself is never modified (it may be a gradient autograd holds)."""
    if value is None:
        return total
    if total is None:
        return times_constant(factor, value)
    if isinstance(factor, Tensor):
        return total + times_constant(factor, value)
    return total + value if factor == 1 else torch.add(total, value, alpha=factor)


# --------------------------------------------------------------------------------------------------
# The autograd function of the reversible mode.


_CHUNK_PARAMETERS = 1 << 20
"""Parameters per autograd node of a reversible stack: consecutive layers are grouped into chunks of at least
this many parameter elements (1 Mi: 4 MiB of float32 gradients) or the rest of the stack. Each chunk
hands its parameters' gradients to autograd as soon as its backward ends, so gradient hooks (DDP's
reductions) fire progressively and the engine holds one chunk's parameter gradients at a time; small
layers share a node, whose fixed cost (about 0.3 ms on a CPU) would otherwise dominate them."""


def _chunks(params: tuple[Tensor, ...], layer_params: tuple[tuple[int, ...], ...]) -> list[tuple[int, int]]:
    """``(first, end)`` layer ranges of the chunks: each gathers at least :data:`_CHUNK_PARAMETERS`
    elements of parameters new to it (the last may have fewer)."""
    ranges, first, seen, size = [], 0, set(), 0
    for k, indices in enumerate(layer_params):
        size += sum(params[i].numel() for i in indices if i not in seen)
        seen.update(indices)
        if size >= _CHUNK_PARAMETERS or k == len(layer_params) - 1:
            ranges.append((first, k + 1))
            first, seen, size = k + 1, set(), 0
    return ranges


@dataclass
class _Chain:
    """What the chunks of one reversible stack call hand each other outside autograd.

    Attributes:
        forward_state: in fixed point, the exact state (tensors, buffers) a chunk's forward ended with,
            which the next chunk continues from (its floating-point input only links the graph).
        boundaries: in the backward, the state (tensors, buffers) a chunk is to start from, keyed by the
            number of the layer it enters: the output of the stack (left by :class:`_SavedOutput`), then
            the input each chunk reconstructed, which is the output of the chunk before it.
        non_finite: where the forward first produced NaN/inf, if it did.
    """

    forward_state: tuple | None = None
    boundaries: dict[int, tuple] = field(default_factory=dict)
    non_finite: str | None = None


@dataclass(frozen=True)
class _Run:
    """One chunk of a call of a reversible stack: its layers, how its flat inputs are laid out, the arithmetic.

    ``first`` is the number of the chunk's first layer in the whole stack, ``chain`` what the chunks of
    the call share (the last chunk's output state goes to :class:`_SavedOutput`).
    """

    stack: Stack
    n_state: int
    arg_spec: Any
    arg_template: tuple
    params: tuple[Tensor, ...]
    layer_params: tuple[tuple[int, ...], ...]
    frac_bits: int | None
    seeds: LayerSeeds
    chain: _Chain
    first: int = 0
    norm_modules: tuple = field(default=())
    keep_input: bool = False

    def parameters_changed(self) -> bool:
        """Whether the chunk's trainable parameters are no longer the tensors recorded by the forward."""
        return self.stack.trainable_parameter_ids() != {id(p) for p in self.params}

    def arguments(self, tensors: Sequence[Tensor]) -> tuple[tuple, dict]:
        """Rebuild ``(args, kwargs)`` with ``tensors`` in place of their tensor leaves."""
        supply = iter(tensors)
        leaves = [next(supply) if isinstance(v, Tensor) else v for v in self.arg_template]
        return pytree.tree_unflatten(leaves, self.arg_spec)


def _sharded_functions(stack: Stack) -> bool:
    """Whether a module inside ``stack``'s functions is an FSDP2 unit (``fully_shard``)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch built without distributed
        return False
    return any(isinstance(m, FSDPModule) for fns in stack.layers for f in fns if isinstance(f, nn.Module)
               for m in f.modules())


def _substituted_parameters(mode: str) -> RuntimeError:
    return RuntimeError(
        f"the parameters of the {mode} stack's functions are not the tensors its forward used (substituted with "
        "torch.func.functional_call or reassigned before backward); the backward re-evaluates the modules and "
        "would differentiate the wrong weights: use mode='autograd'"
    )


def _layer_parameters(functions: Functions) -> tuple[Tensor, ...]:
    """The parameters of the modules among ``functions`` (``Module.parameters()`` order; a parameter
    reached twice is listed twice), as the modules hold them now (see :func:`submodules`)."""
    found: list[Tensor] = []
    for module in submodules(functions):
        for p in module._parameters.values():
            if p is not None:
                found.append(p)
    return tuple(found)


class _ReversibleFunction(torch.autograd.Function):
    """One chunk of a reversible stack (:class:`_Run`): the forward keeps no state; the backward takes its
    output state from the chain (:class:`_Chain`), inverts its layers and leaves their input state there
    for the chunk before it."""

    @staticmethod
    def forward(ctx, run: _Run, *inputs: Tensor):
        n_args = len(inputs) - run.n_state - len(run.params)
        state = inputs[: run.n_state]
        arg_tensors = inputs[run.n_state : run.n_state + n_args]
        args, kwargs = run.arguments(arg_tensors)
        ctx.autocast = AutocastState.capture(accelerator_devices(state))
        ctx.run = run
        ctx.set_materialize_grads(False)  # a gradient autograd has none of stays None (no zero tensor)
        step, chain = run.stack.step(), run.chain
        if run.frac_bits is None:
            arithmetic = _FloatArithmetic()
            tensors, buffers = tuple(state), (None,) * len(state)
        else:
            arithmetic = _FixedPointArithmetic.for_step(step, run.frac_bits, state[0].dtype)
            if run.first == 0:
                exact = ExactState.from_float(state, run.frac_bits)
                tensors, buffers = exact.tensors, exact.buffers
            else:  # continue bit for bit from the previous chunk, not from its dequantised output
                (tensors, buffers), chain.forward_state = chain.forward_state, None
        with run.seeds.forked():
            tensors, buffers = _forward_layers(step, run.stack.layers, run.first, tensors, buffers, args, kwargs,
                                               arithmetic, run.seeds)
            if chain.non_finite is None and not arithmetic.all_finite(tensors):
                with preserved_running_stats(run.norm_modules):
                    chain.non_finite = _first_non_finite_layer(step, run.stack.layers, run.first, tuple(state), args,
                                                               kwargs, run.seeds)
        ctx.arithmetic = arithmetic
        if run.frac_bits is not None:
            chain.forward_state = (tensors, buffers)
        ctx.save_for_backward(*arg_tensors, *(state if run.keep_input else ()))
        return tuple(arithmetic.view(c) for c in tensors)

    @staticmethod
    @once_differentiable
    def backward(ctx, *output_grads: Tensor | None):
        run: _Run = ctx.run
        if run.parameters_changed():
            raise _substituted_parameters("reversible")
        if run.chain.non_finite is not None:
            raise FloatingPointError(
                f"non-finite value (NaN/inf) in the backward of a reversible stack: the forward already produced it "
                f"({run.chain.non_finite}); this is not an inversion error. Check the input and the weights "
                "(a diverging learning rate makes them non-finite)"
            )
        arg_tensors = list(ctx.saved_tensors)
        kept_input = tuple(c.detach() for c in arg_tensors[len(arg_tensors) - run.n_state :]) if run.keep_input else None
        if run.keep_input:
            del arg_tensors[len(arg_tensors) - run.n_state :]
        tensors, buffers = (list(v) for v in run.chain.boundaries.pop(run.first + len(run.stack.layers)))
        arithmetic = ctx.arithmetic
        arg_leaves = tuple(
            a.detach().requires_grad_() if ctx.needs_input_grad[1 + run.n_state + i] else a.detach()
            for i, a in enumerate(arg_tensors)
        )
        args, kwargs = run.arguments(arg_leaves)
        grads = list(output_grads)
        del output_grads  # the lists own the state and its gradients: rewritten layer by layer
        with ctx.autocast.restored(), run.seeds.forked(), preserved_running_stats(run.norm_modules):
            arg_grads, param_grads = _backward_layers(run, tensors, buffers, grads, args, kwargs, arg_leaves,
                                                      arithmetic, run.seeds, kept_input)
        if run.first > 0 and any(ctx.needs_input_grad[1 : 1 + run.n_state]):  # the previous chunk's backward runs
            run.chain.boundaries[run.first] = (tuple(tensors), tuple(buffers))
        del tensors, buffers
        offset = 1 + run.n_state
        if any(g is None for g in param_grads) and _sharded_functions(run.stack):
            raise RuntimeError(
                "a function of this reversible stack is its own FSDP unit (fully_shard applied inside the stack): "
                "FSDP swaps in gathered parameters for the backward's recomputation and reduces only their .grad, "
                "so the parameters the engine recorded would silently get no gradient; shard the whole stack "
                "instead (fully_shard(net) on the reversible network, as revnets.training.fsdp does)"
            )
        state_grads = [g if ctx.needs_input_grad[1 + i] else None for i, g in enumerate(grads)]
        arg_grads = [g if ctx.needs_input_grad[offset + i] else None for i, g in enumerate(arg_grads)]
        offset += len(arg_tensors)
        param_grads = [g if ctx.needs_input_grad[offset + i] else None for i, g in enumerate(param_grads)]
        return (None, *state_grads, *arg_grads, *param_grads)


class _SavedOutput(torch.autograd.Function):
    """The end of a reversible stack: the one node that keeps its output state (and, in fixed point, the
    exact state and buffers) for the backward, as ``save_for_backward`` does (refusing outputs modified
    in place since, and keeping them for a backward with ``retain_graph=True``). Its backward, which runs
    first, hands the state to the last chunk through the chain and returns the gradients unchanged, so
    that autograd drops its reference at once: each tensor of the state is then freed as soon as the
    chunks' backward has replaced it by its reconstruction."""

    @staticmethod
    def forward(ctx, chain: _Chain, depth: int, *outputs: Tensor):
        ctx.set_materialize_grads(False)
        ctx.chain, ctx.depth = chain, depth
        exact, chain.forward_state = chain.forward_state, None
        ctx.buffers = None if exact is None else exact[1]
        ctx.save_for_backward(*(outputs if exact is None else exact[0]))
        return tuple(c.view_as(c) for c in outputs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: Tensor | None):
        tensors = ctx.saved_tensors
        ctx.chain.boundaries[ctx.depth] = (tensors, (None,) * len(tensors) if ctx.buffers is None else ctx.buffers)
        return (None, None, *grads)


# --------------------------------------------------------------------------------------------------
# Public entry points.


def run(
    stack: Stack,
    state: State,
    args: tuple = (),
    kwargs: dict | None = None,
    *,
    mode: str = "reversible",
    frac_bits: int | None = None,
    keep_input: bool = False,
    memory_budget: float = 0.0,
) -> State:
    """Run ``stack`` on ``state`` under the memory strategy ``mode``.

    Args:
        stack: the step declaration and the layers' functions.
        state: the input state, a tuple of tensors.
        args, kwargs: extra arguments passed to every function (tensors among them, also nested in
            lists, tuples and dicts, receive gradients).
        mode: ``"reversible"``, ``"autograd"`` or ``"checkpoint"``.
        frac_bits: if given, run in fixed point with this many fractional bits (reversible mode or
            no gradient only); the output is dequantised.
        keep_input: reversible mode in floating point: also keep the input state, and evaluate the
            first layer's functions on it rather than on its reconstruction (one state more in memory;
            inversion rounding then never reaches the first layer).
        memory_budget: reversible mode in floating point: the fraction in [0, 1] of the layers whose
            graphs are kept (the last ``round(memory_budget · depth)``, run as in ``"autograd"`` mode on
            the output of the others, which run reversibly): memory between reversible (0) and autograd (1).

    Returns:
        The output state, a tuple of tensors of the input's shapes.
    """
    kwargs = {} if kwargs is None else kwargs
    check_mode(mode)
    state = tuple(state)
    if not stack.layers:
        return state
    if frac_bits is not None and mode != "reversible":
        raise ValueError(f"fixed-point (exact) arithmetic needs mode='reversible'; got mode={mode!r}")
    leaves, arg_spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
    arg_tensors = tuple(v for v in leaves if isinstance(v, Tensor))
    needs_graph = torch.is_grad_enabled() and (any(t.requires_grad for t in (*state, *arg_tensors))
                                               or stack.has_trainable_parameters())
    kept = round(memory_budget * len(stack.layers)) if mode == "reversible" and needs_graph else 0
    if kept:
        if frac_bits is not None:
            raise ValueError("memory_budget > 0 keeps floating-point graphs: it needs frac_bits=None (exact=False)")
        inverted = len(stack.layers) - kept
        # one seed for both parts: the random numbers of memory_budget=0 (none under torch.compile)
        seeds = None if torch.compiler.is_compiling() else LayerSeeds.draw(accelerator_devices(state))
        if inverted:
            head = Stack(stack.step, stack.layers[:inverted], stack.coefficients)
            state = _run_reversible(head, state, args, kwargs, leaves, arg_spec, arg_tensors, None, keep_input, True,
                                    seeds)
        return _autograd_layers(stack, state, args, kwargs, first=inverted, seeds=seeds)
    if mode == "reversible" and (needs_graph or frac_bits is not None):
        return _run_reversible(stack, state, args, kwargs, leaves, arg_spec, arg_tensors, frac_bits, keep_input,
                               needs_graph)
    if mode == "checkpoint" and needs_graph:
        if torch.compiler.is_compiling() and not any(m.training for m in stack.norm_modules()):
            # Dynamo turns each checkpoint into a region that the compiled backward recomputes.
            return _checkpoint_layers(stack, state, args, kwargs, protect_running_stats=False)
        return _checkpoint_layers_eagerly(stack, state, args, kwargs, protect_running_stats=True)
    if not needs_graph:
        return _forward_layers(stack.step(), stack.layers, 0, state, (None,) * len(state), args, kwargs,
                               _FloatArithmetic())[0]
    return _autograd_layers(stack, state, args, kwargs)


def _autograd_layers(stack: Stack, state: State, args: tuple, kwargs: dict, first: int = 0,
                     seeds: LayerSeeds | None = None) -> State:
    """``stack.layers[first:]`` under plain autograd, their random numbers drawn as :class:`LayerSeeds` says
    (``seeds``, or new ones; under ``torch.compile``, the compiler's random numbers instead)."""
    step, layers = stack.step(), stack.layers[first:]
    if torch.compiler.is_compiling():
        return _forward_layers(step, layers, first, state, (None,) * len(state), args, kwargs, _FloatArithmetic())[0]
    seeds = LayerSeeds.draw(accelerator_devices(state)) if seeds is None else seeds
    with seeds.forked():
        return _forward_layers(step, layers, first, state, (None,) * len(state), args, kwargs, _FloatArithmetic(),
                               seeds)[0]


@torch.compiler.disable
def _run_reversible(stack, state, args, kwargs, leaves, arg_spec, arg_tensors, frac_bits, keep_input, needs_graph,
                    seeds: LayerSeeds | None = None) -> State:
    """The reversible (or exact) strategy, run eagerly: ``torch.compile`` breaks the graph here, once per
    stack, since the RNG snapshots and the hand-written backward of :class:`_ReversibleFunction` are not
    traceable; the functions inside run uncompiled. One autograd node per chunk of layers (:func:`_chunks`)."""
    if not needs_graph:
        return run_exact(stack, ExactState.from_float(state, frac_bits), args, kwargs).to_float()
    seeds = LayerSeeds.draw(accelerator_devices(state)) if seeds is None else seeds
    params, layer_params = stack.parameters()
    chain, depth = _Chain(), len(stack.layers)
    for first, end in _chunks(params, layer_params):
        chunk = Stack(stack.step, stack.layers[first:end], stack.coefficients)
        used = list(dict.fromkeys(i for indices in layer_params[first:end] for i in indices))  # in order, once
        local = {i: position for position, i in enumerate(used)}
        chunk_params = tuple(params[i] for i in used)
        plan = _Run(chunk, len(state), arg_spec, tuple(leaves), chunk_params,
                    tuple(tuple(local[i] for i in indices) for indices in layer_params[first:end]), frac_bits, seeds,
                    chain, first, chunk.norm_modules(), keep_input and frac_bits is None and first == 0)
        state = _ReversibleFunction.apply(plan, *state, *arg_tensors, *chunk_params)
    return _SavedOutput.apply(chain, depth, *state)


def _checkpoint_layers(stack: Stack, state: State, args: tuple, kwargs: dict, *, protect_running_stats: bool) -> State:
    """:func:`torch.utils.checkpoint.checkpoint` (non-reentrant) around every layer.

    ``protect_running_stats`` (eager): the recomputation runs under :class:`preserved_running_stats`
    (checkpoint's ``context_fn``), so that normalisation layers count each batch once, and random
    numbers follow :class:`LayerSeeds` (checkpoint keeps no generator snapshot per layer). Dynamo
    cannot trace either; when compiling without normalisation layers in training mode neither is
    needed (the compiled graph replays its own random numbers).
    """
    step = stack.step()
    seeds, options = None, {}
    if protect_running_stats:
        seeds = LayerSeeds.draw(accelerator_devices(state))
        options = {"preserve_rng_state": False,
                   "context_fn": functools.partial(_recomputation_contexts, stack.norm_modules())}
    for k, functions in enumerate(stack.layers):
        layer = functools.partial(_checkpointed_layer, step, functions, k, seeds, _layer_parameters(functions), args,
                                  kwargs)
        state = checkpoint(layer, *state, use_reentrant=False, **options)
    return state


_checkpoint_layers_eagerly = torch.compiler.disable(_checkpoint_layers)
""":func:`_checkpoint_layers` run eagerly (a graph break under ``torch.compile``): with normalisation
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
    parameters = _layer_parameters((module,))
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
    current = _layer_parameters(functions)
    if len(current) != len(forward_parameters) or any(a is not b for a, b in zip(current, forward_parameters)):
        raise _substituted_parameters("checkpoint")


def _recomputation_contexts(norm_modules) -> tuple[contextlib.AbstractContextManager, preserved_running_stats]:
    """Checkpoint's (forward, recomputation) contexts: the recomputation leaves running statistics alone."""
    return contextlib.nullcontext(), preserved_running_stats(norm_modules)


def _checkpointed_layer(step: Step, functions: Functions, k: int, seeds: LayerSeeds | None, forward_parameters: tuple,
                        args: tuple, kwargs: dict, *state: Tensor) -> State:
    """Layer ``k`` as checkpoint runs it: in the forward, and again in the backward, where its modules must
    still hold the parameters of the forward (``forward_parameters``, a tuple checkpoint keeps as is)."""
    _check_same_parameters(functions, forward_parameters)
    with seeds.forked() if seeds is not None else contextlib.nullcontext():
        return _forward_layers(step, (functions,), k, state, (None,) * len(state), args, kwargs, _FloatArithmetic(),
                               seeds)[0]


def invert(stack: Stack, state: State, args: tuple = (), kwargs: dict | None = None) -> State:
    """Reconstruct the input state of ``stack`` from its output state (floating point, no graph).

    Normalisation layers do not update their running statistics. Randomness inside the functions
    (dropout in training mode) is not replayed: invert deterministic functions (``eval()``).

    Raises:
        FloatingPointError: a non-finite value was met; the message names the layer.
    """
    kwargs = {} if kwargs is None else kwargs
    state = tuple(state)
    with torch.no_grad(), preserved_running_stats(stack.norm_modules()):
        return _inverse_layers(stack.step(), stack.layers, state, (None,) * len(state), args, kwargs, _FloatArithmetic())[0]


def run_exact(stack: Stack, state: ExactState, args: tuple = (), kwargs: dict | None = None) -> ExactState:
    """Run ``stack`` in fixed point on ``state`` (no graph); invert the result with :func:`invert_exact`."""
    kwargs = {} if kwargs is None else kwargs
    with torch.no_grad():
        step = stack.step()
        arithmetic = _FixedPointArithmetic.for_step(step, state.frac_bits, state.dtype)
        tensors, buffers = _forward_layers(step, stack.layers, 0, state.tensors, state.buffers, args, kwargs, arithmetic)
    return ExactState(tensors, buffers, state.frac_bits, state.dtype)


def invert_exact(stack: Stack, state: ExactState, args: tuple = (), kwargs: dict | None = None) -> ExactState:
    """The bit-exact inverse of :func:`run_exact`."""
    kwargs = {} if kwargs is None else kwargs
    with torch.no_grad(), preserved_running_stats(stack.norm_modules()):
        step = stack.step()
        arithmetic = _FixedPointArithmetic.for_step(step, state.frac_bits, state.dtype)
        tensors, buffers = _inverse_layers(step, stack.layers, state.tensors, state.buffers, args, kwargs, arithmetic)
    return ExactState(tensors, buffers, state.frac_bits, state.dtype)
