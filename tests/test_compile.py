"""``torch.compile`` in every mode: the eager, aot_eager and inductor backends give the outputs,
gradients and BatchNorm running statistics of the eager network.

What compiles into one graph and where the graph breaks (stated in docs/networks.md, "What the modes guarantee"):

* ``mode="autograd"``: one graph, ``fullgraph=True`` works;
* ``mode="checkpoint"``: one graph (Dynamo traces every checkpoint as a region the compiled backward
  recomputes), except with normalisation layers in training mode: their running statistics must
  not be updated again by the recomputation, which takes checkpoint's ``context_fn`` (not traceable),
  so the stack runs eagerly — one graph break per stack;
* ``mode="reversible"`` (and exact): one graph break per stack; the engine's ``autograd.Function``
  (RNG snapshots, hand-written backward) runs eagerly, and calls every function compiled with the
  model's backend, in the forward and in the backward (no eager call of a function).
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import ARCHITECTURES, assemble, make_input, make_net, reference_forward, scheme_options
from torch import nn

pytestmark = pytest.mark.usefixtures("one_thread")

BACKENDS = ("eager", "aot_eager", "inductor")
MODES = ("autograd", "checkpoint", "reversible")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def norm_dropout_net(arch: str, mode: str) -> nn.Module:
    """3 layers of Linear-BatchNorm-Tanh-Dropout (training mode): the hardest case for recomputation."""
    width = 8 if arch == "MomentumNet" else 4
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        fs, gs = ([nn.Sequential(nn.Linear(width, width), nn.BatchNorm1d(width), nn.Tanh(), nn.Dropout(0.3))
                   for _ in range(3)] for _ in range(2))
    return assemble(arch, fs, gs, mode=mode, **scheme_options(arch, 0.9, 0.5))


def compiled_step(net: nn.Module, x: torch.Tensor, forward=None, **options):
    """Outputs and gradients (input, then parameters) of one seeded forward/backward of ``torch.compile(net)``
    (of ``forward(net, x)`` instead of ``net(x)`` if given)."""
    model = torch.compile(net, **options) if options else net
    if forward is not None:
        model = lambda x, net=net: forward(net, x)  # noqa: E731
    x = x.clone().requires_grad_()
    torch.manual_seed(5)
    out = model(x)
    out.pow(2).sum().backward()
    return out.detach(), [x.grad, *(p.grad for p in net.parameters())]


def assert_same_step(net: nn.Module, x: torch.Tensor, *, tol: float, reference_forward=None, **options) -> None:
    reference = copy.deepcopy(net)
    out, grads = compiled_step(net, x, **options)
    ref_out, ref_grads = compiled_step(reference, x, reference_forward)
    torch.testing.assert_close(out, ref_out, rtol=tol, atol=tol)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    for (name, got), want in zip(net.named_buffers(), reference.buffers(), strict=True):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch", ["MomentumNet", "HamiltonianNet"])
def test_compiled_matches_eager(arch, mode, backend):
    net = make_net(arch, depth=3, width=4, mode=mode, dtype=torch.float32)
    assert_same_step(net, make_input(3, 4, dtype=torch.float32), tol=1e-5, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch", ["MomentumNet", "RevNet"])
def test_compiled_matches_eager_with_batchnorm_and_dropout(arch, mode, backend):
    """Running statistics counted once, dropout masks replayed (inductor told to draw eager's random numbers).

    Compiled, ``mode="autograd"`` is one graph whose random numbers are the compiler's: those of a plain
    loop over the layers, not the engine's per-layer seeds; the other modes run the stack eagerly.
    """
    net = norm_dropout_net(arch, mode)
    plain_loop = reference_forward if mode == "autograd" else None
    with torch._inductor.config.patch(fallback_random=True):
        assert_same_step(net, torch.randn(6, 8, generator=torch.Generator().manual_seed(1)), tol=1e-5,
                         backend=backend, reference_forward=plain_loop)
    assert [int(b) for name, b in net.named_buffers() if name.endswith("num_batches_tracked")] == [1] * len(
        [m for m in net.modules() if isinstance(m, nn.BatchNorm1d)])


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_autograd_mode_compiles_into_one_graph(arch):
    net = make_net(arch, depth=3, width=4, mode="autograd", dtype=torch.float32)
    assert_same_step(net, make_input(3, 4, dtype=torch.float32), tol=1e-5, backend="aot_eager", fullgraph=True)


@pytest.mark.parametrize(
    ("mode", "norm", "breaks"),
    [("autograd", False, 0), ("autograd", True, 0), ("checkpoint", False, 0), ("checkpoint", True, 1),
     ("reversible", False, 1), ("reversible", True, 1)],
)
def test_graph_breaks_are_those_documented(mode, norm, breaks):
    net = norm_dropout_net("MomentumNet", mode) if norm else make_net("MomentumNet", 3, 8, mode=mode,
                                                                         dtype=torch.float32)
    explanation = torch._dynamo.explain(net)(torch.randn(6, 8, requires_grad=True))
    assert len(explanation.break_reasons) == breaks, [str(b.reason).splitlines()[0] for b in explanation.break_reasons]


@pytest.mark.parametrize(("name", "mode"), [("momentum_resnet18", "reversible"), ("resnet18", "checkpoint")])
def test_zoo_model_compiles(name, mode):
    """Stem and first blocks under checkpoint_call, stacks reversible: compiled = eager, statistics too."""
    from revnets.models import create_model

    model = create_model(name, num_classes=10).set_mode(mode)
    assert_same_step(model, torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)), tol=1e-4,
                     backend="aot_eager")


class CountingFunction(nn.Module):
    """``tanh(linear(x))`` that counts the calls Python runs eagerly (a compiled call runs none of this code)."""

    eager_calls = 0

    def __init__(self, width: int):
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x):
        if not torch.compiler.is_compiling():
            CountingFunction.eager_calls += 1
        return torch.tanh(self.linear(x))


@pytest.mark.parametrize("exact", [False, True], ids=["float", "exact"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_compiled_reversible_stack_calls_no_function_eagerly(arch, exact):
    """The functions of a reversible (exact) stack run compiled in the forward and in the backward's
    re-evaluations and VJPs: no eager call per step once compiled, and the eager step's gradients."""
    options = {"exact": True} if exact else {}
    net = make_net(arch, depth=4, width=4, dtype=torch.float32, function=CountingFunction, **options)
    x = make_input(5, 4, dtype=torch.float32)
    CountingFunction.eager_calls = 0
    compiled_step(copy.deepcopy(net), x)
    assert CountingFunction.eager_calls >= 2 * 4  # uncompiled: each function in the forward and in the backward
    assert_same_step(net, x, tol=1e-5, backend="aot_eager")
    CountingFunction.eager_calls = 0
    compiled_step(net, x, backend="aot_eager")
    assert CountingFunction.eager_calls == 0


def test_compiled_functions_compile_once_whatever_the_depth():
    """Layers of one function type share their compiled graphs (one per grad mode and input kind): a stack
    of 12 compiles as many frames and graphs as a stack of 3, not one per layer."""
    compiled = []
    for depth in (3, 12):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        net = make_net("MomentumNet", depth=depth, width=4, dtype=torch.float32, function=CountingFunction)
        for _ in range(2):
            compiled_step(net, make_input(5, 4, dtype=torch.float32), backend="aot_eager")
        counters = torch._dynamo.utils.counters
        compiled.append((counters["frames"]["ok"], counters["stats"]["unique_graphs"]))
    assert compiled[0] == compiled[1], compiled


def dropout_net(arch: str, mode: str, wrap=lambda f: f) -> nn.Module:
    """3 layers of Linear-Tanh-Dropout(0.3) (``wrap`` applied to each function), the same weights every time."""
    width = 8 if arch == "MomentumNet" else 4
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        fs, gs = ([wrap(nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Dropout(0.3))) for _ in range(3)]
                  for _ in range(2))
    return assemble(arch, fs, gs, mode=mode, **scheme_options(arch, 0.9, 0.5))


@pytest.mark.parametrize("arch", ["MomentumNet", "RevNet", "MidpointNet"])
def test_inductor_replays_its_own_random_numbers_in_the_backward(arch):
    """Without ``fallback_random``, inductor draws dropout masks from the seed the engine sets before each
    call, in the no-grad forward as in the backward's re-evaluation: the compiled reversible step equals an
    eager autograd-mode step whose functions are compiled one by one (the same seeding, every graph kept)."""
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))
    out, grads = compiled_step(dropout_net(arch, "reversible"), x, backend="inductor")
    reference = dropout_net(arch, "autograd", wrap=lambda f: torch.compile(f, backend="inductor"))
    ref_out, ref_grads = compiled_step(reference, x)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    eager_out, _ = compiled_step(dropout_net(arch, "reversible"), x)
    assert not torch.allclose(out, eager_out)  # inductor's masks, not eager's: the replay was put to the test
