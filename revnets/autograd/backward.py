"""The memory-free backward of a chunk of layers: invert layer by layer, one evaluation of each function.

For each update ``s_t' = a·s_t + c·u(s_{i≠t})``, undone last first, the backward evaluates ``u`` once with
autograd on the views of the other components, rebuilds ``s_t = (s_t' − c·u)/a`` from that value and takes
the vector-Jacobian product of the same evaluation: the gradient of ``s_t`` is ``a·g``, the other
components, the layer's parameters and the extra arguments get ``VJP_u(c·g)`` (Gomez et al. 2017 for
couplings; Sander et al. 2021, Sec. 3, for the momentum update).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge, _engine_run_backward, get_gradient_edge

from ..steps.base import Step, Update, times_constant
from .arithmetic import FloatArithmetic
from .passes import CHECK_EVERY, CHECK_EVERY_LAYER_NUMEL, LayerPass

if TYPE_CHECKING:
    from .reversible import Chunk

FACTOR_PATH_NUMEL = 1 << 16
"""From this many elements per state component on, the backward takes a VJP of the gradient ``g`` itself
and multiplies its results by the update's gain ``c``, rather than a VJP of ``c·g``: one state-sized tensor
less at the VJP, for a multiplication of the parameters' gradients after it, in place (:func:`scaled_result`;
a copy would cost the allocation of every gradient again: 4.2 against 0.4 ms for a Llama layer of 2.9 M
parameters). At smaller states, where a kernel's fixed cost matters more than the memory, only when ``g``
outweighs the layer's parameters."""


def is_learnable(scale) -> bool:
    """Whether a scale or gain is a tensor that requires grad (a learnable coefficient such as γ)."""
    return isinstance(scale, Tensor) and scale.requires_grad


def add_scaled(total: Tensor | None, value: Tensor | None, factor) -> Tensor | None:
    """``total + factor·value`` for a constant ``factor`` (``None`` stands for zero), one kernel when both
    exist and ``factor`` is a number; ``value`` itself is never modified (it may be a gradient autograd holds)."""
    if value is None:
        return total
    if total is None:
        return times_constant(factor, value)
    if isinstance(factor, Tensor):
        return total + times_constant(factor, value)
    return total + value if factor == 1 else torch.add(total, value, alpha=factor)


_STORAGE_USES = getattr(torch._C, "_storage_Use_Count", None)  # private; without it, results are copied


def _references(values: list, position: int) -> tuple[int, int, int]:
    """Who holds the tensor ``values[position]``: its Python references (seen from here), the tensors on its
    storage, and the Python references to its base if it is a view (0 otherwise)."""
    tensor = values[position]
    base = tensor._base
    return (sys.getrefcount(tensor), _STORAGE_USES(tensor.untyped_storage()._cdata) if _STORAGE_USES else -1,
            0 if base is None else sys.getrefcount(base))


_SOLE_REFERENCES = (_references([torch.empty(2, 3)], 0), _references([torch.empty(2, 3).t()], 0))
"""What :func:`_references` sees of a tensor nothing else holds, and of a view (a transposed weight gradient)
whose base nothing else holds."""


def scaled_result(results: list, position: int, factor: float) -> Tensor:
    """``factor · results[position]`` for a VJP's result, which is dropped from ``results``: in place when
    nothing else references that tensor, its base or its storage (autograd passes a gradient through as the
    same tensor or a view, to several inputs alike), so that a parameter's gradient is scaled without a copy."""
    sole = _references(results, position) in _SOLE_REFERENCES and _SOLE_REFERENCES[0][1] > 0
    value, results[position] = results[position], None
    return value.mul_(factor) if sole else times_constant(factor, value)


_PLAIN_TYPES = (Tensor, torch.nn.Parameter, GradientEdge)


def vjp(outputs: list, inputs: list[Tensor], output_grads: list[Tensor]) -> list[Tensor | None]:
    """The gradients of ``inputs`` (``None`` where unused) given those of ``outputs`` (tensors or gradient
    edges), freeing the graph: ``torch.autograd.grad(..., allow_unused=True)``. Plain tensors go straight to
    autograd's engine, as ``torch.autograd.grad`` itself does after its argument checks. Those checks (the
    output gradients' shapes and dtypes, which the engine has already checked at every evaluation, and
    ``__torch_function__`` overrides, which tensor subclasses still get) cost about 18 µs of Python per call,
    a fifth of a W64 B64 layer's VJP."""
    if all(type(t) in _PLAIN_TYPES for t in (*outputs, *inputs)):
        return list(_engine_run_backward(tuple(outputs), tuple(output_grads), False, False, tuple(inputs), True, False))
    return list(torch.autograd.grad(outputs, inputs, output_grads, allow_unused=True))


def placeholder(component: Tensor) -> Tensor:
    """Zeros of ``component``'s shape, dtype and device on one element's storage: a state component that is
    not rebuilt, which an update still evaluated sees only through its shape."""
    return torch.zeros((), dtype=component.dtype, device=component.device).expand(component.shape)


def overflow_safe_sum(value: Tensor) -> Tensor:
    """The sum of ``value`` in float32 at least (0-dim): non-finite if an element is, and otherwise only for
    elements beyond about 1e38 over their number (a half-precision sum would overflow at 65504)."""
    return value.sum(dtype=torch.promote_types(value.dtype, torch.float32))


@dataclass(frozen=True)
class BackwardUpdate:
    """What the backward needs to know of update ``index`` of a step, worked out once per step."""

    update: Update
    index: int
    others: tuple[int, ...]
    """The components ``u`` reads (all but the target)."""
    copies: bool
    """``u`` adds another component with constant scale and gain: nothing to re-evaluate, its VJP is ``c·g``."""
    learnable_scale: bool
    learnable_gain: bool
    read_later: bool
    """The rebuilt target is read: by an update undone after this one (one that reads it, or one that undoes
    it and is itself read), or by the VJP of a learnable scale. Otherwise, in the stack's first layer, its
    reconstruction is skipped (the gradients do not depend on the stack's input state itself) and the
    component's output value freed before the VJP; a zero-stride placeholder of its shape takes its place."""

    @classmethod
    def plan(cls, step: Step, n_state: int) -> tuple[BackwardUpdate, ...]:
        """The updates of ``step`` in the order the backward undoes them (last first)."""
        plans: list[BackwardUpdate] = []
        for j, u in enumerate(step.updates):
            learnable_scale, learnable_gain = is_learnable(u.scale), is_learnable(u.gain)
            read_later = learnable_scale or any(  # by an update undone later: it reads it, or undoes it and is read
                earlier.update.target != u.target or earlier.read_later for earlier in plans)
            plans.append(cls(u, j, tuple(i for i in range(n_state) if i != u.target),
                             u.source is not None and not learnable_scale and not learnable_gain,
                             learnable_scale, learnable_gain, read_later))
        return tuple(reversed(plans))


class ChunkBackward:
    """The backward of one chunk (:class:`~revnets.autograd.reversible.Chunk`).

    ``tensors``, ``buffers`` and ``grads`` (the chunk's output state, its information buffers and its
    gradients; ``None`` for a gradient that is zero) are lists rewritten in place, so that no caller
    keeps a state alive: after :meth:`run` they hold the reconstructed input state, its buffers and
    its gradients, and :attr:`param_grads` and :attr:`arg_grads` the accumulated gradients of the
    chunk's parameters and of ``arg_leaves`` (``None`` where unused). ``kept_input``: the stack's input
    state, if kept; in layer 0 a component is then taken from it as soon as no update left to undo
    targets it, so that the first layer's functions see the exact input.
    """

    def __init__(self, chunk: Chunk, layer_pass: LayerPass, tensors: list, buffers: list, grads: list,
                 arg_leaves: Sequence[Tensor], kept_input: tuple[Tensor, ...] | None):
        self.chunk, self.layer_pass = chunk, layer_pass
        self.tensors, self.buffers, self.grads = tensors, buffers, grads
        self.arg_leaves, self.kept_input = arg_leaves, kept_input
        self.trainable_args = [i for i, a in enumerate(arg_leaves) if a.requires_grad]
        self.param_grads: list[Tensor | None] = [None] * len(chunk.params)
        self.arg_grads: list[Tensor | None] = [None] * len(arg_leaves)

    def run(self) -> None:
        """Invert the chunk's layers last first, checking the reconstruction for NaN/inf as it goes
        (see :data:`~revnets.autograd.passes.CHECK_EVERY`)."""
        chunk, tensors, buffers = self.chunk, self.tensors, self.buffers
        plans = None
        every_layer = tensors[0].numel() > CHECK_EVERY_LAYER_NUMEL
        witness = every_layer and type(self.layer_pass.arithmetic) is FloatArithmetic  # fixed point is finite
        checked = None if every_layer else (len(chunk.stack.layers), tuple(tensors), tuple(buffers))  # last finite
        for local in reversed(range(len(chunk.stack.layers))):
            k = chunk.first + local  # the layer's number in the whole stack (seeds, messages)
            if plans is None or chunk.stack.coefficients:  # learnable coefficients enter each layer's graph afresh
                with torch.enable_grad():
                    self.layer_pass = replace(self.layer_pass, step=chunk.stack.step())
                plans = BackwardUpdate.plan(self.layer_pass.step, len(tensors))
            step = self.layer_pass.step
            if step.order is not None:
                for values in (tensors, buffers, self.grads):
                    values[:] = step.unpermute(tuple(values))
            layer_numel = sum(chunk.params[i].numel() for i in chunk.layer_params[local])
            sums = [total for plan in plans for total in self._undo(plan, k, local, layer_numel, witness)]
            checked = self._check(k, local, sums, every_layer, checked)

    def _check(self, k: int, local: int, sums: list[Tensor], every_layer: bool, checked: tuple | None) -> tuple | None:
        """Check the state rebuilt in layer ``k`` (``local`` in the chunk) for NaN/inf, every layer or every
        :data:`~revnets.autograd.passes.CHECK_EVERY` layers; ``sums``: those of the functions' values (see
        :meth:`_undo`). Returns the last state known to be finite, kept where the check is not made every layer."""
        arithmetic = self.layer_pass.arithmetic
        # in layer 0, a reconstruction skipped is checked through its value's sum; re-inverting from the last
        # state known to be finite names the layer
        if every_layer:
            arithmetic.check_finite((*self.tensors, *sums), sums, f"layer {k}", "when re-evaluated in the backward")
        elif k % CHECK_EVERY == 0 or local == 0:
            if not arithmetic.all_finite((*self.tensors, *sums)):  # re-invert from the last finite state
                end, finite_tensors, finite_buffers = checked
                self.layer_pass.inverse(self.chunk.stack.layers[local:end], k, finite_tensors, finite_buffers,
                                        during="when re-evaluated in the backward")
            checked = (local, tuple(self.tensors), tuple(self.buffers))
        return checked

    def _undo(self, plan: BackwardUpdate, k: int, local: int, layer_numel: int, witness: bool) -> tuple[Tensor, ...]:
        """Undo one update of layer ``k`` (``local`` in the chunk) and pass its gradient on; returns, if
        ``witness`` or the target is not rebuilt, the :func:`overflow_safe_sum` of the functions' value it
        evaluated (nothing for a copy): it names the cause of a non-finite reconstruction without the value
        being held."""
        update, j, t = plan.update, plan.index, plan.update.target
        tensors, grads = self.tensors, self.grads
        if k == 0 and self.kept_input is not None:
            pending = {u.target for u in self.layer_pass.step.updates[: j + 1]}
            tensors[:] = [c if i in pending else self.kept_input[i] for i, c in enumerate(tensors)]
        g, sums = grads[t], ()
        if plan.copies:  # u = s[source] (x <- x + v)
            self._replace_target(plan, k, self.layer_pass.arithmetic.copy_increment(update, tuple(tensors)))
            grads[update.source] = add_scaled(grads[update.source], g, update.gain)
        else:
            sums = self._reevaluate(plan, k, local, layer_numel, witness)
        grads[t] = None if g is None else update.scale_gradient(g)
        return sums

    def _rebuilds(self, plan: BackwardUpdate, k: int) -> bool:
        """Whether the undo of ``plan`` in layer ``k`` rebuilds its target (see :attr:`BackwardUpdate.read_later`;
        fixed point always does: quantising the value is what checks it)."""
        return k > 0 or plan.read_later or type(self.layer_pass.arithmetic) is not FloatArithmetic

    def _replace_target(self, plan: BackwardUpdate, k: int, increment: Tensor) -> None:
        """Replace the target of ``plan`` in layer ``k`` by its value before the update, rebuilt from the
        update's ``increment``, or by a :func:`placeholder` where nothing reads it (:meth:`_rebuilds`)."""
        t = plan.update.target
        if self._rebuilds(plan, k):
            self.tensors[t], self.buffers[t] = self.layer_pass.arithmetic.undo(
                plan.index, plan.update, self.tensors[t], self.buffers[t], increment, f"layer {k}")
        else:
            self.tensors[t], self.buffers[t] = placeholder(self.tensors[t]), None

    def _reevaluate(self, plan: BackwardUpdate, k: int, local: int, layer_numel: int,
                    witness: bool) -> tuple[Tensor, ...]:
        """Evaluate ``u`` once (with autograd if its target has a gradient), rebuild the old target from
        that value, then accumulate the VJP of the same evaluation; returns the value's sum if ``witness``.

        The VJP starts from the evaluation's gradient edge rather than from its output tensor, so that
        neither the value nor the target it rebuilt is held through the VJP, the peak of the backward."""
        update, j, t = plan.update, plan.index, plan.update.target
        arithmetic, g = self.layer_pass.arithmetic, self.grads[t]
        with torch.enable_grad() if g is not None else torch.no_grad():  # a zero gradient needs no VJP
            leaves = [c if i == t else arithmetic.view(c).detach().requires_grad_(g is not None)
                      for i, c in enumerate(self.tensors)]
            increment = self.layer_pass.evaluate(k, j, update, leaves, self.chunk.stack.layers[local])
            gained = update.gain * increment if plan.learnable_gain and g is not None else None
        value, leaves[t] = increment.detach(), None  # the target was there for the shape check only
        sums = (overflow_safe_sum(value),) if witness or not self._rebuilds(plan, k) else ()
        self._replace_target(plan, k, value)
        del value
        if g is None:
            return sums
        outputs, output_grads, factor = self._vjp_outputs(plan, increment, gained, self.tensors[t], g, layer_numel)
        del increment, gained  # their storage now lives only as long as the graph needs it
        parameter_indices = self.chunk.layer_params[local]
        inputs = [*(leaves[i] for i in plan.others), *(self.chunk.params[i] for i in parameter_indices),
                  *(self.arg_leaves[i] for i in self.trainable_args)]
        results = vjp(outputs, inputs, output_grads)
        del outputs, output_grads, leaves, inputs  # the graph is freed before the accumulation
        self._accumulate(plan.others, parameter_indices, results, factor)
        return sums

    def _vjp_outputs(self, plan: BackwardUpdate, increment: Tensor, gained: Tensor | None, old: Tensor,
                     g: Tensor, layer_numel: int) -> tuple[list, list[Tensor], object]:
        """The outputs (gradient edges where they have one) and output gradients of the update's VJP, and
        the factor its results take; ``old``: the rebuilt target, which the VJP of a learnable scale reads."""
        update = plan.update
        if gained is not None:  # a learnable gain: differentiate c·u itself
            outputs, output_grads, factor = [gained], [g], 1
        elif (not plan.learnable_scale and not isinstance(update.gain, Tensor) and g.dtype == increment.dtype
              and (g.numel() > layer_numel or g.numel() >= FACTOR_PATH_NUMEL)):
            # c·VJP(g) rather than VJP(c·g) when g is large: no c·g tensor held through the VJP (the peak of
            # the backward); the state's gradients take c in their accumulation (one kernel) and the
            # parameters' gradients are multiplied in place after the graph is freed
            outputs, output_grads, factor = [increment], [g], update.gain
        else:
            increment_grad = update.gain_gradient(g)
            if increment_grad.dtype != increment.dtype:
                increment_grad = increment_grad.to(increment.dtype)
            outputs, output_grads, factor = [increment], [increment_grad], 1
        if outputs[0].grad_fn is not None:
            outputs[0] = get_gradient_edge(outputs[0])
        if plan.learnable_scale:
            outputs.append(update.scale)
            output_grads.append((g * self.layer_pass.arithmetic.view(old)).sum().to(update.scale.dtype))
        return outputs, output_grads, factor

    def _accumulate(self, others: tuple[int, ...], parameter_indices: tuple[int, ...], results: list,
                    factor) -> None:
        """Add ``factor ·`` the VJP's ``results`` (other components, parameters, arguments, in that order),
        dropping each from ``results`` once added: a scaled copy and its original coexist one at a time."""
        totals = [*((self.grads, i) for i in others), *((self.param_grads, i) for i in parameter_indices),
                  *((self.arg_grads, i) for i in self.trainable_args)]
        for position, (total, i) in enumerate(totals):
            if total[i] is None and results[position] is not None and factor != 1:  # factor: a number here
                total[i] = scaled_result(results, position, factor)
            else:
                total[i] = add_scaled(total[i], results[position], factor)
                results[position] = None
