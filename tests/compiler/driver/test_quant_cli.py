"""The CLI side of issue 17's quantization work: the console names the calibration source,
``kiln compile --strict`` fails a lossy pass that changes nothing (exit 2), and
``kiln plan --sensitivity`` prints (or, with --json, writes) the per-layer ranking."""

from __future__ import annotations

import json

import onnx_ir as ir
import pytest

from kiln.compiler.driver.cli import main
from kiln.compiler.testing import quant_edge_models as edge

PHOTOS = "kiln.compiler.testing.calibration_sources:photo_crops"
SOURCE = "kiln.compiler.testing.quant_edge_models:positive_samples"
W8A8 = "passes:\n  - quantize: {weights: {dtype: int8}, activations: {calibration: minmax}}\n"
WEIGHTS_ONLY = "passes:\n  - quantize: {weights: {dtype: int8}}\n"


@pytest.fixture
def photo_model(tmp_path):
    path = tmp_path / "cnn.onnx"
    ir.save(edge.photo_cnn(), path)
    return str(path)


@pytest.fixture
def outlier_model(tmp_path):
    path = tmp_path / "outlier.onnx"
    ir.save(edge.outlier_mlp(), path)
    return str(path)


def test_report_json_and_console_name_the_source(tmp_path, photo_model, capsys):
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(f"kiln: 1\ncalibration: {{source: '{PHOTOS}', samples: 4}}\n" + W8A8)
    assert main(["compile", photo_model, "--spec", str(spec_file), "--no-build",
                 "-o", str(tmp_path / "out")]) == 0
    console = capsys.readouterr().out
    assert f"calibration: {PHOTOS}, 4 samples (used by quantize)" in " ".join(console.split())
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["calibration"]["source"] == PHOTOS and report["calibration"]["samples"] == 4


def test_cli_strict_exits_2(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    ir.save(edge.input_weight_model(), path)
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text("kiln: 1\n" + WEIGHTS_ONLY)
    assert main(["compile", str(path), "--spec", str(spec_file), "--no-build"]) == 0
    assert main(["compile", str(path), "--spec", str(spec_file), "--no-build",
                 "--strict"]) == 2
    assert "weight is not a constant" in capsys.readouterr().err


def test_cli_plan_sensitivity_prints_and_writes_json(outlier_model, tmp_path, capsys):
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(f"kiln: 1\ncalibration: {{source: '{SOURCE}', samples: 8}}\n" + W8A8
                         + "verify: {samples: 2}\n")
    assert main(["plan", outlier_model, "--spec", str(spec_file), "--sensitivity"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "quantize: sensitivity of 5 layers" in out and "1. 0.0 dB fc2 [int8" in out
    assert main(["plan", outlier_model, "--spec", str(spec_file), "--sensitivity",
                 "--json"]) == 0
    (entry,) = json.loads(capsys.readouterr().out)
    assert [s["node"] for s in entry["sensitivity"]][0] == "fc2"
    assert all(isinstance(s["sqnr_db"], float) for s in entry["sensitivity"])
