"""`kiln compile` end to end for the host: PyTorch models through passes, ONNX and TVM,
the compiled module checked against ONNX Runtime inside the compile."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kiln.backends.tvm import load
from kiln.compiler.driver.compile import compile_model

# The compiled module vs ONNX Runtime on the same inputs (relative to max |output|).
MATCH_RTOL = 1e-4


def _check(out, source_fn):
    report = json.loads((out / "report.json").read_text())
    compiled = report["compiled"]
    assert compiled["verified"] and compiled["target"] == "host"
    module, args = source_fn()
    with torch.no_grad():
        expected = module(*args).numpy()
    (got,) = load(out)(*[a.numpy() for a in args])
    err = np.abs(got - expected).max() / np.abs(expected).max()
    assert err < MATCH_RTOL, err
    return report


def test_cnn_with_reparam_spec(tmp_path):
    from kiln.compiler.testing.torch_models import cnn_with_batchnorm

    result = compile_model("kiln.compiler.testing.torch_models:cnn_with_batchnorm", "reparam")
    out = result.save(tmp_path, target="host")
    report = _check(out, cnn_with_batchnorm)
    fold = report["passes"][-1]
    assert fold["name"] == "fold_batchnorm" and fold["matched"] == 2


def test_small_encoder_fp32(tmp_path):
    from kiln.compiler.testing.torch_models import small_encoder

    out = compile_model("kiln.compiler.testing.torch_models:small_encoder", "fp32").save(
        tmp_path, target="host")
    _check(out, small_encoder)


@pytest.mark.slow
def test_bench_encoder_fp32(tmp_path):
    """The 4-layer d=256 seq-128 encoder of bench/."""
    from kiln.compiler.testing.torch_models import encoder

    out = compile_model("kiln.compiler.testing.torch_models:encoder", "fp32").save(tmp_path, target="host")
    _check(out, encoder)


def test_kiln_run_cli(tmp_path, capsys):
    from kiln.compiler.driver.cli import main

    out = tmp_path / "build"
    assert main(["compile", "compiler/core/examples/tiny_cnn.onnx", "--spec", "reparam",
                 "--target", "host", "-o", str(out), "-q"]) == 0
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    assert main(["run", str(out), "--inputs", str(tmp_path / "in.npz"),
                 "--output", str(tmp_path / "out.npz")]) == 0
    assert "output 0: shape [1, 10] float32" in capsys.readouterr().out
    (expected,) = load(out)(x)
    saved = np.load(tmp_path / "out.npz")
    np.testing.assert_array_equal(saved[saved.files[0]], expected)
    np.savez(tmp_path / "bad.npz", y=x)
    assert main(["run", str(out), "--inputs", str(tmp_path / "bad.npz")]) == 2
    assert "x" in capsys.readouterr().err
