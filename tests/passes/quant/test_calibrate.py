"""calibrate: ``search`` picks the activation clip by the consumers' output error (exact for
a matrix, channel energies for k x k / depthwise Convs) and beats ``mse`` where a channel
with a wide range is barely read; minmax/percentile/mse unchanged."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from kiln.compiler.testing import quant_models as models
from kiln.passes.quant.calibrate import (
    Consumer,
    calibrate_range,
    consumer_of,
    fake_quant,
    output_error,
)
from kiln.passes.quant.config import ActivationQuant, QuantizeConfig
from kiln.passes.quant.quantize import Quantize
from kiln.passes.quant.weights import find_weight

#: search's output error vs mse's on the outlier case (measured 0.056 vs 2.10: ratio 0.027).
MAX_ERROR_RATIO = 0.5


def _outlier_case(seed=0):
    """x [4096, 16]: channel 0 spans +-60, the others N(0, 1); W [16, 8] reads channel 0
    with weights 1e-3 (it hardly matters), the others with N(0, 1)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((4096, 16))
    x[:, 0] = rng.uniform(-60, 60, 4096)
    w = rng.standard_normal((16, 8))
    w[0] *= 1e-3
    return [x[:2048], x[2048:]], Consumer(-1, w, (w ** 2).sum(axis=1))


def test_search_beats_mse_on_the_consumers_output():
    values, consumer = _outlier_case()
    x = np.concatenate(values)
    errors = {}
    for method in ("minmax", "mse", "search"):
        cfg = ActivationQuant(dtype="int8", calibration=method)
        scale, zp = calibrate_range(values, cfg, [consumer])
        errors[method] = output_error(fake_quant(x, scale, zp, "int8") - x, [consumer])
    assert errors["search"] < MAX_ERROR_RATIO * errors["mse"], errors
    assert errors["mse"] <= errors["minmax"]


def test_search_without_consumers_is_mse():
    values, _ = _outlier_case()
    assert calibrate_range(values, ActivationQuant(calibration="search")) == \
        calibrate_range(values, ActivationQuant(calibration="mse"))


def _conv_model(group):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 8 // group, 3, 3))
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="k3", group=group),
             helper.make_node("Conv", ["c", "p"], ["y"], name="p1")]
    inits = [models.init("w", w), models.init("p", rng.standard_normal((4, 8, 1, 1)))]
    info = helper.make_tensor_value_info
    return models.build(nodes, inits, [info("x", TensorProto.FLOAT, [1, 8, 6, 6])],
                        [info("y", TensorProto.FLOAT, [1, 4, 4, 4])]), w


def test_consumer_views():
    for group in (1, 8):
        model, w = _conv_model(group)
        k3, p1 = list(model.graph)
        c = consumer_of(find_weight(k3))
        assert c.axis == 1 and c.matrix is None
        expected = (w ** 2).sum(axis=(0, 2, 3)) if group == 1 else (w ** 2).sum(axis=(1, 2, 3))
        np.testing.assert_allclose(c.energy, expected, rtol=1e-6)
        one = consumer_of(find_weight(p1))
        np.testing.assert_allclose(one.matrix, p1.inputs[1].const_value.numpy()[:, :, 0, 0].T)


def test_quantize_with_search_calibrates_every_activation():
    model, _ = _conv_model(8)
    inputs = models.feeds(model)
    before = models.run(model, inputs)
    q = Quantize(QuantizeConfig(activations=ActivationQuant(calibration="search")),
                 calibration=models.calibration(model))
    assert q(model).modified
    assert models.ops(model).count("QuantizeLinear") == 2
    assert models.sqnr_db(before[0], models.run(model, inputs)[0]) > 20
