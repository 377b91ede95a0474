"""Reproductions of the papers' experiments, one module each, under one contract (:mod:`.base`).

``list_experiments()`` names them; ``reproduce(name, out, smoke=..., seeds=...)`` runs one and writes
``results.json`` and its figure; ``revnets reproduce NAME`` is the command line.
"""

# Each module registers its experiment when imported: this order is the registry's (and the docs').
# isort: off
from . import rings as _rings  # noqa: F401
from . import cubic as _cubic  # noqa: F401
from . import linear as _linear  # noqa: F401
from . import l2o as _l2o  # noqa: F401
from . import memory as _memory  # noqa: F401
from . import gamma as _gamma  # noqa: F401
from . import small_data as _small_data  # noqa: F401
from . import deep as _deep  # noqa: F401
from . import finetune as _finetune  # noqa: F401
from . import cifar as _cifar  # noqa: F401
from . import lm_finetune as _lm_finetune  # noqa: F401
# isort: on
from .base import Experiment as Experiment
from .base import format_table as format_table
from .base import get_experiment as get_experiment
from .base import list_experiments as list_experiments
from .base import load_results as load_results
from .base import register_experiment as register_experiment
from .base import reproduce as reproduce
from .base import summary_entry as summary_entry
