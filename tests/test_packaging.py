"""The package mapping and the layer rules of docs/architecture.md."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent
TOP = {"compiler": "kiln.compiler", "passes": "kiln.passes", "backends": "kiln.backends",
       "specs": "kiln.specs"}
# compiler/core knows no pass and no backend; compiler/driver (pipeline, CLI) sits on top.
CORE = "kiln.compiler.core"
DRIVER = "kiln.compiler.driver"


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _packages_on_disk() -> set[str]:
    found = set()
    for folder, name in TOP.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([name, *rel.parts]) if rel.parts else name)
    return found


def test_every_subpackage_is_mapped():
    config = _pyproject()["tool"]["setuptools"]
    listed = set(config["packages"])
    missing = _packages_on_disk() - listed
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {sorted(missing)}"
    for folder, name in TOP.items():
        assert config["package-dir"][name] == folder


def _folder_of(package: str) -> Path:
    for folder, name in TOP.items():
        if package == name or package.startswith(name + "."):
            return ROOT / folder / Path(*package[len(name):].lstrip(".").split(".") if
                                        package != name else ())
    raise AssertionError(f"{package} is under no mapped folder")


def test_package_dir_has_no_stale_entries():
    config = _pyproject()["tool"]["setuptools"]
    listed = set(config["packages"])
    data_only = listed - _packages_on_disk()
    # A folder of data without __init__.py is listed so that its package data installs;
    # it must exist and declare that data.
    for package in data_only:
        assert _folder_of(package).is_dir(), f"{package}: no such folder"
        assert package in config["package-data"], f"{package}: listed but holds no package data"


def test_package_data_globs_match_files():
    for package, globs in _pyproject()["tool"]["setuptools"]["package-data"].items():
        for pattern in globs:
            assert list(_folder_of(package).glob(pattern)), f"{package}: {pattern} matches nothing"


def test_heavy_dependencies_are_extras():
    project = _pyproject()["project"]
    required = " ".join(project["dependencies"])
    assert "xgboost" not in required and "torch" not in required
    extras = project["optional-dependencies"]
    assert any(d.startswith("xgboost") for d in extras["tune"])
    assert all("==" not in d for d in extras["torch"])
    # `make test` installs .[test]: it must pull what the tests import
    test = " ".join(extras["test"])
    assert "torch" in test and "xgboost" in test


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def test_core_imports_no_pass_and_no_backend():
    for path in _files("compiler/core"):
        bad = {n for n in _imports(path)
               if n.startswith(("kiln.passes", "kiln.backends", DRIVER))}
        assert not bad, f"{path.relative_to(ROOT)} (core) imports {sorted(bad)}"


@pytest.mark.parametrize("folder, forbidden", [("passes", "kiln.backends"),
                                               ("backends", "kiln.passes")])
def test_passes_and_backends_import_only_the_core(folder, forbidden):
    for path in _files(folder):
        for name in _imports(path):
            assert not name.startswith(forbidden), f"{path} imports {name}"
            if name.startswith("kiln.compiler"):
                assert name.startswith(CORE), f"{path.relative_to(ROOT)} imports {name} (not the core)"


def test_only_tvm_backend_imports_tvm():
    for folder in ("compiler", "passes", "backends"):
        for path in _files(folder):
            if path.is_relative_to(ROOT / "backends" / "tvm"):
                continue
            bad = {n for n in _imports(path) if n == "tvm" or n.startswith("tvm.")}
            assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_only_ort_backend_imports_onnxruntime():
    for folder in ("compiler", "passes", "backends"):
        for path in _files(folder):
            if path.is_relative_to(ROOT / "backends" / "ort"):
                continue
            bad = {n for n in _imports(path) if n.startswith("onnxruntime")}
            assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_one_pass_per_module_with_a_mirrored_test():
    from kiln.compiler.driver.registry import BUILTIN_PASSES

    for name, target in BUILTIN_PASSES.items():
        module = target.split(":")[0]
        parts = module.split(".")[2:]  # kiln.passes.<family>.<module>
        assert parts[-1] == name, f"pass {name!r} lives in module {module}"
        test = ROOT / "tests" / "passes" / Path(*parts[:-1]) / f"test_{parts[-1]}.py"
        assert test.exists(), f"missing test {test.relative_to(ROOT)}"


_DOC_REFERENCE = re.compile(r"(?<![\w/.-])((?:[\w-]+/)*[\w-]+\.md)\b")
_SKIP_FOLDERS = {".git", ".venv", "build", ".lint", ".pytest_cache", "node_modules"}


def _cited_documents():
    for path in sorted(ROOT.rglob("*")):
        rel = path.relative_to(ROOT)
        if not path.is_file() or _SKIP_FOLDERS & set(rel.parts) or \
                rel.parts[:2] == ("tests", ".cache") or "egg-info" in str(rel) or \
                path.suffix not in (".py", ".md", ".toml", ".yaml", ".sh", "") and \
                path.name != "Makefile":
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for match in _DOC_REFERENCE.finditer(text):
            yield rel, match.group(1)


def test_every_cited_document_exists():
    """Docstrings, error texts, pyproject and docs name only documents that ship here."""
    cited = list(_cited_documents())
    assert any(doc == "docs/spec.md" for _, doc in cited)
    missing = sorted({f"{rel}: {doc}" for rel, doc in cited
                      if not (ROOT / doc).exists() and not (ROOT / rel.parent / doc).exists()})
    assert not missing, missing


@pytest.mark.slow
def test_editable_install_prints_no_warnings():
    """`pip install -e .` (as `make setup` runs it) with no setuptools warnings: SPDX
    license, package data declared, the editable-install notice filtered by the backend."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "pip", "install", "-e", f"{ROOT}[test]",
                           "--no-deps", "--no-build-isolation"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    output = done.stdout + done.stderr
    assert "warn" not in output.lower(), output
