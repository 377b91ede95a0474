"""Chang et al.'s reversible networks for arbitrarily deep residual nets (AAAI 2018) in the model zoo.

``hamiltonian{38,74,110,218,1202}``, ``midpoint{…}`` and ``leapfrog{…}`` (the same depths): the authors'
CIFAR network

    3×3 conv stem (→ channels[0]) + BN + ReLU → Unit 1 → 2×2 avg-pool + zero channel padding → Unit 2
    → pool + pad → Unit 3 → BN, ReLU, global average pool, linear head,

where each unit is ONE reversible stack of :mod:`revnets.nn` on the two channel halves (streams) of its
input, so that in ``mode="reversible"`` only the unit boundaries keep activations.

Configurations (the authors' ``cifar_configs.py``; ``channels`` = stem, unit 1, unit 2, unit 3):

=========  =================  ===============
depth      channels           blocks per unit
=========  =================  ===============
38         32, 32, 64, 112    3
74         32, 32, 64, 112    6
110        32, 32, 64, 128    9
218        32, 32, 64, 128    18
1202       32, 32, 64, 128    100
=========  =================  ===============

**Layer count** ``4·(blocks) + 2`` (blocks summed over the three units): a block is two branches and
every branch applies a 3×3 operator ``K`` and its transpose ``Kᵀ`` (two weight layers sharing one
kernel), so a block is 4 layers; the stem convolution and the linear head are the 2 others. All three
schemes have two branches per block, hence the same depth and the same parameter count:

* **Hamiltonian** (:class:`~revnets.HamiltonianNet`, Verlet): one block = one ``(F_j, G_j)`` pair,
  ``Y_{j+1} = Y_j + h·F_j(Z_j)``, ``Z_{j+1} = Z_j − h·G_j(Y_{j+1})``. The stack applies ``h`` and the
  signs ``(+h, −h)``; the branches are the plain ``F = K₁ᵀσ(BN(K₁·BN(x)))`` and
  ``G = K₂ᵀσ(BN(K₂·BN(x)))``.
* **Midpoint** (:class:`~revnets.MidpointNet`): one block = two steps
  ``Y_{j+1} = Y_{j−1} + 2h·σ(BN((K_j − K_jᵀ)·BN(Y_j)))``, the two halves of the unit input being
  ``(Y_{−1}, Y_0)``. [exact form unverified: all we could establish from Chang et al. (2018) is a
  branch ``σ((K − Kᵀ)Y + b)`` on the antisymmetric operator ``K − Kᵀ``; the BNs are added as in the
  Hamiltonian branch.]
* **Leapfrog** (:class:`~revnets.LeapfrogNet`): one block = two steps
  ``Y_{j+1} = 2Y_j − Y_{j−1} − h²·K_jᵀσ(BN(K_j·BN(Y_j)))`` on ``(Y_{j−1}, Y_j)``; the stack applies
  ``h²`` and the minus sign, the branch is the plain ``Kᵀσ(…)``.

**Bias** ``b`` of the paper's ``σ(K·+b)``: it is the shift β of the BatchNorm that follows ``K``. A
separate convolution bias would be cancelled exactly by that BatchNorm's mean subtraction in training
(a dead parameter whose gradient is zero up to rounding), so ``K`` has none.

**Step sizes** (defaults, ``h=`` overrides): Hamiltonian ``h = 1`` (the authors' ``config.h``);
Leapfrog ``h = 1`` (gain ``h² = 1`` on the branch); Midpoint ``h = 0.5`` (gain ``2h = 1``): every
scheme then adds its branch with unit gain, as the Hamiltonian does.

**Unit transitions**: 2×2 average pooling (stride 2), then zero channels appended to EACH of the two
halves separately: ``(Y, Z) → (cat(pool(Y), 0), cat(pool(Z), 0))``, so that the next unit's halves are
again ``Y`` and ``Z`` (padding the concatenation at its end would move part of ``Z`` into the next
unit's ``Y`` stream). This is what the authors' code does (``_possible_downsample`` on ``y1`` and
``y2``). For the two-step schemes the halves are the states ``(Y_{j−1}, Y_j)`` and are padded alike.

**Kernel smoothness**: :meth:`ChangNet.smoothness_penalty` returns ``Σ_units Σ_j ||K_{j+1} − K_j||²``
over consecutive kernels of a unit (for the Hamiltonian, the ``F`` kernels and the ``G`` kernels form
two sequences, as in the authors' ``_weight_smoothness``; their ``tf.nn.l2_loss`` carries an extra
factor 1/2). A trainer adds it with weight 2e-4; the model does not.

**Precision** (float32, ``mode="reversible"``): the channels a transition zero-pads reach the first
branch of units 2 and 3 with zero variance, and that branch's input BatchNorm would divide their
inversion rounding by ``sqrt(eps)`` (≈ 316×): float32 gradients were ~1e-2 off at depth 38. Each unit
therefore keeps its input (``keep_input``, one state per unit: the paper stores activations at unit
boundaries), and the engine evaluates the unit's first layer on it: float32 gradients then agree
with ``mode="autograd"`` to ~1e-6 (depth 38 and 110); float64 to < 1e-9.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..autograd import MemoryStrategy, memory_strategy
from ..nn.base import ReversibleNet
from ..nn.coupling import HamiltonianNet, check_step_size
from ..nn.twostep import LeapfrogNet, MidpointNet
from .base import ZooModel
from .registry import register_model

SCHEMES = ("hamiltonian", "midpoint", "leapfrog")

DEFAULT_STEP_SIZES: dict[str, float] = {"hamiltonian": 1.0, "midpoint": 0.5, "leapfrog": 1.0}
"""Default ``h`` per scheme: every scheme adds its branch with unit gain (``h``, ``2h``, ``h²``)."""

CONFIGS: dict[int, tuple[tuple[int, int, int, int], int]] = {
    38: ((32, 32, 64, 112), 3),
    74: ((32, 32, 64, 112), 6),
    110: ((32, 32, 64, 128), 9),
    218: ((32, 32, 64, 128), 18),
    1202: ((32, 32, 64, 128), 100),
}
"""``depth: (channels of stem, unit 1, unit 2, unit 3; blocks per unit)``; depth = 4·(3·blocks) + 2."""


# --------------------------------------------------------------------------------------------------
# Branches: one 3×3 kernel K on the stream's channels, applied as K and as its adjoint Kᵀ.


class KernelBranch(nn.Module):
    """Base of the branches: ``BN`` of the input, a 3×3 kernel ``K`` (``C → C``, no bias) and a ``BN``
    after it. ``Kᵀ`` is :func:`torch.nn.functional.conv_transpose2d` with the SAME weight tensor and
    padding, the exact adjoint of ``K`` (``<K x, y> = <x, Kᵀ y>``): the kernel is stored once.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.norm_in = nn.BatchNorm2d(channels)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(channels)  # its shift β is the paper's bias b

    @property
    def kernel(self) -> Tensor:
        """The weight of ``K``, ``(C, C, 3, 3)``, shared by ``K`` and ``Kᵀ``."""
        return self.conv.weight

    def apply_kernel(self, x: Tensor) -> Tensor:
        """``K x``: ``(B, C, H, W) → (B, C, H, W)``."""
        return self.conv(x)

    def apply_transpose(self, y: Tensor) -> Tensor:
        """``Kᵀ y`` with the weights of ``K``: ``(B, C, H, W) → (B, C, H, W)``."""
        return F.conv_transpose2d(y, self.conv.weight, padding=self.conv.padding)


class SymmetricBranch(KernelBranch):
    """``Kᵀ σ(BN(K · BN(x)))`` (Hamiltonian and Leapfrog): ``(B, C, H, W) → (B, C, H, W)``.

    The network applies the step size and sign (``±h`` or ``−h²``); this branch does not.
    """

    def forward(self, x: Tensor) -> Tensor:
        return self.apply_transpose(F.relu(self.norm(self.apply_kernel(self.norm_in(x)))))


class AntisymmetricBranch(KernelBranch):
    """``σ(BN((K − Kᵀ) · BN(x)))`` (Midpoint; [unverified exact form], see the module docs).

    ``K − Kᵀ`` is antisymmetric: ``<(K − Kᵀ) x, x> = 0``. The network applies ``2h``.
    """

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm_in(x)
        return F.relu(self.norm(self.apply_kernel(x) - self.apply_transpose(x)))


# --------------------------------------------------------------------------------------------------
# Unit transitions.


def pad_streams(x: Tensor, channels: int) -> Tensor:
    """Zero-pad EACH half of ``x`` (``(B, C, H, W)``, ``C`` even) to ``channels // 2`` channels.

    ``cat(Y, Z) → cat(Y, 0, Z, 0)``: the two streams stay the two halves of the result.
    """
    in_channels = x.shape[1]
    if in_channels % 2 or channels % 2 or channels < in_channels:
        raise ValueError(
            f"pad_streams pads the two halves of an even channel count to an even, not smaller count; "
            f"got {in_channels} → {channels}"
        )
    if channels == in_channels:
        return x
    extra = (channels - in_channels) // 2
    y, z = torch.chunk(x, 2, dim=1)
    pad = (0, 0, 0, 0, 0, extra)  # (W, H, C): append `extra` zero channels
    return torch.cat([F.pad(y, pad), F.pad(z, pad)], dim=1)


def transition(x: Tensor, channels: int) -> Tensor:
    """Between units: 2×2 average pooling (stride 2), then :func:`pad_streams` to ``channels``.

    ``(B, C, H, W) → (B, channels, H // 2, W // 2)``; no parameters, and its backward needs no stored
    activation values.
    """
    return pad_streams(F.avg_pool2d(x, 2), channels)


# --------------------------------------------------------------------------------------------------
# The network.


def _make_unit(scheme: str, channels: int, blocks: int, h: float, strategy: MemoryStrategy) -> ReversibleNet:
    """One reversible stack on ``channels`` channels (two streams of ``channels // 2``), ``blocks`` blocks.

    The unit keeps its input (``keep_input``): the paper stores activations at unit boundaries, and
    the zero-padded channels of that input must reach the first branch's BatchNorm exactly.
    """
    half = channels // 2
    if scheme == "hamiltonian":
        unit = HamiltonianNet(
            [SymmetricBranch(half) for _ in range(blocks)], [SymmetricBranch(half) for _ in range(blocks)],
            h=h, strategy=strategy,
        )
    elif scheme == "midpoint":
        unit = MidpointNet([AntisymmetricBranch(half) for _ in range(2 * blocks)], h=h, strategy=strategy)
    else:
        unit = LeapfrogNet([SymmetricBranch(half) for _ in range(2 * blocks)], h=h, strategy=strategy)
    unit.keep_input = True
    return unit


def _kernel_sequences(unit: ReversibleNet) -> list[list[Tensor]]:
    """The sequences of consecutive kernels of ``unit`` (F's and G's separately for the Hamiltonian)."""
    if isinstance(unit, HamiltonianNet):
        return [[f.kernel for f in unit.f_functions], [g.kernel for g in unit.g_functions]]
    return [[f.kernel for f in unit.functions]]


class ChangNet(ZooModel):
    """Chang et al.'s CIFAR network: ``(B, in_channels, H, W) → (B, num_classes)`` (see the module docs).

    Args:
        scheme: ``"hamiltonian"``, ``"midpoint"`` or ``"leapfrog"``.
        channels: channels of the stem and of the three units (all even).
        blocks_per_unit: blocks of each unit (an int for all three, or three ints).
        num_classes: outputs of the linear head.
        h: step size (> 0); ``None`` takes :data:`DEFAULT_STEP_SIZES` of the scheme.
        mode: memory strategy of the units (``"reversible"``, ``"autograd"``, ``"checkpoint"``).
        exact: fixed-point state in the units (bit-exact inversion; needs ``mode="reversible"``).
        in_channels: channels of the input images.

    Attributes:
        units: the three reversible stacks (``nn.ModuleList``).
        num_layers: ``4·(blocks) + 2``: stem, ``K`` and ``Kᵀ`` of every branch, head.
    """

    def __init__(
        self,
        scheme: str,
        channels: Sequence[int],
        blocks_per_unit: int | Sequence[int],
        num_classes: int = 10,
        *,
        h: float | None = None,
        mode: str = "reversible",
        exact: bool = False,
        in_channels: int = 3,
    ):
        if scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {SCHEMES}; got {scheme!r}")
        channels = tuple(channels)
        if len(channels) != 4 or any(isinstance(c, bool) or not isinstance(c, int) or c < 2 or c % 2 for c in channels):
            raise ValueError(f"channels must be 4 even integers ≥ 2 (stem, unit 1, unit 2, unit 3); got {channels!r}")
        if any(b < a for a, b in itertools.pairwise(channels)):
            raise ValueError(f"channels must not decrease (transitions zero-pad); got {channels!r}")
        blocks = (blocks_per_unit,) * 3 if isinstance(blocks_per_unit, int) else tuple(blocks_per_unit)
        if len(blocks) != 3 or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in blocks):
            raise ValueError(f"blocks_per_unit must be an integer ≥ 1 or three of them; got {blocks_per_unit!r}")
        h = DEFAULT_STEP_SIZES[scheme] if h is None else check_step_size(h)
        strategy = memory_strategy(mode, exact=exact)
        super().__init__(num_classes, channels[-1])
        self.scheme, self.h, self.channels, self.blocks_per_unit = scheme, h, channels, blocks
        self.num_layers = 4 * sum(blocks) + 2
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, channels[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(channels[0]),
            nn.ReLU(inplace=True),
        )
        self.units = nn.ModuleList(
            _make_unit(scheme, c, b, h, strategy) for c, b in zip(channels[1:], blocks)
        )
        self.norm = nn.BatchNorm2d(channels[-1])
        self.initialise_weights()

    def forward_features(self, x: Tensor) -> Tensor:
        x = pad_streams(self.stem(x), self.channels[1])  # (B, channels[1], H, W)
        for index, unit in enumerate(self.units):
            if index:
                x = transition(x, self.channels[index + 1])  # (B, channels[k], H/2^k, W/2^k)
            x = unit(x)
        x = F.relu(self.norm(x))
        return x.mean(dim=(2, 3))  # (B, num_features)

    def kernel_sequences(self) -> list[list[Tensor]]:
        """Every sequence of consecutive kernels ``K_j`` (``(C, C, 3, 3)`` each) that the smoothness
        penalty compares: one per unit (two per Hamiltonian unit: the F's and the G's)."""
        return [seq for unit in self.units for seq in _kernel_sequences(unit)]

    def smoothness_penalty(self) -> Tensor:
        """``Σ_units Σ_j ||K_{j+1} − K_j||²`` (a differentiable scalar; weight it in the trainer, 2e-4)."""
        kernels = self.kernel_sequences()
        reference = kernels[0][0]
        total = reference.new_zeros(())
        for seq in kernels:
            for a, b in itertools.pairwise(seq):
                total = total + (b - a).square().sum()
        return total

    def extra_repr(self) -> str:
        return (f"scheme={self.scheme!r}, h={self.h}, channels={self.channels}, "
                f"blocks_per_unit={self.blocks_per_unit}, num_layers={self.num_layers}")


def chang_net(
    scheme: str, depth: int, num_classes: int = 10, *, h: float | None = None, mode: str = "reversible",
    exact: bool = False, in_channels: int = 3,
) -> ChangNet:
    """Chang et al.'s ``scheme``-``depth`` network with the authors' configuration (:data:`CONFIGS`)."""
    if depth not in CONFIGS:
        raise ValueError(f"depth must be one of {sorted(CONFIGS)}; got {depth!r}")
    channels, blocks = CONFIGS[depth]
    return ChangNet(scheme, channels, blocks, num_classes, h=h, mode=mode, exact=exact, in_channels=in_channels)


def _builder(scheme: str, depth: int):
    """The registered builder of ``{scheme}{depth}``: ``h`` defaults to the scheme's default step size."""
    default_h = DEFAULT_STEP_SIZES[scheme]

    def builder(num_classes: int = 10, *, h: float = default_h, mode: str = "reversible", in_channels: int = 3,
                **kwargs) -> ChangNet:
        return chang_net(scheme, depth, num_classes, h=h, mode=mode, in_channels=in_channels, **kwargs)

    builder.__name__ = builder.__qualname__ = f"{scheme}{depth}"
    builder.__doc__ = (
        f"Chang et al.'s {scheme.capitalize()}-{depth} network (h = {default_h} by default); see :func:`chang_net`."
    )
    return builder


for _scheme in SCHEMES:
    for _depth in CONFIGS:
        register_model(_builder(_scheme, _depth), name=f"{_scheme}{_depth}")
