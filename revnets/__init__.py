"""revnets: reversible residual networks whose training memory does not grow with depth.

Momentum ResNets (Sander et al., ICML 2021), RevNets (Gomez et al., 2017) and Chang et al.'s
Hamiltonian, Midpoint and Leapfrog networks (AAAI 2018), all run by one memory-free autograd engine.
"""

from .autograd import MODES as MODES
from .autograd import Autograd as Autograd
from .autograd import Checkpoint as Checkpoint
from .autograd import Exact as Exact
from .autograd import ExactState as ExactState
from .autograd import MemoryStrategy as MemoryStrategy
from .autograd import Reversible as Reversible
from .convert import convert_to_momentum as convert_to_momentum
from .convert import convert_to_reversible as convert_to_reversible
from .nn import HamiltonianNet as HamiltonianNet
from .nn import LeapfrogNet as LeapfrogNet
from .nn import MidpointNet as MidpointNet
from .nn import MomentumNet as MomentumNet
from .nn import ReversibleNet as ReversibleNet
from .nn import RevNet as RevNet
from .nn import set_mode as set_mode

__version__ = "0.1.0"
