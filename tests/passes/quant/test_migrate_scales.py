"""migrate_scales: x/s, W*s folded into a LayerNormalization or a Mul; bit-exact with
pow2, float-exact otherwise; refuses shared weights; idempotent."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from kiln.compiler.testing import quant_models as models
from kiln.passes.quant.migrate_scales import MigrateScales, MigrateScalesConfig

# Non-power-of-two scales round once in 1/s and once in W*s.
RTOL = 1e-5
ATOL = 1e-5
OUTLIERS = (3, 17)


def ln_model():
    """x -> LayerNormalization -> {MatMul q, MatMul k} (one activation, two consumers)."""
    rng = np.random.default_rng(0)
    inits = [models.init("gamma", rng.uniform(0.5, 2, 32)),
             models.init("beta", rng.standard_normal(32)),
             models.init("wq", rng.standard_normal((32, 16))),
             models.init("wk", rng.standard_normal((32, 16)))]
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"], name="ln"),
             helper.make_node("MatMul", ["h", "wq"], ["q"], name="q"),
             helper.make_node("MatMul", ["h", "wk"], ["k"], name="k")]
    return models.build(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                     [2, 8, 32])],
                        [helper.make_tensor_value_info("q", TensorProto.FLOAT, [2, 8, 16]),
                         helper.make_tensor_value_info("k", TensorProto.FLOAT, [2, 8, 16])],
                        opset=17)


@pytest.mark.parametrize("pow2", [True, False])
def test_folds_into_layernorm(pow2):
    model = ln_model()
    inputs = models.feeds(model, outliers=OUTLIERS)
    before = models.run(model, inputs)
    migrate = MigrateScales(MigrateScalesConfig(pow2=pow2), calibration=models.calibration(
        model, outliers=OUTLIERS))
    assert migrate(model).modified
    (candidate,) = [c for c in migrate.last_candidates if c.accepted]
    assert candidate.label == "q, k <- h (into ln)"
    assert models.ops(model) == ["LayerNormalization", "MatMul", "MatMul"]
    scale = candidate.data.scale
    if pow2:
        np.testing.assert_array_equal(np.exp2(np.round(np.log2(scale))), scale)
    after = models.run(model, inputs)
    for a, b in zip(before, after):
        if pow2:
            np.testing.assert_array_equal(b, a)
        else:
            np.testing.assert_allclose(b, a, rtol=RTOL, atol=ATOL * np.abs(a).max())


def test_inserts_mul_on_a_graph_input_and_conv():
    for model in (models.mlp(d_in=32, hidden=64, d_out=16), models.conv()):
        inputs = models.feeds(model)
        before = models.run(model, inputs)
        migrate = MigrateScales(MigrateScalesConfig(pow2=True),
                                calibration=models.calibration(model))
        assert migrate(model).modified
        assert models.ops(model)[0] == "Mul"
        assert len([c for c in migrate.last_candidates if c.accepted]) == 2
        for a, b in zip(before, models.run(model, inputs)):
            np.testing.assert_allclose(b, a, rtol=RTOL, atol=ATOL * np.abs(a).max())


def test_moves_outliers_into_weights():
    model = ln_model()
    calibration = models.calibration(model, outliers=OUTLIERS)
    migrate = MigrateScales(MigrateScalesConfig(), calibration=calibration)
    migrate(model)
    scale = [c for c in migrate.last_candidates if c.accepted][0].data.scale
    # the gamma-scaled LN output's largest channels get the largest scales
    assert scale.max() / np.median(scale) > 1.5


def test_refuses_shared_weight_and_is_idempotent():
    model = models.mlp(d_in=32, hidden=64, d_out=16, shared=True)
    migrate = MigrateScales(calibration=models.calibration(model))
    migrate(model)
    reasons = {c.label: c.reason for c in migrate.last_candidates if not c.accepted}
    assert reasons == {"fc1": "weight 'w1' is shared with fc1_twin",
                       "fc1_twin": "weight 'w1' is shared with fc1"}
    again = MigrateScales(calibration=models.calibration(model))
    assert not again(model).modified
    assert {c.reason for c in again.last_candidates if c.label == "fc2"} == {
        "scales already migrated"}
