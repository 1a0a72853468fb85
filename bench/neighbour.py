"""kiln beside a busy neighbour: ``python -m bench.neighbour [--cases ocr-cls-fp32] [--kind spin]``.

Issue 9: a compiled model must keep its speed within 1.5x of its alone-time when another
thread pool is busy or spinning on one of the cores. For each case this times kiln's
build (median of ``--runs``, ``bench.timing.median_ms``):

- alone, at ``--threads``;
- beside the neighbour, the same loaded model (its thread count fixed at ``--threads``);
- beside the neighbour, a model loaded with the default thread count *before* the
  neighbour started (its ``ThreadGovernor`` drops threads on stalled calls);
- beside the neighbour, the model loaded again with kiln's default thread count (the
  cores free at load time, ``kiln.backends.tvm.runtime.free_cores``).

The neighbour keeps the last core this process may use busy: ``spin`` a process in a
busy loop pinned to it (no GIL shared with the timed calls), ``ort`` an ONNX Runtime
session of the same model in a thread pinned to it, one intra-op thread, spinning
allowed, run back to back (ORT releases the GIL while it runs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.case import PreparedCase
from bench.timing import git_commit, median_ms

KINDS = ("spin", "ort")
#: Time for a neighbour to get going (and a process to start) before timing beside it.
SETTLE_S = 0.5


def _neighbour_core() -> int:
    return max(os.sched_getaffinity(0))


@contextmanager
def spinning_process(core: int) -> Iterator[None]:
    """A Python busy loop in its own process, pinned to ``core``."""
    code = f"import os\nos.sched_setaffinity(0, {{{core}}})\nwhile True:\n    pass\n"
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        time.sleep(SETTLE_S)
        yield
    finally:
        proc.kill()
        proc.wait()


@contextmanager
def ort_loop(case: PreparedCase, core: int) -> Iterator[None]:
    """ONNX Runtime running ``case`` back to back in a thread pinned to ``core``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")
    session = ort.InferenceSession(str(case.onnx_path), options,
                                   providers=["CPUExecutionProvider"])
    stop = threading.Event()

    def loop() -> None:
        os.sched_setaffinity(0, {core})  # pid 0 from a thread: this thread only (Linux)
        while not stop.is_set():
            session.run(None, case.inputs)

    worker = threading.Thread(target=loop, daemon=True)
    worker.start()
    try:
        time.sleep(SETTLE_S)
        yield
    finally:
        stop.set()
        worker.join()


def measure(case: PreparedCase, outdir: Path, args: argparse.Namespace) -> dict:
    from bench.build import build_case
    from kiln.backends.tvm import load

    built = build_case(case, outdir, tuning=args.tuning, threads=args.threads)
    feeds = [case.inputs[name] for name in case.inputs]
    fixed = load(outdir, threads=args.threads)
    alone = median_ms(lambda: fixed(*feeds), args.runs, args.warmup)
    adaptive = load(outdir)  # loaded while the cores are free: the neighbour comes later
    median_ms(lambda: adaptive(*feeds), args.runs, args.warmup)
    core = _neighbour_core()
    neighbour = spinning_process(core) if args.kind == "spin" else ort_loop(case, core)
    with neighbour:
        beside_fixed = median_ms(lambda: fixed(*feeds), args.runs, args.warmup)
        beside_adaptive = median_ms(lambda: adaptive(*feeds), args.runs, args.warmup)
        time.sleep(SETTLE_S)  # kiln's own workers idle, so only the neighbour is seen
        auto = load(outdir)
        beside_auto = median_ms(lambda: auto(*feeds), args.runs, args.warmup)
    return {"case": case.name, "neighbour": args.kind, "neighbour_core": core,
            "built_via": built.via, "threads": fixed.threads, "auto_threads": auto.threads,
            "alone_ms": round(alone, 4), "beside_fixed_ms": round(beside_fixed, 4),
            "beside_auto_ms": round(beside_auto, 4),
            "beside_adaptive_ms": round(beside_adaptive, 4),
            "adaptive_threads": adaptive.threads,
            "ratio_fixed": round(beside_fixed / alone, 3),
            "ratio_adaptive": round(beside_adaptive / alone, 3),
            "ratio_auto": round(beside_auto / alone, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.neighbour", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="ocr-cls-fp32,matmul-fp32")
    parser.add_argument("--kind", choices=KINDS, default="spin")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--tuning", choices=("shipped", "user", "off"), default="shipped")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # TVM's pool size: before TVM starts
    from bench.cases import CASES

    rows = []
    with tempfile.TemporaryDirectory(prefix="kiln-bench-neighbour-") as tmp:
        for name in [n for n in args.cases.split(",") if n]:
            case = CASES[name](Path(tmp))
            rows.append(measure(case, Path(tmp) / name, args))
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        payload = {"commit": git_commit(), "threads": args.threads, "runs": args.runs,
                   "cases": rows}
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
