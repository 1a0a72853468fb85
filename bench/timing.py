"""How bench/ times engines, and the commit it records.

Two protocols (``python -m bench --protocol``):

- ``interleaved`` (the default): after a warm-up of each engine, one call of each in
  turn, A B C A B C ..., with ``gap_s`` of sleep before every timed call. Interleaving
  makes slow drift of a shared machine (clock frequency, other tenants) fall on every
  engine alike; the gap lets the previous engine's thread pool go idle first. TVM's,
  ONNX Runtime's and OpenMP's workers keep spinning after a parallel region, and on 2
  cores a spinning pool slowed the next engine by up to 35x (ocr-cls, before ORT's
  spinning was turned off), so each engine is also configured not to spin (ORT
  ``allow_spinning=0``, torch ``OMP_WAIT_POLICY=PASSIVE``; TVM's workers yield while
  they wait).
- ``blocks``: each engine alone, its warm-up and all its runs back to back, with
  ``block_gap_s`` of idle time between engines: no engine ever runs next to another's
  leftover pool, at the price of drift between blocks. Use it to check that a ratio
  does not depend on the interleaving (issue 9's "each engine timed alone in blocks").

Both report the median of the runs in ms.
"""

from __future__ import annotations

import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

PROTOCOLS = ("interleaved", "blocks")
#: Idle time between two engines' blocks: longer than any pool's spin-wait.
BLOCK_GAP_S = 0.5


def time_interleaved(fns: dict[str, Callable[[], object]], runs: int, warmup: int,
                     gap_s: float = 0.0) -> dict[str, float]:
    """Median wall time in ms of each callable, run A B C A B C ... after a warm-up of each,
    with ``gap_s`` of sleep before each timed call."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            if gap_s:
                time.sleep(gap_s)
            samples[name].append(_timed_ms(fn))
    return {name: statistics.median(values) for name, values in samples.items()}


def time_in_blocks(fns: dict[str, Callable[[], object]], runs: int, warmup: int,
                   block_gap_s: float = BLOCK_GAP_S) -> dict[str, float]:
    """Median wall time in ms of each callable, each timed alone: warm-up and ``runs``
    calls back to back, ``block_gap_s`` of idle time before each engine's block."""
    times = {}
    for name, fn in fns.items():
        time.sleep(block_gap_s)
        times[name] = median_ms(fn, runs, warmup)
    return times


def median_ms(fn: Callable[[], object], runs: int, warmup: int) -> float:
    """Median wall time in ms of ``runs`` back-to-back calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    return statistics.median(_timed_ms(fn) for _ in range(runs))


def time_engines(protocol: str, fns: dict[str, Callable[[], object]], runs: int, warmup: int,
                 gap_s: float) -> dict[str, float]:
    """``fns`` timed by ``protocol`` (one of :data:`PROTOCOLS`)."""
    if protocol == "blocks":
        return time_in_blocks(fns, runs, warmup)
    return time_interleaved(fns, runs, warmup, gap_s)


def _timed_ms(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def git_commit() -> str | None:
    """The checkout's HEAD commit (None outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
