"""RotaryEmbedding (opset 23) lowered by kiln (importer.rotary), against ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from kiln.backends.tvm import build_artifact, load
from kiln.compiler.testing.onnx_models import to_ir
from kiln.compiler.testing.reference import ort_outputs

#: Max |kiln - ORT| (two products and a sum per element).
ABS_TOL = 1e-5
B, S, H, D, POSITIONS = 2, 3, 2, 8, 10


@pytest.mark.parametrize("rank, interleaved, rotary_dim, positions", [
    (4, 1, 0, True), (4, 0, 4, True), (3, 0, 0, False), (3, 1, 6, True),
])
def test_rotary_embedding_matches_ort(rank, interleaved, rotary_dim, positions, tmp_path):
    rng = np.random.default_rng(0)
    half = (rotary_dim or D) // 2
    x_shape = [B, H, S, D] if rank == 4 else [B, S, H * D]
    cache = [POSITIONS, half] if positions else [B, S, half]
    feeds = {"x": rng.standard_normal(x_shape).astype(np.float32),
             "cos": rng.standard_normal(cache).astype(np.float32),
             "sin": rng.standard_normal(cache).astype(np.float32)}
    names = ["x", "cos", "sin"]
    if positions:
        feeds["pos"] = rng.integers(0, POSITIONS, (B, S)).astype(np.int64)
        names.append("pos")
    attrs = {"interleaved": interleaved, "rotary_embedding_dim": rotary_dim}
    if rank == 3:
        attrs["num_heads"] = H
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64 if n == "pos" else
                                            TensorProto.FLOAT, list(feeds[n].shape))
              for n in names]
    graph = helper.make_graph([helper.make_node("RotaryEmbedding", names, ["y"], **attrs)],
                              "rope", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    build_artifact(to_ir(model), "host", tmp_path, model_hash="sha256:test")
    got = load(tmp_path)(**feeds)
    got = got[0] if isinstance(got, (list, tuple)) else got
    np.testing.assert_allclose(got, ort_outputs(model, feeds)[0], atol=ABS_TOL)
