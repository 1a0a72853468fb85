"""Shared fixtures of the MoE pass tests: small torch MoE layers exported to ONNX once."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from kiln.compiler.core import graph as kir
from kiln.compiler.core.pass_api import CalibrationContext

DIM = 16
#: seeded tokens the numerical comparisons run on
TOKENS = np.random.default_rng(0).standard_normal((13, DIM)).astype(np.float32)


def load(path) -> ir.Model:
    return ir.from_proto(onnx.load(str(path)))


def run(model: ir.Model, x: np.ndarray = TOKENS, outputs: list[str] | None = None):
    proto = kir.to_proto(model)
    if outputs:
        for name in outputs:
            proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    result = session.run(outputs, {session.get_inputs()[0].name: x})
    return result if outputs else result[0]


def calibration(samples: int = 4) -> CalibrationContext:
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.standard_normal((32, DIM)).astype(np.float32)} for _ in range(samples)]

    def collect(model, names):
        got = {n: [] for n in names}
        for feed in feeds:
            for n, v in zip(names, run(model, feed["x"], names)):
                got[n].append(v)
        return got
    return CalibrationContext(feeds, collect)


@pytest.fixture(scope="session")
def moe_files(tmp_path_factory):
    import torch

    from kiln.compiler.testing.moe_models import DenseMoE, FeedForward, SparseMoE, export

    folder = tmp_path_factory.mktemp("moe")
    torch.manual_seed(0)
    files = {
        "sparse": export(SparseMoE(DIM, 32, 4, 2), folder / "sparse.onnx", dim=DIM),
        "dense": export(DenseMoE(DIM, 32, 4), folder / "dense.onnx", dim=DIM),
        "ffn": export(FeedForward(DIM, 32), folder / "ffn.onnx", dim=DIM),
        "sparse8": export(SparseMoE(DIM, 24, 8, 2, activation="silu"), folder / "sparse8.onnx",
                          dim=DIM),
    }
    return files
