"""FoldGPT bench cases: a pre-LN transformer (``compiler/testing/block_models.py``: 8
layers, dim 256, 8 heads, MLP 1024, 64 tokens; 16 residual blocks, four of them
near-identity as deep trained transformers have) before and after the ``foldgpt`` spec's
passes (``drop_blocks`` rate 0.25, then ``share_blocks`` adjacent pairs, mean), run by
kiln's driver as ``kiln compile --spec foldgpt`` runs them.

``foldgpt-before`` and ``foldgpt`` register with ``python -m bench`` (kiln vs ONNX Runtime
on each graph). ``python -m bench.cases_blocks`` builds both, prints the size (bytes of
model.onnx and of the built library) and the latency (kiln and ONNX Runtime, interleaved)
before and after, with the output SQNR of the folded model against the original, and
writes ``bench/results_blocks.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.case import SEED, PreparedCase

HERE = Path(__file__).resolve().parent
LAYERS, DIM, HEADS, HIDDEN, TOKENS = 8, 256, 8, 1024, 64
#: near-identity blocks (2i: layer i's attention, 2i+1 its MLP)
QUIET = (3, 4, 11, 12)


def _source(workdir: Path) -> Path:
    from kiln.compiler.testing.block_models import export_transformer

    path = workdir / "foldgpt-before.onnx"
    if not path.exists():
        workdir.mkdir(parents=True, exist_ok=True)
        export_transformer(path, layers=LAYERS, dim=DIM, heads=HEADS, hidden=HIDDEN,
                           tokens=TOKENS, quiet=QUIET, seed=SEED)
    return path


def _folded(workdir: Path) -> Path:
    path = workdir / "foldgpt.onnx"
    if not path.exists():
        from kiln.compiler.driver.compile import compile_model

        result = compile_model(_source(workdir), "foldgpt")
        from kiln.compiler.core.atomic import write_atomic
        from kiln.compiler.core.graph import model_bytes

        write_atomic(path, model_bytes(result.model))
    return path


def _case(name: str) -> Callable[[Path], PreparedCase]:
    def prepare(workdir: Path) -> PreparedCase:
        path = _folded(workdir) if name == "foldgpt" else _source(workdir)
        x = np.random.default_rng(SEED).standard_normal((1, TOKENS, DIM)).astype(np.float32)
        return PreparedCase(name=name, onnx_path=path, input_shapes={"x": [1, TOKENS, DIM]},
                            inputs={"x": x})

    return prepare


BLOCK_CASES: dict[str, Callable[[Path], PreparedCase]] = {
    name: _case(name) for name in ("foldgpt-before", "foldgpt")}


def run_foldgpt(workdir: Path, threads: int, runs: int, rounds: int) -> dict:
    from bench.build import build_case
    from bench.case import ort_runner
    from bench.timing import time_interleaved
    from kiln.compiler.core.metrics import sqnr_db

    cases = {name: prepare(workdir) for name, prepare in BLOCK_CASES.items()}
    built = {name: build_case(case, workdir / f"{name}-built", threads=threads)
             for name, case in cases.items()}
    ort = {name: ort_runner(case, threads) for name, case in cases.items()}
    fns: dict[str, Callable[[], object]] = {}
    for name, case in cases.items():
        fns[f"{name}:kiln"] = (lambda b=built[name], c=case: b.run(c.inputs))
        fns[f"{name}:ort"] = ort[name]
    best: dict[str, float] = {}
    for _ in range(rounds):  # a shared machine: the least disturbed round's median
        for engine, ms in time_interleaved(fns, runs, warmup=5).items():
            best[engine] = min(best.get(engine, ms), ms)
    reference = ort["foldgpt-before"]()[0]
    result = {"case": "foldgpt", "threads": threads,
              "sqnr_db_vs_before": round(sqnr_db(reference, ort["foldgpt"]()[0]), 2)}
    for name, case in cases.items():
        library = workdir / f"{name}-built" / "model.so"
        key = "after" if name == "foldgpt" else "before"
        result[key] = {"onnx_bytes": case.onnx_path.stat().st_size,
                       "library_bytes": library.stat().st_size,
                       "kiln_ms": round(best[f"{name}:kiln"], 4),
                       "ort_ms": round(best[f"{name}:ort"], 4)}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cases_blocks")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / "results_blocks.json")
    args = parser.parse_args(argv)
    from bench.timing import git_commit
    from kiln.compiler.core.atomic import write_atomic

    with tempfile.TemporaryDirectory(prefix="kiln-bench-blocks-") as tmp:
        result = run_foldgpt(Path(tmp), args.threads, args.runs, args.rounds)
    print("| model | model.onnx bytes | model.so bytes | kiln ms | ORT ms |")
    print("|---|---|---|---|---|")
    for key in ("before", "after"):
        r = result[key]
        print(f"| {key} | {r['onnx_bytes']} | {r['library_bytes']} | {r['kiln_ms']} | "
              f"{r['ort_ms']} |")
    print(f"SQNR after vs before: {result['sqnr_db_vs_before']} dB")
    payload = {"commit": git_commit(), "results": [result]}
    write_atomic(args.out, (json.dumps(payload, indent=2) + "\n").encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
