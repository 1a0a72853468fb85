"""``bench.int8_reduce_range``'s CPU-time clock: the interleaved protocol, warm-ups left out."""

from __future__ import annotations

import math

from bench.int8_reduce_range import cpu_timed, time_round


def test_cpu_timed_records_one_sample_per_call_and_passes_the_result_through():
    samples: list[float] = []
    run = cpu_timed(lambda: 42, samples)
    assert [run(), run()] == [42, 42]
    assert len(samples) == 2 and all(value >= 0.0 for value in samples)


def test_cpu_round_runs_every_engine_interleaved_and_keeps_the_warmups_out():
    calls: list[str] = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("a", "b")}
    medians = time_round(fns, runs=4, clock="cpu")
    assert set(medians) == {"a", "b"}
    assert all(math.isfinite(ms) and ms >= 0.0 for ms in medians.values())
    # 3 warm-up calls each, then a b a b ...
    assert calls == ["a"] * 3 + ["b"] * 3 + ["a", "b"] * 4
