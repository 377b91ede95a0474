"""Datasets: the papers' generated toy problems, small packaged digits, and image datasets read from disk.

Use :func:`load_dataset` with a name from :func:`list_datasets`; :func:`dataset_info` describes a
dataset (classes, input shape, splits, channel statistics) without loading it.
"""

try:
    import numpy  # noqa: F401  (the image datasets and the packaged ones are numpy arrays)
except ModuleNotFoundError as error:
    raise ModuleNotFoundError(
        'revnets.data needs numpy, which is not installed; install the data extra: pip install "revnets[data]"',
        name=error.name,
    ) from error

from .images import ArrayImageDataset as ArrayImageDataset
from .images import ImageDataset as ImageDataset
from .images import ImageFolderDataset as ImageFolderDataset
from .images import cifar10 as cifar10
from .images import cifar100 as cifar100
from .images import image_folder as image_folder
from .images import stl10 as stl10
from .packaged import digits as digits
from .packaged import mnist5k as mnist5k
from .registry import DatasetInfo as DatasetInfo
from .registry import dataset_info as dataset_info
from .registry import list_datasets as list_datasets
from .registry import load_dataset as load_dataset
from .synthetic import cubic_map as cubic_map
from .synthetic import nested_rings as nested_rings
