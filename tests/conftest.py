"""Shared fixtures. The factories themselves live in ``tests/helpers.py`` as plain functions.

``tests/`` is not a package and pyproject.toml sets no ``pythonpath``, so this directory is put on
``sys.path`` here: test modules (and hypothesis tests, which cannot use function-scoped fixtures)
can then ``from helpers import make_net, ARCHITECTURES``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import helpers
import pytest
import torch
from helpers import ARCHITECTURES


@pytest.fixture(params=ARCHITECTURES)
def architecture(request) -> str:
    """Each of the five architecture names in turn."""
    return request.param


@pytest.fixture(params=("reversible", "autograd", "checkpoint"))
def mode(request) -> str:
    """Each memory mode in turn."""
    return request.param


@pytest.fixture
def make_net():
    """The factory :func:`helpers.make_net` (``make_net(arch, depth, width, dtype=..., mode=..., seed=...)``)."""
    return helpers.make_net


@pytest.fixture
def make_input():
    """The factory :func:`helpers.make_input` (``make_input(batch, width, dtype=..., seed=...)``)."""
    return helpers.make_input


@pytest.fixture
def net(architecture, make_net):
    """A small float64 reversible-mode network (depth 3, width 4) of each architecture."""
    return make_net(architecture, depth=3, width=4, dtype=torch.float64)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is faster and immune to contention with other processes.

    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
