"""What is run: stacks of residual functions and the model-zoo networks.

A :class:`Spec` (plain data, so it crosses the process boundary as JSON) names a workload and its
size; :func:`build` turns it into a :class:`Stack`: the residual functions, seeded so that every
process builds the same weights, an input state and an output gradient.

Workloads (``Spec.workload``):

``mlp``
    ``f_n = Linear(W, W) → Tanh → Linear(W, W)`` on a state ``(B, W)``; momentum scheme.
``resnet``
    Momentum ResNet blocks ``f_n = Conv3×3 → BatchNorm → ReLU → Conv3×3 → BatchNorm`` on images
    ``(B, W, S, S)`` (W channels, side S = ``Spec.side``); momentum scheme, training mode.
``hamiltonian``
    Chang et al.'s Hamiltonian network on the halves ``(Y, Z)`` of a state ``(B, 2W)``:
    ``Y += h·F_n(Z); Z −= h·G_n(Y)``, with F_n, G_n MLP functions as above, h = 0.1.
``transformer``
    A Momentum Transformer encoder: ``f_n(x) = layer_n(x) − x`` for
    ``nn.TransformerEncoderLayer(W, 4 heads, feed-forward 2W, dropout 0, batch_first)`` on
    ``(B, T, W)`` (T = ``Spec.seq``); the same functions ``revnets.convert_to_momentum`` makes of an
    ``nn.TransformerEncoder``.

The *two-stream* input (``Stack.two_stream_input``) is what the additive-coupling peers (revlib,
memcnn) get: for the momentum scheme the same depth-N functions applied alternately to two W-wide
streams (the same FLOPs on a state twice as large); for the Hamiltonian scheme the functions
interleaved ``F_1, G_1, F_2, …`` on the same ``(Y, Z)`` state (the same coupling up to the signs
and the step h).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

GAMMA = 0.9
"""Momentum γ of every momentum workload."""
STEP = 0.1
"""Step h of the Hamiltonian workload."""

WORKLOADS = ("mlp", "resnet", "hamiltonian", "transformer")
SCHEME = {"mlp": "momentum", "resnet": "momentum", "hamiltonian": "hamiltonian", "transformer": "momentum"}


@dataclass(frozen=True)
class Spec:
    """A workload and its size: depth N, width W (features or channels), batch B."""

    workload: str
    depth: int
    width: int
    batch: int
    side: int = 16
    """Image side of the ``resnet`` workload."""
    seq: int = 32
    """Sequence length of the ``transformer`` workload."""
    seed: int = 0

    def __post_init__(self):
        if self.workload not in WORKLOADS:
            raise ValueError(f"unknown workload {self.workload!r}; choose from {WORKLOADS}")

    @property
    def scheme(self) -> str:
        return SCHEME[self.workload]

    def label(self) -> str:
        extra = {"resnet": f" {self.side}x{self.side}", "transformer": f" T{self.seq}"}.get(self.workload, "")
        return f"{self.workload} W{self.width} B{self.batch} depth {self.depth}{extra}"

    def as_dict(self) -> dict:
        return asdict(self)


class LayerResidual(nn.Module):
    """``f(x) = layer(x) − x``: the residual function of a block that computes ``x + F(x)``."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x) - x


def mlp_function(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width))


def conv_function(channels: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
    )


def transformer_layer(width: int) -> nn.TransformerEncoderLayer:
    return nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=2 * width, dropout=0.0, batch_first=True)


@dataclass
class Stack:
    """A built workload: functions, input, output gradient (all on ``device``)."""

    spec: Spec
    functions: list[nn.Module]
    """Momentum scheme: f_1 … f_N. Hamiltonian scheme: F_1 … F_N followed by G_1 … G_N."""
    x: Tensor
    grad_output: Tensor
    split_dim: int
    """The dimension the two-stream peers split (channels / features)."""
    two_stream_x: Tensor = field(repr=False, default=None)
    two_stream_grad: Tensor = field(repr=False, default=None)

    @property
    def scheme(self) -> str:
        return self.spec.scheme

    @property
    def f_functions(self) -> list[nn.Module]:
        return self.functions[: self.spec.depth]

    @property
    def g_functions(self) -> list[nn.Module]:
        return self.functions[self.spec.depth :]

    def coupled_functions(self) -> list[nn.Module]:
        """The functions in the order the two-stream peers apply them (see the module docstring)."""
        if self.scheme == "hamiltonian":
            return [m for pair in zip(self.f_functions, self.g_functions, strict=True) for m in pair]
        return list(self.functions)


def build(spec: Spec, device: str = "cpu") -> Stack:
    """Seeded functions and input of ``spec`` (the same in every process)."""
    torch.manual_seed(spec.seed)
    w, b, n = spec.width, spec.batch, spec.depth
    if spec.workload == "mlp":
        functions = [mlp_function(w) for _ in range(n)]
        shape, split_dim = (b, w), 1
    elif spec.workload == "hamiltonian":
        functions = [mlp_function(w) for _ in range(2 * n)]
        shape, split_dim = (b, 2 * w), 1
    elif spec.workload == "resnet":
        functions = [conv_function(w) for _ in range(n)]
        shape, split_dim = (b, w, spec.side, spec.side), 1
    else:
        functions = [LayerResidual(transformer_layer(w)) for _ in range(n)]
        shape, split_dim = (b, spec.seq, w), 2
    functions = [f.to(device).train() for f in functions]
    generator = torch.Generator().manual_seed(spec.seed + 1)

    def randn(s):
        return torch.randn(s, generator=generator).to(device)

    x, grad = randn(shape), randn(shape)
    if spec.scheme == "hamiltonian":
        x2, grad2 = x, grad
    else:
        wide = list(shape)
        wide[split_dim] *= 2
        x2, grad2 = randn(tuple(wide)), randn(tuple(wide))
    return Stack(spec, functions, x, grad, split_dim, x2, grad2)


# --------------------------------------------------------------------------------------------------
# The model zoo (memory only)

ZOO_PAIRS = (
    ("ResNet-18", ("momentum_resnet18", "reversible"), ("resnet18", "autograd")),
    ("ResNet-101", ("momentum_resnet101", "reversible"), ("resnet101", "autograd")),
    ("Hamiltonian-38", ("hamiltonian38", "reversible"), ("hamiltonian38", "autograd")),
    ("Hamiltonian-110", ("hamiltonian110", "reversible"), ("hamiltonian110", "autograd")),
)
"""(network, (memory-saving model, mode), (plain counterpart, mode)) on 3×32×32 images."""


def zoo_model(name: str, mode: str, device: str = "cpu") -> nn.Module:
    """A model of ``revnets.models`` in training mode, 10 classes, seeded."""
    from revnets.models import create_model

    torch.manual_seed(0)
    return create_model(name, num_classes=10).set_mode(mode).train().to(device)


def encoder_pair(depth: int, width: int, device: str = "cpu") -> dict[str, nn.Module]:
    """An ``nn.TransformerEncoder`` and its ``revnets.convert_to_momentum`` conversion (reversible)."""
    import revnets

    torch.manual_seed(0)
    encoder = nn.TransformerEncoder(transformer_layer(width), depth, enable_nested_tensor=False).train().to(device)
    return {"nn.TransformerEncoder": encoder,
            "convert_to_momentum (reversible)": revnets.convert_to_momentum(encoder, gamma=GAMMA).train()}
