"""The fallback's int16 activations (``on_budget_exceeded: fallback`` keeps a sensitive
layer with an int16 QDQ of its input, int8 weights, opset 21) build with TVM and match
ONNX Runtime; the int8 layers around it still run on the integer kernel. The int16 layer
is not an integer-kernel chain (``int8_chains`` takes uint8/int8 activations): TVM's
QuantizeLinear/DequantizeLinear converters run it as an int16 tensor dequantized into a
float MatMul, the same arithmetic as ORT's (measured: 1.3e-7 relative)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from kiln.backends.tvm import build_artifact, load
from kiln.compiler.driver.compile import compile_model
from kiln.compiler.driver.specs import spec_from_text
from kiln.compiler.testing import quant_edge_models as edge
from kiln.compiler.testing.reference import exact_reference

SOURCE = "kiln.compiler.testing.quant_edge_models:positive_samples"
FALLBACK = (f"kiln: 1\ncalibration: {{source: '{SOURCE}', samples: 8}}\n"
            "passes:\n  - quantize: {weights: {dtype: int8}, activations: {calibration: minmax}}\n"
            "verify: {samples: 2, budget: {sqnr_db: 28}, on_budget_exceeded: fallback}\n")
#: Relative error vs ORT on the same QDQ graph (float sums in another order; a uint8 hidden
#: step that rounds the other way would move the output by ~1e-2, not seen on these inputs).
REL_TOL = 1e-3


@pytest.fixture(scope="module")
def int16_model(tmp_path_factory) -> ir.Model:
    path = tmp_path_factory.mktemp("int16") / "outlier.onnx"
    ir.save(edge.outlier_mlp(), path)
    result = compile_model(str(path), spec_from_text(FALLBACK))
    (p,) = result.report.passes
    assert [k["precision"] for k in p.kept_float] == ["int16 activations"]
    return result.model


@pytest.mark.slow
def test_int16_activation_layer_builds_and_matches_onnxruntime(int16_model, tmp_path):
    dtypes = {n.inputs[2].dtype for n in int16_model.graph if n.op_type == "QuantizeLinear"}
    assert ir.DataType.INT16 in dtypes and ir.DataType.UINT8 in dtypes
    x = np.abs(np.random.default_rng(3).standard_normal([4, 64])).astype(np.float32)
    want = exact_reference(int16_model, {"x": x})
    result = build_artifact(int16_model, "host", tmp_path, model_hash="int16")
    (got,) = load(tmp_path)(x=x)
    got = np.asarray(got)
    assert got.shape == want.shape and np.isfinite(got).all()
    assert np.abs(got - want).max() <= REL_TOL * np.abs(want).max()
    rules = list(result.rules.values())
    assert rules.count("int8_dense") >= 2, result.rules  # the uint8 layers' integer kernels
