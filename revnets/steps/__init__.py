"""The invertible maths: one small declaration per scheme on the shared :class:`Step` form."""

from .base import State as State
from .base import Step as Step
from .base import Update as Update
from .base import join_channels as join_channels
from .base import split_channels as split_channels
from .coupling import coupling_step as coupling_step
from .momentum import momentum_step as momentum_step
from .twostep import leapfrog_step as leapfrog_step
from .twostep import midpoint_step as midpoint_step
