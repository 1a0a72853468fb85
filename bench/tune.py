"""Regenerate the shipped tuning database: ``python -m bench.tune --trials N [--cases a,b]``.

Tunes each bench case's kernels with MetaSchedule (``kiln.backends.tvm.tuning``) into
``backends/tvm/tuning_db/<target key>/`` (``--out`` to choose another root), keeping a
record only where it beats kiln's own rule. Kernels that already have a record are
skipped, so a run adds to the database; delete the target's folder to start over.
``--recheck`` re-measures the records the cases use against kiln's current rules
(alternating, best of two) and deletes those that are no longer faster.
``--trials`` is the budget per case (``--case-trials encoder-fp32=200,...`` overrides it).
``--space`` is what kernels of kiln's tunable rules (contraction, window) are searched
over: ``kiln`` (kiln's rule with its choice points as decisions; the default), ``union``
(that and MetaSchedule's sketches) or ``metaschedule``; each kept/dropped line names the
space its record came from.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_CASES = "encoder-fp32,matmul-fp32,ocr-cls-fp32,ocr-rec-fp32,resnet50-fp32,ocr-det-fp32"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=64, help="trial budget per case")
    parser.add_argument("--case-trials", default="", help="per-case budgets: name=N,name=N")
    parser.add_argument("--cases", default=DEFAULT_CASES)
    parser.add_argument("--target", default="host")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--space", default=None, choices=("kiln", "union", "metaschedule"),
                        help="search space of kiln's tunable rules' kernels")
    parser.add_argument("--recheck", action="store_true",
                        help="no tuning: re-measure the records these cases use against "
                             "kiln's current rules and delete those no longer faster")
    parser.add_argument("--rpc", default=None, metavar="HOST:PORT:KEY",
                        help="measure candidates on a remote device through TVM's RPC "
                             "tracker (use with --target of that device, e.g. arm64)")
    parser.add_argument("--out", default=None,
                        help="database root (default: the shipped backends/tvm/tuning_db)")
    args = parser.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("kiln.backends.tvm.schedules", "kiln.backends.tvm.importer", "onnx_ir"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from kiln.backends.tvm.remote import RpcAddress, measuring_on
    from kiln.compiler.core.errors import KilnError

    try:
        address = RpcAddress.parse(args.rpc) if args.rpc else None
    except KilnError as error:
        print(f"bench.tune: {error}", file=sys.stderr)
        return 2
    with measuring_on(address):
        return _tune(args)


def _tune(args: argparse.Namespace) -> int:
    from bench.cases import CASES
    from kiln.backends.tvm.importer import lower_to_relax
    from kiln.backends.tvm.targets import resolve_target
    from kiln.backends.tvm.tuning.database import SHIPPED_ROOT
    from kiln.backends.tvm.tuning.space import DEFAULT_SPACE
    from kiln.backends.tvm.tuning.tune import describe, recheck_records, tune_relax_module
    from kiln.compiler.core.frontend import load_model

    budgets = {name: int(n) for name, n in
               (item.split("=") for item in args.case_trials.split(",") if item)}
    target = resolve_target(args.target)
    root = Path(args.out) if args.out else SHIPPED_ROOT
    with tempfile.TemporaryDirectory(prefix="kiln-tune-cases-") as tmp:
        for name in [n for n in args.cases.split(",") if n]:
            trials = budgets.get(name, args.trials)
            case = CASES[name](Path(tmp))
            model = load_model(str(case.onnx_path), input_shapes=case.input_shapes)
            mod = lower_to_relax(model, target_name=target.name)
            start = time.perf_counter()
            last = [0.0]

            def progress(_step: str, done: int, total: int, name=name) -> None:
                if time.perf_counter() - last[0] > 30 or done == total:  # noqa: B023
                    last[0] = time.perf_counter()  # noqa: B023 (one tuning run per iteration)
                    print(f"{name}: {done}/{total} trials", flush=True)

            if args.recheck:
                summary = recheck_records(mod, target, tuning_db=root)
            else:
                summary = tune_relax_module(mod, target, trials=trials, tuning_db=root,
                                            progress=progress,
                                            space=args.space or DEFAULT_SPACE)
            print(f"{name}: {describe(summary)} ({time.perf_counter() - start:.0f} s)", flush=True)
            for kernel, (tuned_us, kiln_us) in summary.kept.items():
                origin = summary.origin.get(kernel, "")
                print(f"  kept    {kernel}: {tuned_us:.1f} us (kiln's rule {kiln_us:.1f} us)"
                      f"{f' [{origin}]' if origin else ''}")
            for kernel, (tuned_us, kiln_us) in summary.dropped.items():
                origin = summary.origin.get(kernel, "")
                print(f"  dropped {kernel}: {tuned_us:.1f} us (kiln's rule {kiln_us:.1f} us)"
                      f"{f' [{origin}]' if origin else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
