"""Build for the host, run the artifact, compare with ONNX Runtime; runtime input errors."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest

from kiln.backends.tvm import build_artifact, load, run_artifact
from kiln.compiler.core.errors import KilnError
from kiln.compiler.core.metrics import relative_error
from kiln.compiler.testing.onnx_models import blocked_int4_matmul, tiny_cnn, to_ir
from kiln.compiler.testing.reference import REL_TOL, ort_outputs


@pytest.fixture(scope="module")
def cnn_artifact(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("tiny_cnn")
    steps = []
    result = build_artifact(to_ir(tiny_cnn()), "host", outdir, model_hash="sha256:test",
                            inputs=[("x", [1, 3, 32, 32], "float32")],
                            progress=lambda step, done, total: steps.append(step))
    return outdir, result, steps


def test_host_build_matches_onnxruntime(cnn_artifact):
    outdir, result, steps = cnn_artifact
    assert result.runs_on_host and result.library.is_file()
    assert steps[0] == "lower" and steps[-1] == "done"
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    (ref,) = ort_outputs(tiny_cnn(), {"x": x})
    (out,) = load(outdir)(x)
    assert out.shape == ref.shape
    assert relative_error(out, ref) < REL_TOL


def test_inputs_on_any_boundary_give_the_same_outputs_and_stay_unchanged(cnn_artifact):
    """A 64-byte-aligned contiguous input is passed to TVM without a copy (runtime's
    device_tensor); unaligned, read-only and strided ones are copied: all agree."""
    outdir, _, _ = cnn_artifact
    model = load(outdir)
    x = np.random.default_rng(1).standard_normal((1, 3, 32, 32)).astype(np.float32)
    raw = np.empty(x.size + 32, dtype=np.float32)
    start = (-raw.ctypes.data % 64) // 4
    aligned = raw[start:start + x.size].reshape(x.shape)
    aligned[:] = x
    other = np.empty(x.size + 32, dtype=np.float32)
    shift = (-other.ctypes.data % 64) // 4 + 1
    unaligned = other[shift:shift + x.size].reshape(x.shape)
    unaligned[:] = x
    assert aligned.ctypes.data % 64 == 0 and unaligned.ctypes.data % 64 != 0
    frozen = x.copy()
    frozen.flags.writeable = False
    strided = np.repeat(x, 2, axis=3)[..., ::2]
    (want,) = model(x)
    for variant in (aligned, unaligned, frozen, strided):
        (got,) = model(variant)
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(aligned, x)          # the model did not write into it
    from kiln.backends.tvm.runtime import device_tensor

    shared = np.from_dlpack(device_tensor(aligned, model.device))
    copied = np.from_dlpack(device_tensor(unaligned, model.device))
    assert shared.ctypes.data == aligned.ctypes.data       # no copy
    assert copied.ctypes.data != unaligned.ctypes.data


def test_manifest_describes_the_artifact(cnn_artifact):
    outdir, _, _ = cnn_artifact
    manifest = json.loads((outdir / "manifest.json").read_text())
    assert manifest["inputs"] == [{"name": "x", "shape": [1, 3, 32, 32], "dtype": "float32"}]
    assert manifest["outputs"] == [{"name": "y", "shape": [1, 10], "dtype": "float32"}]
    assert manifest["target_name"] == "host" and manifest["target"]["kind"] == "llvm"
    assert manifest["model_hash"] == "sha256:test"
    assert manifest["tvm_version"].startswith("0.27") and manifest["kiln_version"]
    assert not list(outdir.glob(".*tmp*")), "temp files left behind"


@pytest.mark.parametrize("call, message", [
    (lambda m, x: m(y=x), "unknown input 'y'; inputs are: x"),
    (lambda m, x: m(x[:, :, :30, :30].copy()),
     "input 'x': expected shape [1,3,32,32] float32, got [1,3,30,30] float32"),
    (lambda m, x: m(x.astype(np.float64)),
     "input 'x': expected shape [1,3,32,32] float32, got [1,3,32,32] float64"),
    (lambda m, x: m(), "missing input 'x' ([1,3,32,32] float32)"),
    (lambda m, x: m(x, x), "expected 1 input(s) (x), got 2 positional"),
])
def test_wrong_inputs_are_one_line_errors(cnn_artifact, call, message):
    outdir, _, _ = cnn_artifact
    model = load(outdir)
    x = np.zeros((1, 3, 32, 32), np.float32)
    with pytest.raises(KilnError) as info:
        call(model, x)
    assert str(info.value) == message


def test_run_artifact_reads_and_writes_npz(cnn_artifact, tmp_path):
    outdir, _, _ = cnn_artifact
    x = np.random.default_rng(1).standard_normal((1, 3, 32, 32)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    outputs = run_artifact(outdir, tmp_path / "in.npz", tmp_path / "out.npz")
    with np.load(tmp_path / "out.npz") as saved:
        np.testing.assert_array_equal(saved["y"], outputs[0])
    np.testing.assert_array_equal(load(outdir)(x=x)[0], outputs[0])


def test_declared_inputs_must_match_the_model(tmp_path):
    from kiln.compiler.core.errors import LoweringError

    with pytest.raises(LoweringError, match="declared inputs"):
        build_artifact(to_ir(tiny_cnn()), "host", tmp_path, model_hash="h",
                       inputs=[("x", [1, 3, 64, 64], "float32")])


@pytest.mark.parametrize("dtype, zero_point, k", [
    (ml_dtypes.int4, True, 128),
    (ml_dtypes.uint4, False, 128),
    (ml_dtypes.int4, True, 80),  # a partial last block
])
def test_blocked_4bit_dequantize_matmul_matches_onnxruntime(tmp_path, dtype, zero_point, k):
    model = blocked_int4_matmul(k=k, dtype=dtype, zero_point=zero_point)
    build_artifact(to_ir(model), "host", tmp_path, model_hash="h")
    x = np.random.default_rng(2).standard_normal((4, k)).astype(np.float32)
    # ORT's graph optimizer would swap in MatMulNBits (~1e-3 off); compare with the exact graph.
    (ref,) = ort_outputs(model, {"x": x}, optimize=False)
    (out,) = load(tmp_path)(x)
    assert relative_error(out, ref) < REL_TOL


def test_fp4_e2m1_blocked_weights(tmp_path):
    """FP4 (opset 23) weights go through the nibble lookup table; checked against numpy."""
    from onnx import TensorProto, helper, numpy_helper

    from kiln.compiler.testing.onnx_models import BLOCK

    rng = np.random.default_rng(4)
    codes = rng.integers(0, 16, size=(64, 16)).astype(np.uint8)
    weights = codes.view(ml_dtypes.float4_e2m1fn)
    scale = (rng.random((64 // BLOCK, 16)) + 0.5).astype(np.float32)
    nodes = [helper.make_node("DequantizeLinear", ["w", "s"], ["wf"], axis=0, block_size=BLOCK),
             helper.make_node("MatMul", ["x", "wf"], ["y"])]
    graph = helper.make_graph(
        nodes, "fp4", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 16])],
        [numpy_helper.from_array(weights, "w"), numpy_helper.from_array(scale, "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    build_artifact(to_ir(model), "host", tmp_path, model_hash="h")
    x = rng.standard_normal((2, 64)).astype(np.float32)
    dense = weights.astype(np.float32) * np.repeat(scale, BLOCK, axis=0)
    (out,) = load(tmp_path)(x)
    assert relative_error(out, x @ dense) < REL_TOL


def test_manifest_records_the_library_hash_and_load_checks_it(cnn_artifact, tmp_path):
    import hashlib
    import shutil

    outdir, result, _ = cnn_artifact
    manifest = json.loads((outdir / "manifest.json").read_text())
    digest = hashlib.sha256(result.library.read_bytes()).hexdigest()
    assert manifest["format"] == 2 and manifest["files"] == {"model.so": digest}
    damaged = tmp_path / "damaged"
    shutil.copytree(outdir, damaged)
    library = damaged / "model.so"
    data = library.read_bytes()
    library.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))  # one byte changed
    with pytest.raises(KilnError, match="model.so: does not match manifest.json"):
        load(damaged)
    library.unlink()
    with pytest.raises(KilnError, match=r"model.so: missing \(listed in manifest.json\)"):
        load(damaged)
