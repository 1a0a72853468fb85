"""merge_branches: RepVGG 3x3 + 1x1 + identity (each with BN) -> one Conv; grouped and
strided blocks; refusals; idempotence; a torch RepVGG model through the pipeline vs ORT."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from kiln.compiler.core import graph as kir
from kiln.passes.reparam.merge_branches import MergeBranches

# float32 rounding of the merged kernel (sums of 3 folded branches), relative to |y|
ATOL = 2e-5


def _init(name, array):
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def _block(groups=1, stride=1, identity=True, bn=True, one_pads=0, dilation=1):
    """x -> Conv3x3 [BN] + Conv1x1 [BN] (+ BN(x)) summed by Adds, 8 channels."""
    rng = np.random.default_rng(3)
    c = 8
    inits, nodes = [], []

    def bn_node(inp, out, prefix):
        inits.extend([_init(f"{prefix}.g", rng.uniform(0.5, 1.5, c)),
                      _init(f"{prefix}.b", rng.standard_normal(c)),
                      _init(f"{prefix}.m", rng.standard_normal(c)),
                      _init(f"{prefix}.v", rng.uniform(0.5, 1.5, c))])
        nodes.append(helper.make_node("BatchNormalization", [inp] + [
            f"{prefix}.{k}" for k in "gbmv"], [out], name=prefix, epsilon=1e-3))

    for name, k, pad in (("dense", 3, 1), ("one", 1, one_pads)):
        inits.append(_init(f"{name}.w", rng.standard_normal((c, c // groups, k, k))))
        out = f"{name}.c" if bn else name
        nodes.append(helper.make_node("Conv", ["x", f"{name}.w"], [out], name=name,
                                      pads=[pad] * 4, strides=[stride] * 2, group=groups,
                                      dilations=[dilation] * 2 if name == "dense" else [1, 1]))
        if bn:
            bn_node(out, name, f"{name}.bn")
    nodes.append(helper.make_node("Add", ["dense", "one"], ["s"], name="add"))
    last = "s"
    if identity:
        bn_node("x", "idn", "id.bn")
        nodes.append(helper.make_node("Add", ["s", "idn"], ["y"], name="add2"))
        last = "y"
    nodes.append(helper.make_node("Relu", [last], ["out"], name="relu"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [1, c, 10, 10])], [helper.make_tensor_value_info(
            "out", TensorProto.FLOAT, None)], initializer=inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(proto))


def _run(model, x):
    session = ort.InferenceSession(kir.model_bytes(model), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _check(model):
    x = np.random.default_rng(0).standard_normal((1, 8, 10, 10)).astype(np.float32)
    before = _run(model, x)
    result = MergeBranches()(model)
    after = _run(model, x)
    np.testing.assert_allclose(after, before, atol=ATOL * np.abs(before).max())
    return result


def test_repvgg_block_becomes_one_conv():
    model = _block()
    assert _check(model).modified
    assert [n.op_type for n in model.graph] == ["Conv", "Relu"]
    conv = next(iter(model.graph))
    assert kir.constant_tensor(conv.inputs[1]).shape == (8, 8, 3, 3)
    assert list(conv.attributes.get_ints("pads")) == [1, 1, 1, 1]
    assert not MergeBranches()(model).modified  # idempotent


def test_grouped_identity_and_no_bn():
    model = _block(groups=4)
    _check(model)
    assert [n.op_type for n in model.graph] == ["Conv", "Relu"]
    model = _block(bn=False, identity=False)
    _check(model)
    assert [n.op_type for n in model.graph] == ["Conv", "Relu"]


def test_strided_block_without_identity():
    model = _block(stride=2, identity=False)
    _check(model)
    assert [n.op_type for n in model.graph] == ["Conv", "Relu"]


def test_refusals_name_the_reason():
    model = _block(one_pads=1)  # a 1x1 padded by 1 is not centred in the 3x3 output grid
    merge = MergeBranches()
    assert not merge(model).modified
    assert "not centred" in merge.last_candidates[0].reason
    merge = MergeBranches()
    assert not merge(_block(dilation=2)).modified
    assert merge.last_candidates[0].reason == "dilated Conv"


def test_shared_weight_is_refused():
    model = _block(identity=False)
    graph = model.graph
    dense = next(n for n in graph if n.name == "dense")
    extra = ir.Node("", "Conv", [graph.inputs[0], dense.inputs[1]], name="other",
                    attributes=[ir.AttrInt64s("pads", [1, 1, 1, 1])], num_outputs=1)
    graph.append(extra)
    extra.outputs[0].name = "other_out"
    graph.outputs.append(extra.outputs[0])
    merge = MergeBranches()
    assert not merge(model).modified
    assert "shared" in merge.last_candidates[0].reason


def test_torch_repvgg_through_the_pipeline(tmp_path):
    """BN stats randomized, eval mode, exported; kiln compile verifies to float32 tolerance."""
    from kiln.compiler.driver.compile import compile_model
    from kiln.compiler.driver.specs import spec_from_text
    from kiln.compiler.testing.reparam_models import repvgg_blocks

    module, args = repvgg_blocks()
    source = tmp_path / "repvgg.onnx"
    torch.onnx.export(module, args, source, dynamo=True, optimize=False)
    result = compile_model(source, spec_from_text("kiln: 1\npasses:\n  - merge_branches: {}\n"))
    merge = next(p for p in result.report.passes if p.name == "merge_branches")
    assert merge.matched == 3
    assert [n.op_type for n in result.model.graph] == ["Conv", "Relu"] * 3
    x = args[0].numpy()
    session = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    expected = session.run(None, {session.get_inputs()[0].name: x})[0]
    got = ort.InferenceSession(kir.model_bytes(result.model), providers=[
        "CPUExecutionProvider"]).run(None, {session.get_inputs()[0].name: x})[0]
    np.testing.assert_allclose(got, expected, atol=ATOL * np.abs(expected).max())
    np.testing.assert_allclose(got, module(*args).detach().numpy(),
                               atol=ATOL * np.abs(expected).max())
