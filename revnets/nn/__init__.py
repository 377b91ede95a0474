"""User-facing reversible networks: each a short declaration on the shared engine."""

from .base import ReversibleNet as ReversibleNet
from .base import TwoStreamNet as TwoStreamNet
from .base import set_mode as set_mode
from .coupling import HamiltonianNet as HamiltonianNet
from .coupling import RevNet as RevNet
from .momentum import MomentumNet as MomentumNet
from .twostep import LeapfrogNet as LeapfrogNet
from .twostep import MidpointNet as MidpointNet
