"""Sparse MatMul/Gemm weights (importer.sparse_weights, .sparse_kernel, .sparse_cost and
the sparse_dense schedule rule): packing round trips, which layers get the sparse
kernel and why, results equal to ONNX Runtime on the pruned model, and the choice in
the build's result and manifest."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

from kiln.backends.tvm import build_artifact, load
from kiln.backends.tvm.importer import internal_ops
from kiln.backends.tvm.importer.sparse_weights import (
    GROUP,
    POLICY_ENV,
    pack_gather,
    pack_shared,
    pack_sparse_weights,
)
from kiln.compiler.core import graph as kir
from kiln.compiler.testing.sparse_models import block_sparse, sparse_mlp, two_of_four

#: float32 sums in another order than ONNX Runtime's (K up to 512)
FLOAT_TOL = 1e-4


def _proto(model):
    import onnx

    return onnx.ModelProto.FromString(kir.model_bytes(model))


def _ort(model, x):
    session = ort.InferenceSession(kir.model_bytes(model), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_packing_round_trips_and_pads_only_what_it_must():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((128, 64)).astype(np.float32)          # [K, N]
    blocked = block_sparse(w, (16, 1), 0.25).T.copy()              # R [N, K]
    shared = pack_shared(blocked)
    np.testing.assert_array_equal(shared.to_dense(), blocked)
    assert shared.columns.shape == shared.values.shape[:2]
    longest = max(int((blocked[g * GROUP] != 0).sum()) for g in range(64 // GROUP))
    assert shared.values.shape[1] == longest
    r24 = two_of_four(w).T.copy()
    gather = pack_gather(r24)
    np.testing.assert_array_equal(gather.to_dense(), r24)
    assert gather.stored_density == 0.5 and gather.columns.dtype == np.int16
    assert gather.nbytes == 64 * 64 * (4 + 2)                      # values + int16 columns


def test_block_sparse_layers_get_the_sparse_kernel_and_2of4_stays_dense():
    block = sparse_mlp((128, 256, 64), pattern="block", block=(16, 1), density=0.2)
    proto = _proto(block)
    choices = pack_sparse_weights(proto, "auto")
    assert [(c.node, c.kernel, c.layout) for c in choices] == [
        ("fc1", "sparse", "shared"), ("fc2", "sparse", "shared")]
    assert all(c.expected_speedup > 1 and c.reason == "cost model" for c in choices)
    assert [n.op_type for n in proto.graph.node if n.domain == internal_ops.DOMAIN] == \
        [internal_ops.SPARSE_DENSE] * 2
    assert not {"fc1.weight", "fc2.weight"} & {t.name for t in proto.graph.initializer}

    dense = pack_sparse_weights(proto24 := _proto(sparse_mlp((128, 256, 64))), "auto")
    assert [c.kernel for c in dense] == ["dense", "dense"]
    assert all(c.reason.startswith("cost model expects no gain over the dense")
               and c.expected_speedup < 1 and c.zero_fraction == 0.5 for c in dense)
    assert not any(n.domain == internal_ops.DOMAIN for n in proto24.graph.node)
    assert pack_sparse_weights(_proto(block), "never") == []


def test_refusals_name_their_reason():
    odd = sparse_mlp((128, 40), pattern="block", block=(8, 1), density=0.2)
    [choice] = pack_sparse_weights(_proto(odd), "always")
    assert choice.kernel == "dense" and choice.reason == f"N=40 is not a multiple of {GROUP}"
    proto = _proto(sparse_mlp((128, 128, 128), pattern="block", block=(16, 1), density=0.2,
                              forms=["matmul", "matmul"]))
    proto.graph.node[3].input[1] = "fc1.weight"          # fc2 reads fc1's weight too
    assert {c.reason for c in pack_sparse_weights(proto, "always")} == {
        "weight is read by another node too"}
    dense = sparse_mlp((64, 64), pattern="dense")
    assert pack_sparse_weights(_proto(dense), "always") == []


@pytest.mark.parametrize("pattern, rows, mode, layout", [
    ("block", 1, "auto", "shared"), ("block", 3, "auto", "shared"),
    ("2:4", 1, "always", "gather"), ("2:4", 10, "always", "gather"),
])
def test_sparse_kernel_matches_ort_on_every_layer_form(tmp_path, monkeypatch, pattern, rows,
                                                       mode, layout):
    monkeypatch.setenv(POLICY_ENV, mode)
    model = sparse_mlp((96, 128, 64, 32), pattern=pattern, block=(16, 1), density=0.2,
                       batch=rows, forms=["gemm", "matmul", "gemm_nt"])
    x = np.random.default_rng(1).standard_normal((rows, 96)).astype(np.float32)
    want = _ort(model, x)
    built = build_artifact(model, "host", tmp_path, model_hash="test")
    assert [(c["node"], c["kernel"], c["layout"]) for c in built.sparse_kernels] == [
        (f"fc{i}", "sparse", layout) for i in (1, 2, 3)]
    assert sorted(r for k, r in built.rules.items() if "sparse" in k) == ["sparse_dense"] * 3
    manifest = json.loads(built.manifest.read_text())
    assert manifest["extra"]["sparse_kernels"] == ["fc1", "fc2", "fc3"]
    [got] = load(tmp_path, threads=1)(x=x)
    np.testing.assert_allclose(got, want, rtol=FLOAT_TOL, atol=FLOAT_TOL)


def test_the_library_keeps_only_the_stored_weights(tmp_path, monkeypatch):
    model = sparse_mlp((512, 512, 256), pattern="block", block=(16, 1), density=0.2)
    sizes = {}
    for mode in ("never", "auto"):
        monkeypatch.setenv(POLICY_ENV, mode)
        built = build_artifact(model, "host", tmp_path / mode, model_hash="test")
        sizes[mode] = built.library.stat().st_size
    weight_bytes = 4 * (512 * 512 + 512 * 256)
    assert sizes["never"] - sizes["auto"] > 0.6 * weight_bytes, sizes


def test_the_report_names_the_sparse_layers():
    from kiln.compiler.driver.report import CompiledReport, CompileReport

    def row(node, kernel):
        return {"node": node, "kernel": kernel}

    report = CompiledReport(target="host", library="model.so", build_seconds=1.0,
                            verified=False, sparse_kernels=[row("fc1", "sparse"),
                                                            row("fc2", "dense")])
    assert report.to_dict()["sparse_kernels"][0] == row("fc1", "sparse")
    full = CompileReport(model="m.onnx", spec="s", kiln_version="0", compiled=report)
    assert "sparse kernel for 1 of 2 sparse layer(s): fc1" in full.compiled_lines()
    report.sparse_kernels = [row("fc1", "dense")]
    assert ("sparse kernel for 0 of 1 sparse layer(s) (none is expected to beat the dense "
            "kernel)") in full.compiled_lines()


def test_an_unknown_policy_is_one_line_error(monkeypatch):
    from kiln.backends.tvm.importer.sparse_weights import policy
    from kiln.compiler.core.errors import KilnError

    monkeypatch.setenv(POLICY_ENV, "sometimes")
    with pytest.raises(KilnError, match="KILN_SPARSE_KERNELS='sometimes': expected one of "
                                        "auto, always, never"):
        policy()
    monkeypatch.setenv(POLICY_ENV, "Never")
    assert policy() == "never"


def test_a_batched_input_is_seen_as_its_rows(tmp_path, monkeypatch):
    """x [2, 3, 64] @ W [64, 32]: the kernel runs on 6 rows and reshapes back."""
    import onnx_ir as ir
    from onnx import TensorProto, helper, numpy_helper

    monkeypatch.setenv(POLICY_ENV, "always")
    w = block_sparse(np.random.default_rng(2).standard_normal((64, 32)).astype(np.float32),
                     (16, 1), 0.1)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["m"], name="fc"),
         helper.make_node("Relu", ["m"], ["y"], name="relu")], "batched",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 32])],
        initializer=[numpy_helper.from_array(w.astype(np.float32), "w")])
    model = ir.serde.deserialize_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    x = np.random.default_rng(3).standard_normal((2, 3, 64)).astype(np.float32)
    built = build_artifact(model, "host", tmp_path, model_hash="test")
    assert [(c["node"], c["kernel"]) for c in built.sparse_kernels] == [("fc", "sparse")]
    [got] = load(tmp_path, threads=1)(x=x)
    np.testing.assert_allclose(got, np.maximum(x @ w, 0), rtol=FLOAT_TOL, atol=FLOAT_TOL)
