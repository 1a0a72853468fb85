"""Per-kernel time of one case's kiln build: ``python -m bench.profile CASE [--top 25]``.

Times each kernel call of kiln's build (the same steps and tuning records as
``python -m bench``; ``--private``: the bench-private build) through the Relax VM's
instrument hook, to see which kernels dominate and which are left unscheduled.
``--runs N --min``: each call's fastest of N runs instead of the mean of 3 (on a shared,
loaded machine the mean of a few runs is mostly other tenants' noise).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile")
    parser.add_argument("case")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--tuning", choices=("shipped", "user", "off"), default="shipped",
                        help="tuning records applied, as for python -m bench")
    parser.add_argument("--shapes", action="store_true",
                        help="print each kernel's argument shapes under it")
    parser.add_argument("--runs", type=int, default=3, help="profiled runs")
    parser.add_argument("--min", action="store_true",
                        help="each call's fastest run instead of the mean")
    parser.add_argument("--private", action="store_true",
                        help="profile the bench-private build instead of kiln's")
    args = parser.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)

    import tvm
    from tvm import relax

    from bench.build import compile_private, compile_with_kiln
    from bench.cases import CASES
    from kiln.backends.tvm.schedules import unscheduled_kernels

    with tempfile.TemporaryDirectory() as tmp:
        case = CASES[args.case](Path(tmp))
        if args.private:
            executable, lowered, compile_s = compile_private(case)
        else:
            executable, lowered, compile_s = compile_with_kiln(case, args.tuning)
    unscheduled = set(unscheduled_kernels(lowered))
    vm = relax.VirtualMachine(executable, tvm.cpu())
    inputs = [tvm.runtime.tensor(case.inputs[name]) for name in case.inputs]
    vm["main"](*inputs)
    rows: dict[str, list[float]] = {}
    started: dict[str, float] = {}
    shapes: dict[str, str] = {}

    def instrument(func, symbol, before_run, ret_value, *call_args):
        if before_run:
            if symbol not in shapes:
                shapes[symbol] = " ".join("x".join(map(str, a.shape)) for a in call_args
                                          if hasattr(a, "shape"))
            started[symbol] = time.perf_counter()
        else:
            rows.setdefault(symbol, []).append((time.perf_counter() - started[symbol]) * 1e6)
        return 0

    vm.set_instrument(instrument)
    runs = max(1, args.runs)
    for _ in range(runs):
        vm["main"](*inputs)
    # one run's worth of calls: call slot i of a symbol over the runs (mean, or --min)
    stat = min if args.min else (lambda v: sum(v) / len(v))
    rows = {k: [stat(v[i::len(v) // runs]) for i in range(len(v) // runs)]
            for k, v in rows.items() if not k.startswith("vm.builtin")}
    total = sum(sum(v) for v in rows.values())
    print(f"{args.case}: compile {compile_s:.1f} s, total kernel time {total / 1e3:.2f} ms, "
          f"{len(unscheduled)} unscheduled")
    for name, values in sorted(rows.items(), key=lambda kv: -sum(kv[1]))[: args.top]:
        mark = " UNSCHEDULED" if name in unscheduled else ""
        print(f"{sum(values) / 1e3:9.3f} ms {100 * sum(values) / total:5.1f}% x{len(values):<3} "
              f"{name}{mark}")
        if args.shapes:
            print(f"{'':22}{shapes.get(name, '')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
