"""The one memory-free engine that runs every reversible scheme, and the memory strategies it runs them under.

Public names: the memory strategies (:class:`MemoryStrategy`: :class:`Reversible`, :class:`Exact`,
:class:`Checkpoint`, :class:`Autograd`; :func:`memory_strategy` spells the public keywords into one),
what the engine runs (:class:`Stack`) and its entry points (:func:`run`, :func:`invert`,
:func:`run_exact`, :func:`invert_exact`), the fixed-point state (:class:`ExactState`), and
:func:`checkpoint_call` for the blocks a reversible model cannot invert.
"""

from .arithmetic import ExactState as ExactState
from .checkpointing import checkpoint_call as checkpoint_call
from .engine import invert as invert
from .engine import invert_exact as invert_exact
from .engine import run as run
from .engine import run_exact as run_exact
from .exact import FRAC_BITS_DEFAULT as FRAC_BITS_DEFAULT
from .stack import Stack as Stack
from .strategy import MODES as MODES
from .strategy import Autograd as Autograd
from .strategy import Checkpoint as Checkpoint
from .strategy import Exact as Exact
from .strategy import MemoryStrategy as MemoryStrategy
from .strategy import Reversible as Reversible
from .strategy import check_mode as check_mode
from .strategy import memory_strategy as memory_strategy

__all__ = ["FRAC_BITS_DEFAULT", "MODES", "Autograd", "Checkpoint", "Exact", "ExactState", "MemoryStrategy",
           "Reversible", "Stack", "check_mode", "checkpoint_call", "invert", "invert_exact", "memory_strategy", "run",
           "run_exact"]
