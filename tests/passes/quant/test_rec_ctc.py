"""Issue #4's accuracy test on a real task: the PP-OCR rec model (RapidOCR's PP-OCRv4 ONNX)
quantized by the built-in ``int8`` and ``int4-weights`` specs reads rendered text lines
(``textlines``) with the same greedy CTC output as float, checked with ONNX Runtime.

Agreement counts lines whose greedy CTC class sequences are identical once the space class
is trimmed at both ends: the float model itself emits a space in a line's margin (12 of the
64 lines), a near tie that quantization flips either way, so the strict count mostly
measures those ties; it is printed too (``pytest -s``), not asserted.

- int8: the built-in spec unchanged (fold_batchnorm, W8A8 QDQ on every Conv and MatMul,
  MSE-calibrated activations on 16 rendered lines that are not in the evaluation set),
  with ``verify: {enabled: false}``: its 20 dB SQNR budget on the softmax output is not
  met (measured 11.0 dB on the 64 lines) although the decodes agree. 83% of that error is
  on the 6% of steps whose argmax moves, mostly between blank / space and a character,
  which CTC's collapse absorbs.
- int4: the built-in ``int4-weights`` spec (MatMul/Gemm, group 128), verified by kiln on two
  rendered lines (budget 12 dB; 18.0 dB on the 64 lines). Conv layers stay float: int4 on them
  (group 32 / per channel) breaks the model (9 / 0 of 64 lines agree), so the
  agreement threshold does catch a broken quantization.

Measured (bench/RESULTS_QUANT.md): float reads 63 of 64 lines (one I read as 1); int8
agrees with float on 61, int4 on 62 (on another seeded set: 62 and 63). The threshold,
58 of 64, leaves a few lines of slack for ONNX Runtime versions.

The shipped model is opset 12 and is quantized as it is: quantize's ``ensure_opset`` raises
it to 13 for int8 (per-axis QDQ) and to 21 for int4-weights (blocked int4), converting its
ReduceMean, Clip, Squeeze, Softmax... nodes. About 32 s on 2 shared cores (31.5 s measured):
slow (KILN_SLOW=1).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from kiln.compiler.testing.real_models import rapidocr_input_shape, rapidocr_model
from kiln.compiler.testing.textlines import (
    REC_SIZE,
    ctc_text,
    greedy_ctc,
    rec_characters,
    rec_input,
    render_line,
    text_lines,
    trim_spaces,
)

EVAL_LINES = 64
CALIBRATION_LINES = 16          # the int8 spec's calibration.samples
SHIPPED_OPSET = 12
# The opset each spec's quantize raises the model to (per-axis QDQ 13, blocked int4 21).
RAISED_OPSET = {"int8": 13, "int4-weights": 21}
MIN_FLOAT_ACCURACY = 0.85       # measured 63/64
MIN_AGREEMENT = 0.90            # measured int8 61/64, int4 62/64; int4 on Conv: 9/64
# name: (spec text, {npz} the calibration file; nodes quantized: 38 Conv + 9 MatMul, 9 MatMul)
SPECS: dict[str, tuple[str, int]] = {
    "int8": ("kiln: 1\nextends: int8\ncalibration: {{source: 'npz:{npz}'}}\n"
             "verify: {{enabled: false}}\n", 47),
    "int4-weights": ("kiln: 1\nextends: int4-weights\ncalibration: {{source: 'npz:{npz}'}}\n",
                     9),
}


@dataclass(frozen=True)
class RecCase:
    """The rec model (as shipped, opset 12), its classes and the rendered evaluation lines."""

    source: Path
    shapes: dict[str, list[int]]
    characters: list[str]
    lines: list[str]
    inputs: list[np.ndarray]
    calibration: Path


def _render(lines: list[str], first_seed: int) -> list[np.ndarray]:
    """Each line rendered (seed ``first_seed + i``) and preprocessed for the rec model."""
    return [rec_input(render_line(line, first_seed + i)) for i, line in enumerate(lines)]


@pytest.fixture(scope="module")
def rec(tmp_path_factory: pytest.TempPathFactory) -> RecCase:
    """The shipped model, 64 evaluation lines and an npz of 16 other lines to calibrate on."""
    import onnx

    folder = tmp_path_factory.mktemp("rec_ctc")
    source = rapidocr_model("rec")
    assert onnx.load(source, load_external_data=False).opset_import[0].version == SHIPPED_OPSET
    shapes = rapidocr_input_shape("rec")
    assert shapes["x"][2:] == list(REC_SIZE)
    characters = rec_characters(source)
    assert characters is not None and len(characters) == 6625
    lines = text_lines(EVAL_LINES + CALIBRATION_LINES, seed=0)      # distinct lines
    calibration = folder / "calibration.npz"
    np.savez(calibration, x=np.stack(_render(lines[EVAL_LINES:], first_seed=10_000)))
    return RecCase(source, shapes, characters, lines[:EVAL_LINES],
                   _render(lines[:EVAL_LINES], first_seed=0), calibration)


def decode(model: bytes | Path, inputs: list[np.ndarray]) -> list[list[int]]:
    """Greedy CTC class sequences of ``model`` (ONNX Runtime, CPU) on each input."""
    import onnxruntime as ort

    session = ort.InferenceSession(model if isinstance(model, bytes) else str(model),
                                   providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return [greedy_ctc(session.run(None, {name: x})[0][0]) for x in inputs]


@pytest.fixture(scope="module")
def float_decodes(rec: RecCase) -> list[list[int]]:
    """The float model's greedy CTC on the evaluation lines: the reference."""
    return decode(rec.source, rec.inputs)


def _agreement(reference: list[list[int]], other: list[list[int]], space: int) -> tuple[int, int]:
    """Lines with identical sequences: (space-trimmed, strict)."""
    trimmed = sum(trim_spaces(a, space) == trim_spaces(b, space)
                  for a, b in zip(reference, other))
    return trimmed, sum(a == b for a, b in zip(reference, other))


@pytest.mark.slow
def test_float_rec_reads_the_rendered_lines(rec: RecCase, float_decodes: list[list[int]]):
    """Non-vacuity: float reads the lines."""
    texts = [ctc_text(d, rec.characters).strip() for d in float_decodes]
    read = sum(text == line for text, line in zip(texts, rec.lines))
    print(f"\nPP-OCR rec float: {read}/{len(texts)} rendered lines read exactly")
    assert all(texts), [line for text, line in zip(texts, rec.lines) if not text]
    assert read >= MIN_FLOAT_ACCURACY * len(texts)


@pytest.mark.slow
@pytest.mark.parametrize("spec_name", SPECS)
def test_quantized_rec_greedy_ctc_agrees_with_float(rec: RecCase, spec_name: str,
                                                    float_decodes: list[list[int]]):
    """The spec's quantized model decodes (nearly) every line as float does."""
    from kiln.compiler.core import graph as kir
    from kiln.compiler.driver.compile import compile_model
    from kiln.compiler.driver.specs import spec_from_text

    text, quantized_nodes = SPECS[spec_name]
    result = compile_model(rec.source, spec_from_text(text.format(npz=rec.calibration)),
                           input_shapes=rec.shapes)
    quant = next(p for p in result.report.passes if p.name == "quantize")
    assert quant.matched == quantized_nodes
    assert result.model.opset_imports[""] == RAISED_OPSET[spec_name]    # from the shipped 12
    decodes = decode(kir.model_bytes(result.model), rec.inputs)
    trimmed, strict = _agreement(float_decodes, decodes, space=len(rec.characters) - 1)
    read = sum(ctc_text(d, rec.characters).strip() == line
               for d, line in zip(decodes, rec.lines))
    n = len(rec.lines)
    print(f"\nPP-OCR rec {spec_name}: greedy CTC identical to float on {trimmed}/{n} lines "
          f"(strict, margin spaces included: {strict}/{n}); reads {read}/{n} exactly")
    assert trimmed >= MIN_AGREEMENT * n
