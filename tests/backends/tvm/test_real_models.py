"""Real models (slow): PP-OCR det/rec/cls, onnx's light_* models and the held-out models
(detectors and a classifier from other wheels) compile for the host, every kernel gets a
kiln rule, and the outputs match ONNX Runtime (and, for light models, their shipped outputs)."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.backends.tvm import build_artifact, load
from kiln.compiler.core.frontend import load_model
from kiln.compiler.core.metrics import relative_error
from kiln.compiler.testing.real_models import (
    HELD_OUT_MODELS,
    LIGHT_MODELS,
    held_out_input_shape,
    held_out_model,
    light_model,
    light_model_io,
    rapidocr_input_shape,
    rapidocr_model,
)
from kiln.compiler.testing.reference import REL_TOL, ort_outputs

pytestmark = pytest.mark.slow


def text_image(shape: list[int], seed: int = 0) -> np.ndarray:
    """Lines of handwritten digits (scikit-learn's 8x8 set, scaled 4x), dark on white,
    normalized as PP-OCR does ((x/255 - 0.5) / 0.5).

    Random noise makes the det model's output ~1e-4 everywhere, so an error
    relative to its max would mean nothing; on text it gives a real map (0..1).
    """
    from sklearn.datasets import load_digits

    digits = load_digits().images
    rng = np.random.default_rng(seed)
    _, channels, height, width = shape
    image = np.full((height, width), 255.0, np.float32)
    size = 32
    margin = min(8, (height - size) // 2)
    for row in range(margin, height - size + 1, 2 * size):
        col = margin
        while col + size <= width - margin and rng.random() < 0.95:
            glyph = np.kron(digits[rng.integers(len(digits))], np.ones((4, 4)))
            image[row:row + size, col:col + size] = 255.0 - glyph * 255.0 / 16.0
            col += size
    normalized = (image / 255.0 - 0.5) / 0.5
    return np.repeat(normalized[None, None], channels, axis=1).astype(np.float32)


def _compile_and_compare(source, shapes, feeds, outdir, record_property, *,
                         all_scheduled: bool = False):
    model = load_model(source, input_shapes=shapes)
    references = ort_outputs(model, feeds)
    result = build_artifact(model, "host", outdir, model_hash="test")
    outputs = load(outdir)(**feeds)
    errors = [relative_error(out, ref) for out, ref in zip(outputs, references, strict=True)]
    record_property("build_seconds", round(result.seconds, 1))
    if all_scheduled:
        assert not result.unscheduled, f"kernels without a kiln rule: {result.unscheduled}"
    record_property("max_rel_error_vs_ort", max(errors))
    for out, ref, err in zip(outputs, references, errors, strict=True):
        assert out.shape == ref.shape
        assert err < REL_TOL, f"relative error {err:.2e} vs ONNX Runtime"
    return outputs


@pytest.mark.parametrize("which", ["det", "rec", "cls"])
def test_rapidocr_model_matches_onnxruntime(which, tmp_path, record_property):
    shapes = rapidocr_input_shape(which)
    feeds = {name: text_image(shape) for name, shape in shapes.items()}
    _compile_and_compare(rapidocr_model(which), shapes, feeds, tmp_path, record_property)


@pytest.mark.parametrize("name", LIGHT_MODELS)
def test_light_model_matches_onnxruntime_and_shipped_outputs(name, tmp_path, record_property):
    feeds, expected = light_model_io(name)
    shapes = {key: list(value.shape) for key, value in feeds.items()}
    outputs = _compile_and_compare(light_model(name), shapes, feeds, tmp_path, record_property)
    for out, ref in zip(outputs, expected, strict=True):
        err = relative_error(out, ref)
        record_property("max_rel_error_vs_shipped", err)
        assert err < REL_TOL, f"relative error {err:.2e} vs the shipped output"


@pytest.mark.parametrize("name", sorted(HELD_OUT_MODELS))
def test_held_out_model_is_fully_scheduled_and_matches_onnxruntime(name, tmp_path,
                                                                   record_property):
    shapes = held_out_input_shape(name)
    rng = np.random.default_rng(0)
    feeds = {k: rng.uniform(0, 1, size=v).astype(np.float32) for k, v in shapes.items()}
    _compile_and_compare(held_out_model(name), shapes, feeds, tmp_path, record_property,
                         all_scheduled=True)
