"""Channels-last convolutions (backends/tvm/layout.py): the rewrite, its fallback, numerics."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm import relax

from kiln.backends.tvm import build_artifact, load
from kiln.backends.tvm.importer import lower_to_relax
from kiln.backends.tvm.layout import align_constant_ranks, channels_last_convs
from kiln.compiler.core.metrics import relative_error
from kiln.compiler.testing.onnx_models import to_ir
from kiln.compiler.testing.reference import REL_TOL, ort_outputs


def _const(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(array.astype(np.float32), name)


def conv_block(*, dropout_mask: bool = False) -> onnx.ModelProto:
    """Conv -> BN as Mul/Add with [C,1,1] constants (constant first) -> Clip -> 1x1 Conv
    -> Sum with the residual -> MaxPool; optionally a Dropout with its mask output."""
    rng = np.random.default_rng(0)
    inits = [
        _const("w1", rng.standard_normal((16, 8, 3, 3)) * 0.2),
        _const("scale", rng.uniform(0.5, 1.5, (16, 1, 1))),
        _const("shift", rng.standard_normal((16, 1, 1)) * 0.1),
        _const("lo", np.array(0.0)), _const("hi", np.array(6.0)),
        _const("w2", rng.standard_normal((16, 16, 1, 1)) * 0.2),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["scale", "c1"], ["bn"]),
        helper.make_node("Add", ["bn", "shift"], ["b1"]),
        helper.make_node("Clip", ["b1", "lo", "hi"], ["a1"]),
        helper.make_node("Conv", ["a1", "w2"], ["c2"]),
        helper.make_node("Sum", ["c2", "a1"], ["s"]),
        helper.make_node("MaxPool", ["s"], ["y"], kernel_shape=[2, 2], strides=[2, 2]),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 8, 8])]
    if dropout_mask:
        nodes.append(helper.make_node("Dropout", ["y"], ["d", "mask"]))
        outputs = [helper.make_tensor_value_info("d", TensorProto.FLOAT, [1, 16, 8, 8]),
                   helper.make_tensor_value_info("mask", TensorProto.BOOL, [1, 16, 8, 8])]
    graph = helper.make_graph(nodes, "conv_block",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16, 16])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _calls(mod: tvm.IRModule, op_name: str) -> list[relax.Call]:
    op = tvm.ir.Op.get(op_name)
    found: list[relax.Call] = []

    def visit(node) -> None:
        if isinstance(node, relax.Call) and isinstance(node.op, tvm.ir.Op) and node.op.same_as(op):
            found.append(node)

    relax.analysis.post_order_visit(mod["main"], visit)
    return found


def test_aligns_constant_ranks_and_puts_the_activation_first():
    mod = align_constant_ranks()(lower_to_relax(to_ir(conv_block())))
    for call in _calls(mod, "relax.multiply") + _calls(mod, "relax.add"):
        ranks = [int(arg.ty.ndim) for arg in call.args]
        assert ranks == [4, 4], call
        assert not isinstance(call.args[0], tvm.ir.GenericConst), call


def test_convolutions_run_channels_last_with_transposes_only_at_the_edges():
    mod = channels_last_convs()(lower_to_relax(to_ir(conv_block())))
    convs = _calls(mod, "relax.nn.conv2d")
    assert len(convs) == 2
    assert all(c.attrs.data_layout == "NHWC" and c.attrs.kernel_layout == "OHWI" for c in convs)
    transposes = _calls(mod, "relax.permute_dims")
    # the graph input into NHWC and the output back; weight transposes are folded
    assert len(transposes) == 2, mod.script()
    assert not any(isinstance(t.args[0], tvm.ir.GenericConst) for t in transposes)


@pytest.mark.parametrize("dropout_mask", [False, True], ids=["nhwc", "fallback-nchw"])
def test_built_model_matches_onnxruntime(dropout_mask, tmp_path):
    model = conv_block(dropout_mask=dropout_mask)
    if dropout_mask:  # TVM's layout inference gives up on the tuple output: stays NCHW
        mod = channels_last_convs()(lower_to_relax(to_ir(model)))
        assert all(c.attrs.data_layout == "NCHW" for c in _calls(mod, "relax.nn.conv2d"))
    build_artifact(to_ir(model), "host", tmp_path, model_hash="sha256:test")
    x = np.random.default_rng(1).standard_normal((1, 8, 16, 16)).astype(np.float32)
    ref = ort_outputs(model, {"x": x})
    out = load(tmp_path)(x)
    out = list(out) if isinstance(out, (list, tuple)) else [out]
    assert relative_error(out[0], ref[0]) < REL_TOL
    if dropout_mask:
        assert np.array_equal(out[1], ref[1])


def test_batch_norm_with_runtime_params_fuses_into_the_conv(tmp_path):
    """Inference batch norm (here with its statistics as graph inputs, as in the onnx
    light ResNet-50) is decomposed into elementwise ops that join the conv's kernel."""
    rng = np.random.default_rng(2)
    c = 16
    stats = ["gamma", "beta", "mean", "var"]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("BatchNormalization", ["c", *stats], ["y"])],
        "conv_bn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 12, 12])]
        + [helper.make_tensor_value_info(n, TensorProto.FLOAT, [c]) for n in stats],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 12, 12])],
        [_const("w", rng.standard_normal((c, 8, 3, 3)) * 0.2)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    result = build_artifact(to_ir(model), "host", tmp_path, model_hash="sha256:test")
    assert not any("batch_norm" in name for name in result.rules), result.rules
    feeds = {"x": rng.standard_normal((1, 8, 12, 12)).astype(np.float32),
             "gamma": rng.uniform(0.5, 1.5, c).astype(np.float32),
             "beta": rng.standard_normal(c).astype(np.float32),
             "mean": rng.standard_normal(c).astype(np.float32) * 0.1,
             "var": rng.uniform(0.5, 2.0, c).astype(np.float32)}
    out = load(tmp_path)(**feeds)
    out = out[0] if isinstance(out, (list, tuple)) else out
    (ref,) = ort_outputs(model, feeds)
    assert relative_error(out, ref) < REL_TOL


def test_constants_behind_dataflow_vars_are_folded_in_numpy():
    """A weight made by ConstantOfShape (broadcast_to of a scalar, as in the onnx light
    models) and then transposed: both fold, through the variable binding them."""
    from kiln.backends.tvm.layout import fold_constant_transposes

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 4, 8), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            w = bb.emit(relax.op.broadcast_to(relax.const(np.float32(0.5)), (16, 8, 3, 3)))
            w = bb.emit(relax.op.permute_dims(w, [0, 2, 3, 1]))
            y = bb.emit(relax.op.nn.conv2d(x, w, data_layout="NHWC", kernel_layout="OHWI"))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    mod = fold_constant_transposes()(bb.get())
    assert _calls(mod, "relax.broadcast_to") == [] and _calls(mod, "relax.permute_dims") == []
    weights = []
    relax.analysis.post_order_visit(
        mod["main"], lambda n: weights.append(n) if isinstance(n, tvm.ir.GenericConst) else None)
    assert any(w.value.numpy().shape == (16, 3, 3, 8) and np.all(w.value.numpy() == 0.5)
               for w in weights)


def test_a_folded_scalar_stays_a_scalar():
    """ONNX Min of two scalars (an expanded DynamicQuantizeLinear's) is broadcast_to
    shape () then stack: the folded constant kept rank 0 (numpy's ascontiguousarray
    makes it [1], and stack then failed on ranks 0 and 1)."""
    from kiln.backends.tvm.layout import fold_constant_transposes

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            c = bb.emit(relax.op.broadcast_to(relax.const(np.float32(0.0)), ()))
            y = bb.emit(relax.op.min(relax.op.stack([x, c], axis=0), axis=0))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    mod = fold_constant_transposes()(bb.get())
    assert _calls(mod, "relax.broadcast_to") == []
    ex = tvm.compile(mod, target="llvm")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    assert float(vm["main"](tvm.runtime.tensor(np.array(-2.0, np.float32))).numpy()) == -2.0
