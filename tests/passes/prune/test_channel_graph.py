"""The channel dependency graph: coupled dims form one group (residual, depthwise, concat
with offsets, grouped conv by whole groups, flatten, attention heads), and groups it cannot follow are
refused with a reason (graph output, a MatMul of activations contracting over the channels,
a shared weight, Softmax over the channels, dynamic shapes); attention heads are units."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
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
    axis, in_pos, out_pos = reshape_mapping([1, 8, 2, 2], [1, 32], 1)
    assert axis == 1
    np.testing.assert_array_equal(in_pos, np.repeat(np.arange(8), 4))
    np.testing.assert_array_equal(out_pos, np.arange(32))
    assert reshape_mapping([2, 16, 64], [2, 16, 64], 2)[0] == 2
    assert reshape_mapping([2, 16, 64], [2, 16, 1, 64], 2)[0] == 3
    # a split into heads: channel c is head c // 16 of the outer axis
    axis, in_pos, out_pos = reshape_mapping([2, 16, 64], [2, 16, 4, 16], 2)
    assert axis == 2
    np.testing.assert_array_equal(in_pos, np.arange(64))
    np.testing.assert_array_equal(out_pos, np.arange(64) // 16)
    assert "merges it with others" in reshape_mapping([2, 6, 4], [3, 16], 1)


def test_attention_heads_are_units():
    """Q, K, V of one head and the output projection's rows of that head are one unit;
    the residual stream (output projection, FFN out) reaches x and y: refused."""
    model = prune_models.attention_block(d_model=32, heads=4, dynamo=False)
    infer_missing_shapes(model)  # the TorchScript exporter writes no value shapes
    groups = _groups(model)
    assert set(groups) == {("/k/MatMul", "/q/MatMul", "/v/MatMul"), ("/fc1/MatMul",),
                           ("/fc2/MatMul", "/o/MatMul")}
    heads = groups[("/k/MatMul", "/q/MatMul", "/v/MatMul")]
    assert heads.reason is None and heads.units == 4
    for name in ("/q/MatMul_output_0", "/k/Add_output_0", "/v/Add_output_0",
                 "/Reshape_3_output_0"):  # the last: heads merged back, read by o
        np.testing.assert_array_equal(heads.unit_of[(name, 2)], np.repeat(np.arange(4), 8))
    # Q K^T and P V keep the head axis (1) of both operands
    for name in ("/MatMul_output_0", "/Softmax_output_0", "/MatMul_1_output_0"):
        np.testing.assert_array_equal(heads.unit_of[(name, 1)], np.arange(4))
    assert groups[("/fc2/MatMul", "/o/MatMul")].reason == "it reaches graph input 'x'"
    assert ("y", 2) in groups[("/fc2/MatMul", "/o/MatMul")].dims


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
    assert group.reason == "it reaches graph output 'y'"  # also through the Reshape

    gram = _linear_then([helper.make_node("Transpose", ["h"], ["t"], perm=[0, 2, 1]),
                         helper.make_node("MatMul", ["h", "t"], ["y"], name="gram")], [2, 3, 3])
    assert ChannelGraph(gram).groups[0].reason == "MatMul gram contracts over it"

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


@pytest.mark.slow
def test_fused_in_projection_of_torch_multihead_attention_is_refused(tmp_path):
    """nn.MultiheadAttention's fused in_proj (one [d, 3d] MatMul, then a Gather per Q/K/V):
    refused with the reason; the FFN's hidden neurons stay prunable (torch.export)."""
    import onnx
    import torch

    from kiln.compiler.testing.torch_models import small_encoder

    module, (x,) = small_encoder()
    torch.onnx.export(module, (x,), tmp_path / "encoder.onnx", dynamo=True,
                      input_names=["x"], external_data=False)
    model = ir.from_proto(onnx.load(str(tmp_path / "encoder.onnx")))
    infer_missing_shapes(model)
    reasons = [(g.units or g.sizes[g.dims[0]], g.reason) for g in ChannelGraph(model).groups]
    assert reasons[0] == (192, "Gather node_select reads it; its channel mapping is unknown")
    assert (1024, None) in reasons
