"""Without an optional extra, the package says which one to install instead of a bare ModuleNotFoundError.

Each check runs in a fresh interpreter where the missing package is blocked (``sys.modules[name] = None``
makes ``import name`` fail as if it were not installed).
"""

from __future__ import annotations

import subprocess
import sys

import pytest


def run_without(package: str, code: str) -> subprocess.CompletedProcess:
    program = f"import sys; sys.modules[{package!r}] = None\n{code}"
    return subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120, check=False)


def test_core_works_without_numpy():
    result = run_without("numpy", "import torch, revnets\nnet = revnets.MomentumNet([torch.nn.Tanh()] * 3)\n"
                         "net(torch.randn(2, 3, requires_grad=True)).sum().backward()")
    assert result.returncode == 0, result.stderr


def test_data_without_numpy_names_the_extra():
    result = run_without("numpy", "import revnets.data")
    assert result.returncode != 0
    assert "revnets.data needs numpy" in result.stderr and 'pip install "revnets[data]"' in result.stderr


@pytest.mark.parametrize("package", ["typer", "tqdm"])
def test_cli_without_its_extra_names_the_extra(package):
    result = run_without(package, "from revnets.cli import main\nsys.argv = ['revnets', '--help']\nmain()")
    assert result.returncode != 0
    assert f"needs the package {package!r}" in result.stderr and 'pip install "revnets[cli]"' in result.stderr
    assert "Traceback" not in result.stderr
