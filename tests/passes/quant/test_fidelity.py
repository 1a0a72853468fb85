"""Claims of docs/passes.md reproduced at small scale, as orderings (not numbers):
FP4 E2M1 vs INT4 (group 128, clip search), NUPES searched exponent vs INT4 and a=0.5,
salient channels by activation norm vs weight norm and random (PTQ1.61), and
int8 / int4 accuracy of a small digits CNN within a point of float."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.passes.quant import formats
from kiln.passes.quant.salient_split import salient_rows, split_quantize

GROUP = 128
SHAPE = (256, 512)          # 1024 groups of 128


def _weights(kind: str) -> np.ndarray:
    rng = np.random.default_rng(0)
    if kind == "laplace":
        return rng.laplace(size=SHAPE)
    if kind == "student_t3":
        return rng.standard_t(3, size=SHAPE)
    if kind == "uniform":
        return rng.uniform(-1, 1, size=SHAPE)
    return rng.standard_normal(SHAPE)


def _groups(w):
    return w.reshape(-1, GROUP)


def _int4_mse(g):
    return formats.quantize_int(g, 4, symmetric=True, clip_search=True).mse(g)


def _fp4_mse(g):
    return formats.quantize_fp4(g, "fp4_e2m1", clip_search=True).mse(g)


@pytest.mark.parametrize("kind", ["laplace", "student_t3"])
def test_fp4_beats_int4_on_heavy_tails(kind):
    g = _groups(_weights(kind))
    assert _fp4_mse(g) < _int4_mse(g)


def test_int4_beats_fp4_on_uniform():
    g = _groups(_weights("uniform"))
    assert _int4_mse(g) < _fp4_mse(g)


@pytest.mark.parametrize("kind", ["gaussian", "laplace"])
def test_power_search_beats_uniform_int4(kind):
    g = _groups(_weights(kind))
    exponent, q = formats.search_power(g, 4, clip_search=True)
    assert exponent != 1.0 and q.mse(g) < _int4_mse(g)


def test_fixed_half_power_is_worse_than_searched_on_gaussian():
    g = _groups(_weights("gaussian"))
    _, searched = formats.search_power(g, 4, clip_search=True)
    fixed = formats.quantize_power(g, 4, 0.5, clip_search=True)
    assert searched.mse(g) < fixed.mse(g)


def test_salient_by_activation_norm_beats_weight_norm_and_random():
    rng = np.random.default_rng(0)
    k, n, tokens = 256, 128, 512
    w = rng.standard_normal((k, n))
    x = rng.standard_normal((tokens, k))
    x[:, rng.choice(k, 12, replace=False)] *= 25            # a few dominant input channels
    norms = np.linalg.norm(x, axis=0)
    errors = {}
    for how in ("activation", "weight", "random"):
        mask = salient_rows(w, norms, 0.2, how, seed=0)
        *_, recon = split_quantize(w, mask, block=128)
        errors[how] = np.sum((x @ w - x @ recon) ** 2)
    assert errors["activation"] < 0.5 * errors["weight"]
    assert errors["activation"] < 0.5 * errors["random"]


# The digits CNN: int8 (W8A8 static) and int4 weights keep accuracy within a point.
ACCURACY_DROP_POINTS = 1.0


def test_digits_cnn_int8_and_int4_within_a_point(tmp_path):
    """Trained on 1400 digits, evaluated on 397 with ONNX Runtime (measured: float 97.2-97.7,
    int8 W8A8 and int4 g32 within 0.3 points)."""
    import onnxruntime as ort
    import torch

    from kiln.compiler.core import graph as kir
    from kiln.compiler.driver.compile import compile_model
    from kiln.compiler.driver.specs import spec_from_text
    from tests.passes.quant.digits import digits_split, trained_cnn

    x_train, _, x_test, y_test = digits_split()
    np.savez(tmp_path / "cal.npz", x=x_train[:64, None])
    module, args = trained_cnn()
    source = tmp_path / "digits.onnx"
    torch.onnx.export(module, args, source, dynamo=True)

    def accuracy(model):
        # graph optimizations off: QDQ runs as written (the method's accuracy, the same on
        # every CPU); fused into ORT's int8 kernels it rounds differently per CPU
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(kir.model_bytes(model), options,
                                       providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        logits = np.concatenate([session.run(None, {name: x_test[i:i + 1]})[0]
                                 for i in range(len(x_test))])
        return 100.0 * np.mean(logits.argmax(axis=1) == y_test)

    base = compile_model(source, spec_from_text("kiln: 1\npasses: []\n"))
    specs = {
        "int8": f"kiln: 1\nextends: int8\ncalibration: {{source: 'npz:{tmp_path}/cal.npz', "
                "samples: 64}\n",
        "int4": "kiln: 1\nextends: int4-weights\npasses:\n  - quantize:\n"
                "      select: {op: [Conv, Gemm, MatMul]}\n"
                "      weights: {dtype: int4, granularity: {group: 32}, clip: mse_search}\n",
    }
    float_accuracy = accuracy(base.model)
    assert float_accuracy > 90
    for name, text in specs.items():
        result = compile_model(source, spec_from_text(text))
        quant = next(p for p in result.report.passes if p.name == "quantize")
        assert quant.matched == 4, name
        assert accuracy(result.model) >= float_accuracy - ACCURACY_DROP_POINTS, name
