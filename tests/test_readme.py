"""The README's and the documentation pages' Python examples run as written (each file's blocks in order,
sharing one namespace, as a reader would), the numbers they state are what they give, and the API
reference pages (docs/api-*.md) name every public name of their package."""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
EXACT_COMMENT = re.compile(r"# (\d\.\d+)–(\d\.\d+) bits per element per layer")


def python_blocks(path: Path) -> list[str]:
    """The ```python blocks of a Markdown file, in order."""
    return re.findall(r"^```python\n(.*?)^```", path.read_text(encoding="utf-8"), flags=re.DOTALL | re.MULTILINE)


def imported_modules(blocks: list[str]) -> set[str]:
    """Top-level names of the modules the blocks import."""
    names = set()
    for block in blocks:
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def test_readme_and_docs_have_python_examples():
    assert len(python_blocks(README)) >= 2
    assert sum(bool(python_blocks(page)) for page in PAGES[1:]) >= 5


@pytest.mark.parametrize("page", [page for page in PAGES if python_blocks(page)],
                         ids=lambda p: p.relative_to(ROOT).as_posix())
def test_python_examples_run(page):
    pytest.importorskip("torchvision")
    pytest.importorskip("sklearn")  # the digits dataset the examples load
    blocks = python_blocks(page)
    for module in sorted(imported_modules(blocks)):
        pytest.importorskip(module)
    name = page.relative_to(ROOT).as_posix()
    namespace: dict = {}
    for index, block in enumerate(blocks):
        try:
            exec(compile(block, f"{name} python block {index}", "exec"), namespace)
        except Exception as error:  # pragma: no cover - the message is the point
            raise AssertionError(f"{name} python block {index} failed: {type(error).__name__}: {error}") from error


def test_exact_buffer_number_is_what_the_example_gives():
    """The bits per element per layer stated for the exact-mode example (a range over random draws)
    contain what the example computes, and lie above the information floor log2(10/9)."""
    found = [(page, block) for page in PAGES for block in python_blocks(page) if EXACT_COMMENT.search(block)]
    assert len(found) == 1, [page.name for page, _ in found]
    page, block = found[0]
    low, high = (float(v) for v in EXACT_COMMENT.search(block).groups())
    import torch
    from torch import nn

    import revnets

    namespace = {"torch": torch, "nn": nn, "revnets": revnets, "x": torch.randn(8, 64, requires_grad=True),
                 "f": lambda: nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64)), "print": lambda *a: None}
    exec(compile(block, f"{page.name} exact block", "exec"), namespace)
    bits = namespace["out"].buffer_bits() / (namespace["x"].numel() * 1000)
    assert 0.152 < low <= bits <= high, (low, bits, high)


def public_names(module: str) -> tuple[list[str], bool]:
    """The public names of a revnets module, read from its source: its ``__all__`` if it has one (True),
    else the names it re-exports as ``from .x import Name as Name`` (False)."""
    origin = importlib.util.find_spec(module).origin
    tree = ast.parse(Path(origin).read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return list(ast.literal_eval(node.value)), True
    names = [alias.asname for node in tree.body if isinstance(node, ast.ImportFrom)
             for alias in node.names if alias.asname == alias.name and not alias.name.startswith("_")]
    return names, False


API_PAGES = sorted(DOCS.glob("api-*.md"))


@pytest.mark.parametrize("page", API_PAGES, ids=lambda p: p.name)
def test_api_page_names_every_public_name(page):
    """mkdocstrings renders a package's re-exports only when its ``__all__`` lists them or the page's
    ``members:`` option does: a name re-exported without either would be missing from the reference."""
    module = "revnets" if page.stem == "api-revnets" else "revnets." + page.stem.removeprefix("api-")
    text = page.read_text(encoding="utf-8")
    assert f"::: {module}" in text
    names, has_all = public_names(module)
    if has_all and "members:" not in text:
        return  # rendered from __all__
    missing = [name for name in names if not re.search(rf"\b{re.escape(name)}\b", text)]
    assert not missing, f"{page.relative_to(ROOT)} does not list {missing} (public names of {module})"
