"""Cross builds: an arm64 ELF, a CUDA (sm_90) library with device code, binary checks."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from kiln.backends.tvm import build_artifact, check_binary, load
from kiln.backends.tvm.targets import cuda_device_present
from kiln.compiler.core.errors import LoweringError
from kiln.compiler.core.metrics import relative_error
from kiln.compiler.testing.onnx_models import tiny_cnn, to_ir
from kiln.compiler.testing.reference import REL_TOL

INSTALL_CROSS = Path(__file__).resolve().parents[3] / "tools" / "edge" / "install_cross.sh"


def _have_cross_gcc() -> bool:
    if shutil.which("aarch64-linux-gnu-gcc"):
        return True
    if INSTALL_CROSS.exists():  # try once (root on CI machines); it never fails the run
        subprocess.run(["bash", str(INSTALL_CROSS)], check=False, capture_output=True)
    return shutil.which("aarch64-linux-gnu-gcc") is not None


@pytest.fixture(scope="module")
def arm64_build(tmp_path_factory):
    if not _have_cross_gcc():
        pytest.skip("aarch64-linux-gnu-gcc is not installed and could not be installed "
                    "(apt-get install gcc-aarch64-linux-gnu)")
    outdir = tmp_path_factory.mktemp("arm64")
    return build_artifact(to_ir(tiny_cnn()), "arm64", outdir, model_hash="h")


def test_arm64_build_is_an_aarch64_elf(arm64_build):
    assert not arm64_build.runs_on_host
    assert check_binary(arm64_build.library, "arm64") == "aarch64 ELF shared library"
    data = arm64_build.library.read_bytes()
    assert data[:4] == b"\x7fELF" and int.from_bytes(data[18:20], "little") == 183


def test_check_binary_rejects_the_wrong_architecture(arm64_build):
    with pytest.raises(LoweringError, match="aarch64 ELF, expected x86_64"):
        check_binary(arm64_build.library, "host")


def test_loading_a_foreign_artifact_is_a_clear_error(arm64_build):
    from kiln.compiler.core.errors import KilnError

    with pytest.raises(KilnError, match="built for aarch64"):
        load(arm64_build.library.parent)


@pytest.fixture(scope="module")
def encoder_model():
    pytest.importorskip("torch")
    from kiln.compiler.core.frontend import load_model

    return load_model("kiln.compiler.testing.torch_models:small_encoder")


@pytest.fixture(scope="module")
def cuda_build(tmp_path_factory, encoder_model):
    outdir = tmp_path_factory.mktemp("cuda_sm90")
    return build_artifact(encoder_model, "cuda-sm90", outdir, model_hash="h")


def test_cuda_sm90_build_holds_device_code(cuda_build):
    description = check_binary(cuda_build.library, "cuda-sm90")
    assert "CUDA kernel" in description
    assert cuda_build.runs_on_host == cuda_device_present()


def test_check_binary_rejects_a_cpu_library_for_cuda(tmp_path):
    result = build_artifact(to_ir(tiny_cnn()), "host", tmp_path, model_hash="h")
    with pytest.raises(LoweringError, match="no CUDA device code"):
        check_binary(result.library, "cuda-sm90")


@pytest.mark.skipif(not cuda_device_present(), reason="no CUDA GPU on this machine")
def test_cuda_artifact_matches_onnxruntime_on_the_gpu(cuda_build, encoder_model):
    from kiln.compiler.testing.reference import ort_outputs

    x = np.random.default_rng(0).standard_normal((1, 16, 64)).astype(np.float32)
    (ref,) = ort_outputs(encoder_model, {encoder_model.graph.inputs[0].name: x})
    (out,) = load(cuda_build.library.parent)(x)
    assert relative_error(out, ref) < REL_TOL


def test_cuda_build_of_int4_weights_fuses_decode_into_one_kernel(tmp_path):
    from kiln.compiler.testing.onnx_models import blocked_int4_matmul

    result = build_artifact(to_ir(blocked_int4_matmul(k=256, n=128, m=1)), "cuda-sm90",
                            tmp_path, model_hash="h")
    description = check_binary(result.library, "cuda-sm90")
    assert description.endswith("1 CUDA kernel(s) as CUDA C, compiled at load time")
