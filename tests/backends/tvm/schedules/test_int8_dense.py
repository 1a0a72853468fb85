"""QDQ MatMul/Gemm/1x1-Conv chains become kiln's integer dense kernel and match ONNX Runtime.

Each case is a small QDQ model built by hand (or by kiln's quantize pass), compiled
for ``host`` (AVX-512 VNNI here), ``x86-64-v3`` (the AVX2 path, forced on this CPU) and
``x86-64-v4``; the ``int8_dense`` rule must schedule every chain's kernel, and the
uint8/int8 outputs may differ from ONNX Runtime by one quantization step (both round
half to even, on float sums taken in a different order: a value on a rounding
boundary may land on either side).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from tvm.target.codegen import target_has_features

from kiln.backends.tvm import build_artifact, load
from kiln.backends.tvm.importer.int8_chains import (
    AVX2_S16,
    AVX2_U8S8,
    KERNELS_ENV,
    VNNI512,
    pack_weight,
    rewrite_int8_chains,
    target_isa,
    weight_layout,
)
from kiln.backends.tvm.schedules.int8_dense import padded_rows, register_tile
from kiln.backends.tvm.targets import host_arch, resolve_target
from kiln.compiler.core.metrics import relative_error
from kiln.compiler.testing import quant_models as models
from kiln.compiler.testing.reference import exact_reference
from kiln.passes.quant.quantize import Quantize, QuantizeConfig

#: Quantized outputs: one step of the output scale (rounding boundaries, see the docstring).
ONE_STEP = 1
#: Float outputs after a quantized hidden layer: one hidden step moves the result by
#: about sy * |w| / |y| (as the QDQ lowering tests allow).
QDQ_REL_TOL = 2e-2
PATHS = {"host": (), "x86-64-v3": ("avx2",), "x86-64-v4": ("avx512f", "avx512bw")}
INT8_KERNEL = "int8_dense"


def int8_target(name: str) -> str:
    if host_arch() != "x86_64":
        pytest.skip(f"the integer kernels are x86 kernels; this host is {host_arch()}")
    host = resolve_target("host").tvm_target()
    missing = [f for f in PATHS[name] if not target_has_features(f, host)]
    if missing:
        pytest.skip(f"this CPU lacks {', '.join(missing)} (needed to run {name} code)")
    return name


def chain_model(*, m=12, k=64, n=48, out_q=True, relu=True, signed_x=False, weight_bound=127,
                 gemm=False, per_channel=True, rows3d=False, gelu="", seed=0) -> onnx.ModelProto:
    """x -> Q -> DQ -> MatMul(DQ(w)) [-> Add b] [-> Relu | Gelu] [-> Q]: uint8 or float."""
    rng = np.random.default_rng(seed)
    w = rng.integers(-weight_bound, weight_bound + 1, size=(k, n)).astype(np.int8)
    sw = (rng.random(n if per_channel else 1) * 0.01 + 0.005).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    zx = np.array(-3 if signed_x else 121, np.int8 if signed_x else np.uint8)
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "sx"),
             numpy_helper.from_array(zx, "zx"),
             numpy_helper.from_array(w.T.copy() if gemm else w, "wq"),
             numpy_helper.from_array(sw if per_channel else sw.reshape(()), "sw"),
             numpy_helper.from_array(b, "b"),
             numpy_helper.from_array(np.array(0.2, np.float32), "sy"),
             numpy_helper.from_array(np.array(7, np.uint8), "zy")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xf"]),
             helper.make_node("DequantizeLinear", ["wq", "sw"], ["wf"],
                              axis=(0 if gemm else 1))]
    if gemm:
        nodes.append(helper.make_node("Gemm", ["xf", "wf", "b"], ["h"], transB=1))
    else:
        nodes += [helper.make_node("MatMul", ["xf", "wf"], ["mm"]),
                  helper.make_node("Add", ["mm", "b"], ["h"])]
    last = "h"
    if relu:
        nodes.append(helper.make_node("Relu", ["h"], ["r"]))
        last = "r"
    if gelu:
        nodes.append(helper.make_node("Gelu", ["h"], ["r"], approximate=gelu))
        last = "r"
    if out_q:
        nodes.append(helper.make_node("QuantizeLinear", [last, "sy", "zy"], ["y"]))
    else:
        nodes.append(helper.make_node("Identity", [last], ["y"]))
    shape = [2, m // 2, k] if rows3d else [m, k]
    out_shape = [*shape[:-1], n]
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.UINT8 if out_q else TensorProto.FLOAT,
                                       out_shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def _conv_chain_model(*, c=32, n=48, hw=(6, 10), kernel=1, seed=0) -> onnx.ModelProto:
    """x [1, C, H, W] -> Q -> DQ -> Conv(DQ(w [N, C, k, k]), b) -> Relu -> Q: uint8."""
    rng = np.random.default_rng(seed)
    w = rng.integers(-127, 128, size=(n, c, kernel, kernel)).astype(np.int8)
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "sx"),
             numpy_helper.from_array(np.array(121, np.uint8), "zx"),
             numpy_helper.from_array(w, "wq"),
             numpy_helper.from_array((rng.random(n) * 0.01 + 0.005).astype(np.float32), "sw"),
             numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "b"),
             numpy_helper.from_array(np.array(0.2, np.float32), "sy"),
             numpy_helper.from_array(np.array(7, np.uint8), "zy")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xf"]),
             helper.make_node("DequantizeLinear", ["wq", "sw"], ["wf"], axis=0),
             helper.make_node("Conv", ["xf", "wf", "b"], ["h"], kernel_shape=[kernel, kernel],
                              pads=[kernel // 2] * 4),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("QuantizeLinear", ["r", "sy", "zy"], ["y"])]
    graph = helper.make_graph(
        nodes, "conv_chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, *hw])],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, [1, n, *hw])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def run_both(proto: onnx.ModelProto, target: str, tmp_path, seed=1):
    x_shape = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    x = (np.random.default_rng(seed).standard_normal(x_shape) * 4).astype(np.float32)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    want = ort.InferenceSession(proto.SerializeToString(), options,
                                providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    result = build_artifact(ir.serde.deserialize_model(proto), target, tmp_path, model_hash="h")
    (got,) = load(tmp_path)(x=x)
    return np.asarray(got), want, result.rules


CASES = {
    "matmul-relu-u8-out": {},
    "gemm-int8-acts-float-out": {"gemm": True, "signed_x": True, "out_q": False, "relu": False},
    "per-tensor-weight-3d-rows": {"per_channel": False, "rows3d": True},
    "seven-bit-weights": {"weight_bound": 63},
    "gemv-one-row": {"m": 1, "k": 256, "n": 64},
    "gelu-u8-out": {"relu": False, "gelu": "none"},
    "gelu-tanh-float-out": {"relu": False, "gelu": "tanh", "out_q": False},
}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("case", list(CASES))
def test_chain_runs_on_the_integer_kernel_and_matches_onnxruntime(case, path, tmp_path):
    got, want, rules = run_both(chain_model(**CASES[case]), int8_target(path), tmp_path)
    assert [name for name, rule in rules.items() if rule == INT8_KERNEL] == ["kiln_int8_dense"], \
        rules
    assert got.dtype == want.dtype and got.shape == want.shape
    if want.dtype == np.uint8:
        assert np.abs(got.astype(int) - want.astype(int)).max() <= ONE_STEP
        assert np.mean(got != want) < 0.01  # boundary cases only
    else:
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("path", list(PATHS))
def test_pointwise_conv_runs_on_the_integer_kernel(path, tmp_path):
    """A 1x1 conv is the dense kernel over H*W rows between NCHW <-> NHWC transposes."""
    got, want, rules = run_both(_conv_chain_model(), int8_target(path), tmp_path)
    assert INT8_KERNEL in rules.values(), rules
    assert got.shape == want.shape
    assert np.abs(got.astype(int) - want.astype(int)).max() <= ONE_STEP
    assert np.mean(got != want) < 0.01


def test_a_3x3_conv_runs_on_the_integer_kernel(tmp_path):
    """(an implicit GEMM: tests/backends/tvm/schedules/test_int8_conv.py has the rest)"""
    got, want, rules = run_both(_conv_chain_model(kernel=3), int8_target("host"), tmp_path)
    assert INT8_KERNEL in rules.values(), rules
    assert np.abs(got.astype(int) - want.astype(int)).max() <= ONE_STEP


def test_kiln_w8a8_mlp_keeps_int8_between_layers(tmp_path):
    """kiln's int8 QDQ on an MLP: both layers are integer kernels; the hidden layer's
    output Q is fused (no float kernel between them: only the input's Q is elementwise, and
    on AVX2 the exact kernel's int16 widening of the hidden activations)."""
    model = models.mlp(d_in=128, hidden=256, d_out=64)
    Quantize(QuantizeConfig(weights={"dtype": "int8"}, activations={"calibration": "minmax"}),
             calibration=models.calibration(model))(model)
    feeds = models.feeds(model)
    want = exact_reference(model, feeds)
    result = build_artifact(model, int8_target("host"), tmp_path, model_hash="h")
    (got,) = load(tmp_path)(**feeds)
    widening = ["elementwise"] if target_isa(int8_target("host")) == "avx2" else []
    assert sorted(result.rules.values()) == \
        ["elementwise", *widening, INT8_KERNEL, INT8_KERNEL], result.rules
    assert relative_error(got, want) < QDQ_REL_TOL


@pytest.mark.parametrize("reduce_range, isa", [(False, "avx2_s16"), (True, "avx2_u8s8")])
def test_reduce_range_weights_take_the_u8s8_kernel_on_avx2(reduce_range, isa, tmp_path):
    """quantize's ``reduce_range`` (7-bit weights): no pair of weights can saturate
    vpmaddubsw's int16 sums, so on AVX2 every layer is packed for the 32-product
    ``avx2_u8s8`` kernel; full-range weights take the exact ``avx2_s16`` kernel (and its
    int16 widening of the hidden activations). Both match ONNX Runtime on the QDQ model."""
    model = models.mlp(d_in=128, hidden=256, d_out=64)
    Quantize(QuantizeConfig(weights={"dtype": "int8", "reduce_range": reduce_range},
                            activations={"calibration": "minmax"}),
             calibration=models.calibration(model))(model)
    target = int8_target("x86-64-v3")
    proto = ir.serde.serialize_model(model)
    assert rewrite_int8_chains(proto, target) == 2
    assert {helper.get_attribute_value(a).decode() for n in proto.graph.node
            if n.op_type == "KilnInt8Dense" for a in n.attribute if a.name == "isa"} == {isa}
    feeds = models.feeds(model)
    want = exact_reference(model, feeds)
    result = build_artifact(model, target, tmp_path, model_hash="h")
    (got,) = load(tmp_path)(**feeds)
    widening = [] if reduce_range else ["elementwise"]
    assert sorted(result.rules.values()) == \
        ["elementwise", *widening, INT8_KERNEL, INT8_KERNEL], result.rules
    assert relative_error(got, want) < QDQ_REL_TOL


@pytest.mark.parametrize("path", ["host", "x86-64-v3"])
def test_columns_are_padded_to_the_lanes(path, tmp_path):
    """N = 20: the weight is padded with zero columns to 32 (VNNI) / 24 (AVX2), the
    kernel's output sliced back to 20."""
    got, want, rules = run_both(chain_model(n=20), int8_target(path), tmp_path)
    assert INT8_KERNEL in rules.values(), rules
    assert got.shape == want.shape
    assert np.abs(got.astype(int) - want.astype(int)).max() <= ONE_STEP


def test_columns_the_kernel_cannot_reduce_stay_in_qdq_form(tmp_path):
    got, want, rules = run_both(chain_model(k=30), int8_target("host"), tmp_path)
    assert INT8_KERNEL not in rules.values(), rules
    assert np.abs(got.astype(int) - want.astype(int)).max() <= ONE_STEP


def test_no_integer_kernels_off_x86_cpus():
    proto = chain_model()
    assert target_isa("cuda-sm90") is None and target_isa("arm64") is None
    assert rewrite_int8_chains(proto, "arm64") == 0
    assert [n.op_type for n in proto.graph.node][-1] == "QuantizeLinear"


def test_kernels_can_be_switched_off(monkeypatch):
    proto = chain_model()
    monkeypatch.setenv(KERNELS_ENV, "never")
    assert rewrite_int8_chains(proto, int8_target("host")) == 0
    monkeypatch.setenv(KERNELS_ENV, "auto")
    assert rewrite_int8_chains(proto, "host") == 1
    assert [n.op_type for n in proto.graph.node][-1] == "KilnInt8Dense"


def test_weight_layouts():
    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, size=(8, 32)).astype(np.int8)
    packed = pack_weight(w, VNNI512)
    assert packed.shape == (2, 2, 16, 4)
    assert packed[1, 1, 3, 2] == w[1 * 4 + 2, 16 + 3]
    assert weight_layout("vnni512", w) == VNNI512
    assert weight_layout("avx2", w) == AVX2_S16  # full-range pairs could saturate int16
    assert weight_layout("avx2", (w // 2).astype(np.int8)) == AVX2_U8S8
    assert pack_weight(w, AVX2_S16).dtype == np.int16


def test_register_tile_fits_the_registers():
    for rows, vectors, regs in [(64, 8, 32), (49, 6, 32), (12, 6, 16), (1, 4, 16), (7, 1, 16)]:
        mr, nv = register_tile(rows, vectors, regs)
        assert rows % mr == 0 and vectors % nv == 0 and mr * nv + nv + 3 <= regs


def test_rows_are_padded_to_a_register_tile():
    """169 rows (13 x 13 pixels) have no divisor from 2 to 8: one row per tile unless a few
    rows are added (at most 1/16 of them); rows a good tile already divides stay."""
    assert register_tile(169, 48, 16) == (1, 4)
    assert padded_rows(169, 48, 16) == 170 and register_tile(170, 48, 16) == (5, 2)
    assert padded_rows(169, 24, 32) == 174 and register_tile(174, 24, 32) == (6, 4)
    assert padded_rows(14400, 3, 16) == 14400 and padded_rows(2704, 6, 32) == 2704
    assert padded_rows(12, 6, 16) == 12 and padded_rows(1, 4, 32) == 1  # too few to pad


@pytest.mark.parametrize("path", ["host", "x86-64-v3"])
@pytest.mark.parametrize("kind", ["conv3x3", "dense"])
def test_padded_rows_are_sliced_off(kind, path, tmp_path):
    """13 x 13 pixels (a 3x3 conv) or 169 rows (a MatMul): the kernel computes the padded
    rows (reading the last input row) and the result keeps the first 169."""
    proto = (_conv_chain_model(hw=(13, 13), kernel=3) if kind == "conv3x3"
             else chain_model(m=169))
    got, want, rules = run_both(proto, int8_target(path), tmp_path)
    assert INT8_KERNEL in rules.values(), rules
    assert any("strided_slice" in name for name in rules), rules  # the rows' trim
    assert got.shape == want.shape
    assert np.abs(got.astype(int) - want.astype(int)).max() <= ONE_STEP
    assert np.mean(got != want) < 0.01


def test_a_weight_quantized_in_the_graph_is_folded(tmp_path):
    """ORT's QDQ form may keep a weight float behind QuantizeLinear: evaluated at compile
    time (as ONNX rounds: half to even, saturating) and packed like an int8 initializer."""
    proto = chain_model()
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    w = numpy_helper.to_array(inits["wq"]).astype(np.float32)
    sw = numpy_helper.to_array(inits["sw"])
    graph.initializer.remove(inits["wq"])
    graph.initializer.extend([numpy_helper.from_array(w * sw, "w_float"),
                              numpy_helper.from_array(np.zeros(sw.shape, np.int8), "zw")])
    graph.node.insert(0, helper.make_node("QuantizeLinear", ["w_float", "sw", "zw"], ["wq"],
                                          axis=1))
    got, want, rules = run_both(proto, int8_target("host"), tmp_path)
    assert INT8_KERNEL in rules.values(), rules
    assert np.abs(got.astype(int) - want.astype(int)).max() <= ONE_STEP
