"""Inference batch norm folding (backends/tvm/batchnorm.py): into the conv before it, as a
multiply-add elsewhere, refused where a parameter is not constant; numerics vs ORT."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm import relax

from kiln.backends.tvm import build_artifact, load
from kiln.backends.tvm.batchnorm import fold_inference_batchnorm
from kiln.backends.tvm.importer import lower_to_relax
from kiln.compiler.core.metrics import relative_error
from kiln.compiler.testing.onnx_models import to_ir
from kiln.compiler.testing.reference import REL_TOL, ort_outputs

C = 16
BN_PARAMS = ["gamma", "beta", "mean", "var"]


def _bn_params(rng: np.random.Generator, prefix: str) -> list[onnx.TensorProto]:
    values = [rng.uniform(0.5, 1.5, C), rng.standard_normal(C), rng.standard_normal(C) * 0.1,
              rng.uniform(0.5, 2.0, C)]
    return [numpy_helper.from_array(v.astype(np.float32), f"{prefix}{n}")
            for n, v in zip(BN_PARAMS, values, strict=True)]


def _model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], *,
           extra_inputs: tuple[str, ...] = (), outputs: tuple[str, ...] = ("y",)) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "bn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, 10, 10])]
        + [helper.make_tensor_value_info(n, TensorProto.FLOAT, [C]) for n in extra_inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, C, 10, 10]) for n in outputs],
        inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])


def residual_block(*, conv_bias: bool = False) -> onnx.ModelProto:
    """Conv -> BN -> Relu -> Conv -> BN -> Add(residual x) -> Relu (a ResNet block)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal((C, C, 3, 3)) * 0.2).astype(np.float32),
                                     name) for name in ("w1", "w2")]
    inits += _bn_params(rng, "a_") + _bn_params(rng, "b_")
    conv1 = ["x", "w1"]
    if conv_bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(C).astype(np.float32), "cb"))
        conv1.append("cb")
    nodes = [
        helper.make_node("Conv", conv1, ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", *(f"a_{n}" for n in BN_PARAMS)], ["n1"]),
        helper.make_node("Relu", ["n1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c2", *(f"b_{n}" for n in BN_PARAMS)], ["n2"]),
        helper.make_node("Add", ["n2", "x"], ["s"]),
        helper.make_node("Relu", ["s"], ["y"]),
    ]
    return _model(nodes, inits)


def _calls(mod: tvm.IRModule, op_name: str) -> list[relax.Call]:
    op = tvm.ir.Op.get(op_name)
    found: list[relax.Call] = []

    def visit(node) -> None:
        if isinstance(node, relax.Call) and isinstance(node.op, tvm.ir.Op) and node.op.same_as(op):
            found.append(node)

    relax.analysis.post_order_visit(mod["main"], visit)
    return found


def _run(model: onnx.ModelProto, tmp_path, feeds: dict[str, np.ndarray]):
    result = build_artifact(to_ir(model), "host", tmp_path, model_hash="sha256:test")
    out = load(tmp_path)(**feeds)
    return result, list(out) if isinstance(out, (list, tuple)) else [out]


def _x() -> np.ndarray:
    return np.random.default_rng(1).standard_normal((1, C, 10, 10)).astype(np.float32)


@pytest.mark.parametrize("conv_bias", [False, True], ids=["no-bias", "conv-bias"])
def test_folds_into_the_conv_weights(conv_bias):
    model = residual_block(conv_bias=conv_bias)
    before = lower_to_relax(to_ir(model))
    mod = fold_inference_batchnorm()(before)
    assert len(_calls(before, "relax.nn.batch_norm")) == 2
    assert _calls(mod, "relax.nn.batch_norm") == []
    assert _calls(mod, "relax.multiply") == []  # the scale went into the weights
    convs = _calls(mod, "relax.nn.conv2d")
    assert len(convs) == 2
    weights = {id(c): c.args[1].value.numpy() for c in convs}
    w1 = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "w1"))
    gamma, _, _, var = (numpy_helper.to_array(i) for i in model.graph.initializer
                        if i.name.startswith("a_"))
    expected = w1 * (gamma / np.sqrt(var + 1e-5)).reshape(C, 1, 1, 1)
    assert any(np.allclose(w, expected, rtol=1e-6) for w in weights.values())
    tvm.ir.assert_structural_equal(fold_inference_batchnorm()(mod), mod)  # idempotent


@pytest.mark.parametrize("conv_bias", [False, True], ids=["no-bias", "conv-bias"])
def test_residual_block_is_two_kernels_and_matches_onnxruntime(conv_bias, tmp_path):
    model = residual_block(conv_bias=conv_bias)
    result, (out,) = _run(model, tmp_path, {"x": _x()})
    kernels = [name for name in result.rules if "transpose" not in name]
    assert len(kernels) == 2, result.rules
    assert all("conv2d" in name and "relu" in name for name in kernels), kernels
    (ref,) = ort_outputs(model, {"x": _x()})
    assert relative_error(out, ref) < REL_TOL


def test_batch_norm_without_a_conv_becomes_a_multiply_add(tmp_path):
    """BN of the graph input, and BN of a conv output that something else reads too: both
    are x * s + t (the shared conv's weights are left as they are)."""
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((C, C, 1, 1)) * 0.2).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w"), *_bn_params(rng, "a_"), *_bn_params(rng, "b_")]
    nodes = [
        helper.make_node("BatchNormalization", ["x", *(f"a_{n}" for n in BN_PARAMS)], ["n1"]),
        helper.make_node("Conv", ["n1", "w"], ["c"]),
        helper.make_node("BatchNormalization", ["c", *(f"b_{n}" for n in BN_PARAMS)], ["n2"]),
        helper.make_node("Relu", ["n2"], ["r"]),
        helper.make_node("Add", ["r", "c"], ["y"]),
    ]
    model = _model(nodes, inits)
    mod = fold_inference_batchnorm()(lower_to_relax(to_ir(model)))
    assert _calls(mod, "relax.nn.batch_norm") == []
    assert len(_calls(mod, "relax.multiply")) == 2
    (conv,) = _calls(mod, "relax.nn.conv2d")
    assert np.array_equal(conv.args[1].value.numpy(), w)
    _, (out,) = _run(model, tmp_path, {"x": _x()})
    (ref,) = ort_outputs(model, {"x": _x()})
    assert relative_error(out, ref) < REL_TOL


def test_refuses_runtime_parameters_and_read_statistics():
    """Statistics as graph inputs: not constants, the batch norm stays (DecomposeOps-
    ForInference lowers it later); same for a batch norm whose mean output is read."""
    rng = np.random.default_rng(4)
    w = numpy_helper.from_array((rng.standard_normal((C, C, 1, 1)) * 0.2).astype(np.float32), "w")
    runtime = _model([helper.make_node("Conv", ["x", "w"], ["c"]),
                      helper.make_node("BatchNormalization", ["c", *BN_PARAMS], ["y"])],
                     [w], extra_inputs=tuple(BN_PARAMS))
    mod = fold_inference_batchnorm()(lower_to_relax(to_ir(runtime)))
    assert len(_calls(mod, "relax.nn.batch_norm")) == 1

    # a relax-level batch norm whose mean output is read as well as its data output
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, C, 4, 4), "float32"))
    params = [relax.const(np.ones(C, np.float32)) for _ in range(4)]
    with bb.function("main", [x]):
        with bb.dataflow():
            bn = bb.emit(relax.op.nn.batch_norm(x, *params, axis=1))
            y = bb.emit(relax.TupleGetItem(bn, 0))
            mean = bb.emit(relax.TupleGetItem(bn, 1))
            out = bb.emit_output(relax.Tuple([y, mean]))
        bb.emit_func_output(out)
    mod = fold_inference_batchnorm()(bb.get())
    assert len(_calls(mod, "relax.nn.batch_norm")) == 1
