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
