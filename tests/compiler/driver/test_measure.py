"""``kiln compile --measure``: report.json gets ``measure: {kiln_ms, kiln_uncompressed_ms,
ort_ms}`` after a host build; a compressed module that is slower gets a warning with its
reasons (too small, dequantize overhead, layers left in fp32). Timings are never asserted:
only that they are there and that the warning follows from them."""

from __future__ import annotations

import json

import onnx
import onnx_ir as ir
import pytest

from kiln.compiler.driver.cli import main
from kiln.compiler.driver.measure import measure_lines, slower_reasons
from kiln.compiler.testing import quant_models as models

KEYS = ("kiln_ms", "kiln_uncompressed_ms", "ort_ms")
# The tiny MLP int8 spec: W8A8 on fc1 only, so fc2 is a layer left in fp32.
SPEC = ("kiln: 1\ncalibration: {samples: 4}\npasses:\n  - quantize:\n      select: {name: fc1}\n"
        "      weights: {dtype: int8}\n      activations: {calibration: minmax}\n"
        "verify: {samples: 2, budget: {sqnr_db: 15}}\n")


@pytest.fixture
def tiny_mlp(tmp_path):
    path = tmp_path / "mlp.onnx"
    onnx.save(ir.serde.serialize_model(models.mlp(d_in=16, hidden=32, d_out=8, batch=1)),
              path)
    spec = tmp_path / "w8a8.yaml"
    spec.write_text(SPEC)
    return path, spec


def test_measure_writes_latencies_and_warns_when_slower(tiny_mlp, tmp_path, capsys):
    model, spec = tiny_mlp
    out = tmp_path / "out"
    assert main(["compile", str(model), "--spec", str(spec), "-o", str(out),
                 "--target", "host", "--measure", "5"]) == 0
    printed = capsys.readouterr().out
    entry = json.loads((out / "report.json").read_text())["measure"]
    assert all(isinstance(entry[k], float) and entry[k] > 0 for k in KEYS), entry
    assert entry["compressed"] and entry["runs"] == 5
    assert entry["slower"] == (entry["kiln_ms"] > entry["kiln_uncompressed_ms"])
    assert "measure: kiln" in printed
    if entry["slower"]:     # a 16-32-8 MLP: expected, but a timing is never asserted
        reasons = " ".join(entry["reasons"])
        assert "too small" in reasons and "layers left in fp32: 1 of 2" in reasons
        assert "compressed module is slower" in printed
    else:
        assert "reasons" not in entry and "compressed module is slower" not in printed


def test_reasons_for_a_slower_module():
    model = models.mlp(d_in=16, hidden=32, d_out=8, batch=1)
    from kiln.passes.quant.config import ActivationQuant, QuantizeConfig
    from kiln.passes.quant.quantize import Quantize

    Quantize(QuantizeConfig(activations=ActivationQuant()), calibration=models.calibration(model),
             selected=lambda n: n.name == "fc1")(model)
    reasons = slower_reasons(model, uncompressed_ms=0.01, uncompressed_bytes=4000)
    assert reasons[0].startswith("too small: the uncompressed module runs in 0.01 ms")
    assert reasons[1] == ("dequantize overhead: 1 activation(s) quantized and dequantized in "
                          "float, 1 weight(s) decoded in their kernels, on every call")
    assert reasons[2] == "layers left in fp32: 1 of 2 Conv/Gemm/MatMul layers"
    # a big model with nothing left in float and nothing decoded: no cause recognized
    plain = models.mlp()
    assert slower_reasons(plain, 50.0, 1 << 30) == [
        "layers left in fp32: 2 of 2 Conv/Gemm/MatMul layers"]
    lines = measure_lines({"kiln_ms": 2.0, "kiln_uncompressed_ms": 1.0, "ort_ms": 1.5,
                           "runs": 20, "slower": True, "reasons": reasons})
    assert lines[1].startswith("warning: the compressed module is slower than the "
                               "uncompressed one: too small")


def test_measure_needs_an_output_folder_and_a_build(tiny_mlp, capsys):
    model, spec = tiny_mlp
    assert main(["compile", str(model), "--spec", str(spec), "--measure"]) == 2
    assert "--measure needs -o OUTDIR and a build" in capsys.readouterr().err
