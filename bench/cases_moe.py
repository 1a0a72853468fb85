"""MoE bench cases (``moe-top2``): 8 experts, top-2, on 1, 16 and 256 tokens, each as the
dense-gated original (``moe-dense-tN``: every expert runs) and as kiln's top-2 sparse
dispatch of the same layer (``moe-top2-tN``: ``moe_dense_to_sparse``, only the chosen
experts run on a token; docs/moe.md), so the runner compares kiln and ONNX Runtime on
both graphs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.case import SEED, PreparedCase

DIM, HIDDEN, EXPERTS, K = 256, 512, 8, 2
TOKENS = (1, 16, 256)


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
