"""Converters for standard ops TVM's importer lacks or refuses on mixed types
(kiln.backends.tvm.importer.missing_ops), run as onnx's conformance cases: built for
host, compared with the suite's expected outputs."""

from __future__ import annotations

import pytest

from kiln.compiler.testing.conformance import failures


def _all_pass(names: list[str]) -> None:
    failed = failures(names)
    assert not failed, "\n".join(failed)


@pytest.mark.slow  # its cases also run in tests/conformance' fast subset
def test_lp_normalization_with_a_zero_norm_and_integer_pow():
    # axis 0 of the case has an all-zero column: 0 out, not NaN; int64 ** int64
    _all_pass(["test_l2normalization_axis_0", "test_pow_types_int64_int64"])


@pytest.mark.slow
def test_bitcast_onehot_affine_grid_and_mixed_pow():
    _all_pass(["test_bitcast_float32_to_int32", "test_bitcast_uint16_to_int16",
               "test_l1normalization_axis_last", "test_pow_types_float32_int64",
               "test_onehot_with_negative_axis",        # runtime depth (fixed) and values
               "test_affine_grid_2d"])                  # runtime size (fixed)


def test_bitcast_that_changes_the_width_is_refused_by_name():
    import onnx_ir as ir
    from onnx import TensorProto, helper

    from kiln.backends.tvm import lower_to_relax
    from kiln.compiler.core.errors import LoweringError

    graph = helper.make_graph(
        [helper.make_node("BitCast", ["x"], ["y"], to=TensorProto.INT16)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.INT16, [4, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 26)])
    with pytest.raises(LoweringError, match="BitCast.*element width"):
        lower_to_relax(ir.serde.deserialize_model(model))


def test_reduce_max_of_a_fully_masked_row_is_minus_infinity(tmp_path):
    import numpy as np
    from onnx import TensorProto, helper

    from kiln.backends.tvm import build_artifact, load
    from kiln.compiler.testing.onnx_models import to_ir

    graph = helper.make_graph(
        [helper.make_node("ReduceMax", ["x"], ["y"], axes=[1], keepdims=0),
         helper.make_node("ReduceMin", ["x"], ["z"], axes=[1], keepdims=1)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, [3, 1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    build_artifact(to_ir(model), "host", tmp_path, model_hash="sha256:test")
    x = np.array([[-np.inf] * 4, [1, -np.inf, 3, 2], [np.inf] * 4], np.float32)
    y, z = load(tmp_path)(x=x)
    np.testing.assert_array_equal(y, [-np.inf, 3, np.inf])      # TVM's own: -3.4e38 first
    np.testing.assert_array_equal(z[:, 0], [-np.inf, -np.inf, np.inf])


@pytest.mark.slow
def test_masked_attention_rows_and_bool_reduce_cases():
    _all_pass(["test_attention_causal_boolmask_nan_robustness_expanded",
               "test_reduce_max_bool_inputs", "test_reduce_min_empty_set",
               "test_eyelike_with_dtype", "test_constantofshape_int_zeros",
               "test_reversesequence_time", "test_onehot_with_axis"])


@pytest.mark.parametrize("attrs", [
    dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]),
    dict(kernel_shape=[2, 3], strides=[1, 2], dilations=[2, 1], storage_order=1),
    dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
])
def test_max_pool_indices_match_ort(attrs, tmp_path):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    from kiln.backends.tvm import build_artifact, load
    from kiln.compiler.testing.onnx_models import to_ir
    from kiln.compiler.testing.reference import ort_outputs

    graph = helper.make_graph(
        [helper.make_node("MaxPool", ["x"], ["y", "i"], **attrs)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 7, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("i", TensorProto.INT64, None)])
    model = onnx.shape_inference.infer_shapes(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)]))
    # few distinct values: ties, where the first tap in row-major order must win
    x = np.random.default_rng(0).integers(0, 4, [2, 3, 7, 8]).astype(np.float32)
    build_artifact(to_ir(model), "host", tmp_path, model_hash="sha256:test")
    values, indices = load(tmp_path)(x=x)
    want_values, want_indices = ort_outputs(model, {"x": x})
    np.testing.assert_array_equal(values, want_values)
    assert indices.dtype == np.int64
    np.testing.assert_array_equal(indices, want_indices)


@pytest.mark.parametrize("mode", ["CRD", "DCR"])
def test_space_to_depth_keeps_its_mode(mode, tmp_path):
    import numpy as np
    from onnx import TensorProto, helper
    from onnx.reference import ReferenceEvaluator

    from kiln.backends.tvm import build_artifact, load
    from kiln.compiler.testing.onnx_models import to_ir

    graph = helper.make_graph(
        [helper.make_node("SpaceToDepth", ["x"], ["y"], blocksize=2, mode=mode)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 12, 2, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 24)])
    x = np.arange(72, dtype=np.float32).reshape(1, 3, 4, 6)
    build_artifact(to_ir(model), "host", tmp_path, model_hash="sha256:test")
    got = load(tmp_path)(x=x)
    got = got[0] if isinstance(got, (list, tuple)) else got
    np.testing.assert_array_equal(got, ReferenceEvaluator(model).run(None, {"x": x})[0])
