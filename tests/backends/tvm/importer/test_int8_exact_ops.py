"""A QuantizeLinear after Concat / MaxPool / Resize(nearest) moves into the integer kernels
that feed them (``int8_exact_ops.push_quantize``): the region runs on uint8 and the result
matches ONNX Runtime on the QDQ graph within one output step on host / x86-64-v3 /
x86-64-v4 (the kernels' own rounding boundaries; the move itself is exact)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from kiln.backends.tvm.importer.int8_chains import rewrite_int8_chains
from kiln.backends.tvm.importer.int8_exact_ops import push_quantize
from tests.backends.tvm.schedules.test_int8_dense import ONE_STEP, PATHS, int8_target, run_both


def qdq_conv(rng, inits, nodes, name, x, cin, cout, k, stride) -> None:
    """Append ``name = Conv(x, DQ(w int8 per channel), b)`` (k x k, same padding)."""
    w = rng.integers(-127, 128, size=(cout, cin, k, k)).astype(np.int8)
    inits.extend([numpy_helper.from_array(w, name + "_w"),
                  numpy_helper.from_array((rng.random(cout) * 0.01 + 0.004)
                                          .astype(np.float32), name + "_sw"),
                  numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32),
                                          name + "_b")])
    nodes.extend([helper.make_node("DequantizeLinear", [name + "_w", name + "_sw"],
                                   [name + "_wf"], axis=0),
                  helper.make_node("Conv", [x, name + "_wf", name + "_b"], [name],
                                   kernel_shape=[k, k], pads=[k // 2] * 4,
                                   strides=[stride] * 2)])


def spp_model(c=16, n=16, hw=(10, 14), seed=0) -> onnx.ModelProto:
    """x -> Q -> {conv a -> Relu, conv b (stride 2) -> Resize x2 nearest};
    Concat(a, MaxPool(a), Resize(b)) -> Q -> DQ -> 1x1 conv -> Q: the first Q after the
    Concat only (as YOLOX's CSP / SPP / FPN blocks are quantized)."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "sx"),
             numpy_helper.from_array(np.array(121, np.uint8), "zx"),
             numpy_helper.from_array(np.array(0.1, np.float32), "sc"),
             numpy_helper.from_array(np.array(3, np.uint8), "zc"),
             numpy_helper.from_array(np.array(0.2, np.float32), "sy"),
             numpy_helper.from_array(np.array(7, np.uint8), "zy"),
             numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "up")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xf"])]

    def conv(name, x, cin, cout, k, stride):
        qdq_conv(rng, inits, nodes, name, x, cin, cout, k, stride)

    conv("a0", "xf", c, n, 3, 1)
    nodes.append(helper.make_node("Relu", ["a0"], ["a"]))
    conv("b", "xf", c, n, 3, 2)
    nodes += [helper.make_node("MaxPool", ["a"], ["m"], kernel_shape=[5, 5], pads=[2] * 4),
              helper.make_node("Resize", ["b", "", "up"], ["r"], mode="nearest"),
              helper.make_node("Concat", ["a", "m", "r"], ["cat"], axis=1),
              helper.make_node("QuantizeLinear", ["cat", "sc", "zc"], ["catq"]),
              helper.make_node("DequantizeLinear", ["catq", "sc", "zc"], ["catf"])]
    conv("y", "catf", 3 * n, n, 1, 1)
    nodes.append(helper.make_node("QuantizeLinear", ["y", "sy", "zy"], ["yq"]))
    graph = helper.make_graph(
        nodes, "spp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, *hw])],
        [helper.make_tensor_value_info("yq", TensorProto.UINT8, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def test_the_quantize_after_concat_moves_into_the_kernels():
    model = spp_model()
    assert rewrite_int8_chains(model, int8_target("host")) == 3
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") == 1, ops  # only the input's
    kernels = [n for n in model.graph.node if n.op_type.startswith("KilnInt8")]
    dtypes = [next(a.s for a in k.attribute if a.name == "out_dtype") for k in kernels]
    assert dtypes == [b"uint8"] * 3, dtypes
    assert push_quantize(model.graph) == 0  # nothing left to move


def test_a_value_read_outside_the_region_keeps_its_quantize():
    model = spp_model()
    graph = model.graph
    graph.output.append(helper.make_tensor_value_info("m", TensorProto.FLOAT, None))
    rewrite_int8_chains(model, int8_target("host"))
    ops = [n.op_type for n in graph.node]
    assert ops.count("QuantizeLinear") == 2, ops


@pytest.mark.parametrize("path", list(PATHS))
def test_concat_maxpool_resize_on_uint8_match_onnxruntime(path, tmp_path):
    got, want, rules = run_both(spp_model(), int8_target(path), tmp_path)
    assert got.dtype == want.dtype == np.uint8 and got.shape == want.shape
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.max() <= ONE_STEP
    assert np.mean(diff > 0) < 0.02
