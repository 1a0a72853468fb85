"""Tests and bench/ use kiln as installed: no source folder imported as a top-level
package (``compiler.spec`` next to ``kiln.compiler.core.spec`` would be two copies of one
module), no ``sys.path`` edits, no bench -> tests imports, frontends named through
``kiln.compiler.testing``."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
SOURCE_FOLDERS = {"compiler", "passes", "backends", "specs"}


def _python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def _imported_modules(tree: ast.AST) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


@pytest.mark.parametrize("path", _python_files("tests", "bench"),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_name_the_installed_package(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for name in _imported_modules(tree):
        top = name.split(".")[0]
        assert top not in SOURCE_FOLDERS, f"{name}: import kiln.{name} (the installed package)"
        if path.is_relative_to(ROOT / "bench"):
            assert top != "tests", f"bench imports {name}: shared helpers are kiln.compiler.testing"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in {"insert", "append"} \
                and isinstance(node.value, ast.Attribute) and node.value.attr == "path" \
                and isinstance(node.value.value, ast.Name) and node.value.value.id == "sys":
            pytest.fail(f"{path.relative_to(ROOT)}:{node.lineno} edits sys.path")
        if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and node.value.startswith("tests.") and ":" in node.value:
            pytest.fail(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r} names a test "
                        "module as MODULE:CALLABLE; use kiln.compiler.testing")


def test_no_second_copy_of_kiln_was_imported():
    """Collection imported every test module before this runs: none brought in a copy."""
    copies = sorted(name for name in sys.modules if name.split(".")[0] in SOURCE_FOLDERS)
    assert not copies, f"imported from the source tree instead of kiln.*: {copies}"
