"""The package stays readable and layered: no module over 450 lines, no function over 60 lines of code,
and the core (steps, autograd, nn, models, convert, data, memory) never imports what sits above it
(training, experiments, the command line)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "revnets"
MODULES = sorted(PACKAGE.rglob("*.py"))
MAX_MODULE_LINES, MAX_FUNCTION_CODE_LINES = 450, 60
CORE = ("steps", "autograd", "nn", "models", "convert", "data", "memory.py")
ABOVE_THE_CORE = ("training", "experiments", "cli")


def code_lines(source: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of ``node``'s body that hold code: its docstring, blank lines and comments left out."""
    body = node.body
    if ast.get_docstring(node, clean=False) is not None:
        body = body[1:]
    if not body:
        return 0
    lines = source[body[0].lineno - 1 : node.end_lineno]
    return sum(1 for line in lines if line.strip() and not line.strip().startswith("#"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_and_functions_stay_small(path):
    source = path.read_text().splitlines()
    assert len(source) <= MAX_MODULE_LINES, f"{path.name}: {len(source)} lines"
    tree = ast.parse("\n".join(source))
    long = {node.name: n for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            if (n := code_lines(source, node)) > MAX_FUNCTION_CODE_LINES}
    assert not long, f"functions over {MAX_FUNCTION_CODE_LINES} code lines: {long}"


@pytest.mark.parametrize("path", [p for p in MODULES if p.relative_to(PACKAGE).parts[0] in CORE],
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_the_core_does_not_import_what_sits_above_it(path):
    depth = len(path.relative_to(PACKAGE).parts)  # 1: a module of revnets itself, 2: of a subpackage
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.level:  # relative: ``..training`` from a subpackage, ``.training`` from revnets itself
                parts = node.module.split(".") if node.level == depth else []
            else:
                parts = node.module.split(".")[1:] if node.module.startswith("revnets.") else []
            assert not parts or parts[0] not in ABOVE_THE_CORE, f"{path.relative_to(PACKAGE)} imports {node.module}"
