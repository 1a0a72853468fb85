"""A third-party pass, installed as a real distribution with a ``kiln.passes`` entry point:
listed by `kiln passes`, usable from a spec, its options validated like a built-in's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from kiln.compiler.driver.cli import main

REPO = Path(__file__).resolve().parents[3]
EXAMPLE = REPO / "compiler" / "core" / "examples" / "tiny_cnn.onnx"

PYPROJECT = """\
[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"

[project]
name = "kiln-demo-plugin"
version = "0.1.0"

[project.entry-points."kiln.passes"]
my_pass = "kiln_demo_plugin:MyPass"
broken_pass = "kiln_demo_plugin:NoSuchPass"

[tool.setuptools]
py-modules = ["kiln_demo_plugin"]
"""

MODULE = '''\
"""A demo kiln plugin."""

from pydantic import Field

from kiln.compiler.core.pass_api import Candidate, KilnPass, PassConfig


class MyPassConfig(PassConfig):
    prefix: str = Field(default="demo.", min_length=1, description="prepended to node names")


class MyPass(KilnPass):
    """Prefix the name of every selected node (a demo plugin; outputs are unchanged)."""

    name = "my_pass"
    config_class = MyPassConfig
    exact = True

    def candidates(self, model):
        found = []
        for node in self.selected_nodes(model):
            if node.name.startswith(self.config.prefix):
                found.append(Candidate(node, node.name, reason="already prefixed"))
            else:
                found.append(Candidate(node, node.name))
        return found

    def rewrite(self, model, accepted):
        for candidate in accepted:
            candidate.anchor.name = self.config.prefix + candidate.anchor.name
        return len(accepted)
'''


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    """The plugin project, pip-installed (offline, no deps) into its own site folder."""
    root = tmp_path_factory.mktemp("plugin")
    project = root / "kiln-demo-plugin"
    project.mkdir()
    (project / "pyproject.toml").write_text(PYPROJECT)
    (project / "kiln_demo_plugin.py").write_text(MODULE)
    site = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--no-index", "--disable-pip-version-check",
                    "--target", str(site), str(project)],
                   check=True, capture_output=True, text=True, timeout=300)
    assert list(site.glob("kiln_demo_plugin-*.dist-info"))
    return site


def kiln(site: Path, *argv: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)}
    return subprocess.run([sys.executable, "-m", "kiln.compiler.driver.cli", *argv], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def passes_listing(plugin_site) -> str:
    proc = kiln(plugin_site, "passes")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_plugin_is_listed_with_options_and_docstring(passes_listing):
    lines = passes_listing.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("my_pass"))
    assert lines[header] == ("my_pass (exact) [plugin: kiln-demo-plugin]: Prefix the name of "
                             "every selected node (a demo plugin; outputs are unchanged).")
    assert lines[header + 1].strip() == "prefix: str = 'demo.' - prepended to node names"
    assert "fold_batchnorm (exact)" in passes_listing  # built-ins still there


def test_plugin_options_are_in_the_schema(plugin_site):
    proc = kiln(plugin_site, "schema")
    assert proc.returncode == 0, proc.stderr
    schema = json.loads(proc.stdout)
    (item,) = [i for i in schema["properties"]["passes"]["items"]["anyOf"]
               if "my_pass" in i.get("properties", {})]
    body = item["properties"]["my_pass"]["anyOf"][0]
    assert set(body["properties"]) == {"prefix", "select", "optional", "budget"}


def test_plugin_used_from_a_spec(plugin_site, tmp_path):
    spec = tmp_path / "plugin.yaml"
    spec.write_text("kiln: 1\npasses:\n  - fold_batchnorm: {}\n  - my_pass:\n"
                    "      prefix: 'x.'\n      select: {op: [Conv, Gemm]}\n")
    out = tmp_path / "out"
    proc = kiln(plugin_site, "compile", str(EXAMPLE), "--spec", str(spec), "--no-build",
                "--quiet", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    before = {n.name: n.op_type for n in onnx.load(EXAMPLE).graph.node}
    model = onnx.load(out / "model.onnx")
    names = [n.name for n in model.graph.node]
    # fold_batchnorm removed stem.bn and head.scale/shift; my_pass prefixed exactly the
    # remaining Conv and Gemm nodes and nothing else.
    expected = {("x." + name if op in ("Conv", "Gemm") else name)
                for name, op in before.items()
                if name not in ("stem.bn", "head.scale", "head.shift")}
    assert set(names) == expected
    assert sorted(n for n in names if n.startswith("x.")) == [
        "x.head.fc", "x.left.conv", "x.right.conv", "x.stem.conv"]
    # Renaming is the only change: without the prefixes, the same bytes as fold_batchnorm alone.
    fold_only = tmp_path / "fold.yaml"
    fold_only.write_text("kiln: 1\npasses:\n  - fold_batchnorm: {}\n")
    assert main(["compile", str(EXAMPLE), "--spec", str(fold_only), "--no-build", "--quiet",
                 "-o", str(tmp_path / "fold")]) == 0
    for node in model.graph.node:
        node.name = node.name.removeprefix("x.")
    assert model.SerializeToString(deterministic=True) == \
        onnx.load(tmp_path / "fold" / "model.onnx").SerializeToString(deterministic=True)
    report = json.loads((out / "report.json").read_text())
    entry = report["passes"][1]
    assert (entry["name"], entry["matched"], entry["modified"]) == ("my_pass", 4, True)
    assert entry["sqnr_db"] is None and entry["max_abs_err"] == 0.0  # verified: identical


def test_plugin_refusal_shows_in_plan(plugin_site, tmp_path):
    spec = tmp_path / "plugin.yaml"
    spec.write_text("kiln: 1\npasses:\n  - my_pass: {prefix: stem., select: {op: Conv}}\n")
    proc = kiln(plugin_site, "plan", str(EXAMPLE), "--spec", str(spec))
    assert proc.returncode == 0, proc.stderr
    assert "- stem.conv: already prefixed" in proc.stdout
    assert "+ left.conv" in proc.stdout and "+ right.conv" in proc.stdout


@pytest.mark.parametrize("options, where, words", [
    ("{prefixx: a}", ":3 passes[0].my_pass.prefixx: ",
     ["pass 'my_pass'", "unknown key 'prefixx'", "did you mean 'prefix'"]),
    ("\n      prefix: [a]", ":4 passes[0].my_pass.prefix: ", ["valid string"]),
])
def test_plugin_bad_options_are_validated_like_builtins(plugin_site, tmp_path, options, where,
                                                        words):
    spec = tmp_path / "plugin.yaml"
    spec.write_text(f"kiln: 1\npasses:\n  - my_pass: {options}\n")
    proc = kiln(plugin_site, "plan", str(EXAMPLE), "--spec", str(spec))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"kiln: error: {spec}{where}"), line
    for word in words:
        assert word in line, line


def test_broken_plugin_is_reported_not_fatal(plugin_site, passes_listing, tmp_path):
    (line,) = [line for line in passes_listing.splitlines() if line.startswith("broken_pass")]
    assert "unavailable" in line and "kiln_demo_plugin:NoSuchPass" in line
    spec = tmp_path / "broken.yaml"
    spec.write_text("kiln: 1\npasses:\n  - broken_pass: {}\n")
    proc = kiln(plugin_site, "plan", str(EXAMPLE), "--spec", str(spec))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"kiln: error: {spec}:3 passes[0]: pass 'broken_pass' "
                           "(kiln_demo_plugin:NoSuchPass) cannot be loaded"), line


def test_without_the_plugin_the_pass_is_unknown(tmp_path, capsys):
    spec = tmp_path / "plugin.yaml"
    spec.write_text("kiln: 1\npasses:\n  - my_pass: {}\n")
    assert main(["plan", str(EXAMPLE), "--spec", str(spec)]) == 2  # this process: no plugin
    assert capsys.readouterr().err.startswith(f"kiln: error: {spec}:3 passes[0]: unknown pass "
                                              "'my_pass'")
