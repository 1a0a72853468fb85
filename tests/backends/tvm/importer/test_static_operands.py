"""Shape operands fed by model inputs fixed from the declared output shapes before import
(kiln.backends.tvm.importer.static_operands): Split parts, Reduce axes behind an
elementwise op (expanded ReduceL2), a keepdims=0 reduce whose axis the shapes cannot
tell built for each candidate and picked at run time, idempotence."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from kiln.backends.tvm.importer.static_operands import fix_shape_operands
from kiln.compiler.testing.conformance import failures


def _model(nodes, inputs, outputs) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _fixed(model: onnx.ModelProto, node: int, index: int) -> list[int]:
    name = model.graph.node[node].input[index]
    init = next(t for t in model.graph.initializer if t.name == name)
    return numpy_helper.to_array(init).tolist()


def test_split_parts_come_from_the_outputs():
    model = _model([helper.make_node("Split", ["x", "parts"], ["a", "b"], axis=1)],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6]),
                    helper.make_tensor_value_info("parts", TensorProto.INT64, [2])],
                   [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 2]),
                    helper.make_tensor_value_info("b", TensorProto.FLOAT, [2, 4])])
    assert fix_shape_operands(model) == 1
    assert _fixed(model, 0, 1) == [2, 4]
    assert fix_shape_operands(model) == 0                      # idempotent
    assert [i.name for i in model.graph.input] == ["x", "parts"]  # the input stays


def _l2(keepdims: int, out: list[int]) -> onnx.ModelProto:
    nodes = [helper.make_node("Mul", ["x", "x"], ["sq"]),
             helper.make_node("ReduceSum", ["sq", "axes"], ["s"], keepdims=keepdims),
             helper.make_node("Sqrt", ["s"], ["y"])]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 2, 2]),
                          helper.make_tensor_value_info("axes", TensorProto.INT64, [1])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, out)])


def test_reduce_axes_reach_the_output_through_elementwise_ops():
    model = _l2(1, [3, 1, 2])           # the reduce's own output has no declared shape
    assert fix_shape_operands(model) == 1
    assert _fixed(model, 1, 1) == [1]


def test_ambiguous_axes_are_reduced_each_way_and_picked_at_run_time():
    from onnx.reference import ReferenceEvaluator

    model = _l2(0, [3, 2])              # axis 1 or axis 2: the shapes cannot tell
    original = ReferenceEvaluator(model.SerializeToString())
    assert fix_shape_operands(model) == 1
    assert [n.op_type for n in model.graph.node].count("ReduceSum") == 2
    assert fix_shape_operands(model) == 0                       # idempotent
    onnx.checker.check_model(model)
    x = np.random.default_rng(0).standard_normal([3, 2, 2]).astype(np.float32)
    for axis in (1, 2, -1, -2):
        feeds = {"x": x, "axes": np.array([axis], np.int64)}
        (got,) = ReferenceEvaluator(model).run(None, feeds)
        np.testing.assert_array_equal(got, original.run(None, feeds)[0])


@pytest.mark.slow  # its cases also run in tests/conformance' fast subset
def test_runtime_operand_cases_compile_and_match():
    names = ["test_split_variable_parts_2d_opset18", "test_reduce_l2_keep_dims_random_expanded",
             "test_reduce_sum_do_not_keepdims_random"]
    failed = failures(names)
    assert not failed, "\n".join(failed)


def test_cumsum_over_a_runtime_axis_is_built_for_each_axis():
    from onnx.reference import ReferenceEvaluator

    model = _model([helper.make_node("CumSum", ["x", "axis"], ["y"], exclusive=1)],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
                    helper.make_tensor_value_info("axis", TensorProto.INT32, [])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    original = ReferenceEvaluator(model.SerializeToString())
    assert fix_shape_operands(model) == 1
    assert [n.op_type for n in model.graph.node].count("CumSum") == 2
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    for axis in (0, 1, -1):
        feeds = {"x": x, "axis": np.array(axis, np.int32)}
        (got,) = ReferenceEvaluator(model).run(None, feeds)
        np.testing.assert_array_equal(got, original.run(None, feeds)[0])


@pytest.mark.slow
def test_cumulative_cases_with_a_runtime_axis():
    names = ["test_cumsum_2d_negative_axis", "test_cumprod_2d_axis_1", "test_cumprod_1d_reverse"]
    failed = failures(names)
    assert not failed, "\n".join(failed)


def test_a_shorter_expand_shape_is_written_at_the_outputs_rank():
    model = _model([helper.make_node("Expand", ["x", "shape"], ["y"])],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 1]),
                    helper.make_tensor_value_info("shape", TensorProto.INT64, [2])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 1])])
    assert fix_shape_operands(model) == 1
    assert _fixed(model, 0, 1) == [1, 3, 1]   # TVM's broadcast_to wants the full rank


def test_an_input_the_output_shapes_imply_through_a_computation_becomes_constant():
    from onnx.reference import ReferenceEvaluator

    from tests.compiler.core.test_shape_probe import window_model

    model = window_model(5)                 # size -> Cast -> Range: no operand rule sees it
    original = ReferenceEvaluator(model.SerializeToString())
    assert fix_shape_operands(model) == 1
    assert _fixed(model, 0, 0) == 5         # the Cast reads the constant
    assert [v.name for v in model.graph.input] == ["size"]   # still taken (and ignored)
    assert fix_shape_operands(model) == 0   # idempotent
    feeds = {"size": np.array(5, np.int64)}
    np.testing.assert_array_equal(ReferenceEvaluator(model).run(None, feeds)[0],
                                  original.run(None, feeds)[0])


@pytest.mark.slow  # two of them also run in tests/conformance' fast subset
def test_window_and_crop_cases_expanded_by_their_functions():
    names = ["test_hannwindow_expanded", "test_blackmanwindow_symmetric_expanded",
             "test_center_crop_pad_crop_expanded", "test_center_crop_pad_pad_expanded",
             "test_center_crop_pad_crop_negative_axes_hwc_expanded"]
    failed = failures(names)
    assert not failed, "\n".join(failed)
