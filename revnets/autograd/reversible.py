"""The reversible strategy's autograd nodes: a stack call is a chain of :class:`ReversibleFunction` nodes,
one per :class:`Chunk` of layers, ended by :class:`SavedOutput`, the one node that keeps the output state.

The forward keeps no state; the backward of each chunk takes its output state from the :class:`Chain`,
inverts its layers (:class:`~revnets.autograd.backward.ChunkBackward`) and leaves their input state there
for the chunk before it. Parameter gradients therefore reach autograd chunk by chunk (gradient hooks, DDP's
bucket reductions, fire as the backward goes), and each state tensor is freed as soon as its
reconstruction replaces it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ..steps.base import State
from .arithmetic import ExactState, FixedPointArithmetic, FloatArithmetic
from .backward import ChunkBackward
from .passes import LayerPass, first_non_finite_layer
from .replay import AutocastState, LayerSeeds, accelerator_devices, preserved_running_stats
from .stack import Arguments, ParameterSlot, Stack, StackCall, slots_changed

CHUNK_PARAMETERS = 1 << 20
"""Parameters per autograd node of a reversible stack: consecutive layers are grouped into chunks of at least
this many parameter elements (1 Mi: 4 MiB of float32 gradients) or the rest of the stack. Each chunk
hands its parameters' gradients to autograd as soon as its backward ends, so gradient hooks (DDP's
reductions) fire progressively and the engine holds one chunk's parameter gradients at a time; small
layers share a node, whose fixed cost (about 0.3 ms on a CPU) would otherwise dominate them."""


def chunk_ranges(params: tuple[Tensor, ...], layer_params: tuple[tuple[int, ...], ...]) -> list[tuple[int, int]]:
    """``(first, end)`` layer ranges of the chunks: each gathers at least :data:`CHUNK_PARAMETERS`
    elements of parameters new to it (the last may have fewer)."""
    ranges, first, seen, size = [], 0, set(), 0
    for k, indices in enumerate(layer_params):
        size += sum(params[i].numel() for i in indices if i not in seen)
        seen.update(indices)
        if size >= CHUNK_PARAMETERS or k == len(layer_params) - 1:
            ranges.append((first, k + 1))
            first, seen, size = k + 1, set(), 0
    return ranges


@dataclass
class Chain:
    """What the chunks of one reversible stack call hand each other outside autograd.

    Attributes:
        forward_state: in fixed point, the exact state (tensors, buffers) a chunk's forward ended with,
            which the next chunk continues from (its floating-point input only links the graph).
        boundaries: in the backward, the state (tensors, buffers) a chunk is to start from and its
            gradients, keyed by the number of the layer it enters: the output of the stack and the
            gradients autograd gave it (left by :class:`SavedOutput`), then the input each chunk
            reconstructed, with its gradients, which are the output and output gradients of the chunk
            before it. The gradients travel here rather than through autograd, which would hold each
            chunk's output gradients until its backward returns (two tensors of the state's size more at
            its peak); the chunk's own lists free each as soon as its backward has replaced it.
        non_finite: where the forward first produced NaN/inf, if it did.
    """

    forward_state: tuple | None = None
    boundaries: dict[int, tuple] = field(default_factory=dict)
    non_finite: str | None = None


@dataclass(frozen=True)
class Chunk:
    """One chunk of a call of a reversible stack: its layers, the call's arguments, its parameters.

    Attributes:
        stack: the chunk's layers (a part of the stack called).
        n_state: number of state components.
        arguments: the call's extra arguments (their tensors are inputs of the node).
        params: the distinct trainable parameters of the chunk's layers (inputs of the node).
        layer_params: for each layer, the indices in ``params`` of those it uses.
        frac_bits: fixed point with this many fractional bits, or ``None`` (floating point).
        seeds: the call's random-number replay.
        chain: what the chunks of the call share.
        first: the number of the chunk's first layer in the whole stack.
        norm_modules: the normalisation layers whose running statistics recomputation must not update.
        keep_input: the chunk is the first and the stack's input state is kept (floating point only).
        compiler: under ``torch.compile``, the key of the model's backend: the functions run compiled with it
            (:mod:`revnets.autograd.compiled`).
        slots: where the chunk's modules hold ``params`` (:data:`~revnets.autograd.stack.ParameterSlot`), checked
            before the backward re-evaluates them.
    """

    stack: Stack
    n_state: int
    arguments: Arguments
    params: tuple[Tensor, ...]
    layer_params: tuple[tuple[int, ...], ...]
    frac_bits: int | None
    seeds: LayerSeeds
    chain: Chain
    first: int = 0
    norm_modules: tuple = ()
    keep_input: bool = False
    compiler: int | None = None
    slots: tuple[ParameterSlot, ...] = ()

    def parameters_changed(self) -> bool:
        """Whether the chunk's modules no longer hold the trainable parameters the forward recorded."""
        return slots_changed(self.slots)


def sharded_functions(stack: Stack) -> bool:
    """Whether a module inside ``stack``'s functions is an FSDP2 unit (``fully_shard``)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch built without distributed
        return False
    return any(isinstance(m, FSDPModule) for fns in stack.layers for f in fns if isinstance(f, nn.Module)
               for m in f.modules())


def substituted_parameters(mode: str) -> RuntimeError:
    """The error of a backward whose modules no longer hold the parameters its forward used."""
    return RuntimeError(
        f"the parameters of the {mode} stack's functions are not the tensors its forward used (substituted with "
        "torch.func.functional_call or reassigned before backward); the backward re-evaluates the modules and "
        "would differentiate the wrong weights: use mode='autograd'"
    )


class ReversibleFunction(torch.autograd.Function):
    """One :class:`Chunk` of a reversible stack: the forward keeps no state; the backward takes its output
    state from the :class:`Chain`, inverts its layers and leaves their input state there for the chunk
    before it."""

    @staticmethod
    def forward(ctx, chunk: Chunk, *inputs: Tensor):
        n_args = len(chunk.arguments.tensors)
        state, arg_tensors = inputs[: chunk.n_state], inputs[chunk.n_state : chunk.n_state + n_args]
        args, kwargs = chunk.arguments.rebuild(arg_tensors)
        ctx.autocast = AutocastState.capture(accelerator_devices(state))
        ctx.chunk = chunk
        ctx.set_materialize_grads(False)  # a gradient autograd has none of stays None (no zero tensor)
        step, chain = chunk.stack.step(), chunk.chain
        if chunk.frac_bits is None:
            arithmetic = FloatArithmetic()
            tensors, buffers = tuple(state), (None,) * len(state)
        else:
            arithmetic = FixedPointArithmetic.for_step(step, chunk.frac_bits, state[0].dtype)
            if chunk.first == 0:
                exact = ExactState.from_float(state, chunk.frac_bits)
                tensors, buffers = exact.tensors, exact.buffers
            else:  # continue bit for bit from the previous chunk, not from its dequantised output
                (tensors, buffers), chain.forward_state = chain.forward_state, None
        layer_pass = LayerPass(step, args, kwargs, arithmetic, chunk.seeds, chunk.compiler)
        with chunk.seeds.forked():
            tensors, buffers = layer_pass.forward(chunk.stack.layers, chunk.first, tensors, buffers)
            if chain.non_finite is None and not arithmetic.all_finite(tensors):
                with preserved_running_stats(chunk.norm_modules):
                    chain.non_finite = first_non_finite_layer(
                        LayerPass(step, args, kwargs, FloatArithmetic(), chunk.seeds), chunk.stack.layers,
                        chunk.first, tuple(state))
        ctx.arithmetic = arithmetic
        if chunk.frac_bits is not None:
            chain.forward_state = (tensors, buffers)
        ctx.save_for_backward(*arg_tensors, *(state if chunk.keep_input else ()))
        return tuple(arithmetic.view(c) for c in tensors)

    @staticmethod
    @once_differentiable
    def backward(ctx, *output_grads: Tensor | None):
        chunk: Chunk = ctx.chunk
        _check_backward_allowed(chunk)
        arg_tensors = list(ctx.saved_tensors)
        kept_input = None
        if chunk.keep_input:
            kept_input = tuple(c.detach() for c in arg_tensors[len(arg_tensors) - chunk.n_state :])
            del arg_tensors[len(arg_tensors) - chunk.n_state :]
        tensors, buffers, handed = chunk.chain.boundaries.pop(chunk.first + len(chunk.stack.layers))
        grads = [_sum(a, b) for a, b in zip(handed, output_grads)]  # autograd's: None unless used elsewhere
        offset = 1 + chunk.n_state
        arg_leaves = tuple(a.detach().requires_grad_() if ctx.needs_input_grad[offset + i] else a.detach()
                           for i, a in enumerate(arg_tensors))
        args, kwargs = chunk.arguments.rebuild(arg_leaves)
        layer_pass = LayerPass(chunk.stack.step(), args, kwargs, ctx.arithmetic, chunk.seeds, chunk.compiler)
        backward = ChunkBackward(chunk, layer_pass, list(tensors), list(buffers), grads, arg_leaves, kept_input)
        del output_grads, tensors, buffers, handed, grads  # the backward's lists own them: rewritten layer by layer
        with ctx.autocast.restored(), chunk.seeds.forked(), preserved_running_stats(chunk.norm_modules):
            backward.run()
        needs = ctx.needs_input_grad
        state_grads = [g if needs[1 + i] else None for i, g in enumerate(backward.grads)]
        if chunk.first > 0 and any(needs[1:offset]):  # the previous chunk's backward runs: hand it all over
            chunk.chain.boundaries[chunk.first] = (tuple(backward.tensors), tuple(backward.buffers), tuple(state_grads))
            state_grads = [None] * chunk.n_state
        for values in (backward.tensors, backward.buffers, backward.grads):
            values.clear()
        if any(g is None for g in backward.param_grads) and sharded_functions(chunk.stack):
            raise RuntimeError(
                "a function of this reversible stack is its own FSDP unit (fully_shard applied inside the stack): "
                "FSDP swaps in gathered parameters for the backward's recomputation and reduces only their .grad, "
                "so the parameters the engine recorded would silently get no gradient; shard the whole stack "
                "instead (fully_shard(net) on the reversible network, as revnets.training.fsdp does)"
            )
        arg_grads = [g if needs[offset + i] else None for i, g in enumerate(backward.arg_grads)]
        offset += len(arg_tensors)
        param_grads = [g if needs[offset + i] else None for i, g in enumerate(backward.param_grads)]
        return (None, *state_grads, *arg_grads, *param_grads)


def _check_backward_allowed(chunk: Chunk) -> None:
    """Refuse a backward whose parameters were substituted, or whose forward already produced NaN/inf."""
    if chunk.parameters_changed():
        raise substituted_parameters("reversible")
    if chunk.chain.non_finite is not None:
        raise FloatingPointError(
            f"non-finite value (NaN/inf) in the backward of a reversible stack: the forward already produced it "
            f"({chunk.chain.non_finite}); this is not an inversion error. Check the input and the weights "
            "(a diverging learning rate makes them non-finite)"
        )


class SavedOutput(torch.autograd.Function):
    """The end of a reversible stack: the one node that keeps its output state (and, in fixed point, the
    exact state and buffers) for the backward, as ``save_for_backward`` does (refusing outputs modified
    in place since, and keeping them for a backward with ``retain_graph=True``). Its backward, which runs
    first, hands the state and its gradients to the last chunk through the chain and returns none to
    autograd, which drops its references at once: each tensor of the state, and each gradient, is then
    freed as soon as the chunks' backward has replaced it."""

    @staticmethod
    def forward(ctx, chain: Chain, depth: int, *outputs: Tensor):
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
        buffers = (None,) * len(tensors) if ctx.buffers is None else ctx.buffers
        ctx.chain.boundaries[ctx.depth] = (tensors, buffers, grads)
        return (None, None, *(None for _ in grads))


def _sum(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    """``a + b`` with ``None`` standing for zero."""
    return b if a is None else a if b is None else a + b


@torch.compiler.disable
def run_reversible(call: StackCall, *, frac_bits: int | None = None, keep_input: bool = False,
                   seeds: LayerSeeds | None = None, compiler: int | None = None) -> State:
    """The reversible (``frac_bits``: exact) strategy on a call that records a graph, run eagerly:
    ``torch.compile`` breaks the graph here, once per stack, since the RNG snapshots and the hand-written
    backward of :class:`ReversibleFunction` are not traceable; the functions inside run compiled with the
    model's backend (``compiler``, the key of :func:`~revnets.autograd.compiled.outer_backend`, given by a
    caller Dynamo traced). One autograd node per chunk of layers (:func:`chunk_ranges`); ``seeds``: the
    call's random-number replay if already drawn."""
    stack, state = call.stack, call.state
    seeds = LayerSeeds.draw(accelerator_devices(state)) if seeds is None else seeds
    params, layer_params, layer_slots, layer_norms = stack.parameters()
    chain = Chain()
    for first, end in chunk_ranges(params, layer_params):
        part = stack.part(first, end)
        used = list(dict.fromkeys(i for indices in layer_params[first:end] for i in indices))  # in order, once
        local = {i: position for position, i in enumerate(used)}
        chunk_params = tuple(params[i] for i in used)
        norms = tuple({id(m): m for layer in layer_norms[first:end] for m in layer}.values())
        chunk = Chunk(part, len(state), call.arguments, chunk_params,
                      tuple(tuple(local[i] for i in indices) for indices in layer_params[first:end]), frac_bits, seeds,
                      chain, first, norms, keep_input and frac_bits is None and first == 0, compiler,
                      tuple(slot for layer in layer_slots[first:end] for slot in layer))
        state = ReversibleFunction.apply(chunk, *state, *call.arguments.tensors, *chunk_params)
    return SavedOutput.apply(chain, len(stack.layers), *state)
