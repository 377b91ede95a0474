"""Training the model zoo: the loop, the one training step it shares with the experiments
(:func:`training_step`), recipes and configuration files, resumable checkpoints, metrics, devices and
precision, several processes under torchrun (DDP, FSDP).

Kept apart from the engine (:mod:`revnets.autograd`, :mod:`revnets.nn`): nothing in the core package
imports it. The ``revnets train`` command is a thin layer over :func:`train` and :func:`resume`.
"""

from .checkpoint import RunDirectoryError as RunDirectoryError
from .checkpoint import default_run_dir as default_run_dir
from .config import RECIPES as RECIPES
from .config import TrainConfig as TrainConfig
from .config import resolve as resolve
from .loop import Interrupted as Interrupted
from .loop import evaluate as evaluate
from .loop import resume as resume
from .loop import train as train
from .metrics import EpochMetrics as EpochMetrics
from .metrics import summary_table as summary_table
from .step import forward_backward as forward_backward
from .step import training_step as training_step
