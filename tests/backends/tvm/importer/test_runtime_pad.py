"""Pad with pads computed at run time (importer.runtime_pad): one build for the declared
output shape, run with pads (and axes, constant_value) a graph input feeds, against ONNX
Runtime in each mode, with uneven and negative (cropping) pads; refused without a
declared output shape."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from kiln.backends.tvm import build_artifact, load, lower_to_relax
from kiln.compiler.core.errors import LoweringError
from kiln.compiler.testing.onnx_models import to_ir
from kiln.compiler.testing.reference import ort_outputs

SHAPE = [2, 3, 4]
#: (output name, mode, pads [begin..., end...] over every axis) of the Pad nodes
NODES = [
    ("constant_uneven", "constant", [0, 2, 0, 1, 0, 3]),
    ("constant_crop", "constant", [0, -1, 1, 0, 1, -2]),
    ("edge", "edge", [1, 0, 2, 0, 2, 1]),
    ("reflect", "reflect", [0, 2, 3, 0, 1, 0]),
    ("wrap", "wrap", [0, 1, 3, 1, 2, 2]),
]


def _out_shape(pads):
    rank = len(SHAPE)
    return [n + pads[i] + pads[i + rank] for i, n in enumerate(SHAPE)]


def runtime_pads_model(nodes=NODES, declared=True) -> onnx.ModelProto:
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE),
              helper.make_tensor_value_info("value", TensorProto.FLOAT, [])]
    graph_nodes, outputs = [], []
    for name, mode, pads in nodes:
        inputs.append(helper.make_tensor_value_info(f"p_{name}", TensorProto.INT64, [6]))
        operands = ["x", f"p_{name}"] + (["value"] if mode == "constant" else [])
        graph_nodes.append(helper.make_node("Pad", operands, [name], name=name, mode=mode))
        outputs.append(helper.make_tensor_value_info(
            name, TensorProto.FLOAT, _out_shape(pads) if declared else None))
    # runtime axes too: pads over axes [2, 0] (given in that order), value absent (0)
    inputs += [helper.make_tensor_value_info("p_axes", TensorProto.INT64, [4]),
               helper.make_tensor_value_info("axes", TensorProto.INT64, [2])]
    graph_nodes.append(helper.make_node("Pad", ["x", "p_axes", "", "axes"], ["by_axes"],
                                        name="by_axes"))
    outputs.append(helper.make_tensor_value_info("by_axes", TensorProto.FLOAT,
                                                 [3, 3, 5] if declared else None))
    graph = helper.make_graph(graph_nodes, "runtime_pad", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


def test_one_build_matches_ort_for_every_mode(tmp_path):
    model = runtime_pads_model()
    build_artifact(to_ir(model), "host", tmp_path, model_hash="sha256:test")
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    feeds = {"x": x, "value": np.array(1.5, np.float32),
             **{f"p_{name}": np.array(pads, np.int64) for name, _, pads in NODES},
             "p_axes": np.array([1, 2, 0, -1], np.int64),   # axis 2: +1 +0, axis 0: +2 -1
             "axes": np.array([-1, 0], np.int64)}
    got = load(tmp_path)(**feeds)
    want = ort_outputs(model, feeds)
    for name, g, w in zip([n for n, _, _ in NODES] + ["by_axes"], got, want):
        np.testing.assert_array_equal(np.asarray(g), w, err_msg=name)


def test_without_a_declared_output_shape_runtime_pads_are_refused():
    model = runtime_pads_model(NODES[:1], declared=False)
    with pytest.raises(LoweringError, match=r"Pad \(node 'constant_uneven'\).*declared"):
        lower_to_relax(to_ir(model))
