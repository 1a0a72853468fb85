"""``python -m kiln.compiler.testing.conformance``: run conformance cases and print
each failure and the figures.

Examples::

    python -m kiln.compiler.testing.conformance --op Resize
    python -m kiln.compiler.testing.conformance --case test_clip_default_int8_min
    python -m kiln.compiler.testing.conformance --all --jobs 2 --json conf.jsonl
"""

from __future__ import annotations

import argparse
import sys

from .cases import FIGURES, select
from .runner import DEFAULT_TIMEOUT_S, run_cases, summarize


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kiln.compiler.testing.conformance")
    parser.add_argument("--op", action="append", help="an op's cases (repeatable)")
    parser.add_argument("--case", action="append", help="a case by name (repeatable)")
    parser.add_argument("--kind", action="append",
                        help="node, simple, pytorch-converted, pytorch-operator, light")
    parser.add_argument("--all", action="store_true", help="every case")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (2)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        help=f"seconds per case before it counts as a hang ({DEFAULT_TIMEOUT_S:g})")
    parser.add_argument("--json", help="write every outcome to this file (JSON lines)")
    parser.add_argument("-v", "--verbose", action="store_true", help="print passes too")
    args = parser.parse_args(argv)
    if not (args.op or args.case or args.kind or args.all):
        parser.error("name cases with --op, --case, --kind or --all")
    try:
        cases = select(names=args.case, ops=args.op, kinds=args.kind)
    except ValueError as error:
        parser.error(str(error))
    if not cases:
        parser.error("no case matches")
    sink = open(args.json, "w") if args.json else None

    def show(outcome) -> None:
        if sink is not None:
            sink.write(outcome.to_json() + "\n")
            sink.flush()
        if outcome.outcome != "pass" or args.verbose:
            ort = "" if outcome.ort in ("pass", "") else f"  [ORT: {outcome.ort[:80]}]"
            print(f"{outcome.outcome:8} {outcome.name}: {outcome.reason}{ort}", flush=True)

    outcomes = run_cases(cases, jobs=args.jobs, timeout=args.timeout, on_result=show)
    if sink is not None:
        sink.close()
    for figure in FIGURES:
        counts = summarize(outcomes, figure)
        print(f"{figure} (ONNX Runtime passes): " +
              ", ".join(f"{k} {v}" for k, v in counts.items()))
    counts = {k: sum(1 for o in outcomes if o.outcome == k)
              for k in ("pass", "refused", "crash", "wrong", "excluded")}
    print("all selected: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
