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
