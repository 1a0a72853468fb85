"""bench/llm_compare.py without its optional engines: a missing package skips its engine
with one line, and the interleaved rounds report each engine's medians."""

from __future__ import annotations

import sys
from pathlib import Path

from bench import llm_compare


def test_a_missing_package_skips_its_engine(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)          # import raises ImportError
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)
    ready = llm_compare.engines(["llama.cpp", "ort-genai"], Path("ckpt"), tmp_path, 2, None)
    assert ready == {}
    printed = capsys.readouterr().out
    assert "skipping llama.cpp" in printed and "skipping ort-genai" in printed


def test_measure_reports_medians_per_engine():
    calls = []

    def fake(step_seconds):
        def run(prompt, new):
            calls.append((step_seconds, len(prompt), new))
            return 0.5, [step_seconds] * (new - 1), list(range(new))
        return run

    report = llm_compare.measure({"a": fake(0.01), "b": fake(0.02)}, prompt=4, new=5,
                                 prefill=8, repeats=2)
    assert report["a"]["decode_tokens_per_second"] == 100.0
    assert report["b"]["decode_tokens_per_second"] == 50.0
    assert report["a"]["fastest_step_ms"] == 10.0
    assert report["a"]["prefill_8_ms"] == 500.0 and report["a"]["tokens"] == [0, 1, 2, 3, 4]
    # a warm-up each, then per round: a 4-token prompt + 5 new, an 8-token prefill
    assert calls[:2] == [(0.01, 4, 4), (0.02, 4, 4)]
    assert calls[2:6] == [(0.01, 4, 5), (0.01, 8, 1), (0.02, 4, 5), (0.02, 8, 1)]
