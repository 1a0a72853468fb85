"""The channel dependency graph: coupled dims form one group (residual, depthwise, concat
with offsets, grouped conv by whole groups, flatten), and groups it cannot follow are
refused with a reason (graph output, a Reshape splitting heads, a shared weight,
Softmax over the channels, dynamic shapes)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper

from kiln.compiler.testing import prune_models
from kiln.compiler.testing.quant_models import build, init
from kiln.passes.prune.channel_graph import ChannelGraph, infer_missing_shapes, reshape_mapping


def _groups(model):
    return {tuple(sorted(p.node.name for p in g.producers)): g for g in ChannelGraph(model).groups}


def test_coupled_cnn_groups():
    groups = _groups(prune_models.coupled_cnn(width=8))
    assert set(groups) == {("conv1", "conv2", "dw"), ("conv3", "gconv"), ("fc",)}
    first = groups[("conv1", "conv2", "dw")]
    assert first.reason is None and first.units == 8
    # residual add, relu and the depthwise conv share channel k; concat holds both copies
    assert {d for d in first.dims} >= {("c1", 1), ("c2", 1), ("s", 1), ("a", 1), ("d0", 1),
                                      ("d1", 1), ("cat", 1)}
    np.testing.assert_array_equal(first.unit_of[("c1", 1)], first.unit_of[("c2", 1)])
    np.testing.assert_array_equal(first.unit_of[("cat", 1)],
                                  np.concatenate([first.unit_of[("a", 1)],
                                                  first.unit_of[("d", 1)]]))
    # grouped conv (group 2): only whole groups can go -> 2 units, through pool and flatten
    second = groups[("conv3", "gconv")]
    assert second.reason is None and second.units == 2
    np.testing.assert_array_equal(second.unit_of[("c3", 1)], [0] * 6 + [1] * 6)
    np.testing.assert_array_equal(second.unit_of[("g", 1)], [0] * 4 + [1] * 4)
    assert ("f", 1) in second.dims
    assert groups[("fc",)].reason == "it reaches graph output 'y'"


def test_reshape_mapping():
    axis, channel = reshape_mapping([1, 8, 2, 2], [1, 32], 1)
    assert axis == 1
    np.testing.assert_array_equal(channel, np.repeat(np.arange(8), 4))
    assert reshape_mapping([2, 16, 64], [2, 16, 64], 2)[0] == 2
    assert reshape_mapping([2, 16, 64], [2, 16, 1, 64], 2)[0] == 3
    assert "splits the channel axis" in reshape_mapping([2, 16, 64], [2, 16, 4, 16], 2)


def _linear_then(op_nodes, out_shape, extra_inits=(), hidden=16):
    rng = np.random.default_rng(0)
    inits = [init("w", rng.standard_normal((8, hidden)))] + list(extra_inits)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="fc")] + op_nodes
    model = build(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)])
    infer_missing_shapes(model)
    return model


def test_refusals_name_the_reason():
    heads = _linear_then([helper.make_node("Reshape", ["h", "shape"], ["y"], name="split")],
                         [2, 3, 4, 4], [helper.make_tensor("shape", TensorProto.INT64, [4],
                                                           [2, 3, 4, 4])])
    (group,) = ChannelGraph(heads).groups
    assert group.reason == "Reshape split: it splits the channel axis (16) into 2 axes"

    softmax = _linear_then([helper.make_node("Softmax", ["h"], ["s"], name="sm", axis=-1),
                            helper.make_node("Relu", ["s"], ["y"])], [2, 3, 16])
    assert ChannelGraph(softmax).groups[0].reason == \
        "Softmax sm normalizes over the channel axis 2"

    shared = _linear_then([helper.make_node("Relu", ["h"], ["r"]),
                           helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2"),
                           helper.make_node("MatMul", ["r", "w2"], ["z"], name="fc3")], [2, 3, 4],
                          [init("w2", np.ones((16, 4)))])
    shared.graph.outputs.append(shared.graph.node(3).outputs[0])
    assert ChannelGraph(shared).groups[0].reason == "weight 'w2' of fc2 is shared"


def test_symbolic_batch_is_fine_a_symbolic_channel_is_refused():
    rng = np.random.default_rng(0)

    def model(hidden):
        return build([helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
                      helper.make_node("Relu", ["h"], ["r"]),
                      helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")],
                     [init("w", rng.standard_normal((8, 16))), init("w2", np.ones((16, 4)))],
                     [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
                     [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])])

    ok = model(16)
    infer_missing_shapes(ok)
    first = ChannelGraph(ok).groups[0]
    assert first.reason is None and first.units == 16
    odd = model(16)
    infer_missing_shapes(odd)
    odd.graph.node(0).outputs[0].shape = ir.Shape(["n", "k"])
    assert ChannelGraph(odd).groups[0].reason == \
        "'h' has no static size on axis 1 (bind input shapes first)"
