"""``python -m bench [--cases a,b] [--json bench/results.json] [--threads 2] [--runs 20]``."""

from __future__ import annotations

import argparse
import os
import sys

from bench.timing import PROTOCOLS


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    parser.add_argument("--json", default=None, help="write results here (e.g. bench/results.json)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=20, help="timed runs per engine (median)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--gap-ms", type=float, default=5.0,
                        help="sleep before each timed call so the previous engine's pool goes idle")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="interleaved",
                        help="interleaved calls with gaps, or each engine alone in a block "
                             "(bench/timing.py says why)")
    parser.add_argument("--workdir", default=None, help="where built artifacts go (default: a temp dir)")
    parser.add_argument("--private", action="store_true",
                        help="build through TVM directly (bench-private) instead of kiln's API")
    parser.add_argument("--tuning", choices=("shipped", "user", "off"), default="shipped",
                        help="tuning records applied: kiln's shipped database (default), "
                             "also the user's cache, or none (kiln's rules only)")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--rpc", default=None, metavar="HOST:PORT:KEY",
                        help="time kiln's build on a remote device through TVM's RPC tracker "
                             "(bench/remote.py; outputs checked against ORT on this machine)")
    parser.add_argument("--target", default="host",
                        help="kiln's build target with --rpc (e.g. arm64 for an aarch64 board)")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    # TVM reads its thread count when its runtime starts: set it before anything imports tvm.
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    # TVM's workers unpinned (as kiln's load sets it): pinned, one sharing its core with a
    # busy thread stalls every kernel; set before TVM's pool is made.
    os.environ.setdefault("TVM_BIND_THREADS", "0")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    # torch's OpenMP workers spin after each op by default and starve the engine timed
    # next in the interleaved loop (measured: torch 0.4 ms alone, 16 ms interleaved with ORT).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from bench.runner import run_bench

    return run_bench(args)


if __name__ == "__main__":
    sys.exit(main())
