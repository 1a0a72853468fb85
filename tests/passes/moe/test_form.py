"""The documented MoE form: torch layers exported both ways are recognized, and the
emitted forms compute what the originals do."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.passes.moe.emit import emit
from kiln.passes.moe.form import MoeLayer, recognize
from tests.passes.moe.conftest import DIM, load, run

#: a re-emitted layer computes the same sums in another order
FLOAT_TOL = 1e-5


@pytest.mark.parametrize("name, k, dispatch", [("sparse", 2, "per-expert"),
                                               ("dense", None, "per-expert"),
                                               ("sparse8", 2, "per-expert")])
def test_recognizes_torch_layers(moe_files, name, k, dispatch):
    model = load(moe_files[name])
    [(gate, layer)] = recognize(model)
    assert isinstance(layer, MoeLayer), layer
    assert gate.op_type == "Softmax"
    assert layer.k == k and layer.dispatch == dispatch
    assert layer.renormalize == (k is not None)
    assert layer.num_experts == (8 if name == "sparse8" else 4)
    assert layer.activation == ("silu" if name == "sparse8" else "relu")
    assert layer.y.is_graph_output()


@pytest.mark.parametrize("name", ["sparse", "dense", "sparse8"])
def test_emitted_form_matches_and_is_recognized_again(moe_files, name):
    model = load(moe_files[name])
    reference = run(model)
    [(_, layer)] = recognize(model)
    emit(model, layer, name="moe")
    np.testing.assert_allclose(run(model), reference, atol=FLOAT_TOL, rtol=FLOAT_TOL)
    [(_, again)] = recognize(model)
    assert isinstance(again, MoeLayer), again
    assert (again.k, again.num_experts) == (layer.k, layer.num_experts)
    assert again.dispatch == ("stacked" if layer.k is None else "per-expert")
    for a, b in zip(again.experts, layer.experts):
        np.testing.assert_allclose(a.w1, b.w1, atol=1e-7)


def test_refuses_router_logits_used_outside(moe_files):
    model = load(moe_files["sparse"])
    [(gate, _)] = recognize(model)
    probs = gate.outputs[0]
    model.graph.outputs.append(probs)
    [(_, layer)] = recognize(model)
    assert isinstance(layer, str) and "used outside the MoE layer" in layer


def test_plain_softmax_is_not_a_layer():
    import onnx_ir as ir
    from onnx import TensorProto, helper

    node = helper.make_node("Softmax", ["x"], ["y"], axis=-1)
    graph = helper.make_graph([node], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, DIM])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, DIM])])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert recognize(model) == []


@pytest.mark.parametrize("cls", ["SparseMoE", "DenseMoE"])
def test_dynamo_export_is_recognized(tmp_path, cls):
    import torch

    from kiln.compiler.testing import moe_models

    torch.manual_seed(0)
    path = moe_models.export(getattr(moe_models, cls)(DIM, 32, 4), tmp_path / "m.onnx",
                             dim=DIM, dynamo=True)
    model = load(path)
    [(_, layer)] = recognize(model)
    assert isinstance(layer, MoeLayer), layer
    assert layer.num_experts == 4 and layer.k == (2 if cls == "SparseMoE" else None)
    reference = run(model)
    emit(model, layer, name="moe")
    np.testing.assert_allclose(run(model), reference, atol=FLOAT_TOL, rtol=FLOAT_TOL)


def test_kiln_plan_lists_each_layer_with_experts_and_k(moe_files, capsys):
    from kiln.compiler.driver.cli import main

    main(["plan", str(moe_files["sparse8"]), "--spec", "moe-top2", "--input", "x=4x16"])
    out = " ".join(capsys.readouterr().out.split())
    assert "8 experts (FFN 16->24->16, silu), softmax gate, top-2 renormalized" in out


def test_stacked_expert_weights_and_sigmoid_gate(tmp_path):
    import torch

    from kiln.compiler.testing.moe_models import SparseMoE, StackedMoE, export

    torch.manual_seed(0)
    stacked = load(export(StackedMoE(DIM, 32, 4), tmp_path / "stacked.onnx", dim=DIM))
    sigmoid = load(export(SparseMoE(DIM, 32, 4, 2, gate="sigmoid"), tmp_path / "sig.onnx",
                          dim=DIM))
    for model, gate, k, dispatch in ((stacked, "softmax", None, "stacked"),
                                     (sigmoid, "sigmoid", 2, "per-expert")):
        [(_, layer)] = recognize(model)
        assert isinstance(layer, MoeLayer), layer
        assert (layer.gate, layer.k, layer.dispatch, layer.num_experts) == (gate, k, dispatch, 4)
        reference = run(model)
        emit(model, layer, name="moe")
        np.testing.assert_allclose(run(model), reference, atol=FLOAT_TOL, rtol=FLOAT_TOL)


def test_silu_ffn_is_not_a_gate(tmp_path):
    import torch

    from kiln.compiler.testing.moe_models import Expert, export

    torch.manual_seed(0)
    assert recognize(load(export(Expert(DIM, 32, "silu"), tmp_path / "f.onnx", dim=DIM))) == []
