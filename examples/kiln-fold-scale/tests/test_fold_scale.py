"""Tests of fold_scale with kiln's pass-checking helpers (ONNX Runtime before vs after)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from kiln_fold_scale import FoldScale, FoldScaleConfig
from onnx import TensorProto, helper, numpy_helper

from kiln.compiler.testing.passcheck import check_pass


def _model(nodes, inits, out_shape=(2, 4)) -> ir.Model:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(out_shape))],
        initializer=[numpy_helper.from_array(np.asarray(a, np.float32), name)
                     for name, a in inits.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(proto))


RNG = np.random.default_rng(0)
W = RNG.standard_normal((8, 4))


def test_matmul_per_column_scale_is_folded_exactly():
    model = _model([helper.make_node("MatMul", ["x", "w"], ["p"], name="mm"),
                    helper.make_node("Mul", ["p", "s"], ["y"], name="scale")],
                   {"w": W, "s": [0.5, 2.0, -1.0, 3.0]})
    check = check_pass(FoldScale(), model)
    assert check.modified and check.rewritten == 1
    assert [n.op_type for n in model.graph] == ["MatMul"]
    assert model.graph.outputs[0].name == "y"


def test_gemm_transposed_weight_scalar_scale_and_bias():
    model = _model([helper.make_node("Gemm", ["x", "w", "b"], ["p"], name="fc", transB=1,
                                     beta=0.5),
                    helper.make_node("Mul", ["s", "p"], ["y"], name="scale")],
                   {"w": W.T, "b": [1.0, 2.0, 3.0, 4.0], "s": 3.0})
    check = check_pass(FoldScale(), model)
    assert check.rewritten == 1
    assert [n.op_type for n in model.graph] == ["Gemm"]


@pytest.mark.parametrize("nodes, inits, reason", [
    ([helper.make_node("MatMul", ["x", "w"], ["p"], name="mm"),
      helper.make_node("Mul", ["p", "s"], ["y"], name="scale")],
     {"w": W, "s": np.ones((2, 4))}, "scale shape [2, 4] is not per column"),
    ([helper.make_node("MatMul", ["x", "w"], ["p"], name="mm"),
      helper.make_node("Sigmoid", ["s0"], ["s"], name="gate"),
      helper.make_node("Mul", ["p", "s"], ["y"], name="scale")],
     {"w": W, "s0": np.ones(4)}, "the scale is not a constant"),
    ([helper.make_node("MatMul", ["x", "w"], ["p"], name="mm"),
      helper.make_node("MatMul", ["x", "w"], ["q"], name="mm2"),
      helper.make_node("Mul", ["p", "s"], ["r"], name="scale"),
      helper.make_node("Add", ["r", "q"], ["y"], name="add")],
     {"w": W, "s": np.full(4, 2.0)}, "the weight is shared with another node"),
])
def test_refusals_name_the_reason(nodes, inits, reason):
    model = _model(nodes, inits)
    fold = FoldScale()
    check = check_pass(fold, model)
    assert not check.modified
    assert [c.reason for c in check.candidates] == [reason]


def test_max_scale_option():
    model = _model([helper.make_node("MatMul", ["x", "w"], ["p"], name="mm"),
                    helper.make_node("Mul", ["p", "s"], ["y"], name="scale")],
                   {"w": W, "s": [1e9, 1.0, 1.0, 1.0]})
    check = check_pass(FoldScale(FoldScaleConfig(max_scale=1e3)), model)
    assert [c.reason for c in check.candidates] == ["scale above max_scale"]


def test_listed_and_used_from_a_spec(tmp_path):
    """Needs the plugin installed (pip install .): its entry point makes it a kiln pass."""
    listing = subprocess.run([sys.executable, "-m", "kiln.compiler.driver.cli", "passes"],
                             capture_output=True, text=True, check=True).stdout
    assert "fold_scale (exact) [plugin: kiln-fold-scale]" in listing
    model = _model([helper.make_node("MatMul", ["x", "w"], ["p"], name="mm"),
                    helper.make_node("Mul", ["p", "s"], ["y"], name="scale")],
                   {"w": W, "s": [0.5, 2.0, -1.0, 3.0]})
    path = tmp_path / "model.onnx"
    ir.save(model, path)
    spec = tmp_path / "spec.yaml"
    spec.write_text("kiln: 1\npasses:\n  - fold_scale: {select: {op: MatMul}}\n")
    proc = subprocess.run([sys.executable, "-m", "kiln.compiler.driver.cli", "compile",
                           str(path), "--spec", str(spec), "--no-build", "--quiet",
                           "-o", str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert [n.op_type for n in onnx.load(tmp_path / "out" / "model.onnx").graph.node] == \
        ["MatMul"]
