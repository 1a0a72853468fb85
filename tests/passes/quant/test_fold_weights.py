"""quantize folds weights computed from constants (ConstantOfShape, Reshape, Transpose,
Cast, Identity of initializers) before matching, exactly, and leaves paths that read a
graph input or an already-quantized weight alone."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper

from kiln.compiler.core import graph as kir
from kiln.compiler.testing import quant_edge_models as edge
from kiln.compiler.testing import quant_models as models
from kiln.passes.quant.config import QuantizeConfig
from kiln.passes.quant.fold_weights import fold_weight_paths
from kiln.passes.quant.quantize import Quantize

# Output SQNR floor (dB) of the 3-layer computed-weights MLP with int8 per-channel
# weights (measured 50.6 dB).
INT8_SQNR_FLOOR_DB = 40


def _config(**weights) -> QuantizeConfig:
    return QuantizeConfig.model_validate({"weights": {"dtype": "int8", **weights}})


def test_computed_weights_are_refused_without_folding():
    model = edge.computed_weights_mlp()
    found = Quantize(_config()).candidates(model)
    assert [c.reason for c in found] == ["weight is not a constant"] * 3


def test_folding_is_exact_and_touches_only_weight_paths():
    model = edge.computed_weights_mlp()
    feeds = models.feeds(model)
    before = models.run(model, feeds)
    folded = fold_weight_paths(model, list(kir.nodes(model)))
    assert sorted(folded) == sorted(["Reshape", "Cast", "Transpose", "ConstantOfShape", "Mul",
                                     "Identity"])
    assert sorted(n.op_type for n in kir.nodes(model)) == ["Gemm", "MatMul", "MatMul",
                                                           "Relu", "Relu"]
    assert "w1_flat" not in model.graph.initializers  # the inputs of a folded path go
    after = models.run(model, feeds)
    assert all(np.array_equal(a, b) for a, b in zip(before, after))


def test_such_a_model_quantizes():
    model = edge.computed_weights_mlp()
    feeds = models.feeds(model)
    reference = models.run(model, feeds)
    q = Quantize(_config())
    result = q(model)
    assert result.modified
    assert [c.accepted for c in q.last_candidates] == [True] * 3
    assert "folded 6 weight-path node(s)" in q.note
    assert models.ops(model).count("DequantizeLinear") == 3
    assert models.sqnr_db(reference[0], models.run(model, feeds)[0]) > INT8_SQNR_FLOOR_DB
    again = Quantize(_config())
    assert not again(model).modified  # idempotent: a quantized weight is not re-folded
    assert {c.reason for c in again.last_candidates} == {"weight is already quantized"}


def test_a_path_reading_a_graph_input_is_not_folded():
    nodes = [helper.make_node("Reshape", ["w_in", "shape"], ["w"], name="w_reshape"),
             helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")]
    model = models.build(
        nodes, [helper.make_tensor("shape", TensorProto.INT64, [2], [4, 3])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4]),
         helper.make_tensor_value_info("w_in", TensorProto.FLOAT, [12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    q = Quantize(_config())
    assert not q(model).modified
    assert [c.reason for c in q.last_candidates] == ["weight is not a constant"]
    assert [n.op_type for n in kir.nodes(model)] == ["Reshape", "MatMul"]


def test_round_trip_through_onnx_keeps_folded_initializers(tmp_path):
    model = edge.computed_weights_mlp()
    fold_weight_paths(model, list(kir.nodes(model)))
    path = tmp_path / "m.onnx"
    ir.save(model, path)
    loaded = ir.load(path)
    assert all(kir.constant_tensor(n.inputs[1]) is not None for n in kir.nodes(loaded)
               if n.op_type in ("MatMul", "Gemm"))
