"""Models quantized by ONNX Runtime's own tools compile onto kiln's kernels
(importer.foreign_quant, docs/op-coverage.md).

Each float model (a small CNN with every op ORT's QOperator format has a QLinear form for,
a transformer-ish MLP block, one conv) is quantized by ``onnxruntime.quantization`` itself:
quantize_static in QDQ and QOperator form (per tensor and per channel), quantize_dynamic
(MatMulInteger / ConvInteger + DynamicQuantizeLinear) and the MatMulNBits 4-bit quantizer
(block 32, with and without zero points). kiln builds each for the host and its outputs are
compared with ONNX Runtime on the same quantized model.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper

from kiln.backends.tvm import build_artifact, load
from kiln.backends.tvm.importer.foreign_quant import REWRITES, lower_foreign_quant
from kiln.compiler.core.errors import LoweringError
from kiln.compiler.core.metrics import relative_error
from kiln.compiler.testing.reference import DECODE_REL_TOL, ort_outputs
from tests.backends.tvm.importer import foreign_quant_models as fq

#: Static quantization: kiln's QuantizeLinear rounds the float sum where ORT requantizes the
#: int32 accumulator (``acc * sx*sw/sy``); both round half to even, but a value that lands
#: on a rounding boundary may come out one step of the output's scale apart (measured: 0
#: steps on these models).
OUTPUT_STEPS = 1
#: quantize_dynamic: the integer products are summed exactly in float32 (K * 255 * 128 <
#: 2**24) and the scales applied after; what can differ is an activation code that lands on
#: a rounding boundary of DynamicQuantizeLinear (x / scale computed in another order),
#: one step of the activation scale on one input, relative to max |y| far below 1e-2
#: (measured: ~1e-7).
DYNAMIC_REL_TOL = 1e-2
#: MatMulNBits: the 4-bit weight is decoded exactly, so only the summation order differs.
NBITS_REL_TOL = DECODE_REL_TOL


def _foreign_nodes(proto: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in proto.graph.node
            if ("" if node.domain in ("", "ai.onnx") else node.domain, node.op_type) in REWRITES]


def _output_step(proto: onnx.ModelProto) -> float:
    """The scale of the DequantizeLinear that writes the first graph output."""
    inits = {t.name: t for t in proto.graph.initializer}
    (node,) = [n for n in proto.graph.node if proto.graph.output[0].name in n.output]
    assert node.op_type == "DequantizeLinear", node.op_type
    return float(numpy_helper.to_array(inits[node.input[1]]).max())


def _build_and_run(path, tmp_path):
    """kiln's build of the quantized model at ``path`` for the host, its outputs and ORT's
    on the same seeded inputs (ORT unoptimized: the model as the quantizer wrote it)."""
    proto = onnx.load(path)
    feeds = fq.input_feeds(proto)
    want = ort_outputs(proto, feeds, optimize=False)[0]
    result = build_artifact(ir.load(path), "host", tmp_path / "build", model_hash="h")
    (got,) = load(tmp_path / "build")(**feeds)
    assert got.shape == want.shape
    return result, got, want


STATIC_CASES = {
    "cnn-qdq": (fq.small_cnn, "QDQ", False),
    "cnn-qoperator": (fq.small_cnn, "QOperator", False),
    "cnn-qoperator-per-channel": (fq.small_cnn, "QOperator", True),
    "mlp-qdq-per-channel": (fq.matmul_block, "QDQ", True),
    "mlp-qoperator": (fq.matmul_block, "QOperator", False),
    "mlp-qoperator-per-channel": (fq.matmul_block, "QOperator", True),
}


@pytest.mark.parametrize("case", list(STATIC_CASES))
def test_static_quantized_model_builds_and_matches_onnxruntime(case, tmp_path):
    """quantize_static's QDQ and QOperator models build for the host and match ORT within
    one step of the output scale, on the kernels kiln's own int8 models use: each MLP
    MatMul is the integer dense kernel (int8_dense: u8 x s8 -> s32), and the CNN's convs
    run as integer implicit GEMMs on the same kernel (``kiln_int8_conv*`` blocks)."""
    make, quant_format, per_channel = STATIC_CASES[case]
    path = fq.quantize_static(make(), tmp_path / f"{case}.onnx", quant_format, per_channel)
    proto = onnx.load(path)
    if quant_format == "QOperator":
        assert {"QLinearMatMul", "QLinearAdd"} <= set(_foreign_nodes(proto)) or \
            {"QLinearConv", "QGemm", "QLinearConcat"} <= set(_foreign_nodes(proto))
    else:
        assert not _foreign_nodes(proto)
    result, got, want = _build_and_run(path, tmp_path)
    step = _output_step(proto)
    assert np.abs(got - want).max() <= OUTPUT_STEPS * step * (1 + 1e-6), (step, got - want)
    if make is fq.small_cnn:
        convs = [name for name, rule in result.rules.items()
                 if name.startswith("kiln_int8_conv") and rule == "int8_dense"]
        assert convs, result.rules
    else:
        kernels = [name for name, rule in result.rules.items() if rule == "int8_dense"]
        assert len(kernels) == 2, result.rules


def test_qoperator_rewrite_is_qdq_that_onnxruntime_runs_the_same(tmp_path):
    """The rewrite itself, checked by ONNX Runtime alone: every QLinear / com.microsoft node
    becomes standard DequantizeLinear -> op -> QuantizeLinear (a valid ONNX model, no
    com.microsoft op left), and ORT gives the same outputs on both within one output step.
    A second rewrite finds nothing."""
    path = fq.quantize_static(fq.small_cnn(), tmp_path / "cnn.onnx", "QOperator", True)
    proto = onnx.load(path)
    foreign = _foreign_nodes(proto)
    assert sorted(set(foreign)) == ["QGemm", "QLinearAdd", "QLinearConcat", "QLinearConv",
                                    "QLinearGlobalAveragePool", "QLinearLeakyRelu",
                                    "QLinearMul", "QLinearSigmoid"]
    rewritten = onnx.load(path)
    assert lower_foreign_quant(rewritten) == len(foreign)
    assert not _foreign_nodes(rewritten)
    assert {n.domain for n in rewritten.graph.node} <= {"", "ai.onnx"}
    onnx.checker.check_model(rewritten, full_check=True)
    feeds = fq.input_feeds(proto)
    (want,) = ort_outputs(proto, feeds, optimize=False)
    (got,) = ort_outputs(rewritten, feeds, optimize=False)
    assert np.abs(got - want).max() <= OUTPUT_STEPS * _output_step(proto) * (1 + 1e-6)
    assert lower_foreign_quant(rewritten) == 0


@pytest.mark.parametrize("per_channel", [False, True], ids=["per-tensor", "per-channel"])
def test_qoperator_model_of_opset_11(per_channel, tmp_path):
    """PP-OCR's models are opset 11/12, where DequantizeLinear has no ``axis``: a
    per-tensor rewrite stays at opset 11 (no ``axis`` written, valid for onnx's checker);
    a per-channel one first raises the model to 13 with kiln's upgrader. Both build and
    match ORT within one output step."""
    path = fq.quantize_static(fq.small_cnn(opset=11), tmp_path / "cnn11.onnx", "QOperator",
                              per_channel)
    proto, rewritten = onnx.load(path), onnx.load(path)
    lower_foreign_quant(rewritten)
    opset = next(o.version for o in rewritten.opset_import if o.domain in ("", "ai.onnx"))
    assert opset == (13 if per_channel else 11)
    # the checker knows no com.microsoft schema: check the rewritten (standard) model only
    onnx.checker.check_model(rewritten, full_check=True)
    _, got, want = _build_and_run(path, tmp_path)
    assert np.abs(got - want).max() <= OUTPUT_STEPS * _output_step(proto) * (1 + 1e-6)


DYNAMIC_CASES = {"mlp-matmulinteger": fq.matmul_block, "conv-convinteger": fq.single_conv}


@pytest.mark.parametrize("case", list(DYNAMIC_CASES))
def test_dynamic_quantized_model_builds_and_matches_onnxruntime(case, tmp_path):
    """quantize_dynamic's MatMulInteger / ConvInteger with DynamicQuantizeLinear: the
    activation is quantized at run time by kiln's DynamicQuantizeLinear lowering and the
    weight's codes are decoded inside the contraction's kernel."""
    path = fq.quantize_dynamic(DYNAMIC_CASES[case](), tmp_path / f"{case}.onnx")
    ops = [n.op_type for n in onnx.load(path).graph.node]
    integer_op = "MatMulInteger" if case.startswith("mlp") else "ConvInteger"
    assert integer_op in ops and "DynamicQuantizeLinear" in ops, ops
    result, got, want = _build_and_run(path, tmp_path)
    assert relative_error(got, want) < DYNAMIC_REL_TOL
    rules = set(result.rules.values())
    assert ("decode_contraction" if integer_op == "MatMulInteger" else "decode_conv") in rules


def test_dynamic_rewrite_drops_the_int32_round_trip(tmp_path):
    """MatMulInteger's int32 result is read only by quantize_dynamic's Cast back to float:
    the rewrite keeps the float sum (an exact integer here), no Cast to int32 is left (its
    rounding epilogue made the kernel's compile ~20x slower), and ORT agrees on both."""
    path = fq.quantize_dynamic(fq.matmul_block(), tmp_path / "mlp.onnx")
    proto, rewritten = onnx.load(path), onnx.load(path)
    assert lower_foreign_quant(rewritten) == 2
    casts = [next(a.i for a in n.attribute if a.name == "to")
             for n in rewritten.graph.node if n.op_type == "Cast"]
    assert onnx.TensorProto.INT32 not in casts, casts
    onnx.checker.check_model(rewritten, full_check=True)
    feeds = fq.input_feeds(proto)
    (want,) = ort_outputs(proto, feeds, optimize=False)
    (got,) = ort_outputs(rewritten, feeds, optimize=False)
    assert relative_error(got, want) < DYNAMIC_REL_TOL


def test_matmul_nbits_runs_on_the_fused_int4_gemv(tmp_path):
    """ORT's MatMulNBits quantizer (4 bits, block 32) on a 4-token MLP: both MatMuls are
    kiln's grouped int4 GEMV kernel (kiln_gemv_int4, decode_contraction) on the packed
    weight: the library holds 2 x 64 KiB of nibbles, not the 1 MiB of float32 weights."""
    model = fq.matmul_block(d=256, hidden=512)
    path = fq.quantize_matmul_nbits(model, tmp_path / "nbits.onnx", 32, symmetric=True)
    nbits = [n for n in onnx.load(path).graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 2 and all(len(n.input) == 3 for n in nbits)
    result, got, want = _build_and_run(path, tmp_path)
    assert relative_error(got, want) < NBITS_REL_TOL
    assert len(result.rules) == 2, result.rules
    assert all("kiln_gemv_int4" in name and rule == "decode_contraction"
               for name, rule in result.rules.items()), result.rules
    assert result.library.stat().st_size < 512 * 1024


#: (tokens, d, hidden, block, symmetric) and the kernel each MatMul must be: the grouped
#: GEMV needs K a multiple of the block and at most 4 rows; otherwise the packed weight is
#: decoded inside a GEMV / GEMM (kiln_decode4 fused into the matmul).
NBITS_CASES = {
    "uint4-zero-point-g32": ((4, 64, 128, 32, False), "kiln_gemv_int4"),
    "int4-g16": ((1, 64, 128, 16, True), "kiln_gemv_int4"),
    "int4-ragged-k80": ((1, 80, 96, 32, True), "kiln_decode4"),
    "uint4-16-tokens": ((16, 64, 128, 32, False), "kiln_decode4"),
}


@pytest.mark.parametrize("case", list(NBITS_CASES))
def test_matmul_nbits_forms_decode_inside_one_kernel(case, tmp_path):
    (tokens, d, hidden, block, symmetric), kernel = NBITS_CASES[case]
    model = fq.matmul_block(tokens=tokens, d=d, hidden=hidden)
    path = fq.quantize_matmul_nbits(model, tmp_path / "nbits.onnx", block, symmetric)
    nbits = [n for n in onnx.load(path).graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 2 and all(len(n.input) == (3 if symmetric else 4) for n in nbits)
    result, got, want = _build_and_run(path, tmp_path)
    assert relative_error(got, want) < NBITS_REL_TOL
    assert len(result.rules) == 2, result.rules
    assert all(kernel in name and rule == "decode_contraction"
               for name, rule in result.rules.items()), result.rules


def _nbits_proto(tmp_path) -> onnx.ModelProto:
    return onnx.load(fq.quantize_matmul_nbits(fq.matmul_block(), tmp_path / "nbits.onnx"))


def _first_nbits(proto: onnx.ModelProto) -> onnx.NodeProto:
    return next(n for n in proto.graph.node if n.op_type == "MatMulNBits")


def _set_bits(proto: onnx.ModelProto, bits: int) -> str:
    node = _first_nbits(proto)
    for attr in node.attribute:
        if attr.name == "bits":
            attr.i = bits
            break
    else:
        node.attribute.append(helper.make_attribute("bits", bits))
    return node.name


def test_refuses_matmul_nbits_of_other_widths_in_one_line(tmp_path):
    """The build refuses with one line naming the node and the reason."""
    proto = _nbits_proto(tmp_path)
    name = _set_bits(proto, 8)
    with pytest.raises(LoweringError) as info:
        build_artifact(ir.serde.deserialize_model(proto), "host", tmp_path / "b",
                       model_hash="h")
    message = str(info.value)
    assert "\n" not in message
    assert f"MatMulNBits node '{name}'" in message and "bits=8" in message
    assert info.value.ops == {"MatMulNBits": name}


def test_kiln_compile_refuses_matmul_nbits_with_g_idx_in_one_line(tmp_path, capsys):
    """An act-order MatMulNBits (ORT runs it, so verification passes): ``kiln compile``
    exits 2 with one error line naming the node."""
    from kiln.compiler.driver.cli import main

    proto = _nbits_proto(tmp_path)
    node = _first_nbits(proto)
    k = next(a.i for a in node.attribute if a.name == "K")
    proto.graph.initializer.append(
        numpy_helper.from_array(np.arange(k, dtype=np.int32) // 32, "g_idx"))
    while len(node.input) < 4:
        node.input.append("")
    node.input.append("g_idx")
    path = tmp_path / "act_order.onnx"
    onnx.save(proto, path)
    code = main(["compile", str(path), "--spec", "fp32", "--target", "host",
                 "-o", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("kiln: error: ")]
    assert errors == [f"kiln: error: MatMulNBits node '{node.name}': g_idx (act-order) is "
                      "not supported"], err
    assert "Traceback" not in err


def test_refuses_float_zero_points(tmp_path):
    proto = onnx.load(fq.quantize_matmul_nbits(fq.matmul_block(), tmp_path / "zp.onnx",
                                               symmetric=False))
    node = _first_nbits(proto)
    zero_point = next(t for t in proto.graph.initializer if t.name == node.input[3])
    as_float = numpy_helper.from_array(
        numpy_helper.to_array(zero_point).astype(np.float32), zero_point.name)
    zero_point.CopyFrom(as_float)
    with pytest.raises(LoweringError, match=rf"MatMulNBits node '{node.name}': float zero "
                                            "points are not supported"):
        lower_foreign_quant(proto)


def test_refuses_a_weight_that_is_not_a_constant(tmp_path):
    """A packed weight (or an int32 bias, a scale) must be an initializer to be decoded."""
    proto = _nbits_proto(tmp_path)
    node = _first_nbits(proto)
    weight = next(t for t in proto.graph.initializer if t.name == node.input[1])
    proto.graph.initializer.remove(weight)
    proto.graph.input.append(helper.make_tensor_value_info(
        weight.name, weight.data_type, list(weight.dims)))
    with pytest.raises(LoweringError, match=rf"'{node.name}': input '{weight.name}' must be "
                                            "a constant"):
        lower_foreign_quant(proto)


def test_kiln_compile_of_a_qoperator_model_verifies_for_host(tmp_path):
    """``kiln compile MODEL --spec fp32 --target host`` on ORT's QOperator CNN: the driver
    verifies the build against ORT and writes the model as ORT quantized it (the QDQ
    rewrite is the backend's own copy)."""
    from kiln.compiler.driver.compile import compile_model

    path = fq.quantize_static(fq.small_cnn(), tmp_path / "cnn.onnx", "QOperator")
    out = compile_model(str(path), "fp32").save(tmp_path / "out", target="host")
    report = json.loads((out / "report.json").read_text())
    assert report["compiled"]["verified"] and report["compiled"]["target"] == "host"
    saved = onnx.load(out / "model.onnx")
    assert "QLinearConv" in _foreign_nodes(saved)


#: A real model quantized by ORT, kiln vs ORT on it, relative to max |y|: 50-odd quantized
#: layers, each where a summation-order difference may move a value across a rounding
#: boundary of the next QuantizeLinear (one step), as for kiln's own static W8A8
#: (test_quant_lowering.QDQ_REL_TOL). Measured: 0 (QOperator) and 9e-5 (dynamic).
REAL_REL_TOL = 2e-2


def _check_real_model(path, shapes, feeds, tol, tmp_path, record_property) -> None:
    """kiln's host build of the quantized real model at ``path`` vs ORT on it: relative
    error under ``tol`` and the same argmax (class / character) everywhere."""
    from kiln.compiler.core.frontend import load_model

    model = load_model(path, input_shapes=shapes)
    (want,) = ort_outputs(model, feeds, optimize=False)
    result = build_artifact(model, "host", tmp_path / "build", model_hash="h")
    (got,) = load(tmp_path / "build")(**feeds)
    error = relative_error(got, want)
    record_property("max_rel_error_vs_ort", error)
    record_property("build_seconds", round(result.seconds, 1))
    assert error < tol
    assert np.array_equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.slow
@pytest.mark.parametrize("form", ["qoperator", "dynamic"])
def test_ppocr_cls_quantized_by_onnxruntime_builds_and_matches(form, tmp_path,
                                                              record_property):
    """PP-OCR's direction classifier (from the rapidocr wheel, not written for kiln)
    quantized by quantize_static (QOperator, calibrated on 4 text lines) or
    quantize_dynamic (53 ConvInteger): kiln's host build matches ORT on the quantized
    model and picks the same class."""
    from kiln.compiler.testing.real_models import rapidocr_input_shape, rapidocr_model
    from tests.backends.tvm.test_real_models import text_image

    shapes = rapidocr_input_shape("cls")
    ((name, shape),) = shapes.items()
    source = onnx.load(rapidocr_model("cls"))
    path = tmp_path / f"cls-{form}.onnx"
    if form == "qoperator":
        calibration = [{name: text_image(shape, seed=i)} for i in range(4)]
        fq.quantize_static(source, path, "QOperator", calibration=calibration)
        assert "QLinearSoftmax" in _foreign_nodes(onnx.load(path))
    else:
        fq.quantize_dynamic(source, path)
    assert _foreign_nodes(onnx.load(path))
    _check_real_model(path, shapes, {name: text_image(shape, seed=10)}, REAL_REL_TOL,
                      tmp_path, record_property)


@pytest.mark.slow
def test_ppocr_rec_with_dynamic_matmuls_builds_and_matches(tmp_path, record_property):
    """PP-OCRv4 rec with its MatMuls quantized by quantize_dynamic (MatMulInteger, int8
    weights; convs left float): builds and matches ORT on the quantized model, same
    characters. (With its convs quantized too, or by quantize_static, ORT's own rec is
    unstable: 1e-6 relative input noise moves its output by 0.2-0.6, see
    docs/architecture.md, so no comparison there means much.)"""
    from kiln.compiler.testing.real_models import rapidocr_input_shape, rapidocr_model
    from tests.backends.tvm.test_real_models import text_image

    shapes = rapidocr_input_shape("rec")
    ((name, shape),) = shapes.items()
    path = fq.quantize_dynamic(onnx.load(rapidocr_model("rec")), tmp_path / "rec.onnx",
                               ops=["MatMul"], preprocess=True)
    assert "MatMulInteger" in [n.op_type for n in onnx.load(path).graph.node]
    _check_real_model(path, shapes, {name: text_image(shape)}, DYNAMIC_REL_TOL, tmp_path,
                      record_property)
