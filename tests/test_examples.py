"""The example plugin in examples/ (docs/writing-a-pass.md) installs as a real distribution
and its own tests pass against this checkout's kiln."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PLUGIN = REPO / "examples" / "kiln-fold-scale"


def test_fold_scale_plugin_installs_and_its_tests_pass(tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--no-index", "--disable-pip-version-check",
                    "--target", str(site), str(PLUGIN)],
                   check=True, capture_output=True, text=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-p", "no:xdist", str(PLUGIN / "tests")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout


@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("make") is None,
                    reason="cmake and make are not installed")
def test_cmake_example_rebuilds_only_when_the_spec_changes(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(REPO / "examples" / "cmake", source)
    kiln = Path(sys.executable).with_name("kiln")
    model = REPO / "compiler" / "core" / "examples" / "tiny_cnn.onnx"
    build = tmp_path / "build"
    subprocess.run(["cmake", "-S", str(source), "-B", str(build), f"-DKILN={kiln}",
                    f"-DKILN_MODEL={model}", "-G", "Unix Makefiles"],
                   check=True, capture_output=True, text=True, timeout=120)

    def make() -> str:
        proc = subprocess.run(["cmake", "--build", str(build)], capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    assert "kiln: compiling" in make()
    assert {"model.onnx", "model.so", "manifest.json"} <= \
        {p.name for p in (build / "tiny_cnn").iterdir()}
    assert "kiln: compiling" not in make()                    # nothing changed: no rerun
    spec = source / "spec.yaml"
    spec.write_text(spec.read_text() + "verify: {samples: 1}\n")
    assert "kiln: compiling" in make()
