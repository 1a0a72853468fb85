"""Every quantized form kiln's passes emit lowers with TVM, builds, and matches ONNX Runtime.

Forms: int8 per channel, int4/uint4 blocked (two nibble layouts), int3/int2 through
``kiln.UnpackBits``, FP8 E4M3/E5M2, FP4 E2M1/E3M0 through ``kiln.DequantizeTable``,
NUPES power, codebook Gather (uint8 and uint16 indices), static W8A8 QDQ, dynamic
activations, salient_split. The int4 GEMV/GEMM kernels read the packed weight (kiln's
decode_contraction rule), a quantized conv its codes (decode_conv), a codebook weight's
kernel its indices and table; arm64 and cuda-sm90 builds of an int4 model are checked
for their binary kind. (ScatterND as a row gather: importer/test_standard_converters.py.)
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from kiln.backends.tvm import build_artifact, check_binary, load
from kiln.compiler.core.metrics import relative_error
from kiln.compiler.testing import quant_models as models
from kiln.compiler.testing.reference import DECODE_REL_TOL, exact_reference
from kiln.passes.quant.quantize import Quantize, QuantizeConfig

#: With quantized activations a summation-order difference may move a value across a
#: rounding boundary of the next QuantizeLinear (one step of its scale).
QDQ_REL_TOL = 2e-2

WEIGHT_FORMS = {
    "int8-per-channel": {"dtype": "int8"},
    "int4-g32": {"dtype": "int4", "granularity": {"group": 32}},
    "int4-g128": {"dtype": "int4", "granularity": {"group": 128}},
    "uint4-g32-zero-point": {"dtype": "uint4", "granularity": {"group": 32},
                             "symmetric": False},
    "int3-g32": {"dtype": "int3", "granularity": {"group": 32}},
    "int2-g32": {"dtype": "int2", "granularity": {"group": 32}},
    "fp8-e4m3-g32": {"dtype": "fp8_e4m3", "granularity": {"group": 32}},
    "fp8-e5m2": {"dtype": "fp8_e5m2"},
    "fp4-e2m1-g32": {"dtype": "fp4_e2m1", "granularity": {"group": 32}},
    "fp4-e3m0-g32": {"dtype": "fp4_e3m0", "granularity": {"group": 32}},
    "nupes-power": {"dtype": "power"},
    "codebook": {"dtype": "codebook", "vector": 4, "centroids": 64, "iterations": 8},
    "codebook-k512-uint16": {"dtype": "codebook", "vector": 4, "centroids": 512,
                             "iterations": 4},
}


def _build_and_compare(model: ir.Model, tmp_path, tol: float = DECODE_REL_TOL):
    feeds = models.feeds(model)
    want = exact_reference(model, feeds)
    result = build_artifact(model, "host", tmp_path, model_hash="h")
    (got,) = load(tmp_path)(**feeds)
    assert relative_error(got, want) < tol
    return result


@pytest.mark.parametrize("form", list(WEIGHT_FORMS))
def test_weight_form_builds_and_matches_onnxruntime(form, tmp_path):
    """Each MatMul/Gemm is one kernel that decodes its weight inside (decode_contraction):
    no decode kernel writes a float32 weight."""
    model = models.mlp(d_in=128, hidden=256, d_out=64)
    Quantize(QuantizeConfig(weights=WEIGHT_FORMS[form]))(model)
    result = _build_and_compare(model, tmp_path)
    assert set(result.rules.values()) == {"decode_contraction"}, result.rules


def _static_w8a8() -> ir.Model:
    model = models.mlp(d_in=128, hidden=256, d_out=64)
    Quantize(QuantizeConfig(weights={"dtype": "int8"}, activations={"calibration": "minmax"}),
             calibration=models.calibration(model))(model)
    assert any(n.op_type == "QuantizeLinear" for n in model.graph)
    return model


def _dynamic_activations() -> ir.Model:
    model = models.mlp(d_in=128, hidden=256, d_out=64)
    Quantize(QuantizeConfig(weights={"dtype": "int8"}, activations={"dynamic": True}))(model)
    assert any(n.op_type == "DynamicQuantizeLinear" for n in model.graph)
    return model


def _salient_split() -> ir.Model:
    from kiln.passes.quant.salient_split import SalientSplit, SalientSplitConfig

    model = models.mlp(d_in=256, hidden=256, d_out=64)
    SalientSplit(SalientSplitConfig(salient=0.25, block=128),
                 calibration=models.calibration(model))(model)
    assert any(n.op_type == "UnpackBits" for n in model.graph)
    return model


#: Forms with quantized activations (and salient_split's mixed 4/1-bit weights): a model
#: builder and the tolerance against ONNX Runtime.
ACTIVATION_FORMS = {
    "static-w8a8-qdq": (_static_w8a8, QDQ_REL_TOL),
    "dynamic-activations": (_dynamic_activations, QDQ_REL_TOL),
    "salient-split": (_salient_split, DECODE_REL_TOL),
}


@pytest.mark.parametrize("form", list(ACTIVATION_FORMS))
def test_activation_form_builds_and_matches(form, tmp_path):
    make, tol = ACTIVATION_FORMS[form]
    result = _build_and_compare(make(), tmp_path, tol)
    if form == "salient-split":
        # the 4-bit and 1-bit rows' decodes, their Concat and the row ScatterND (an
        # injective row gather, importer.standard_converters.ScatterRowsAsGather) are inside each MatMul
        assert set(result.rules.values()) == {"decode_contraction"}, result.rules


CONV_FORMS = {"int8-per-channel": {"dtype": "int8"},
              "int4-g8": {"dtype": "int4", "granularity": {"group": 8}},
              "fp8-e4m3": {"dtype": "fp8_e4m3"},
              "fp4-e2m1-g8": {"dtype": "fp4_e2m1", "granularity": {"group": 8}},
              "codebook": {"dtype": "codebook", "vector": 4, "centroids": 64, "iterations": 8}}


@pytest.mark.parametrize("form", list(CONV_FORMS))
def test_conv_weights_decode_inside_the_conv_and_match(form, tmp_path):
    """A quantized conv is one kernel (decode_conv: a decoded weight panel per task), no
    separate decode kernel (the only elementwise kernels are layout transposes at the
    graph's input and output); exact against ONNX Runtime. (The 1x1 conv's 4-bit codes,
    128 bytes, are small enough to be folded to float32: a plain contraction.)"""
    model = models.conv()
    Quantize(QuantizeConfig(weights=CONV_FORMS[form]))(model)
    rules = _build_and_compare(model, tmp_path).rules
    assert "decode_conv" in rules.values(), rules
    assert set(rules.values()) <= {"decode_conv", "contraction", "elementwise"}, rules
    assert all(name.startswith("transpose") for name, rule in rules.items()
               if rule == "elementwise"), rules


def _int4_matmul(m: int, k: int, n: int, group: int) -> ir.Model:
    from bench.cases_quant import gemv_int4_model

    return ir.serde.deserialize_model(gemv_int4_model(m, k, n, group, seed=3))


def _scheduled(model: ir.Model) -> dict[str, str]:
    import tvm

    from kiln.backends.tvm.importer import lower_to_relax
    from kiln.backends.tvm.pipeline import legalize_passes, schedule_passes
    from kiln.backends.tvm.schedules import schedule_rules_used
    from kiln.backends.tvm.targets import resolve_target

    target = resolve_target("host")
    with target.tvm_target():
        mod = tvm.transform.Sequential(legalize_passes(target) + schedule_passes(target))(
            lower_to_relax(model))
    return schedule_rules_used(mod)


@pytest.mark.parametrize("m, group", [(1, 32), (1, 128), (8, 32)])
def test_int4_matmul_decodes_inside_its_kernel(m, group, tmp_path):
    """GEMV (decode inlined in the K loop) and GEMM (a decoded panel per column task)
    are one kernel scheduled by decode_contraction, reading the packed weight."""
    model = _int4_matmul(m, 256, 256, group)
    rules = _scheduled(model)
    assert list(rules.values()) == ["decode_contraction"], rules
    x = np.random.default_rng(5).standard_normal((m, 256)).astype(np.float32)
    want = exact_reference(model, {"x": x})
    build_artifact(model, "host", tmp_path, model_hash="h")
    (got,) = load(tmp_path)(x)
    assert relative_error(got, want) < DECODE_REL_TOL


def test_int4_library_holds_packed_weights(tmp_path):
    """The 512x512 int4 weight is 128 KiB packed; a float32 copy would be 1 MiB."""
    result = build_artifact(_int4_matmul(1, 512, 512, 32), "host", tmp_path, model_hash="h")
    assert result.library.stat().st_size < 512 * 1024


@pytest.mark.parametrize("centroids", [64, 512])
def test_codebook_library_holds_indices_and_codebook(centroids, tmp_path):
    """A codebook weight stays its indices (uint8, or uint16 past 256 centroids) and its
    table through import and constant folding (the ONNX model keeps its Cast + Gather +
    Reshape, which ONNX Runtime runs): the 512x512 + 64x512 float32 weights would be
    1.2 MB; their indices are 74 KB (uint8) or 147 KB (uint16)."""
    from kiln.backends.tvm.importer.internal_ops import CODEBOOK

    model = models.mlp(d_in=512, hidden=512, d_out=64)
    Quantize(QuantizeConfig(weights={"dtype": "codebook", "vector": 4,
                                     "centroids": centroids, "iterations": 2}))(model)
    assert [n.op_type for n in model.graph].count("Gather") == 2
    result = _build_and_compare(model, tmp_path)
    assert set(result.rules.values()) == {"decode_contraction"}, result.rules
    assert result.library.stat().st_size < 400 * 1024
    assert not any(n.op_type == CODEBOOK for n in model.graph)  # the backend's copy only


def test_arm64_build_of_int4_weights(tmp_path):
    import shutil

    if not shutil.which("aarch64-linux-gnu-gcc"):
        pytest.skip("aarch64-linux-gnu-gcc is not installed")
    result = build_artifact(_int4_matmul(1, 256, 256, 32), "arm64", tmp_path, model_hash="h")
    assert check_binary(result.library, "arm64") == "aarch64 ELF shared library"


def test_cuda_sm90_build_of_int4_weights(tmp_path):
    result = build_artifact(_int4_matmul(1, 256, 256, 32), "cuda-sm90", tmp_path,
                            model_hash="h")
    assert "CUDA kernel" in check_binary(result.library, "cuda-sm90")


BUILTIN_QUANT_SPECS = {"int8": QDQ_REL_TOL, "int4-weights": DECODE_REL_TOL,
                       "fp4-llm": DECODE_REL_TOL}


def _compile_mlp(spec: str, tmp_path):
    import onnx

    from kiln.compiler.driver.compile import compile_model

    model = models.mlp(d_in=256, hidden=512, d_out=128, batch=4)
    source = tmp_path / "mlp.onnx"
    onnx.save(ir.serde.serialize_model(model), source)
    return compile_model(str(source), spec)


@pytest.mark.parametrize("spec", list(BUILTIN_QUANT_SPECS))
def test_builtin_quant_spec_compiles_for_host_and_matches(spec, tmp_path):
    """``kiln compile --spec SPEC --target host`` on a small MLP: the quantized model the
    pipeline writes builds for the host and matches ONNX Runtime on that model."""
    result = _compile_mlp(spec, tmp_path)
    out = result.save(tmp_path / "out")
    saved = ir.load(out / "model.onnx")
    assert any(n.op_type in ("DequantizeLinear", "DequantizeTable") for n in saved.graph)
    build_artifact(result.model, "host", out, model_hash=result.model_hash)
    feeds = models.feeds(result.model)
    (got,) = load(out)(**feeds)
    assert relative_error(got, exact_reference(result.model, feeds)) < BUILTIN_QUANT_SPECS[spec]


@pytest.mark.parametrize("spec", list(BUILTIN_QUANT_SPECS))
def test_save_with_target_host_verifies_quantized_specs(spec, tmp_path):
    result = _compile_mlp(spec, tmp_path)
    out = result.save(tmp_path / "out", target="host")
    assert (out / "model.so").exists()
    assert result.report.compiled is not None and result.report.compiled.verified


def _build_for(model: ir.Model, target: str, tmp_path) -> None:
    """Build for arm64 or cuda-sm90 and check the binary's kind (not run: no arm64 board
    or GPU here; `make test-edge` runs an arm64 build under qemu)."""
    import shutil

    if target == "arm64" and not shutil.which("aarch64-linux-gnu-gcc"):
        pytest.skip("aarch64-linux-gnu-gcc is not installed")
    result = build_artifact(model, target, tmp_path, model_hash="h")
    kind = check_binary(result.library, target)
    if target == "arm64":
        assert kind == "aarch64 ELF shared library"
    else:
        assert "CUDA kernel" in kind


@pytest.mark.parametrize("target", ["arm64", "cuda-sm90"])
@pytest.mark.parametrize("form", list(WEIGHT_FORMS))
def test_weight_form_builds_for_arm64_and_cuda(form, target, tmp_path):
    """Every weight form builds for the edge and GPU targets."""
    model = models.mlp(d_in=128, hidden=256, d_out=64)
    Quantize(QuantizeConfig(weights=WEIGHT_FORMS[form]))(model)
    _build_for(model, target, tmp_path)


@pytest.mark.parametrize("target", ["arm64", "cuda-sm90"])
@pytest.mark.parametrize("form", list(ACTIVATION_FORMS))
def test_activation_form_builds_for_arm64_and_cuda(form, target, tmp_path):
    """Static W8A8 QDQ, dynamic activations and salient_split build for the edge and GPU
    targets (QuantizeLinear / DynamicQuantizeLinear kernels, UnpackBits + ScatterND)."""
    _build_for(ACTIVATION_FORMS[form][0](), target, tmp_path)


@pytest.mark.parametrize("target", ["arm64", "cuda-sm90"])
@pytest.mark.parametrize("form", list(CONV_FORMS))
def test_conv_form_builds_for_arm64_and_cuda(form, target, tmp_path):
    """A quantized conv (decode_conv on arm64; the fused decode + conv under dlight on CUDA)."""
    model = models.conv()
    Quantize(QuantizeConfig(weights=CONV_FORMS[form]))(model)
    _build_for(model, target, tmp_path)
