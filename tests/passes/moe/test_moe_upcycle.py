"""moe_upcycle: a dense FFN becomes E copies + a router, exact (renormalized gates)."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.passes.moe.form import MoeLayer, recognize
from kiln.passes.moe.moe_upcycle import MoeUpcycle, MoeUpcycleConfig
from tests.passes.moe.conftest import load, run

#: y = sum_j v_j f(x) with sum_j v_j = 1 is f(x) up to float32 rounding
FLOAT_TOL = 1e-5


def test_upcycles_exactly(moe_files):
    model = load(moe_files["ffn"])
    reference = run(model)
    p = MoeUpcycle(MoeUpcycleConfig(experts=8, k=2))
    assert p(model).modified
    assert "8 experts, top-2" in p.last_candidates[0].label
    np.testing.assert_allclose(run(model), reference, atol=FLOAT_TOL, rtol=FLOAT_TOL)
    [(_, layer)] = recognize(model)
    assert isinstance(layer, MoeLayer) and layer.num_experts == 8 and layer.k == 2


def test_idempotent_and_refuses_moe_layers(moe_files):
    model = load(moe_files["ffn"])
    MoeUpcycle()(model)
    p = MoeUpcycle()
    assert not p(model).modified
    assert all(c.reason == "already inside a MoE layer" for c in p.last_candidates)
    p = MoeUpcycle()
    assert not p(load(moe_files["sparse"])).modified


def test_through_the_pipeline(moe_files):
    """Compiled with the driver (verification to float32 tolerance) and compared with ONNX
    Runtime on the source."""
    from kiln.compiler.driver.compile import compile_model
    from kiln.compiler.driver.specs import spec_from_text

    result = compile_model(moe_files["ffn"], spec_from_text(
        "kiln: 1\ninputs: {x: [5, 16]}\npasses:\n  - moe_upcycle: {experts: 4, k: 2}\n"),
        input_shapes={"x": [5, 16]})
    [entry] = [p for p in result.report.passes if p.name == "moe_upcycle"]
    assert entry.matched == 1 and entry.exact
    x = np.random.default_rng(3).standard_normal((5, 16)).astype(np.float32)
    np.testing.assert_allclose(run(result.model, x), run(load(moe_files["ffn"]), x),
                               atol=FLOAT_TOL)


def test_config_validates():
    with pytest.raises(ValueError, match="experts"):
        MoeUpcycleConfig(experts=1)


def test_two_ffns_in_a_row_then_rerouted(tmp_path):
    """Two blocks upcycled (distinct node names, ORT accepts the model), then both layers
    rerouted top-1: still exact, the experts being copies."""
    import torch

    from kiln.compiler.testing.moe_models import FeedForward, export
    from kiln.passes.moe.moe_router import MoeRouter, MoeRouterConfig

    torch.manual_seed(0)
    path = export(torch.nn.Sequential(FeedForward(16, 32), FeedForward(16, 32)),
                  tmp_path / "two.onnx")
    model = load(path)
    reference = run(model)
    MoeUpcycle(MoeUpcycleConfig(experts=4))(model)
    names = [n.name for n in model.graph]
    assert len(names) == len(set(names))
    assert len(recognize(model)) == 2
    MoeRouter(MoeRouterConfig(k=1))(model)
    assert [layer.k for _, layer in recognize(model)] == [1, 1]
    np.testing.assert_allclose(run(model), reference, atol=FLOAT_TOL, rtol=FLOAT_TOL)


@pytest.mark.slow
def test_transformer_encoder_ffns(tmp_path):
    """Every GELU FFN of a 4-layer encoder (3-D activations, dynamo export) upcycled
    exactly and recognized as a MoE layer."""
    import onnx
    import onnx_ir as ir
    import onnxruntime as ort
    import torch

    from kiln.compiler.core import graph as kir
    from kiln.compiler.testing.torch_models import encoder

    module, (example,) = encoder()
    torch.onnx.export(module, (example,), tmp_path / "enc.onnx", dynamo=True,
                      input_names=["x"], external_data=False)
    model = ir.from_proto(onnx.load(str(tmp_path / "enc.onnx")))

    def infer(m):
        session = ort.InferenceSession(kir.model_bytes(m), providers=["CPUExecutionProvider"])
        return session.run(None, {"x": example.numpy()})[0]
    reference = infer(model)
    assert recognize(model) == []
    MoeUpcycle()(model)
    layers = [layer for _, layer in recognize(model)]
    assert len(layers) == 4 and all(layer.activation == "gelu" for layer in layers)
    np.testing.assert_allclose(infer(model), reference, atol=1e-4, rtol=1e-4)
