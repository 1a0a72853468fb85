"""Verification inputs that mean something (issue 16.2): graph-derived random draws,
verify.inputs, "verification could not be done", NaN/inf comparison."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from kiln.compiler.core.errors import FrontendError, SpecError, VerificationError
from kiln.compiler.core.metrics import max_abs_error, sqnr_db
from kiln.compiler.core.spec import default_spec
from kiln.compiler.driver.compile import compile_model
from kiln.compiler.driver.specs import spec_from_text
from kiln.compiler.driver.verify import compare, make_samples, static_input_shapes


def _model(nodes, inputs, outputs, opset=18, inits=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return ir.serde.deserialize_model(proto), proto


def _vi(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def _samples(model, count=4):
    return make_samples(model, default_spec(), count=count, seed=1)


def test_gather_indices_stay_within_the_indexed_dimension():
    model, _ = _model([helper.make_node("Gather", ["x", "i"], ["y"], axis=1)],
                      [_vi("x", TensorProto.FLOAT, [2, 3]), _vi("i", TensorProto.INT64, [50])],
                      [_vi("y", TensorProto.FLOAT, [2, 50])])
    for feeds in _samples(model):
        assert feeds["i"].min() >= 0 and feeds["i"].max() < 3
        assert feeds["i"].dtype == np.int64


def test_reduce_axes_and_topk_k_and_reshape_shape_come_from_the_graph():
    model, _ = _model([helper.make_node("ReduceSum", ["x", "axes"], ["s"], keepdims=1),
                       helper.make_node("TopK", ["x", "k"], ["v", "ix"], axis=2),
                       helper.make_node("Reshape", ["x", "shape"], ["r"])],
                      [_vi("x", TensorProto.FLOAT, [2, 3, 5]), _vi("axes", TensorProto.INT64, [1]),
                       _vi("k", TensorProto.INT64, [1]), _vi("shape", TensorProto.INT64, [2])],
                      [_vi("s", TensorProto.FLOAT, [2, 1, 5]), _vi("v", TensorProto.FLOAT, [2, 3, 4]),
                       _vi("ix", TensorProto.INT64, [2, 3, 4]), _vi("r", TensorProto.FLOAT, [6, 5])])
    for feeds in _samples(model):
        assert feeds["axes"].tolist() == [1]
        assert feeds["k"].tolist() == [4]
        assert feeds["shape"].tolist() == [6, 5]


def test_scatter_indices_are_distinct_so_no_two_updates_race():
    model, _ = _model([helper.make_node("ScatterElements", ["x", "i", "u"], ["y"], axis=0)],
                      [_vi("x", TensorProto.FLOAT, [4, 3]), _vi("i", TensorProto.INT64, [4, 3]),
                       _vi("u", TensorProto.FLOAT, [4, 3])],
                      [_vi("y", TensorProto.FLOAT, [4, 3])])
    for feeds in _samples(model):
        for column in feeds["i"].T:
            assert sorted(column.tolist()) == [0, 1, 2, 3]


def test_integer_divisors_are_never_zero_and_shift_amounts_fit_the_width():
    model, _ = _model([helper.make_node("Div", ["a", "b"], ["q"]),
                       helper.make_node("BitShift", ["c", "d"], ["s"], direction="LEFT")],
                      [_vi("a", TensorProto.INT32, [64]), _vi("b", TensorProto.INT32, [64]),
                       _vi("c", TensorProto.UINT8, [64]), _vi("d", TensorProto.UINT8, [64])],
                      [_vi("q", TensorProto.INT32, [64]), _vi("s", TensorProto.UINT8, [64])])
    for feeds in _samples(model):
        assert np.all(feeds["b"] != 0)
        assert feeds["d"].max() < 8


def test_a_zero_length_dimension_is_static():
    model, _ = _model([helper.make_node("Identity", ["x"], ["y"])],
                      [_vi("x", TensorProto.FLOAT, [0, 3])], [_vi("y", TensorProto.FLOAT, [0, 3])])
    assert static_input_shapes(model)["x"][0] == [0, 3]
    assert _samples(model, 1)[0]["x"].shape == (0, 3)


def test_a_dynamic_input_is_not_blamed_on_a_spec_key():
    model, _ = _model([helper.make_node("Identity", ["x"], ["y"])],
                      [_vi("x", TensorProto.FLOAT, ["n", 3])], [_vi("y", TensorProto.FLOAT, ["n", 3])])
    with pytest.raises(FrontendError) as raised:
        static_input_shapes(model)
    assert "calibration" not in str(raised.value) and "=0" not in str(raised.value)


def test_nan_against_nan_and_same_inf_are_equal_and_never_exact_otherwise():
    ref = [[np.array([1.0, np.nan, np.inf, -np.inf, 2.0])]]
    same = compare(ref, [[ref[0][0].copy()]], ["y"], rtol=1e-4, atol=1e-5)
    assert same.within_tolerance and same.sqnr_db == math.inf
    moved = compare(ref, [[np.array([1.0, 0.0, np.inf, -np.inf, 2.0])]], ["y"],
                    rtol=1e-4, atol=1e-5)
    assert not moved.within_tolerance and moved.sqnr_db == -math.inf
    assert "exact" not in moved.describe()
    a = np.array([np.nan, np.inf, 3.0])
    assert sqnr_db(a, a) == math.inf and max_abs_error(a, a) == 0.0
    assert max_abs_error(a, np.array([0.0, np.inf, 3.0])) == math.inf


def test_nan_on_random_inputs_is_not_a_refusal(tmp_path):
    """Log of normal random inputs is NaN for negatives in ORT and in the compiled module."""
    _, proto = _model([helper.make_node("Log", ["x"], ["y"])],
                      [_vi("x", TensorProto.FLOAT, [4, 8])], [_vi("y", TensorProto.FLOAT, [4, 8])])
    path = tmp_path / "log.onnx"
    onnx.save(proto, path)
    result = compile_model(path, None)
    assert np.isnan(result.reference_outputs[0][0]).any()


def test_reference_that_cannot_run_is_unverifiable_not_wrong(tmp_path):
    """Indices computed from an input (Add) are out of kiln's reach: ORT fails on them."""
    _, proto = _model([helper.make_node("Add", ["i", "ten"], ["j"]),
                       helper.make_node("Gather", ["x", "j"], ["y"])],
                      [_vi("x", TensorProto.FLOAT, [3, 2]), _vi("i", TensorProto.INT64, [4])],
                      [_vi("y", TensorProto.FLOAT, [4, 2])],
                      inits=[helper.make_tensor("ten", TensorProto.INT64, [], [10])])
    path = tmp_path / "gather.onnx"
    onnx.save(proto, path)
    with pytest.raises(VerificationError, match=r"verification could not be done: .*"
                                                r"give inputs with verify.inputs"):
        compile_model(path, None)
    # the user's own inputs make it verifiable
    np.savez(tmp_path / "in.npz", x=np.ones((3, 2), np.float32),
             i=np.array([-10, -9, -8, -10], np.int64))
    spec = spec_from_text(f"kiln: 1\nverify:\n  inputs: npz:{tmp_path / 'in.npz'}\n", file="v.yaml")
    result = compile_model(path, spec)
    assert result.samples[0]["i"].tolist() == [-10, -9, -8, -10]


def test_verify_inputs_errors_point_at_verify_inputs(tmp_path):
    _, proto = _model([helper.make_node("Identity", ["x"], ["y"])],
                      [_vi("x", TensorProto.FLOAT, [2])], [_vi("y", TensorProto.FLOAT, [2])])
    path = tmp_path / "id.onnx"
    onnx.save(proto, path)
    spec = spec_from_text("kiln: 1\nverify:\n  inputs: npz:missing.npz\n", file="v.yaml")
    with pytest.raises(SpecError, match=r"v.yaml:3 verify.inputs: .*does not exist"):
        compile_model(path, spec)
    with pytest.raises(SpecError, match="npz:PATH"):
        spec_from_text("kiln: 1\nverify:\n  inputs: random\n", file="v.yaml")


def test_an_output_of_another_dtype_is_refused_naming_both_dtypes():
    ref = [[np.array([0, 2, 1], np.int64)]]
    assert compare(ref, [[ref[0][0].copy()]], ["indices"], rtol=1e-4, atol=1e-5).within_tolerance
    with pytest.raises(VerificationError, match=r"output 'indices' changed dtype from int64 "
                                                r"\(reference\) to int32"):
        compare(ref, [[np.array([0, 2, 1], np.int32)]], ["indices"], rtol=1e-4, atol=1e-5)
    with pytest.raises(VerificationError, match="float32.* to float64"):
        compare([[np.ones(3, np.float32)]], [[np.ones(3)]], ["y"], rtol=1e-4, atol=1e-5)


def test_a_compiled_module_with_another_output_dtype_fails_the_compile(tmp_path, monkeypatch):
    """The compiled module's outputs as int32 where ONNX (ArgMax) says int64: the values are
    equal, so only the dtype check can refuse it (an int32 MaxPool Indices once passed)."""
    from kiln.backends import tvm as tvm_backend

    _, proto = _model([helper.make_node("ArgMax", ["x"], ["y"], axis=1, keepdims=0)],
                      [_vi("x", TensorProto.FLOAT, [2, 5])], [_vi("y", TensorProto.INT64, [2])])
    path = tmp_path / "argmax.onnx"
    onnx.save(proto, path)
    result = compile_model(path, None)
    real_load = tvm_backend.load

    def load_int32(folder):
        module = real_load(folder)
        return lambda **feeds: [np.asarray(o).astype(np.int32) for o in module(**feeds)]

    monkeypatch.setattr(tvm_backend, "load", load_int32)
    with pytest.raises(VerificationError, match=r"output 'y' changed dtype from int64 "
                                                r"\(reference\) to int32"):
        result.save(tmp_path / "out", target="host")
