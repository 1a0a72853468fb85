"""The pruning and sharing cases (issue 10) in 1-thread CPU time, for a loaded machine.

``python -m bench.compress_cpu_time`` builds, at 1 thread:

- ``channel-{dense,pruned}-{cnn,mlp}`` (``bench/cases_prune.py``: 50% of the channels
  removed by ``prune_channels``);
- ``sparse-2of4`` and ``block-sparse-80`` (``bench/cases_sparse.py``) three times, with
  ``KILN_SPARSE_KERNELS=auto`` (the cost model's choice), ``never`` (the dense kernel) and
  ``always`` (the sparse kernel on every pruned layer);
- ``foldgpt-before`` / ``foldgpt`` (``bench/cases_blocks.py``);

and ONNX Runtime (1 intra-op thread) on the same ONNX files. Each engine's time is the CPU
time of the calling thread over ``--runs`` calls, divided by the count; the rounds run every
engine in turn and the least disturbed round (the minimum) is kept. On a shared 2-core
machine wall time counts the time other processes hold the core (ORT's wall time at load 7
was 2.5x its CPU time on the sparse MLP); the calling thread's CPU time does not, and with
one thread both engines compute on that thread. It still includes cache and memory
contention, so it is not a quiet-machine number either. Writes ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
SPARSE_MODES = ("auto", "never", "always")


def cpu_ms_per_call(fn: Callable[[], object], runs: int) -> float:
    """The calling thread's CPU time of ``runs`` calls of ``fn`` (after one warm-up), in ms
    per call."""
    fn()
    start = time.thread_time()
    for _ in range(runs):
        fn()
    return (time.thread_time() - start) * 1e3 / runs


def _engines(names: list[str], workdir: Path) -> tuple[dict[str, Callable[[], object]],
                                                         dict[str, int]]:
    """name:engine -> callable, and the built size of each kiln build."""
    from bench.build import build_case
    from bench.case import ort_runner
    from bench.cases_blocks import BLOCK_CASES
    from bench.cases_prune import PRUNE_CASES
    from bench.cases_sparse import SPARSE_CASES
    from kiln.backends.tvm.importer.sparse_weights import POLICY_ENV

    cases = {**PRUNE_CASES, **SPARSE_CASES, **BLOCK_CASES}
    fns: dict[str, Callable[[], object]] = {}
    sizes: dict[str, int] = {}
    before = os.environ.get(POLICY_ENV)
    try:
        for name in names:
            case = cases[name](workdir)
            for mode in SPARSE_MODES if name in SPARSE_CASES else ("auto",):
                os.environ[POLICY_ENV] = mode
                key = f"{name}:kiln" + ("" if mode == "auto" else f"-{mode}")
                built = build_case(case, workdir / key.replace(":", "-"), threads=1)
                fns[key] = lambda b=built, c=case: b.run(c.inputs)
                sizes[key] = built.bytes
            fns[f"{name}:ort"] = ort_runner(case, 1)
    finally:
        if before is None:
            os.environ.pop(POLICY_ENV, None)
        else:
            os.environ[POLICY_ENV] = before
    return fns, sizes


def main(argv: list[str] | None = None) -> int:
    from bench.cases_blocks import BLOCK_CASES
    from bench.cases_prune import PRUNE_CASES
    from bench.cases_sparse import SPARSE_CASES
    from bench.timing import git_commit
    from kiln.compiler.core.atomic import write_atomic

    default = [*PRUNE_CASES, *SPARSE_CASES, *BLOCK_CASES]
    parser = argparse.ArgumentParser(prog="python -m bench.compress_cpu_time")
    parser.add_argument("--cases", default=",".join(default))
    parser.add_argument("--runs", type=int, default=50, help="calls per engine per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=HERE / "results_compress_cpu.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kiln-bench-compress-") as tmp:
        fns, sizes = _engines(args.cases.split(","), Path(tmp))
        load_before = os.getloadavg()
        best: dict[str, float] = {}
        for _ in range(args.rounds):
            for key, fn in fns.items():
                best[key] = min(best.get(key, float("inf")), cpu_ms_per_call(fn, args.runs))
        load_after = os.getloadavg()
    print("| case:engine | CPU ms per call (1 thread) | built bytes |")
    print("|---|---:|---:|")
    for key in fns:
        print(f"| {key} | {best[key]:.3f} | {sizes.get(key, '')} |")
    print(f"load average before {load_before[0]:.1f}, after {load_after[0]:.1f}")
    payload = {"commit": git_commit(), "runs": args.runs, "rounds": args.rounds,
               "load_before": load_before[0], "load_after": load_after[0],
               "cpu_ms": {k: round(v, 4) for k, v in best.items()}, "built_bytes": sizes}
    write_atomic(args.out, (json.dumps(payload, indent=2) + "\n").encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
