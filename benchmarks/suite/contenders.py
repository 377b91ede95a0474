"""How a stack is run: every contender builds a network from the same seeded functions.

A :class:`Contender` turns a :class:`~.workloads.Stack` into an :class:`Instance` (a callable network
with its input and output gradient), or says why it does not apply to that workload. Contenders:

``loop``, ``loop-nograd``
    The scheme written as a plain Python loop under autograd (momentum:
    ``v = γv + (1−γ)f(x); x = x + v``; Hamiltonian: ``Y += hF(Z); Z −= hG(Y)``). ``loop-nograd`` is
    its forward alone under ``torch.no_grad()`` (timed only): the *floor* of a reversible backward
    is ``loop + loop-nograd`` of the same trial (one extra forward).
``torch-checkpoint``
    The loop with ``torch.utils.checkpoint(use_reentrant=False)`` around every step.
``torch-checkpoint-full``
    The same with ``early_stop=False``: the backward recomputes each whole step. By default
    (``early_stop=True``) the recomputation stops as soon as every tensor the step's backward needs is
    back, which skips the step's last operations when no backward formula needs their output (the
    second ``Linear`` of the MLP functions): checkpoint then runs less than one extra forward, which a
    reversible backward cannot (the inversion needs the value of every function).
``handwritten-reversible``
    The momentum scheme's reversible backward written out for this one scheme (invert, re-evaluate
    ``f_n``, one VJP per layer), with none of the engine's generality: no checks, no random-number
    replay, no running-statistic protection, no extra arguments, one autograd node. Not a library
    (wrong on dropout or BatchNorm): the least a Python reversible backward costs, so that the gap
    to ``revnets-reversible`` measures the engine's overhead.
``compile@b``
    ``torch.compile`` of the loop with ``torch._functorch.config.activation_memory_budget = b``
    (the min-cut partitioner recomputes activations to keep that fraction of them).
``revnets-autograd``, ``revnets-reversible``, ``revnets-checkpoint``, ``revnets-exact``, ``revnets@b``
    ``revnets.MomentumNet`` / ``revnets.HamiltonianNet`` in each mode, and with ``memory_budget=b``.
``compile-reversible``, ``compile-exact``
    ``torch.compile`` (the suite's backend) of ``revnets-reversible`` / ``revnets-exact``: the model compiled
    as a user compiles it, the stack's functions compiled inside the engine.
``momentumnet``, ``revlib``, ``memcnn``
    The PyPI peers (imported only when built; they run in the peers' environment, see
    :mod:`.peers`): ``momentumnet.MomentumNet(use_backprop=False)`` (momentum scheme only);
    ``revlib.ReversibleSequential`` and ``memcnn.AdditiveCoupling`` pairs on the two-stream input
    (see :mod:`.workloads`), so the same functions and FLOPs, a different (additive) scheme.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .workloads import GAMMA, STEP, Stack

PEERS = ("momentumnet", "revlib", "memcnn")
BUDGETS = (0.0, 0.25, 0.5, 0.75, 1.0)


class SchemeLoop(nn.Module):
    """The stack's scheme as a plain Python loop; ``use_checkpoint`` wraps every step (with checkpoint's
    ``early_stop``)."""

    def __init__(self, stack: Stack, use_checkpoint: bool = False, early_stop: bool = True):
        super().__init__()
        self.scheme = stack.scheme
        self.f = nn.ModuleList(stack.f_functions if stack.scheme == "hamiltonian" else stack.functions)
        self.g = nn.ModuleList(stack.g_functions if stack.scheme == "hamiltonian" else [])
        self.use_checkpoint, self.early_stop = use_checkpoint, early_stop

    def _call(self, step, *args):
        if self.use_checkpoint:
            return checkpoint(step, *args, use_reentrant=False, early_stop=self.early_stop)
        return step(*args)

    def forward(self, x: Tensor) -> Tensor:
        if self.scheme == "hamiltonian":
            y, z = x.chunk(2, dim=1)
            for f, g in zip(self.f, self.g):
                y, z = self._call(_hamiltonian_step, f, g, y, z)
            return torch.cat([y, z], dim=1)
        v = torch.zeros_like(x)
        for f in self.f:
            x, v = self._call(_momentum_step, f, x, v)
        return x


def _momentum_step(f, x, v):
    v = GAMMA * v + (1 - GAMMA) * f(x)
    return x + v, v


def _hamiltonian_step(f, g, y, z):
    y = y + STEP * f(z)
    return y, z - STEP * g(y)


class HandwrittenReversible(nn.Module):
    """``handwritten-reversible`` (see the module docstring): momentum scheme, γ = :data:`GAMMA`."""

    def __init__(self, stack: Stack):
        super().__init__()
        self.f = nn.ModuleList(stack.functions)

    def forward(self, x: Tensor) -> Tensor:
        return _HandwrittenMomentum.apply(self.f, x, *self.f.parameters())


class _HandwrittenMomentum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, functions: nn.ModuleList, x: Tensor, *params: Tensor) -> Tensor:
        v = torch.zeros_like(x)
        for f in functions:
            v = torch.lerp(f(x), v, GAMMA)  # γ·v + (1 − γ)·f(x)
            x = x + v
        ctx.functions = functions
        ctx.save_for_backward(x, v)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, v = ctx.saved_tensors
        grad_x, grad_v, param_grads = grad, None, []
        for f in reversed(ctx.functions):
            x = x - v
            grad_v = grad_x if grad_v is None else grad_v + grad_x
            leaf = x.detach().requires_grad_()
            with torch.enable_grad():
                fx = f(leaf)
            params = tuple(f.parameters())
            grad_leaf, *grads = torch.autograd.grad(fx, (leaf, *params), (1 - GAMMA) * grad_v)
            v = torch.lerp(fx.detach(), v, 1 / GAMMA)  # (v − (1 − γ)·f(x)) / γ
            grad_x = grad_x + grad_leaf
            grad_v = GAMMA * grad_v
            param_grads[:0] = grads
        return None, grad_x, *param_grads


class Compiled(nn.Module):
    """``torch.compile`` of the loop, compiled (and run) under an activation memory budget.

    The budget is read when the graph is partitioned, at the first call, and is not among Dynamo's
    guards: loops of the same structure would share the first budget's compiled graph. So the budget
    is also an attribute the compiled forward reads (:class:`_BudgetedLoop`), which Dynamo guards on:
    each budget gets its own graph.
    """

    def __init__(self, stack: Stack, budget: float, backend: str):
        super().__init__()
        self.loop = _BudgetedLoop(SchemeLoop(stack), budget)
        self.compiled = torch.compile(self.loop, backend=backend)

    def forward(self, x: Tensor) -> Tensor:
        import torch._functorch.config as functorch_config

        with functorch_config.patch(activation_memory_budget=self.loop.budget):
            return self.compiled(x)


class _BudgetedLoop(nn.Module):
    def __init__(self, loop: SchemeLoop, budget: float):
        super().__init__()
        self.loop, self.budget = loop, budget

    def forward(self, x: Tensor) -> Tensor:
        if self.budget < 0:  # never: makes Dynamo guard on the budget's value
            raise ValueError("activation_memory_budget must be in [0, 1]")
        return self.loop(x)


@dataclass
class Instance:
    """A contender built on a stack: ``model(x)`` with the input and output gradient to use."""

    model: Callable[[Tensor], Tensor]
    x: Tensor
    grad_output: Tensor
    params: list[Tensor]
    forward_only: bool = False

    def fresh_input(self) -> Tensor:
        """A new copy of the input per call (memcnn frees its inputs' storage in place)."""
        return self.x.detach().clone().requires_grad_(not self.forward_only)

    def clear_grads(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self, x: Tensor) -> None:
        """What is timed: forward + backward (forward alone for ``loop-nograd``)."""
        if self.forward_only:
            with torch.no_grad():
                self.model(x)
        else:
            self.model(x).backward(self.grad_output)


@dataclass(frozen=True)
class Contender:
    name: str
    label: str
    group: str
    """``baseline`` (plain PyTorch), ``revnets`` or ``peer``."""
    make: Callable[[Stack, dict], nn.Module]
    same_scheme: bool = True
    """Computes the loop's function (its gradients are compared with the loop's)."""
    two_stream: bool = False
    forward_only: bool = False
    schemes: tuple[str, ...] = ("momentum", "hamiltonian")

    def not_applicable(self, stack: Stack) -> str | None:
        """Why the contender does not run on this stack, or None."""
        if stack.scheme not in self.schemes:
            return f"{self.name} has no {stack.scheme} scheme"
        if self.name == "memcnn" and len(stack.coupled_functions()) % 2:
            return "memcnn couples the functions in pairs: odd depth"
        return None

    def build(self, stack: Stack, options: dict) -> Instance:
        model = self.make(stack, options)
        params = list(dict.fromkeys(p for p in model.parameters() if p.requires_grad))
        x, grad = (stack.two_stream_x, stack.two_stream_grad) if self.two_stream else (stack.x, stack.grad_output)
        return Instance(model, x, grad, params, self.forward_only)


def _revnets(mode: str = "reversible", exact: bool = False, budget: float = 0.0):
    def make(stack: Stack, options: dict) -> nn.Module:
        import revnets

        kw = {"mode": mode, "exact": exact, "memory_budget": budget}
        if stack.scheme == "hamiltonian":
            return revnets.HamiltonianNet(stack.f_functions, stack.g_functions, h=STEP, **kw)
        return revnets.MomentumNet(stack.functions, gamma=GAMMA, **kw)

    return make


def _compiled(budget: float):
    def make(stack: Stack, options: dict) -> nn.Module:
        return Compiled(stack, budget, options.get("compile_backend", "inductor"))

    return make


def _compiled_revnets(exact: bool):
    def make(stack: Stack, options: dict) -> nn.Module:
        return torch.compile(_revnets(exact=exact)(stack, options), backend=options.get("compile_backend", "inductor"))

    return make


def _momentumnet(stack: Stack, options: dict) -> nn.Module:
    import momentumnet

    return momentumnet.MomentumNet(list(stack.functions), gamma=GAMMA, use_backprop=False)


def _revlib(stack: Stack, options: dict) -> nn.Module:
    import revlib

    return revlib.ReversibleSequential(*stack.coupled_functions(), split_dim=stack.split_dim)


def _memcnn(stack: Stack, options: dict) -> nn.Module:
    import memcnn

    fs = stack.coupled_functions()
    return nn.Sequential(*(
        memcnn.InvertibleModuleWrapper(memcnn.AdditiveCoupling(Fm=fs[i], Gm=fs[i + 1], split_dim=stack.split_dim),
                                       keep_input=False, keep_input_inverse=False)
        for i in range(0, len(fs), 2)
    ))


def _budget_name(b: float) -> str:
    return f"{b:g}"


def registry() -> dict[str, Contender]:
    """Every contender by name."""
    c = [
        Contender("loop", "plain loop (autograd)", "baseline", lambda s, o: SchemeLoop(s)),
        Contender("loop-nograd", "plain loop, forward under no_grad", "baseline", lambda s, o: SchemeLoop(s),
                  forward_only=True),
        Contender("torch-checkpoint", "plain loop, torch checkpoint per step", "baseline",
                  lambda s, o: SchemeLoop(s, use_checkpoint=True)),
        Contender("torch-checkpoint-full", "plain loop, torch checkpoint per step, early_stop=False", "baseline",
                  lambda s, o: SchemeLoop(s, use_checkpoint=True, early_stop=False)),
        Contender("handwritten-reversible", "hand-written reversible loop (momentum only, no checks)", "baseline",
                  lambda s, o: HandwrittenReversible(s), schemes=("momentum",)),
        *(Contender(f"compile@{_budget_name(b)}", f"torch.compile, activation_memory_budget={b:g}", "baseline",
                    _compiled(b)) for b in BUDGETS),
        Contender("revnets-autograd", 'revnets mode="autograd"', "revnets", _revnets("autograd")),
        Contender("revnets-reversible", 'revnets mode="reversible"', "revnets", _revnets("reversible")),
        Contender("revnets-checkpoint", 'revnets mode="checkpoint"', "revnets", _revnets("checkpoint")),
        Contender("revnets-exact", "revnets exact=True", "revnets", _revnets(exact=True)),
        *(Contender(f"revnets@{_budget_name(b)}", f"revnets memory_budget={b:g}", "revnets", _revnets(budget=b))
          for b in BUDGETS),
        Contender("compile-reversible", 'torch.compile(revnets mode="reversible")', "revnets",
                  _compiled_revnets(exact=False)),
        Contender("compile-exact", "torch.compile(revnets exact=True)", "revnets", _compiled_revnets(exact=True)),
        Contender("momentumnet", "momentumnet use_backprop=False", "peer", _momentumnet, schemes=("momentum",)),
        Contender("revlib", "revlib ReversibleSequential (additive, 2 streams)", "peer", _revlib,
                  same_scheme=False, two_stream=True),
        Contender("memcnn", "memcnn AdditiveCoupling (2 streams)", "peer", _memcnn, same_scheme=False, two_stream=True),
    ]
    return {contender.name: contender for contender in c}


def version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
