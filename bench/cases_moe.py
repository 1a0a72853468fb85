"""MoE bench cases (``moe-top2``): 8 experts, top-2, on 1, 16, 64 and 256 tokens, each as the
dense-gated original (``moe-dense-tN``: every expert runs) and as kiln's top-2 sparse
dispatch of the same layer (``moe-top2-tN``: ``moe_dense_to_sparse``, only the chosen
experts run on a token; docs/moe.md), so the runner compares kiln and ONNX Runtime on
both graphs.

``python -m bench.cases_moe [--rounds 200] [--threads 2] [--kinds top2,dense]`` times the
cases' kiln builds (``--tuning off``) and ONNX Runtime interleaved, one call each per round, and
prints the minimum and median per engine (on a shared machine the minimum is the
figure that load disturbs least); the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.case import SEED, PreparedCase

DIM, HIDDEN, EXPERTS, K = 256, 512, 8, 2
TOKENS = (1, 16, 64, 256)


def _dense_file(workdir: Path) -> Path:
    import torch

    from kiln.compiler.testing.moe_models import DenseMoE, export

    path = workdir / "moe-dense.onnx"
    if not path.exists():
        torch.manual_seed(SEED)
        export(DenseMoE(DIM, HIDDEN, EXPERTS), path, tokens=16, dim=DIM)
    return path


def _sparse_file(workdir: Path) -> Path:
    import onnx
    import onnx_ir as ir

    from kiln.passes.moe.moe_dense_to_sparse import MoeDenseToSparse, MoeDenseToSparseConfig

    path = workdir / "moe-top2.onnx"
    if not path.exists():
        model = ir.from_proto(onnx.load(str(_dense_file(workdir))))
        MoeDenseToSparse(MoeDenseToSparseConfig(k=K))(model)
        ir.save(model, path)
    return path


def _case(kind: str, tokens: int) -> Callable[[Path], PreparedCase]:
    def prepare(workdir: Path) -> PreparedCase:
        path = _sparse_file(workdir) if kind == "top2" else _dense_file(workdir)
        x = np.random.default_rng(SEED).standard_normal((tokens, DIM)).astype(np.float32)
        per_expert = 2.0 * 2 * DIM * HIDDEN * tokens
        flops = per_expert * (K if kind == "top2" else EXPERTS)
        return PreparedCase(name=f"moe-{kind}-t{tokens}", onnx_path=path,
                            input_shapes={"x": [tokens, DIM]}, inputs={"x": x}, flops=flops)

    return prepare


MOE_CASES: dict[str, Callable[[Path], PreparedCase]] = {
    f"moe-{kind}-t{t}": _case(kind, t) for kind in ("top2", "dense") for t in TOKENS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cases_moe")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kinds", default="top2,dense",
                        help="comma-separated: top2 (sparse dispatch), dense (dense-gated)")
    args = parser.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # before tvm starts

    from bench.build import build_case
    from bench.case import ort_runner

    print(f"load average before: {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        engines: dict[str, Callable[[], object]] = {}
        kinds = set(args.kinds.split(","))
        for name, prepare in MOE_CASES.items():
            if name.split("-")[1] not in kinds:
                continue
            case = prepare(Path(tmp))
            built = build_case(case, Path(tmp) / name, tuning="off", threads=args.threads)
            feeds = dict(case.inputs)
            engines[f"{name} kiln"] = (lambda b=built, f=feeds: b.run(f))
            engines[f"{name} ort"] = ort_runner(case, args.threads)
        for fn in engines.values():
            fn()
        samples: dict[str, list[float]] = {key: [] for key in engines}
        for _ in range(args.rounds):
            for key, fn in engines.items():
                start = time.perf_counter()
                fn()
                samples[key].append((time.perf_counter() - start) * 1e3)
    print(f"load average after: {os.getloadavg()}")
    print(f"threads {args.threads}, {args.rounds} rounds; ms: min / median")
    for key, values in samples.items():
        print(f"{key:22} {min(values):8.3f} {statistics.median(values):8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
