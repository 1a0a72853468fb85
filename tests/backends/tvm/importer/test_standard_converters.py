"""kiln's converters for standard ops (importer.standard_converters): the forms they
rewrite, the ones they leave to TVM's converter, and results equal to ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from kiln.backends.tvm import build_artifact, load, lower_to_relax
from kiln.compiler.core.metrics import relative_error
from kiln.compiler.testing import quant_models
from kiln.compiler.testing.onnx_models import to_ir
from kiln.compiler.testing.reference import DECODE_REL_TOL, REL_TOL, ort_outputs


def _single_node_model(node, inits, x_shape, opset: int = 13):
    graph = helper.make_graph(
        [node], "single", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, None)], inits)
    return onnx.shape_inference.infer_shapes(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))


def _as_ir(model):
    return to_ir(model) if isinstance(model, onnx.ModelProto) else model


def _build_and_compare(model, feeds, tmp_path, tol: float = REL_TOL):
    """Build ``model`` for the host, run it on ``feeds`` and compare with ONNX Runtime."""
    result = build_artifact(_as_ir(model), "host", tmp_path, model_hash="sha256:test")
    out = load(tmp_path)(**feeds)
    out = out[0] if isinstance(out, (list, tuple)) else out
    (ref,) = ort_outputs(model, feeds)
    assert out.shape == ref.shape
    assert relative_error(out, ref) < tol
    return result


@pytest.mark.parametrize("kernel, strides, bias, rewritten", [
    ((2, 2), (2, 2), True, True),     # the DB-head / U-Net upsampler
    ((2, 3), (2, 3), False, True),
    ((3, 3), (2, 2), True, False),    # overlapping taps: the importer's conv2d_transpose
])
def test_conv_transpose_without_overlap_is_a_1x1_conv(kernel, strides, bias, rewritten, tmp_path):
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((6, 5, *kernel)).astype(np.float32), "w")]
    inputs = ["x", "w"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(5).astype(np.float32), "b"))
        inputs.append("b")
    node = helper.make_node("ConvTranspose", inputs, ["y"], kernel_shape=list(kernel),
                            strides=list(strides))
    model = _single_node_model(node, inits, [1, 6, 7, 9])
    script = lower_to_relax(to_ir(model)).script()
    assert ("conv2d_transpose" not in script) == rewritten
    x = rng.standard_normal((1, 6, 7, 9)).astype(np.float32)
    _build_and_compare(model, {"x": x}, tmp_path)


@pytest.mark.parametrize("opset, bounds", [(13, (0.0, 6.0)), (13, (None, 1.0)), (6, (-1.0, 1.0)),
                                           (13, (float("nan"), 0.5))])
def test_clip_with_constant_bounds_is_relax_max_min(opset, bounds, tmp_path):
    lo, hi = bounds
    if opset < 11:
        node = helper.make_node("Clip", ["x"], ["y"], min=lo, max=hi)
        inits = []
    else:
        names = ["x", "lo" if lo is not None else "", "hi"]
        node = helper.make_node("Clip", names, ["y"])
        inits = [numpy_helper.from_array(np.array(v, np.float32), n)
                 for n, v in (("lo", lo), ("hi", hi)) if v is not None]
    model = _single_node_model(node, inits, [1, 4, 8, 8], opset)
    script = lower_to_relax(to_ir(model)).script()
    assert "R.call_tir" not in script and "R.minimum" in script
    x = np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32) * 4
    _build_and_compare(model, {"x": x}, tmp_path)


def test_clip_with_a_computed_bound_keeps_the_importers_conversion():
    """A bound that is not a constant scalar: TVM's converter (a clip kernel, no max/min)."""
    graph = helper.make_graph(
        [helper.make_node("ReduceMax", ["x"], ["hi"], keepdims=0),
         helper.make_node("Clip", ["x", "", "hi"], ["y"])], "computed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    script = lower_to_relax(to_ir(onnx.shape_inference.infer_shapes(model))).script()
    assert "R.minimum" not in script


@pytest.mark.parametrize("node", [
    helper.make_node("HardSwish", ["x"], ["y"]),
    helper.make_node("HardSigmoid", ["x"], ["y"]),
    helper.make_node("HardSigmoid", ["x"], ["y"], alpha=0.3, beta=0.6),
], ids=["hardswish", "hardsigmoid", "hardsigmoid-attrs"])
def test_hard_activations_are_relax_max_min(node, tmp_path):
    """No ``R.clip`` (ConvertLayout wrapped it in two transposes in NHWC CNNs)."""
    model = _single_node_model(node, [], [1, 4, 8, 8], 14)
    script = lower_to_relax(to_ir(model)).script()
    assert "R.clip" not in script and "R.minimum" in script and "R.maximum" in script
    x = np.random.default_rng(2).standard_normal((1, 4, 8, 8)).astype(np.float32) * 5
    _build_and_compare(model, {"x": x}, tmp_path)


def test_sum_is_a_chain_of_adds(tmp_path):
    """Sum of three inputs: two broadcasting adds, no stacked intermediate."""
    graph = helper.make_graph(
        [helper.make_node("Sum", ["x", "x", "b"], ["y"])], "sum",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.arange(4, dtype=np.float32), "b")])
    model = onnx.shape_inference.infer_shapes(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    script = lower_to_relax(to_ir(model)).script()
    assert script.count("R.add(") == 2 and "R.stack" not in script
    x = np.random.default_rng(2).standard_normal((2, 3, 4)).astype(np.float32)
    _build_and_compare(model, {"x": x}, tmp_path)


@pytest.mark.parametrize("rows", [[[2], [0], [3], [1]], [[1], [3]]])
def test_scatter_nd_of_rows_matches(rows, tmp_path):
    """ScatterND writing every row once is lowered as a row gather (data unread); any
    other ScatterND (here: two of four rows) keeps TVM's scatter."""
    indices = numpy_helper.from_array(np.array(rows, np.int64), "rows")
    model = quant_models.build(
        [helper.make_node("ScatterND", ["x", "rows", "u"], ["y"], name="scatter")], [indices],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8]),
         helper.make_tensor_value_info("u", TensorProto.FLOAT, [len(rows), 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])])
    kernels = _build_and_compare(model, quant_models.feeds(model), tmp_path, DECODE_REL_TOL).rules
    assert any("kiln_permute_rows" in name for name in kernels) == (len(rows) == 4), kernels


@pytest.mark.parametrize("axis, shape", [(0, [2, 3, 4]), (-1, [2, 3, 4]), (1, [1, 4, 6])])
def test_rms_normalization_over_any_axes_matches(axis, shape, tmp_path):
    """Over every axis (axis 0) TVM's own conversion failed to compile."""
    scale = numpy_helper.from_array(
        np.random.default_rng(4).standard_normal(shape[axis % len(shape):]).astype(np.float32),
        "scale")
    graph = helper.make_graph(
        [helper.make_node("RMSNormalization", ["x", "scale"], ["y"], axis=axis,
                          epsilon=1e-3)], "rms",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [scale])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    x = np.random.default_rng(5).standard_normal(shape).astype(np.float32)
    _build_and_compare(model, {"x": x}, tmp_path)


@pytest.mark.parametrize("elem", [TensorProto.FLOAT16, TensorProto.FLOAT])
def test_elu_keeps_its_input_type(elem, tmp_path):
    # TVM's Elu subtracts a float16 exp from a float32 constant: the import failed
    node = helper.make_node("Elu", ["x"], ["y"], alpha=0.7)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", elem, [2, 8])],
                              [helper.make_tensor_value_info("y", elem, [2, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    dtype = helper.tensor_dtype_to_np_dtype(elem)
    x = np.random.default_rng(0).standard_normal([2, 8]).astype(dtype)
    build_artifact(to_ir(model), "host", tmp_path, model_hash="sha256:test")
    out = load(tmp_path)(x=x)
    out = out[0] if isinstance(out, (list, tuple)) else out
    want = np.where(x > 0, x, 0.7 * (np.exp(x.astype(np.float64)) - 1)).astype(dtype)
    assert out.dtype == dtype
    np.testing.assert_allclose(out.astype(np.float64), want, rtol=ELU_TOL[elem], atol=ELU_TOL[elem])


#: float16 rounds each of the 4 ops once (an ulp is 2^-11 relative)
ELU_TOL = {TensorProto.FLOAT16: 4e-3, TensorProto.FLOAT: 1e-6}
