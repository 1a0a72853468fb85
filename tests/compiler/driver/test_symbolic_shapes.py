"""Symbolic input dims: one build serves every size in its range (issue 16, item 4).

`--input x=1x3x16xW --dim W=LO..HI` (or a model's own dim_param named by --dim) builds
one artifact; the manifest records the symbol and range; the artifact runs at any size
in range and matches ONNX Runtime there; a size out of range is one line, exit 2."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

from kiln.compiler.core.errors import FrontendError, KilnError
from kiln.compiler.driver import symbolic
from kiln.compiler.driver.cli import main
from kiln.compiler.testing.symbolic_models import conv_line_model, sequence_model


@pytest.fixture(scope="module")
def conv_build(tmp_path_factory):
    """The conv line model built once for W=9..63 through `kiln compile`."""
    pytest.importorskip("tvm")
    folder = tmp_path_factory.mktemp("symbolic")
    model = conv_line_model(folder / "conv.onnx")
    out = folder / "out"
    code = main(["compile", str(model), "--input", "x=1x3x16xW", "--dim", "W=9..63",
                 "--target", "host", "-o", str(out), "--quiet"])
    assert code == 0
    return model, out


def test_parse_binding_forms():
    assert symbolic.parse_binding("x=1x3x48xW")[1] == ["1", "3", "48", "W"]
    bound, ranges = symbolic.split_shapes({"x": [1, 3, 48, "W=16..1024"], "y": ["4..8", 2]})
    assert bound == {"x": [1, 3, 48, "W"], "y": ["y_0", 2]}
    assert ranges == {"W": (16, 1024), "y_0": (4, 8)}
    assert symbolic.parse_dim_option("seq_len=1..512") == ("seq_len", (1, 512))
    assert symbolic.check_sizes_values({"W": (16, 1024)}) == [{"W": 16}, {"W": 520},
                                                              {"W": 1024}]
    assert symbolic.check_sizes_values({"W": (5, 5)}) == [{"W": 5}]


@pytest.mark.parametrize("text, words", [
    ("x=1x3x48xW=64..16", ["--input 'x=1x3x48xW=64..16'", "1 <= LO <= HI"]),
    ("x=1x3x48x16..", ["--input 'x=1x3x48x16..'", "integers"]),
    ("x=1x3x48xw", ["--input 'x=1x3x48xw'", "uppercase"]),
    ("x=1x3x48x0..9", ["1 <= LO <= HI"]),
])
def test_bad_symbolic_binding_is_one_line(capsys, tmp_path, text, words):
    model = conv_line_model(tmp_path / "conv.onnx")
    code = main(["compile", str(model), "--input", text, "--no-build", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) <= 2, err
    for word in words:
        assert word in err, err


def test_dim_naming_nothing_is_refused(capsys, tmp_path):
    model = conv_line_model(tmp_path / "conv.onnx")
    code = main(["compile", str(model), "--dim", "H=1..9", "--no-build", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "--dim H" in err and "no input" in err, err
    with pytest.raises(FrontendError, match="--dim 'W': expected NAME=LO..HI"):
        symbolic.parse_dim_option("W")


def test_fixed_dim_cannot_become_a_symbol(capsys, tmp_path):
    model = conv_line_model(tmp_path / "conv.onnx", width=32)
    code = main(["compile", str(model), "--input", "x=1x3x16xW", "--no-build", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "dim 3 is fixed at 32" in err, err


def test_one_build_serves_every_size(conv_build):
    model, out = conv_build
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dims"] == {"W": [9, 63]}
    assert manifest["inputs"][0]["shape"] == [1, 3, 16, "W"]
    assert manifest["outputs"][0]["shape"] == [1, 8, 16, "W"]
    from kiln.backends import tvm as tvm_backend

    compiled = tvm_backend.load(out)
    session = ort.InferenceSession(str(model))
    rng = np.random.default_rng(1)
    for width in (9, 10, 31, 37, 63):  # tile tails (row tile 4) included
        x = rng.standard_normal((1, 3, 16, width)).astype(np.float32)
        np.testing.assert_allclose(compiled(x=x)[0], session.run(None, {"x": x})[0],
                                   rtol=1e-4, atol=1e-4)
    with pytest.raises(KilnError, match=r"dim 3 \(W\) is 64, outside the range this build "
                                        r"serves \(W=9\.\.63\)"):
        compiled(x=np.zeros((1, 3, 16, 64), np.float32))
    with pytest.raises(KilnError, match="expected shape"):
        compiled(x=np.zeros((1, 3, 17, 20), np.float32))


def test_kiln_run_refuses_out_of_range(conv_build, tmp_path, capsys):
    _, out = conv_build
    good, bad = tmp_path / "good.npz", tmp_path / "bad.npz"
    np.savez(good, x=np.ones((1, 3, 16, 40), np.float32))
    np.savez(bad, x=np.ones((1, 3, 16, 8), np.float32))
    assert main(["run", str(out), "--inputs", str(good), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["run", str(out), "--inputs", str(bad), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "outside the range" in err and "W=9..63" in err, err


def test_model_dim_param_becomes_the_symbol(tmp_path):
    """`T` is the model's own dim_param: --dim alone makes it the build's symbol; the
    driver checks the compiled module at T=1, 32, 64 against ONNX Runtime."""
    pytest.importorskip("tvm")
    from kiln.backends import tvm as tvm_backend
    from kiln.compiler.driver.compile import compile_to_folder

    model = sequence_model(tmp_path / "seq.onnx")
    code = main(["compile", str(model), "--dim", "T=1..64", "--target", "host",
                 "-o", str(tmp_path / "out"), "--quiet"])
    assert code == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["dims"] == {"T": [1, 64]} and manifest["inputs"][0]["shape"] == [1, "T", 16]
    compiled = tvm_backend.load(tmp_path / "out")
    session = ort.InferenceSession(str(model))
    for length in (1, 17, 64):
        x = np.random.default_rng(length).standard_normal((1, length, 16)).astype(np.float32)
        np.testing.assert_allclose(compiled(x=x)[0], session.run(None, {"x": x})[0],
                                   rtol=1e-4, atol=1e-4)
    # the Python API takes the same forms: a named range inline
    result = compile_to_folder(model, "reparam", tmp_path / "api",
                               input_shapes={"x": [1, "T=2..8", 16]}, target="host")
    assert result.report.compiled is not None and result.report.compiled.verified
    assert json.loads((tmp_path / "api" / "manifest.json").read_text())["dims"] == \
        {"T": [2, 8]}


def test_static_build_has_no_dims(tmp_path):
    pytest.importorskip("tvm")
    model = conv_line_model(tmp_path / "conv.onnx")
    assert main(["compile", str(model), "--input", "x=1x3x16x20", "--target", "host",
                 "-o", str(tmp_path / "out"), "--quiet"]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["dims"] == {} and manifest["inputs"][0]["shape"] == [1, 3, 16, 20]


def test_spec_inputs_take_symbols(tmp_path, capsys):
    """The spec's `inputs:` takes the same dims; a bad one names the spec's line."""
    model = conv_line_model(tmp_path / "conv.onnx")
    spec = tmp_path / "spec.yaml"
    spec.write_text("kiln: 1\ninputs:\n  x: [1, 3, 16, W=9..40]\n")
    assert main(["compile", str(model), "--spec", str(spec), "--target", "host",
                 "-o", str(tmp_path / "out"), "--quiet"]) == 0
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["dims"] == \
        {"W": [9, 40]}
    spec.write_text("kiln: 1\ninputs:\n  x: [1, 3, 16, w]\n")
    code = main(["compile", str(model), "--spec", str(spec), "--no-build", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and f"{spec}:3 inputs.x" in err and "'w'" in err, err
