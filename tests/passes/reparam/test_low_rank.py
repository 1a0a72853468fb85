"""low_rank: truncated SVD factors of constant MatMul/Gemm weights; rank and energy;
refusals; activation-aware (whitened) SVD beats plain SVD when a few input channels
dominate (the docs/passes.md claim); a Gemm + MatMul model through the pipeline vs ORT."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from kiln.compiler.core import graph as kir
from kiln.compiler.core.pass_api import CalibrationContext
from kiln.passes.reparam.low_rank import (
    LowRank,
    LowRankConfig,
    choose_rank,
    factorize,
)

# float32 rounding of P Q at full rank, relative to |W|
FACTOR_TOL = 1e-9
# whitened SVD's output error at least this many times lower than plain SVD's (measured on
# the dominant-channel inputs below: relative output error 0.11 vs 0.80, 7x)
WHITEN_GAIN = 4.0


def _mlp(w1: np.ndarray, w2: np.ndarray) -> ir.Model:
    """x [4, m] -> Gemm(w1^T stored [n, m], transB) -> Relu -> MatMul(w2)."""
    m = w1.shape[0]
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    inits = [numpy_helper.from_array(w1.T.astype(np.float32).copy(), "w1"),
             numpy_helper.from_array(np.linspace(-1, 1, w1.shape[1]).astype(np.float32), "b1"),
             numpy_helper.from_array(w2.astype(np.float32), "w2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [4, m])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, [4, w2.shape[1]])], initializer=inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(proto))


def _low_rank_matrix(rng, m, n, r, noise=1e-3):
    return rng.standard_normal((m, r)) @ rng.standard_normal((r, n)) + noise * \
        rng.standard_normal((m, n))


def _run(model, x):
    session = ort.InferenceSession(kir.model_bytes(model), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_rank_choice_and_full_rank_is_exact():
    s = np.array([4.0, 2.0, 1.0, 0.5])
    assert choose_rank(s, 2, None) == 2
    assert choose_rank(s, 9, None) == 4
    assert choose_rank(s, None, 16 / 21.25) == 1   # s0^2 is exactly that fraction
    assert choose_rank(s, None, 0.94) == 2        # (16 + 4) / 21.25 = 0.941
    assert choose_rank(s, None, 0.95) == 3        # (16 + 4 + 1) / 21.25 = 0.988
    w = np.random.default_rng(0).standard_normal((12, 7))
    p, q, error = factorize(w, 7, None)
    assert p.shape == (12, 7) and q.shape == (7, 7) and error < FACTOR_TOL
    np.testing.assert_allclose(p @ q, w, atol=FACTOR_TOL * np.abs(w).max())


def test_config_takes_rank_or_energy():
    with pytest.raises(ValueError, match="rank or energy"):
        LowRankConfig(rank=2, energy=0.9)
    with pytest.raises(ValueError):
        LowRankConfig(whiten="cholesky")


def test_factors_both_layers_and_refuses_when_nothing_is_saved():
    rng = np.random.default_rng(1)
    model = _mlp(_low_rank_matrix(rng, 32, 24, 3), _low_rank_matrix(rng, 24, 16, 3))
    x = rng.standard_normal((4, 32)).astype(np.float32)
    before = _run(model, x)
    low = LowRank(LowRankConfig(rank=3))
    assert low(model).modified
    assert [n.op_type for n in model.graph] == ["MatMul", "Gemm", "Relu", "MatMul", "MatMul"]
    assert "2 layer(s): 1152 -> 288 weights (75% saved)" in low.note
    after = _run(model, x)
    sqnr = 10 * np.log10(np.sum(before ** 2) / np.sum((after - before) ** 2))
    assert sqnr > 40
    # rank 10: pays on the 32 x 24 Gemm (560 < 768), not on the 24 x 16 MatMul (400 >= 384)
    model = _mlp(_low_rank_matrix(rng, 32, 24, 3), _low_rank_matrix(rng, 24, 16, 3))
    low = LowRank(LowRankConfig(rank=10))
    low(model)
    reasons = [c.reason for c in low.last_candidates]
    assert reasons[0] is None
    assert reasons[1] == "rank 10 saves nothing (r(m+n) = 400 >= mn = 384)"


def test_whitened_svd_beats_plain_svd_on_dominant_channels():
    """Inputs with 4 of 64 channels 30x larger: the output error ||X (W - W_r)|| of the
    activation-aware factors is far lower than that of the plain SVD at the same rank."""
    rng = np.random.default_rng(2)
    m, n, rank = 64, 48, 8
    w = rng.standard_normal((m, n))
    scale = np.ones(m)
    scale[[3, 17, 40, 51]] = 30.0
    x = (rng.standard_normal((512, m)) * scale).astype(np.float32)
    proto_nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")]
    graph = helper.make_graph(proto_nodes, "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [512, m])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, [512, n])], initializer=[
                numpy_helper.from_array(w.astype(np.float32), "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    exact = x.astype(np.float64) @ w
    errors = {}
    for whiten in ("none", "activations"):
        model = ir.serde.deserialize_model(proto)
        calibration = CalibrationContext([{"x": x[:256]}, {"x": x[256:]}],
                                         lambda model, names: {})
        low = LowRank(LowRankConfig(rank=rank, whiten=whiten), calibration=calibration)
        assert low(model).modified
        assert calibration.used == (whiten == "activations")
        out = _run(model, x)
        errors[whiten] = np.linalg.norm(out - exact) / np.linalg.norm(exact)
    assert errors["activations"] * WHITEN_GAIN < errors["none"], errors


def test_through_the_pipeline_with_calibration(tmp_path):
    from kiln.compiler.driver.compile import compile_model
    from kiln.compiler.driver.specs import spec_from_text

    rng = np.random.default_rng(3)
    model = _mlp(_low_rank_matrix(rng, 32, 24, 4), _low_rank_matrix(rng, 24, 16, 4))
    source = tmp_path / "mlp.onnx"
    onnx.save(kir.to_proto(model), source)
    spec = "kiln: 1\npasses:\n  - low_rank: {energy: 0.999, whiten: activations}\n"
    result = compile_model(source, spec_from_text(spec))
    report = next(p for p in result.report.passes if p.name == "low_rank")
    assert report.matched == 2 and not report.exact
    assert report.params_after < report.params_before
    assert report.sqnr_db > 30 and "saved" in report.note
    x = rng.standard_normal((4, 32)).astype(np.float32)
    expected = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]
    got = _run(result.model, x)
    assert 10 * np.log10(np.sum(expected ** 2) / np.sum((got - expected) ** 2)) > 30
