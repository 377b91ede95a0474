"""The model zoo: ``create_model(name, num_classes=...)`` and ``list_models()``.

Every model is a :class:`ZooModel`: ``forward_features``, ``forward_head``, ``set_mode``, ``num_classes``.
"""

from . import chang as _chang  # noqa: F401 - registers Chang et al.'s networks
from . import resnet as _resnet  # noqa: F401 - registers the ResNets
from .base import ZooModel as ZooModel
from .registry import create_model as create_model
from .registry import list_models as list_models
from .registry import register_model as register_model
