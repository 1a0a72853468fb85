"""The float ops between integer convolutions run NHWC (``int8_layout.channels_last_regions``):
an FPN-neck-like block (SE Mul by a pooled gate, Add, nearest Resize, a per-channel
constant, Concat, Q) keeps no NCHW <-> NHWC transpose between the kernels and matches ONNX
Runtime on the QDQ graph within one output step on host / x86-64-v3 / x86-64-v4."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from kiln.backends.tvm.importer.int8_chains import rewrite_int8_chains
from tests.backends.tvm.importer.test_int8_exact_ops import qdq_conv
from tests.backends.tvm.schedules.test_int8_dense import ONE_STEP, PATHS, int8_target, run_both


def neck_model(c=16, n=16, hw=(12, 16), seed=0, float_output=False):
    """x -> Q -> {conv a, conv b (stride 2)}; gate = HardSigmoid(conv g(Q(GAP(a))));
    s = a + a * gate + Resize2x(b); Concat(s * k[n, 1, 1], Relu(s)) -> Q -> 1x1 conv -> Q."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(np.array(v, np.float32), f"s{i}") for i, v in
             enumerate((0.05, 0.1, 0.2, 0.02))]
    inits += [numpy_helper.from_array(np.array(v, np.uint8), f"z{i}") for i, v in
              enumerate((121, 3, 7, 10))]
    inits += [numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "up"),
              numpy_helper.from_array((rng.random((n, 1, 1)) + 0.5).astype(np.float32), "k")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s0", "z0"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s0", "z0"], ["xf"])]

    def conv(name, x, cin, cout, k, stride):
        qdq_conv(rng, inits, nodes, name, x, cin, cout, k, stride)

    def qdq(x, i):
        nodes.extend([helper.make_node("QuantizeLinear", [x, f"s{i}", f"z{i}"], [x + "_q"]),
                      helper.make_node("DequantizeLinear", [x + "_q", f"s{i}", f"z{i}"],
                                       [x + "_f"])])
        return x + "_f"

    conv("a", "xf", c, n, 3, 1)
    conv("b", "xf", c, n, 3, 2)
    nodes.append(helper.make_node("GlobalAveragePool", ["a"], ["pooled"]))
    conv("g", qdq("pooled", 3), n, n, 1, 1)
    nodes += [helper.make_node("HardSigmoid", ["g"], ["gate"]),
              helper.make_node("Mul", ["a", "gate"], ["se"]),
              helper.make_node("Add", ["a", "se"], ["t"]),
              helper.make_node("Resize", ["b", "", "up"], ["r"], mode="nearest"),
              helper.make_node("Add", ["t", "r"], ["s"]),
              helper.make_node("Mul", ["s", "k"], ["sk"]),
              helper.make_node("Relu", ["s"], ["sr"]),
              helper.make_node("Concat", ["sk", "sr"], ["cat"], axis=1)]
    conv("y", qdq("cat", 1), 2 * n, n, 1, 1)
    nodes.append(helper.make_node("QuantizeLinear", ["y", "s2", "z2"], ["yq"]))
    outputs = [helper.make_tensor_value_info("yq", TensorProto.UINT8, None)]
    if float_output:
        outputs.append(helper.make_tensor_value_info("s", TensorProto.FLOAT, None))
    graph = helper.make_graph(
        nodes, "neck", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, *hw])],
        outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_no_transpose_is_left_between_the_kernels():
    model = neck_model()
    assert rewrite_int8_chains(model, int8_target("host")) == 4
    ops = [n.op_type for n in model.graph.node]
    transposes = [(list(n.input), list(n.output)) for n in model.graph.node
                  if n.op_type == "Transpose"]
    # the input's (to NHWC, one per conv reading it) and the output's (to NCHW) only
    assert sorted(t[0][0] for t in transposes if t[1] != ["yq"]) == ["xq", "xq"], transposes
    assert len(transposes) == 3, transposes
    assert "GlobalAveragePool" not in ops and ops.count("ReduceMean") == 1, ops


def test_a_float_value_read_in_nchw_is_its_nhwc_twin_transposed():
    model = neck_model(float_output=True)
    rewrite_int8_chains(model, int8_target("host"))
    producer = {o: n for n in model.graph.node for o in n.output}
    back = producer["s"]
    assert back.op_type == "Transpose" and producer[back.input[0]].op_type == "Add"
    assert [n.op_type for n in model.graph.node].count("Transpose") == 4


@pytest.mark.parametrize("path", list(PATHS))
def test_neck_in_nhwc_matches_onnxruntime(path, tmp_path):
    got, want, rules = run_both(neck_model(), int8_target(path), tmp_path)
    assert list(rules.values()).count("int8_dense") == 4, rules
    assert got.dtype == want.dtype == np.uint8 and got.shape == want.shape
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.max() <= ONE_STEP
    assert np.mean(diff > 0) < 0.02
