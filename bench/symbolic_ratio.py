"""One symbolic-shape build against a fixed-shape build at each size (issue 16 item 4).

``python -m bench.symbolic_ratio --model rec --sizes 160,320,640,1280 [--profile 320]``

Builds the model once with a symbolic dim (PP-OCRv4 rec: ``x=1x3x48xW=16..2048``; the
encoder: ``x=1xS=2..1024x256``) and once per size with that size fixed, then times,
at each size, the symbolic build, the fixed one and ONNX Runtime, each alone in a block
(``bench.timing.time_in_blocks``), ``--rounds`` times in turn; the ratio reported is
the median over rounds of symbolic / fixed. ``--cpu-time``: 1 thread, each engine's
fastest call in CPU time (``time.thread_time``), interleaved: on a loaded shared machine
a 2-thread pool's wall time is mostly waiting for the other tenants' processes.
``--profile SIZE``: each kernel's time in both builds at SIZE, the calls paired in graph
order (the builds number their kernels apart), the kernels the symbolic build loses most on first.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

#: the symbolic dim of each model: (input, axis, range of the symbolic build)
MODELS = {"rec": ("x", 3, (16, 2048)), "encoder": ("x", 1, (2, 1024))}


def _model_path(model: str, workdir: Path) -> tuple[Path, list]:
    """The ONNX file and its input shape with ``None`` at the symbolic axis."""
    if model == "rec":
        from kiln.compiler.testing.real_models import rapidocr_model

        return rapidocr_model("rec"), [1, 3, 48, None]
    import torch

    from kiln.compiler.testing.torch_models import encoder

    net, (example,) = encoder()
    path = workdir / "encoder-dynamic-seq.onnx"
    seq = torch.export.Dim("S", min=2, max=1024)
    program = torch.onnx.export(net, (example,), dynamo=True, input_names=["x"],
                                dynamic_shapes=({1: seq},))
    program.save(str(path))
    return path, [1, None, 256]


def _case(path: Path, shape: list, dim, size: int):
    from bench.case import PreparedCase, random_inputs

    concrete = [size if d is None else d for d in shape]
    return PreparedCase(name=f"{path.stem}-{size}", onnx_path=path,
                        input_shapes={"x": [dim if d is None else d for d in shape]},
                        inputs=random_inputs({"x": concrete}))


def _call_times(executable, inputs: list, runs: int) -> list[tuple[str, float]]:
    """(kernel, fastest of ``runs`` in us) for each kernel call of one run, in order."""
    import time

    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(executable, tvm.cpu())
    vm["main"](*inputs)
    calls: list[tuple[str, float]] = []
    started: list[float] = []

    def instrument(func, symbol, before_run, ret_value, *args):
        if before_run:
            started.append(time.perf_counter())
        elif not symbol.startswith("vm.builtin"):
            calls.append((symbol, (time.perf_counter() - started[-1]) * 1e6))
        return 0

    vm.set_instrument(instrument)
    for _ in range(runs):
        vm["main"](*inputs)
    per_run = len(calls) // runs
    return [(calls[i][0], min(calls[i + r * per_run][1] for r in range(runs)))
            for i in range(per_run)]


def _stem(name: str) -> str:
    return re.sub(r"\d+", "", name)


def profile(symbolic_case, fixed_case, runs: int, top: int) -> None:
    """Each kernel call of both builds at one size, paired in order, worst ratio first."""
    import tvm

    from bench.build import compile_with_kiln

    timed = []
    for case in (symbolic_case, fixed_case):
        executable, _, _ = compile_with_kiln(case)
        inputs = [tvm.runtime.tensor(v) for v in case.inputs.values()]
        timed.append(_call_times(executable, inputs, runs))
    sym, fixed = timed
    matcher = difflib.SequenceMatcher(a=[_stem(n) for n, _ in sym],
                                      b=[_stem(n) for n, _ in fixed], autojunk=False)
    rows, paired = [], set()
    for a, b, size in matcher.get_matching_blocks():
        for k in range(size):
            rows.append((sym[a + k][1] - fixed[b + k][1], sym[a + k], fixed[b + k][1]))
            paired.add(a + k)
    rows += [(t, (n, t), 0.0) for i, (n, t) in enumerate(sym) if i not in paired]
    total_s, total_f = sum(t for _, t in sym), sum(t for _, t in fixed)
    print(f"kernel time: symbolic {total_s / 1e3:.2f} ms ({len(sym)} calls), "
          f"fixed {total_f / 1e3:.2f} ms ({len(fixed)} calls), "
          f"ratio {total_s / total_f:.2f}")
    print(f"{'loss ms':>8} {'sym ms':>8} {'fixed ms':>8}  kernel (symbolic build)")
    ranked = sorted(rows, key=lambda r: -r[0])
    for n, (loss, (name, t_sym), t_fixed) in enumerate(ranked[:top] + ranked[-top // 3:]):
        if n == top:
            print("   ... the kernels the symbolic build gains most on:")
        print(f"{loss / 1e3:8.3f} {t_sym / 1e3:8.3f} {t_fixed / 1e3:8.3f}  {name}")


def _cpu_min_ms(fns: dict, runs: int, rounds: int) -> dict[str, float]:
    """Each callable's fastest call in CPU time (ms), ``rounds`` x ``runs`` interleaved."""
    import time

    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds * runs):
        for name, fn in fns.items():
            start = time.thread_time()
            fn()
            best[name] = min(best[name], (time.thread_time() - start) * 1e3)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.symbolic_ratio")
    parser.add_argument("--model", choices=sorted(MODELS), default="rec")
    parser.add_argument("--sizes", default="160,320,640,1280")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=20, help="timed calls per block")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="blocks of each engine per size")
    parser.add_argument("--profile", type=int, default=None, metavar="SIZE")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--cpu-time", action="store_true",
                        help="1 thread, fastest call in CPU time, interleaved")
    args = parser.parse_args(argv)
    if args.cpu_time:
        args.threads = 1
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("TVM_BIND_THREADS", "0")

    from bench.build import build_case
    from bench.case import ort_runner
    from bench.timing import time_in_blocks

    sizes = [int(s) for s in args.sizes.split(",")]
    name, _, (lo, hi) = MODELS[args.model]
    dim = f"S={lo}..{hi}" if args.model == "encoder" else f"W={lo}..{hi}"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        path, shape = _model_path(args.model, work)
        if args.profile is not None:
            profile(_case(path, shape, dim, args.profile),
                    _case(path, shape, args.profile, args.profile), args.runs, args.top)
            return 0
        symbolic = build_case(_case(path, shape, dim, sizes[0]), work / "sym",
                              threads=args.threads)
        print(f"{args.model}: symbolic build ({dim}) {symbolic.compile_s:.0f} s, "
              f"unscheduled {symbolic.unscheduled}", flush=True)
        print(f"{'size':>6} {'symbolic':>9} {'fixed':>9} {'ORT':>9} {'sym/fixed':>10} "
              f"{'fixed/ORT':>10}  (ms, " + (f"1 thread, CPU time min of {args.rounds * args.runs})"
                                    if args.cpu_time else
                                    f"median of {args.rounds} blocks of {args.runs})"))
        for size in sizes:
            case = _case(path, shape, size, size)
            fixed = build_case(case, work / f"fixed{size}", threads=args.threads)
            feeds = case.inputs
            got, want = symbolic.run(feeds)[0], fixed.run(feeds)[0]
            np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
            fns = {"symbolic": lambda f=feeds: symbolic.run(f),
                   "fixed": lambda f=feeds, b=fixed: b.run(f),
                   "ort": ort_runner(case, args.threads)}
            if args.cpu_time:
                med = _cpu_min_ms(fns, args.runs, args.rounds)
                ratio = med["symbolic"] / med["fixed"]
            else:
                rounds = [time_in_blocks(fns, args.runs, args.warmup)
                          for _ in range(args.rounds)]
                med = {k: statistics.median(r[k] for r in rounds) for k in fns}
                ratio = statistics.median(r["symbolic"] / r["fixed"] for r in rounds)
            print(f"{size:6d} {med['symbolic']:9.2f} {med['fixed']:9.2f} {med['ort']:9.2f} "
                  f"{ratio:10.2f} {med['fixed'] / med['ort']:10.2f}", flush=True)
    print(f"load {open('/proc/loadavg').read().split()[:3]}, "
          f"KILN_HOST_MCPU={os.environ.get('KILN_HOST_MCPU', '(host)')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
