"""``python -m bench --rpc HOST:PORT:KEY [--target arm64] --cases ...``: kiln's build of each
case timed on a remote device through TVM's RPC tracker (``kiln.backends.tvm.remote``).

Each case is built here for ``--target`` (the board's target), uploaded, run on the board
with TVM's ``time_evaluator`` (the board's clock, ``--runs`` repeats, median), and its outputs
are brought back and compared with ONNX Runtime running the case on this machine. ONNX Runtime
and PyTorch are not timed: they do not run on the board through TVM's RPC, so there is no
ratio; compare with numbers measured on the board itself.

Pointing it at a board: start a tracker where both can reach it (``python -m
tvm.exec.rpc_tracker --host 0.0.0.0 --port 9190``), on the board an RPC server with TVM's
runtime (``python -m tvm.exec.rpc_server --tracker TRACKER:9190 --key rk3588``), check it is
listed (``python -m tvm.exec.query_rpc_tracker --port 9190``), then
``python -m bench --rpc TRACKER:9190:rk3588 --target arm64 --cases ocr-cls-fp32``.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

import onnx

from bench.timing import git_commit

log = logging.getLogger("bench.remote")


def run_remote(args: argparse.Namespace, names: list[str], cases: dict) -> int:
    """``cases``: name -> case builder (bench.cases.CASES, passed in: no import cycle)."""
    from kiln.backends.ort import ReferenceRunner
    from kiln.backends.tvm.build import build_artifact
    from kiln.backends.tvm.remote import RpcAddress, connect, time_artifact
    from kiln.compiler.core.errors import KilnError
    from kiln.compiler.core.metrics import relative_error
    from kiln.compiler.driver.symbolic import load_with_symbols

    try:
        address = RpcAddress.parse(args.rpc)
        session = connect(address)
    except KilnError as error:
        print(f"bench: {error}")
        return 2
    results = []
    with tempfile.TemporaryDirectory(prefix="kiln-bench-remote-") as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        for name in names:
            case = cases[name](workdir)
            outdir = workdir / f"{name}-{args.target}"
            model = load_with_symbols(str(case.onnx_path), case.input_shapes)
            build_artifact(model, args.target, outdir, model_hash=name,
                           apply_tuning=args.tuning != "off")
            timing = time_artifact(outdir, case.inputs, address, runs=args.runs,
                                   session=session)
            want = ReferenceRunner(onnx.load(str(case.onnx_path))).run(case.inputs)
            error = max(relative_error(g, w) for g, w in zip(timing.outputs, want, strict=True))
            row = {"case": name, "target": args.target, "device": timing.device,
                   "kiln_ms": round(timing.median_ms, 4),
                   "min_ms": round(min(timing.runs_ms), 4), "runs": len(timing.runs_ms),
                   "max_rel_err_vs_ort": float(f"{error:.3g}")}
            results.append(row)
            print(f"{name:<24}{args.target:>10}{row['kiln_ms']:>12.3f} ms"
                  f"{row['min_ms']:>12.3f} ms min   rel err vs ORT {error:.1e}", flush=True)
    if args.json:
        payload = {"commit": git_commit(), "rpc": str(address), "target": args.target,
                   "runs": args.runs, "cases": results}
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    return 0
