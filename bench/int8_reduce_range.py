"""kiln int8 with and without quantize's ``reduce_range`` (7-bit weights) on one target.

``python -m bench.int8_reduce_range [--case det] [--target x86-64-v3]`` quantizes a real
CNN of ``bench.cases_int8`` twice (W8A8 ``percentile``, the same calibration; full-range
int8 weights and 7-bit ones), builds both and the fp32 model with kiln for ``--target``,
and times them with ONNX Runtime on both QDQ models, interleaved (``bench.timing``),
``--rounds`` times (each engine's minimum median kept). On AVX2 without VNNI the full-range
build takes the exact int16 ``vpmaddwd`` kernel, the 7-bit one the ``vpmaddubsw`` kernel
(``backends/tvm/importer/int8_chains.py``, ``weight_layout``). SQNR is against ORT fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from bench.cases_int8 import first_output, kiln_build, real_pair
from bench.timing import time_interleaved
from kiln.compiler.core.metrics import sqnr_db


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.int8_reduce_range")
    parser.add_argument("--case", default="det")
    parser.add_argument("--target", default="x86-64-v3")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    from bench.case import ort_session

    with tempfile.TemporaryDirectory(prefix="kiln-bench-rr-") as tmp:
        work = Path(tmp)
        fp32, full, feeds = real_pair(args.case, work)
        _, seven, _ = real_pair(args.case, work, reduce_range=True)
        reference = ort_session(str(fp32), args.threads).run(None, feeds)[0]
        fns, sqnr = {}, {}
        for label, path in (("int8", full), ("int8_7bit", seven)):
            run, rules = kiln_build(path, feeds, args.target, work / f"{label}-so")
            fns[f"kiln_{label}"] = run
            ort = ort_session(str(path), args.threads)
            fns[f"ort_{label}"] = lambda ort=ort: ort.run(None, feeds)
            sqnr[f"kiln_{label}"] = round(sqnr_db(reference, first_output(run())), 1)
            sqnr[f"ort_{label}"] = round(sqnr_db(reference, ort.run(None, feeds)[0]), 1)
        fns["kiln_fp32"] = kiln_build(fp32, feeds, args.target, work / "fp32-so")[0]
        best: dict[str, float] = {}
        loads = []
        for _ in range(args.rounds):
            for engine, ms in time_interleaved(fns, args.runs, warmup=3, gap_s=0.05).items():
                best[engine] = min(ms, best.get(engine, float("inf")))
            loads.append(round(os.getloadavg()[0], 1))
    row = {"case": args.case, "target": args.target, "threads": args.threads,
           "runs": args.runs, "rounds": args.rounds,
           **{f"{k}_ms": round(v, 2) for k, v in best.items()},
           "kiln_7bit_over_kiln_int8": round(best["kiln_int8_7bit"] / best["kiln_int8"], 3),
           "kiln_7bit_over_kiln_fp32": round(best["kiln_int8_7bit"] / best["kiln_fp32"], 3),
           "kiln_int8_over_kiln_fp32": round(best["kiln_int8"] / best["kiln_fp32"], 3),
           "kiln_7bit_over_ort_7bit": round(best["kiln_int8_7bit"] / best["ort_int8_7bit"], 3),
           "sqnr_db_vs_fp32": sqnr, "load_average": loads}
    print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
