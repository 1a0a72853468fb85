"""Ops without a converter that ONNX defines by a function, expanded before import
(kiln.backends.tvm.importer.schema_functions): the body replaces the node, nested
function ops are expanded too, and an op whose body needs an op without a converter
is left alone so that the refusal names it."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from kiln.backends.tvm.importer.lower import supported_op_types
from kiln.backends.tvm.importer.schema_functions import expand_schema_functions
from kiln.compiler.testing.conformance import failures

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _model(node: onnx.NodeProto, inputs, outputs, opset: int) -> onnx.ModelProto:
    graph = helper.make_graph([node], "g", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _ops(model: onnx.ModelProto) -> set[str]:
    return {n.op_type for n in model.graph.node}


def test_a_loss_becomes_its_body_nested_functions_included():
    scores = helper.make_tensor_value_info("scores", TensorProto.FLOAT, [3, 5])
    labels = helper.make_tensor_value_info("labels", TensorProto.INT64, [3])
    loss = helper.make_tensor_value_info("loss", TensorProto.FLOAT, [])
    node = helper.make_node("SoftmaxCrossEntropyLoss", ["scores", "labels"], ["loss"],
                            reduction="mean")
    model = _model(node, [scores, labels], [loss], 13)
    supported = supported_op_types()
    out = expand_schema_functions(model, supported)
    # SoftmaxCrossEntropyLoss's body uses NegativeLogLikelihoodLoss: both are expanded
    assert not _ops(out) & {"SoftmaxCrossEntropyLoss", "NegativeLogLikelihoodLoss"}
    assert "LogSoftmax" in _ops(out) and _ops(out) <= supported
    assert expand_schema_functions(out, supported) is out      # nothing left to expand
    onnx.checker.check_model(out, full_check=True)
    assert _ops(model) == {"SoftmaxCrossEntropyLoss"}          # the input is not changed


def test_defaults_of_omitted_attributes_reach_the_body():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    model = _model(helper.make_node("Celu", ["x"], ["y"]), [x], [y], 12)  # alpha omitted
    out = expand_schema_functions(model, supported_op_types())
    assert "Celu" not in _ops(out)
    from onnx.reference import ReferenceEvaluator

    data = np.array([-2.0, -0.5, 0.0, 3.0], np.float32)
    (got,) = ReferenceEvaluator(out).run(None, {"x": data})
    np.testing.assert_allclose(got, np.where(data > 0, data, np.expm1(data)), rtol=1e-6)


def test_an_op_whose_body_needs_an_unsupported_op_is_left_for_the_refusal():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    model = _model(helper.make_node("Bernoulli", ["x"], ["y"]), [x], [y], 22)
    assert expand_schema_functions(model, supported_op_types()) is model  # RandomUniformLike


def _all_pass(names: list[str]) -> None:
    failed = failures(names)
    assert not failed, "\n".join(failed)


@pytest.mark.slow  # its cases also run in tests/conformance' fast subset
def test_function_op_cases_compile_and_match():
    # a context-dependent body (the loss, from the inferred input types) and a crop whose
    # shape input is fixed from the declared output shape
    _all_pass(["test_sce_mean_weight_ii_3d", "test_center_crop_pad_crop_axes_chw"])


@pytest.mark.slow
def test_more_function_op_cases_compile_and_match():
    # a window whose size input is fixed from the output shape; a body with a Scan
    # (unrolled) and absent optional inputs (LinearAttention); the other function ops
    _all_pass(["test_hannwindow_symmetric", "test_blackmanwindow", "test_linear_attention_delta",
               "test_causal_conv_with_state_silu_with_past_state", "test_nllloss_NCd1d2d3_sum_weight_high_ii",
               "test_sce_NCd1d2d3d4d5_mean_weight_log_prob_expanded", "test_celu", "test_swish"])


@pytest.mark.slow
def test_attention_with_nonpad_kv_seqlen_is_expanded_though_it_has_a_converter():
    # kiln's Attention converter refuses nonpad_kv_seqlen; the node's body covers it
    _all_pass(["test_attention_4d_gqa_causal_nonpad_decode",
               "test_attention_local_window_ext_cache_rank2_mask"])
