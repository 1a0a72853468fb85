"""ONNX rewrites before import for TVM converters' edge cases (importer.edge_cases):
ConvTranspose's output_shape written as pads/output_padding (TVM ignores output_shape)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from kiln.backends.tvm.importer.edge_cases import rewrite_edge_cases
from kiln.compiler.testing.reference import ort_outputs

#: the rewritten node computes the same sums in ONNX Runtime
TOLERANCE = 1e-6


def _conv_transpose(x_shape, out_shape, **attrs) -> onnx.ModelProto:
    w = np.random.default_rng(1).standard_normal([x_shape[1], 2, 3, 3]).astype(np.float32)
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], **attrs)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("attrs", [
    dict(strides=[3, 2], output_shape=[10, 8]),                  # bigger: output_padding
    dict(strides=[2, 2], output_shape=[6, 5]),                   # smaller: pads split
    dict(strides=[2, 2], output_shape=[6, 6], auto_pad="SAME_UPPER"),
    dict(strides=[2, 2], output_shape=[6, 5], auto_pad="SAME_LOWER"),
    dict(strides=[2, 2], output_shape=[8, 7], auto_pad="SAME_LOWER"),
    dict(strides=[2, 3], output_shape=[8, 10], pads=[1, 0, 0, 1]),  # given pads: ignored
])
def test_output_shape_becomes_pads_and_output_padding(attrs):
    model = _conv_transpose([1, 1, 3, 3], [1, 2, *attrs["output_shape"]], **attrs)
    x = np.random.default_rng(0).standard_normal([1, 1, 3, 3]).astype(np.float32)
    (want,) = ort_outputs(model, {"x": x})
    assert rewrite_edge_cases(model) == 1
    (node,) = model.graph.node
    names = {a.name for a in node.attribute}
    assert "output_shape" not in names and "auto_pad" not in names
    assert rewrite_edge_cases(model) == 0                       # idempotent
    (got,) = ort_outputs(model, {"x": x})
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=TOLERANCE, atol=TOLERANCE)


def test_an_output_padding_tvm_cannot_take_is_left_alone():
    model = _conv_transpose([1, 1, 3, 3], [1, 2, 12, 8], strides=[3, 2], output_shape=[12, 8])
    assert rewrite_edge_cases(model) == 0                       # 12 needs output_padding 3
    assert any(a.name == "output_shape" for a in model.graph.node[0].attribute)
