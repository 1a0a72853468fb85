"""report.html: self-contained (no network), charts per section, a per-layer view for lossy
passes, deterministic; rendered by headless Chromium (Debian's package)."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from kiln.compiler.driver.compile import compile_model
from kiln.compiler.driver.specs import spec_from_text
from kiln.compiler.testing import quant_models

SPEC = """\
kiln: 1
passes:
  - quantize:
      weights: {dtype: int4, granularity: {group: 32}, symmetric: true}
      activations: none
verify: {samples: 2}
output: {report: [json, html]}
"""


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    import onnx_ir as ir

    folder = tmp_path_factory.mktemp("report")
    model = quant_models.mlp(d_in=64, hidden=128, d_out=32)
    path = folder / "mlp.onnx"
    ir.save(model, path)
    result = compile_model(path, spec_from_text(SPEC))
    out = result.save(folder / "out")
    return result, (out / "report.html").read_text()


def _images(html: str) -> list[Image.Image]:
    found = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", html)
    return [Image.open(io.BytesIO(base64.b64decode(data))) for data in found]


def test_page_is_self_contained_with_its_charts(page):
    result, html = page
    assert "http://" not in html and "https://" not in html and "<script" not in html
    for section in ("Passes", "Size", "Error", "Per layer: quantize"):
        assert f"<h2>{section}</h2>" in html
    images = _images(html)
    assert len(images) >= 3 and all(im.size[0] > 200 and im.size[1] > 100 for im in images)
    # charts are drawn, not blank
    assert all(np.asarray(im.convert("L")).std() > 5 for im in images)


def test_per_layer_view_lists_every_quantized_layer(page):
    result, html = page
    (p,) = result.report.passes
    assert [layer["op"] for layer in p.layers] == ["MatMul", "Gemm"]   # fc1, fc2
    assert all(layer["sqnr_db"] is not None and layer["sqnr_db"] > 0 for layer in p.layers)
    # the error accumulates: the last layer's output is no better than the first's + margin
    assert p.layers[-1]["sqnr_db"] <= p.layers[0]["sqnr_db"] + 6
    for layer in p.layers:
        assert f"<td>{layer['node']}</td>" in html
    assert list(p.to_dict()["outputs_sqnr_db"]) == ["y"]


def test_same_report_same_bytes(page):
    result, html = page
    assert result.report.to_html() == html


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="Debian's chromium is not installed (tools/install_chromium.sh)")
def test_chromium_renders_the_page_with_its_charts(page, tmp_path):
    _, html = page
    file = tmp_path / "report.html"
    file.write_text(html)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(["chromium", *flags, "--dump-dom", file.as_uri()], capture_output=True,
                         text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count("<img") == len(_images(html)) and "Per layer: quantize" in dom.stdout
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", *flags, f"--screenshot={shot}", "--window-size=1100,2400",
                    file.as_uri()], capture_output=True, text=True, timeout=120, check=True)
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    # the charts' coloured bars are on the page (blue/green/red), not only black text
    coloured = (np.abs(pixels - pixels.mean(axis=2, keepdims=True)).max(axis=2) > 40).mean()
    assert coloured > 0.01, coloured


def test_latency_chart_when_measured(page):
    result, _ = page
    result.report.measure = {"kiln_ms": 0.5, "kiln_uncompressed_ms": 0.7, "ort_ms": 0.6}
    try:
        html = result.report.to_html()
    finally:
        result.report.measure = None
    section = html.split("<h2>Compiled module</h2>", 1)
    assert len(section) == 2 and "data:image/png;base64," in section[1]
