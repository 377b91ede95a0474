"""The README's Python examples run as written (in order, sharing one namespace, as a reader would)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_examples_run():
    pytest.importorskip("torchvision")
    pytest.importorskip("sklearn")
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert len(blocks) >= 3
    namespace: dict = {}
    for index, block in enumerate(blocks):
        try:
            exec(compile(block, f"README.md python block {index}", "exec"), namespace)  # noqa: S102
        except Exception as error:  # pragma: no cover - the message is the point
            raise AssertionError(f"README python block {index} failed: {type(error).__name__}: {error}") from error


def test_readme_exact_buffer_number_is_what_the_example_gives():
    """The bits per element per layer the README states for its exact-mode example (a range over random
    draws) contain what the example computes, and lie above the information floor log2(10/9)."""
    text = README.read_text()
    low, high = (float(v) for v in re.search(r"# (\d\.\d+)–(\d\.\d+) bits per element per layer", text).groups())
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL) if "exact=True" in b)
    import torch
    from torch import nn

    import revnets

    namespace = {"torch": torch, "nn": nn, "revnets": revnets, "x": torch.randn(8, 64, requires_grad=True),
                 "f": lambda: nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64)), "print": lambda *a: None}
    exec(compile(block, "README.md exact block", "exec"), namespace)  # noqa: S102
    bits = namespace["out"].buffer_bits() / (namespace["x"].numel() * 1000)
    assert 0.152 < low <= bits <= high, (low, bits, high)
