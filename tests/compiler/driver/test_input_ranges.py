"""Verification draws (kiln.compiler.driver.input_ranges): a shape-like input read through
a computation is drawn as the value the declared output shapes imply."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from kiln.compiler.driver.input_ranges import input_draws
from tests.compiler.core.test_shape_probe import window_model


def test_a_size_read_through_a_computation_is_drawn_as_the_implied_value():
    draws = input_draws(ir.serde.deserialize_model(window_model(7)))
    value = draws["size"](np.random.default_rng(0), [], np.dtype(np.int64))
    assert value.shape == () and value.dtype == np.int64 and int(value) == 7


def test_an_input_the_shapes_do_not_pin_gets_no_probed_draw():
    model = window_model(7)
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "N"
    assert "size" not in input_draws(ir.serde.deserialize_model(model))


def test_sequence_lens_are_drawn_within_the_sequence():
    from onnx import TensorProto, helper, numpy_helper

    for layout, x_shape in ((0, [5, 2, 4]), (1, [2, 5, 4])):
        w = numpy_helper.from_array(np.zeros([1, 12, 4], np.float32), "w")
        r = numpy_helper.from_array(np.zeros([1, 12, 3], np.float32), "r")
        graph = helper.make_graph(
            [helper.make_node("LSTM", ["x", "w", "r", "", "lens"], ["y"], hidden_size=3,
                              layout=layout)], "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape),
             helper.make_tensor_value_info("lens", TensorProto.INT32, [2])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, r])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
        draw = input_draws(ir.serde.deserialize_model(model))["lens"]
        lens = draw(np.random.default_rng(0), [200], np.dtype(np.int32))
        assert lens.min() == 1 and lens.max() == 5, layout   # T = 5 steps either layout
