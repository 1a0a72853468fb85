"""Sparse benchmark cases: kiln's sparse kernel vs its dense kernel vs ONNX Runtime.

The bench MLP is ``x[1, 512] -> 1024 -> 1024 -> 256`` (ReLU, Gemm layers, seeded weights,
7.3 MB fp32), pruned by kiln's own ``prune`` pass:

sparse-2of4      ``pattern: "2:4"`` (the sparse-2of4 spec's pruning: 50% zeros).
block-sparse-80  ``block: [16, 1], sparsity: 0.8`` (80% of the 16x1 blocks zero).

``SPARSE_CASES`` registers both with ``python -m bench`` (kiln as built by default, i.e.
the sparse kernel only where the cost model expects it to win, vs ONNX Runtime on the
same pruned ONNX file). ``python -m bench.cases_sparse`` builds each case three times, with
``KILN_SPARSE_KERNELS=auto``, ``never`` (the dense kernel everywhere) and ``always`` (the
sparse kernel on every pruned layer, whatever the cost model says), times them and ONNX
Runtime interleaved, prints which layers got the sparse kernel and writes
``bench/results_sparse.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.case import SEED, PreparedCase

HERE = Path(__file__).resolve().parent
MLP_SIZES = (512, 1024, 1024, 256)
#: case -> the prune pass's options
PRUNING: dict[str, dict] = {
    "sparse-2of4": {"pattern": "2:4"},
    "block-sparse-80": {"block": (16, 1), "sparsity": 0.8},
}


def _pruned_mlp(name: str) -> Callable[[Path], PreparedCase]:
    def prepare(workdir: Path) -> PreparedCase:
        import onnx

        from kiln.compiler.core import graph as kir
        from kiln.compiler.testing.sparse_models import sparse_mlp
        from kiln.passes.prune.prune import Prune, PruneConfig

        path = workdir / f"{name}.onnx"
        if not path.exists():
            model = sparse_mlp(MLP_SIZES, pattern="dense", seed=SEED)
            Prune(PruneConfig(**PRUNING[name]))(model)
            workdir.mkdir(parents=True, exist_ok=True)
            onnx.save(kir.to_proto(model), path)
        x = np.random.default_rng(SEED).standard_normal((1, MLP_SIZES[0])).astype(np.float32)
        return PreparedCase(name=name, onnx_path=path, input_shapes={"x": [1, MLP_SIZES[0]]},
                            inputs={"x": x}, flops=2.0 * sum(
                                k * n for k, n in zip(MLP_SIZES[:-1], MLP_SIZES[1:],
                                                      strict=True)))

    return prepare


SPARSE_CASES: dict[str, Callable[[Path], PreparedCase]] = {
    name: _pruned_mlp(name) for name in PRUNING}


def _build(case: PreparedCase, outdir: Path, mode: str, threads: int):
    from bench.build import build_case
    from kiln.backends.tvm.importer.sparse_weights import POLICY_ENV

    before = os.environ.get(POLICY_ENV)
    os.environ[POLICY_ENV] = mode
    try:
        built = build_case(case, outdir, threads=threads)
    finally:
        if before is None:
            os.environ.pop(POLICY_ENV, None)
        else:
            os.environ[POLICY_ENV] = before
    sparse = json.loads((outdir / "manifest.json").read_text()).get("extra", {}).get(
        "sparse_kernels", [])
    return built, sparse


def run_sparse_case(name: str, workdir: Path, threads: int, runs: int, rounds: int) -> dict:
    from bench.case import ort_runner
    from bench.timing import time_interleaved

    case = SPARSE_CASES[name](workdir)
    auto, layers = _build(case, workdir / f"{name}-auto", "auto", threads)
    dense, _ = _build(case, workdir / f"{name}-dense", "never", threads)
    forced, _ = _build(case, workdir / f"{name}-always", "always", threads)
    ort_run = ort_runner(case, threads)
    want = ort_run()[0]
    errors = {k: float(np.abs(b.run(case.inputs)[0] - want).max() / np.abs(want).max())
              for k, b in (("auto", auto), ("dense", dense), ("always", forced))}
    fns = {"kiln": lambda: auto.run(case.inputs), "kiln_dense": lambda: dense.run(case.inputs),
           "kiln_always_sparse": lambda: forced.run(case.inputs), "ort": ort_run}
    best: dict[str, float] = {}
    for _ in range(rounds):  # a shared machine: the least disturbed round's median
        for engine, ms in time_interleaved(fns, runs, warmup=20).items():
            best[engine] = min(best.get(engine, ms), ms)
    return {
        "case": name, "pruning": {k: list(v) if isinstance(v, tuple) else v
                                  for k, v in PRUNING[name].items()},
        "sparse_layers": layers, "kiln_ms": round(best["kiln"], 4),
        "kiln_dense_ms": round(best["kiln_dense"], 4),
        "kiln_always_sparse_ms": round(best["kiln_always_sparse"], 4),
        "ort_ms": round(best["ort"], 4),
        "sparse_vs_dense": round(best["kiln_dense"] / best["kiln"], 3),
        "bytes": auto.bytes, "dense_bytes": dense.bytes, "always_sparse_bytes": forced.bytes,
        "threads": threads,
        "max_rel_err_vs_ort": {k: float(f"{v:.3g}") for k, v in errors.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cases_sparse")
    parser.add_argument("cases", nargs="*", default=list(SPARSE_CASES))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / "results_sparse.json")
    args = parser.parse_args(argv)
    from bench.timing import git_commit

    with tempfile.TemporaryDirectory(prefix="kiln-bench-sparse-") as tmp:
        results = [run_sparse_case(name, Path(tmp), args.threads, args.runs, args.rounds)
                   for name in args.cases]
    print("| case | sparse layers | kiln (auto) ms | kiln dense ms | kiln all sparse ms | "
          "ORT ms | dense/auto |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['case']} | {', '.join(r['sparse_layers']) or 'none'} | {r['kiln_ms']} | "
              f"{r['kiln_dense_ms']} | {r['kiln_always_sparse_ms']} | {r['ort_ms']} | "
              f"{r['sparse_vs_dense']} |")
    payload = {"commit": git_commit(), "results": results}
    from kiln.compiler.core.atomic import write_atomic

    write_atomic(args.out, (json.dumps(payload, indent=2) + "\n").encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
