"""A shape-like input implied by the declared output shapes (kiln.compiler.core.shape_probe):
a window size read through Cast/Range, a crop shape through Add/Slice, a size with a
dim no output has (AffineGrid's C), a clamped end
(several values, the same outputs) implied; a slice start that moves the values but not
the shape, two integer inputs, an undeclared output shape: nothing implied."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from kiln.compiler.core.shape_probe import probe_shape_inputs


def _model(nodes, inputs, outputs, inits=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _int(name, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, np.int64), name)


def window_model(out: int = 5, size_dtype=TensorProto.INT64) -> onnx.ModelProto:
    """cos(Range(0, float(size), 1)): a window's size read through Cast and Range."""
    return _model(
        [helper.make_node("Cast", ["size"], ["n"], to=TensorProto.FLOAT),
         helper.make_node("Range", ["zero", "n", "one"], ["r"]),
         helper.make_node("Cos", ["r"], ["y"])],
        [helper.make_tensor_value_info("size", size_dtype, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [out])],
        [numpy_helper.from_array(np.float32(0), "zero"),
         numpy_helper.from_array(np.float32(1), "one")])


def _slice(starts: str, ends: str, x_shape, shape_shape, out, extra=()) -> onnx.ModelProto:
    return _model([*extra, helper.make_node("Slice", ["x", starts, ends], ["y"])],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape),
                   helper.make_tensor_value_info("s", TensorProto.INT64, shape_shape)],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, out)],
                  [_int("zeros", [0] * len(x_shape)), _int("three", [3])])


def test_a_window_size_read_through_range_is_implied():
    (value,) = probe_shape_inputs(window_model(5)).values()
    assert value.shape == () and value.dtype == np.int64 and int(value) == 5
    assert int(probe_shape_inputs(window_model(3, TensorProto.INT32))["size"]) == 3


def test_a_crop_shape_read_through_add_is_implied():
    model = _slice("zeros", "e", [4, 6], [2], [3, 5],
                   [helper.make_node("Add", ["s", "zeros"], ["e"])])
    assert probe_shape_inputs(model)["s"].tolist() == [3, 5]


def test_a_shape_with_a_dim_no_output_has_is_implied_with_it_filled_in():
    # size [N, C, H, W] -> zeros [N, H, W] (an expanded AffineGrid's): any C gives the same
    model = _model([helper.make_node("Slice", ["s", "zero", "one"], ["n"]),
                    helper.make_node("Slice", ["s", "two", "four"], ["hw"]),
                    helper.make_node("Concat", ["n", "hw"], ["nhw"], axis=0),
                    helper.make_node("ConstantOfShape", ["nhw"], ["y"])],
                   [helper.make_tensor_value_info("s", TensorProto.INT64, [4])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, 6])],
                   [_int(name, [v]) for name, v in
                    (("zero", 0), ("one", 1), ("two", 2), ("four", 4))])
    value = probe_shape_inputs(model)["s"].tolist()
    assert [value[0], *value[2:]] == [2, 5, 6]


def test_values_giving_the_same_outputs_imply_the_first():
    # ends 10, 11, 12 all slice the whole 10 elements: equivalent, the first is taken
    model = _slice("zeros", "e", [10], [], [10],
                   [helper.make_node("Unsqueeze", ["s", "zeros"], ["e"])])
    assert int(probe_shape_inputs(model)["s"]) == 10


def test_a_start_that_moves_the_values_but_not_the_shape_implies_nothing():
    # x[s : s + 3] has 3 elements for any s <= 7, other ones for each s
    model = _slice("t", "e", [10], [1], [3],
                   [helper.make_node("Identity", ["s"], ["t"]),
                    helper.make_node("Add", ["s", "three"], ["e"])])
    assert probe_shape_inputs(model) == {}


def test_nothing_is_probed_without_static_outputs_or_with_two_integer_inputs():
    model = window_model(5)
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "N"
    assert probe_shape_inputs(model) == {}
    model = window_model(5)
    model.graph.input.append(helper.make_tensor_value_info("other", TensorProto.INT64, []))
    assert probe_shape_inputs(model) == {}
    direct = _slice("zeros", "s", [10], [1], [4])  # read by Slice itself: an operand rule's
    assert probe_shape_inputs(direct) == {}
