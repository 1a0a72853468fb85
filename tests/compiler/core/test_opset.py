"""The opset upgrader (``kiln.compiler.core.opset.ensure_opset``) by itself: raising a model
changes its signatures, not what it computes; an op that cannot be raised is refused with the
op and node named and the model left as it was; a model already there only gets its IR
version checked. (Passes that raise a model are tested with it in their own tests.)"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from kiln.compiler.core import graph as kir
from kiln.compiler.core.errors import PassError
from kiln.compiler.core.opset import BLOCKED_IR_VERSION, BLOCKED_OPSET, ensure_opset
from kiln.compiler.testing import quant_models as models
from tests.compiler.core.old_opset_models import OLD_OPSETS, assert_valid_at, float_outputs, old_opset_model

# Raising the opset reorders no arithmetic: float32 rounding only.
EXACT_RTOL = 1e-5
EXACT_ATOL = 1e-6


@pytest.mark.parametrize("opset", OLD_OPSETS)
def test_raising_the_opset_alone_is_exact(opset):
    """ensure_opset by itself does not change what the model computes (to 13 and to 21)."""
    proto = old_opset_model(opset)
    inputs = models.feeds(ir.serde.deserialize_model(proto), seed=3)
    reference = float_outputs(proto, inputs)
    for target in (13, 21):
        model = ir.serde.deserialize_model(proto)
        ensure_opset(model, target, pass_name="quantize")
        assert_valid_at(model, max(target, opset))
        for expected, actual in zip(reference, models.run(model, inputs)):
            np.testing.assert_allclose(actual, expected, rtol=EXACT_RTOL, atol=EXACT_ATOL)


def test_signatures_change_to_the_target_opset():
    """Clip's min/max attributes become inputs, Squeeze's axes an input, ReduceMean keeps
    ``axes`` as an attribute at 13 and loses it at 18+; the weight ops are the same nodes."""
    for target, mean_has_axes in ((13, True), (21, False)):
        model = ir.serde.deserialize_model(old_opset_model(10))
        gemm = next(n for n in model.graph if n.op_type == "Gemm")
        ensure_opset(model, target, pass_name="test")
        by_name = {n.name: n for n in model.graph}
        assert by_name["fc"] is gemm
        assert len(by_name["clip"].inputs) == 3 and not by_name["clip"].attributes
        assert len(by_name["squeeze"].inputs) == 2
        assert ("axes" in by_name["mean"].attributes) == mean_has_axes


def test_model_already_at_the_opset_is_left_alone():
    model = ir.serde.deserialize_model(old_opset_model(13))
    model.ir_version = 7
    snapshot = kir.model_digest(model)
    ensure_opset(model, 13, pass_name="test")
    assert kir.model_digest(model) == snapshot and model.opset_imports[""] == 13
    ensure_opset(model, 10, pass_name="test")          # never lowered
    assert model.opset_imports[""] == 13


def test_blocked_opset_raises_the_ir_version():
    model = ir.serde.deserialize_model(old_opset_model(13))
    model.ir_version = 6
    ensure_opset(model, BLOCKED_OPSET, pass_name="test")
    assert model.opset_imports[""] == BLOCKED_OPSET and model.ir_version >= BLOCKED_IR_VERSION


def test_op_that_cannot_be_raised_is_refused_unchanged():
    """BatchNormalization-9 with its training outputs has no opset-14 form: the PassError names
    the pass, both opsets, the op and the node, and nothing in the model has changed (the
    ReduceMean before it, which would convert, keeps its opset-9 form)."""
    stats = ["scale", "bias", "mean", "var"]
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x"], ["r"], axes=[1], name="mean"),
         helper.make_node("BatchNormalization", ["x", *stats], ["bn", "m1", "v1", "sm", "sv"],
                          name="bn")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])] +
        [helper.make_tensor_value_info(s, TensorProto.FLOAT, [64]) for s in stats],
        [helper.make_tensor_value_info("bn", TensorProto.FLOAT, [2, 64]),
         helper.make_tensor_value_info("r", TensorProto.FLOAT, [2, 1])])
    model = ir.serde.deserialize_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)]))
    snapshot = kir.model_digest(model)
    with pytest.raises(PassError, match=r"pass 'upgrade'.*from opset 9 to 21: "
                                        r"BatchNormalization \(bn\) does not convert"):
        ensure_opset(model, 21, pass_name="upgrade")
    assert kir.model_digest(model) == snapshot and model.opset_imports[""] == 9


def test_non_standard_op_at_an_old_opset_is_refused():
    graph = helper.make_graph([helper.make_node("NoSuchOp", ["x"], ["y"], name="odd")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)])
    model = ir.serde.deserialize_model(proto)
    with pytest.raises(PassError, match=r"NoSuchOp \(odd\) is not a standard op at opset 12"):
        ensure_opset(model, 13, pass_name="test")
    assert model.opset_imports[""] == 12
