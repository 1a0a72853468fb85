"""quantize's ``bias_correction``: after int4 per-tensor weights, each layer's mean output
on the calibration samples is the float one again (Convs: per kernel tap, so exact with
padding too) (Conv with and without bias, depthwise,
Gemm with beta, MatMul through an inserted Add); forms that are not DequantizeLinear are
left and counted; the correction lowers the output error of a two-layer model."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from kiln.compiler.testing import quant_models as models
from kiln.passes.quant.bias_correction import CORRECTED_KEY
from kiln.passes.quant.config import FloatWeights, IntWeights, PerTensor, QuantizeConfig
from kiln.passes.quant.quantize import Quantize

#: Mean output shift left after correction, relative to the shift before (float64 algebra,
#: float32 runs: measured below 1e-4).
MAX_LEFT = 1e-3
INT4 = IntWeights(dtype="int4", granularity=PerTensor())
info = helper.make_tensor_value_info


def _layer(kind):
    """One weight layer whose input has a non-zero mean per channel (x ~ N(1 + c/4, 1))."""
    rng = np.random.default_rng(2)
    if kind in ("conv", "conv_bias", "depthwise"):
        group = 8 if kind == "depthwise" else 1
        inits = [models.init("w", rng.standard_normal((8, 8 // group, 3, 3)))]
        ins = ["x", "w"]
        if kind == "conv_bias":
            inits.append(models.init("b", rng.standard_normal(8)))
            ins.append("b")
        if kind == "conv_bias":     # padded and strided: the taps read zeros at the border
            node = helper.make_node("Conv", ins, ["y"], name="layer", pads=[1] * 4,
                                    strides=[2, 2])
            side = 5
        else:
            node = helper.make_node("Conv", ins, ["y"], name="layer", group=group)
            side = 7
        return models.build([node], inits, [info("x", TensorProto.FLOAT, [1, 8, 9, 9])],
                            [info("y", TensorProto.FLOAT, [1, 8, side, side])])
    if kind == "gemm":
        inits = [models.init("w", rng.standard_normal((8, 16))),
                 models.init("c", rng.standard_normal(8))]
        node = helper.make_node("Gemm", ["x", "w", "c"], ["y"], name="layer", transB=1,
                                alpha=0.5, beta=2.0)
    else:
        inits = [models.init("w", rng.standard_normal((16, 8)))]
        node = helper.make_node("MatMul", ["x", "w"], ["y"], name="layer")
    return models.build([node], inits, [info("x", TensorProto.FLOAT, [32, 16])],
                        [info("y", TensorProto.FLOAT, [32, 8])])


def _calibration(model):
    samples = models.calibration(model).samples
    for s in samples:
        x = s["x"]
        axis = 1 if x.ndim == 4 else -1
        shape = [1] * x.ndim
        shape[axis] = -1
        s["x"] = (x + 1 + np.arange(x.shape[axis]).reshape(shape) / 4).astype(np.float32)
    from kiln.backends.ort import collect_activations
    from kiln.compiler.core.pass_api import CalibrationContext
    return CalibrationContext(samples, lambda m, names: collect_activations(m, names, samples))


def _mean_shift(model, quantized, samples):
    axes = (0, 2, 3) if samples[0]["x"].ndim == 4 else (0,)
    shifts = [models.run_simulated(quantized, s)[0] - models.run_simulated(model, s)[0]
              for s in samples]
    return np.mean([d.mean(axis=axes) for d in shifts], axis=0)


@pytest.mark.parametrize("kind", ["conv", "conv_bias", "depthwise", "gemm", "matmul"])
def test_mean_output_is_kept(kind):
    calibration = _calibration(_layer(kind))
    samples = calibration.samples
    float_model = _layer(kind)
    plain, corrected = _layer(kind), _layer(kind)
    Quantize(QuantizeConfig(weights=INT4), calibration=calibration)(plain)
    q = Quantize(QuantizeConfig(weights=INT4, bias_correction=True), calibration=calibration)
    assert q(corrected).modified
    assert q.note.endswith("bias corrected on 1 of 1 layers")
    before = np.abs(_mean_shift(float_model, plain, samples))
    after = np.abs(_mean_shift(float_model, corrected, samples))
    assert before.max() > 0.05
    assert after.max() < MAX_LEFT * before.max() + 1e-5, (before, after)
    layer = [n for n in corrected.graph if n.name == "layer"][0]
    assert CORRECTED_KEY in layer.metadata_props
    expected = {"conv": 3, "conv_bias": 3, "depthwise": 3, "gemm": 3, "matmul": 2}[kind]
    assert len(layer.inputs) == expected
    if kind == "matmul":
        assert models.ops(corrected)[-1] == "Add" and corrected.graph.outputs[0].name == "y"


def test_other_forms_are_left_and_counted():
    model = _layer("conv")
    q = Quantize(QuantizeConfig(weights=FloatWeights(dtype="fp4_e2m1", granularity=PerTensor()),
                                bias_correction=True), calibration=_calibration(model))
    q(model)
    assert q.note.endswith("bias corrected on 0 of 1 layers")


def test_correction_lowers_a_two_layer_error():
    model = models.conv()
    inputs = models.feeds(model, seed=7)
    reference = models.run(model, inputs)[0]
    sqnr = {}
    for correct in (False, True):
        m = models.conv()
        Quantize(QuantizeConfig(weights=INT4, bias_correction=correct),
                 calibration=models.calibration(m))(m)
        sqnr[correct] = models.sqnr_db(reference, models.run(m, inputs)[0])
    assert sqnr[True] > sqnr[False], sqnr
