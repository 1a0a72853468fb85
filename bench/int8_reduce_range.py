"""kiln int8 with and without quantize's ``reduce_range`` (7-bit weights) on one target.

``python -m bench.int8_reduce_range [--case det] [--target x86-64-v3]`` quantizes a real
CNN of ``bench.cases_int8`` twice (W8A8 ``percentile``, the same calibration; full-range
int8 weights and 7-bit ones), builds both and the fp32 model with kiln for ``--target``,
and times them with ONNX Runtime on both QDQ models, interleaved (``bench.timing``),
``--rounds`` times (each engine's minimum median kept). On AVX2 without VNNI the full-range
build takes the exact int16 ``vpmaddwd`` kernel, the 7-bit one the ``vpmaddubsw`` kernel
(``backends/tvm/importer/int8_chains.py``, ``weight_layout``). SQNR is against ORT fp32
(``sqnr_db_vs_fp32``) and, per kiln build, against ORT on the same QDQ model
(``sqnr_db_vs_ort_qdq``). ``--clock cpu`` times each call's CPU time in the calling thread
(``time.thread_time``: meaningful with ``--threads 1``, where both engines run there) in
place of wall time, so that other processes' load moves it less.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.cases_int8 import first_output, kiln_build, real_pair
from bench.timing import time_interleaved
from kiln.compiler.core.metrics import sqnr_db


def cpu_timed(fn: Callable[[], object], samples: list[float]) -> Callable[[], object]:
    """``fn``, appending each call's CPU time of this thread in ms to ``samples``."""
    def run() -> object:
        start = time.thread_time()
        out = fn()
        samples.append((time.thread_time() - start) * 1e3)
        return out
    return run


def time_round(fns: dict[str, Callable[[], object]], runs: int, clock: str) -> dict[str, float]:
    """One interleaved round: each engine's median in ms (wall or this thread's CPU time)."""
    warmup = 3
    if clock == "wall":
        return time_interleaved(fns, runs, warmup=warmup, gap_s=0.05)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    time_interleaved({name: cpu_timed(fn, samples[name]) for name, fn in fns.items()},
                     runs, warmup=warmup, gap_s=0.05)
    return {name: statistics.median(values[warmup:]) for name, values in samples.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.int8_reduce_range")
    parser.add_argument("--case", default="det")
    parser.add_argument("--target", default="x86-64-v3")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = parser.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    from bench.case import ort_session

    with tempfile.TemporaryDirectory(prefix="kiln-bench-rr-") as tmp:
        work = Path(tmp)
        fp32, full, feeds = real_pair(args.case, work)
        _, seven, _ = real_pair(args.case, work, reduce_range=True)
        reference = ort_session(str(fp32), args.threads).run(None, feeds)[0]
        fns, sqnr, vs_ort = {}, {}, {}
        for label, path in (("int8", full), ("int8_7bit", seven)):
            run, rules = kiln_build(path, feeds, args.target, work / f"{label}-so")
            fns[f"kiln_{label}"] = run
            ort = ort_session(str(path), args.threads)
            fns[f"ort_{label}"] = lambda ort=ort: ort.run(None, feeds)
            ort_out = ort.run(None, feeds)[0]
            sqnr[f"kiln_{label}"] = round(sqnr_db(reference, first_output(run())), 1)
            sqnr[f"ort_{label}"] = round(sqnr_db(reference, ort_out), 1)
            vs_ort[f"kiln_{label}"] = round(sqnr_db(ort_out, first_output(run())), 1)
        fns["kiln_fp32"] = kiln_build(fp32, feeds, args.target, work / "fp32-so")[0]
        best: dict[str, float] = {}
        loads = []
        for _ in range(args.rounds):
            for engine, ms in time_round(fns, args.runs, args.clock).items():
                best[engine] = min(ms, best.get(engine, float("inf")))
            loads.append(round(os.getloadavg()[0], 1))
    row = {"case": args.case, "target": args.target, "threads": args.threads, "clock": args.clock,
           "runs": args.runs, "rounds": args.rounds,
           **{f"{k}_ms": round(v, 2) for k, v in best.items()},
           "kiln_7bit_over_kiln_int8": round(best["kiln_int8_7bit"] / best["kiln_int8"], 3),
           "kiln_7bit_over_kiln_fp32": round(best["kiln_int8_7bit"] / best["kiln_fp32"], 3),
           "kiln_int8_over_kiln_fp32": round(best["kiln_int8"] / best["kiln_fp32"], 3),
           "kiln_7bit_over_ort_7bit": round(best["kiln_int8_7bit"] / best["ort_int8_7bit"], 3),
           "sqnr_db_vs_fp32": sqnr, "sqnr_db_vs_ort_qdq": vs_ort, "load_average": loads}
    print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
