"""bench/quant_fidelity.py: a tiny run in the default suite (PP-OCRv4 det on one 64x64 page,
kiln's fullest method and ORT MinMax), the table's section written into a copy of
bench/RESULTS_QUANT.md; rec at the --quick sizes with every method under KILN_SLOW=1."""

from __future__ import annotations

import math

import pytest

TINY_SQNR_DB = 3.0      # one 64x64 page: a quantized det must still resemble float


def test_tiny_det_table_and_section(tmp_path):
    from bench import quant_fidelity as qf

    sizes = qf.Sizes(det_calibration=1, det_eval=1, det_side=64)
    rows = qf.evaluate("det", sizes, lambda _line: None,
                       kiln_methods=("search+equalize+bias",), ort_methods=("MinMax",))
    assert [name for name, _, _ in rows] == ["float", "kiln search+equalize+bias", "ORT MinMax"]
    assert math.isinf(rows[0][1]) and rows[0][2] == "100.00% pixels, IoU 1.000"
    assert all(math.isfinite(s) and s > TINY_SQNR_DB for _, s, _ in rows[1:]), rows
    text = qf.table("det", rows, sizes)
    assert "| kiln search+equalize+bias |" in text and "| ORT MinMax | " in text
    results = tmp_path / "results.txt"
    results.write_text("# int8 kernels\n\nother engineer's table\n")
    qf.write_section("first\n", results)
    qf.write_section(text, results)           # replaces its own section only
    written = results.read_text()
    assert written.startswith("# int8 kernels\n\nother engineer's table\n")
    assert written.count(qf.START) == 1 and "first" not in written and text.strip() in written


@pytest.mark.slow
def test_rec_quick_every_method():
    from bench import quant_fidelity as qf

    rows = qf.evaluate("rec", qf.QUICK, print)
    names = [name for name, _, _ in rows]
    assert names == ["float"] + [f"kiln {m}" for m in qf.KILN_METHODS] + [
        f"ORT {m}" for m in qf.ORT_METHODS]
    print(qf.table("rec", rows, qf.QUICK))
    assert all(math.isfinite(s) for _, s, _ in rows[1:])
