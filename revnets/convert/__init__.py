"""Converters: existing residual models to reversible ones (the Momentum ResNet drop-in replacement)."""

from .momentum import MomentumTransformerDecoder as MomentumTransformerDecoder
from .momentum import MomentumTransformerEncoder as MomentumTransformerEncoder
from .momentum import convert_to_momentum as convert_to_momentum
from .momentum import convert_to_reversible as convert_to_reversible
from .momentum import find_residual_stacks as find_residual_stacks
from .residual import ResidualFunction as ResidualFunction
