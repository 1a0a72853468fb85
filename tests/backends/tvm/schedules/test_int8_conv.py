"""QDQ KxK / strided / dilated / depthwise Conv chains become kiln's integer conv kernels
(implicit GEMM on the dense kernel's dot products, or the depthwise window kernel) with the
elementwise tail (HardSwish, SiLU, ...) folded into the requantizing epilogue, and match
ONNX Runtime on the QDQ graph on ``host`` (AVX-512 VNNI here), ``x86-64-v3`` (AVX2, forced)
and ``x86-64-v4``.

The integer sums are exact (the input is padded with its zero point); the uint8 outputs may
differ from ONNX Runtime by one step where a float value sits on a rounding boundary, and
the Sigmoid of a SiLU tail is TOPI's fast_exp (a few ulp from ORT's), which moves a
boundary value the same way.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from kiln.backends.tvm.importer.int8_chains import cancel_transposes, rewrite_int8_chains
from kiln.backends.tvm.importer.int8_epilogue import evaluate_numpy, match_tail
from tests.backends.tvm.schedules.test_int8_dense import ONE_STEP, PATHS, int8_target, run_both

#: Outputs that may sit one step off ORT's (rounding boundaries): a small fraction.
BOUNDARY_FRACTION = 0.01
INT8_RULES = {"int8_dense", "int8_window"}


def conv_model(*, c=32, n=48, hw=(12, 20), k=3, stride=1, group=1, dilation=1, tail="relu",
               layers=1, depthwise_layers=(), signed_x=False, seed=0) -> onnx.ModelProto:
    """x [1, C, H, W] -> Q -> (DQ -> Conv(DQ(w), b) -> tail -> Q) x layers: uint8 out
    (the layers in ``depthwise_layers`` depthwise, N = C)."""
    rng = np.random.default_rng(seed)
    zx = np.array(-5, np.int8) if signed_x else np.array(121, np.uint8)
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "sx"),
             numpy_helper.from_array(zx, "zx"),
             numpy_helper.from_array(np.array(0.2, np.float32), "sy"),
             numpy_helper.from_array(np.array(7, np.uint8), "zy"),
             numpy_helper.from_array(np.array([3.0], np.float32), "three"),
             numpy_helper.from_array(np.array(6.0, np.float32), "six"),
             numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
             numpy_helper.from_array(np.array([0.75], np.float32), "scale")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["q0"])]
    pad = (k // 2) * dilation
    channels, scale, zero = c, "sx", "zx"
    for layer in range(layers):
        p = f"l{layer}_"
        groups = channels if layer in depthwise_layers else group
        w = rng.integers(-127, 128, size=(n, channels // groups, k, k)).astype(np.int8)
        inits += [numpy_helper.from_array(w, p + "w"),
                  numpy_helper.from_array((rng.random(n) * 0.01 + 0.004).astype(np.float32),
                                          p + "sw"),
                  numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), p + "b")]
        h = p + "h"
        nodes += [helper.make_node("DequantizeLinear", [f"q{layer}", scale, zero], [p + "xf"]),
                  helper.make_node("DequantizeLinear", [p + "w", p + "sw"], [p + "wf"], axis=0),
                  helper.make_node("Conv", [p + "xf", p + "wf", p + "b"], [h],
                                   kernel_shape=[k, k], pads=[pad] * 4, strides=[stride] * 2,
                                   group=groups, dilations=[dilation] * 2)]
        if tail == "relu":
            nodes.append(helper.make_node("Relu", [h], [p + "r"]))
        elif tail == "hardswish":  # PP-LCNet's, written out, then a learnable scale
            nodes += [helper.make_node("Add", [h, "three"], [p + "h3"]),
                      helper.make_node("Clip", [p + "h3", "zero", "six"], [p + "hc"]),
                      helper.make_node("Div", [p + "hc", "six"], [p + "hd"]),
                      helper.make_node("Mul", [h, p + "hd"], [p + "hs"]),
                      helper.make_node("Mul", ["scale", p + "hs"], [p + "r"])]
        elif tail == "silu":
            nodes += [helper.make_node("Sigmoid", [h], [p + "s"]),
                      helper.make_node("Mul", [h, p + "s"], [p + "r"])]
        nodes.append(helper.make_node("QuantizeLinear", [p + "r", "sy", "zy"],
                                      [f"q{layer + 1}"]))
        channels, scale, zero = n, "sy", "zy"
    graph = helper.make_graph(
        nodes, "conv_chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, *hw])],
        [helper.make_tensor_value_info(f"q{layers}", TensorProto.UINT8, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


CASES = {
    "3x3-relu": {},
    "3x3-stride2-hardswish": {"stride": 2, "tail": "hardswish"},
    "5x5-dilated-silu": {"k": 5, "dilation": 2, "tail": "silu", "hw": (9, 13)},
    "3-channel-stem-int8-input": {"c": 3, "n": 16, "stride": 2, "signed_x": True},
    "3x3-24-columns-padded": {"n": 24, "tail": "silu"},
    "1x1-42-channels-padded": {"c": 42, "n": 24, "k": 1},
    "depthwise-3x3-hardswish": {"c": 32, "n": 32, "group": 32, "tail": "hardswish"},
    "depthwise-5x5-stride2-silu": {"c": 48, "n": 48, "group": 48, "k": 5, "stride": 2,
                                   "tail": "silu", "hw": (11, 17)},
}


def _check(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.max() <= ONE_STEP
    assert np.mean(diff > 0) < BOUNDARY_FRACTION


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("case", list(CASES))
def test_conv_chain_runs_on_an_integer_kernel_and_matches_onnxruntime(case, path, tmp_path):
    got, want, rules = run_both(conv_model(**CASES[case]), int8_target(path), tmp_path)
    kernel = "int8_window" if CASES[case].get("group", 1) > 1 else "int8_dense"
    assert [r for r in rules.values() if r in INT8_RULES] == [kernel], rules
    _check(got, want)


def test_consecutive_integer_convs_pass_uint8_nhwc(tmp_path):
    """conv -> SiLU -> Q -> depthwise -> Q -> conv: no float tensor and no transpose pair
    between the layers (only the input's Q + transpose and the last output's transpose)."""
    proto = conv_model(c=16, n=16, layers=3, depthwise_layers=(1,), tail="silu")
    rewritten = onnx.ModelProto.FromString(proto.SerializeToString())
    assert rewrite_int8_chains(rewritten, int8_target("host")) == 3
    ops = [n.op_type for n in rewritten.graph.node]
    assert ops == ["QuantizeLinear", "Transpose", "KilnInt8Conv", "KilnInt8Conv",
                   "KilnInt8Conv", "Transpose"], ops
    got, want, rules = run_both(proto, int8_target("host"), tmp_path)
    # the two dense layers have the same shapes: one kernel, called twice
    assert sorted(r for r in rules.values() if r in INT8_RULES) == \
        ["int8_dense", "int8_window"], rules
    _check(got, want)


def test_a_grouped_conv_stays_in_qdq_form(tmp_path):
    got, want, rules = run_both(conv_model(c=32, n=32, group=4), int8_target("host"), tmp_path)
    assert not INT8_RULES & set(rules.values()), rules
    assert np.abs(got.astype(int) - want.astype(int)).max() <= ONE_STEP


def test_the_tail_is_the_closed_elementwise_region_after_the_conv():
    from kiln.backends.tvm.importer.int8_chains import ChainGraph

    proto = conv_model(tail="hardswish")
    g = ChainGraph(proto.graph)
    program, nodes, result = match_tail(g, "l0_h")
    assert [n.op_type for n in nodes] == ["Add", "Clip", "Div", "Mul", "Mul"]
    assert result == "l0_r"
    x = np.linspace(-8, 8, 33, dtype=np.float32)
    want = 0.75 * x * np.clip(x + 3, 0, 6) / 6
    np.testing.assert_allclose(evaluate_numpy(program, x), want, rtol=1e-6)
    # a value read outside the region ends it: the conv output itself is read by an Add
    # of a non-constant (a residual), so nothing after it can be folded
    proto.graph.node.append(helper.make_node("Add", ["l0_h", "x"], ["other"]))
    assert match_tail(ChainGraph(proto.graph), "l0_h") == ([], [], "l0_h")


def test_transposes_cancel_only_between_integer_kernels():
    nodes = [helper.make_node("Transpose", ["a"], ["b"], name="k_to_nchw", perm=[0, 3, 1, 2]),
             helper.make_node("Transpose", ["b"], ["c"], name="j_to_nhwc", perm=[0, 2, 3, 1]),
             helper.make_node("Relu", ["c"], ["d"]),
             helper.make_node("Transpose", ["x"], ["y"], name="user", perm=[0, 3, 1, 2]),
             helper.make_node("Transpose", ["y"], ["z"], name="j2_to_nhwc", perm=[0, 2, 3, 1])]
    graph = helper.make_graph(nodes, "g", [], [helper.make_tensor_value_info("d", 1, None),
                                               helper.make_tensor_value_info("z", 1, None)])
    assert cancel_transposes(graph) == 1
    assert [(n.op_type, list(n.input)) for n in graph.node] == \
        [("Relu", ["a"]), ("Transpose", ["x"]), ("Transpose", ["y"])]


@pytest.mark.parametrize("path", list(PATHS))
def test_the_register_tile_allocates_nothing_per_task(path):
    """The dot-product intrinsics take the activations' group as an expression: a named
    value became a 4-byte "local" buffer, allocated and freed (TVMBackendAllocWorkspace)
    once per register tile inside the parallel loop."""
    import onnx_ir as ir
    import tvm

    from kiln.backends.tvm.importer import lower_to_relax
    from kiln.backends.tvm.pipeline import relax_pipeline
    from kiln.backends.tvm.targets import resolve_target

    target = resolve_target(int8_target(path))
    mod = lower_to_relax(ir.serde.deserialize_model(conv_model(c=32, n=24, hw=(6, 6))),
                         target_name=target.name)
    scheduled: list[tvm.IRModule] = []
    tvm.compile(mod, target=target.tvm_target(),
                relax_pipeline=relax_pipeline(target, None, scheduled.append))
    kernels = {gv.name_hint: f.script() for gv, f in scheduled[-1].functions.items()
               if gv.name_hint.startswith("kiln_int8_conv")}
    assert kernels
    for name, text in kernels.items():
        assert "alloc_local" not in text, name
