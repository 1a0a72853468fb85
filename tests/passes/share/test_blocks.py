"""blocks: residual blocks x + f(x) found in hand-written graphs and the exported
transformer, what is not a block (a branch reading another input, an inner value used
outside, a graph output inside), no nesting, and signatures that ignore weight values
but not structure or structural constants."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from kiln.compiler.core.frontend import load_model
from kiln.compiler.testing.block_models import export_transformer
from kiln.passes.share.blocks import find_blocks, identical_groups, is_weight

DIM = 4


def _model(nodes, inits, outputs=("y",), inputs=("x",)) -> ir.Model:
    rng = np.random.default_rng(0)
    tensors = [numpy_helper.from_array(
        np.asarray(v, np.float32) if not isinstance(v, str) else
        rng.standard_normal((DIM, DIM)).astype(np.float32), k) for k, v in inits.items()]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, DIM])
                     for n in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, DIM]) for n in outputs],
        initializer=tensors)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    return ir.serde.deserialize_model(proto)


def _chain(scale_a=2.0, scale_b=2.0):
    """Two blocks h = x + relu(x W1) * s_a and y = h + relu(h W2) * s_b."""
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"], name="mm1"),
             helper.make_node("Relu", ["m1"], ["r1"], name="relu1"),
             helper.make_node("Mul", ["r1", "s1"], ["f1"], name="mul1"),
             helper.make_node("Add", ["x", "f1"], ["h"], name="add1"),
             helper.make_node("MatMul", ["h", "w2"], ["m2"], name="mm2"),
             helper.make_node("Relu", ["m2"], ["r2"], name="relu2"),
             helper.make_node("Mul", ["r2", "s2"], ["f2"], name="mul2"),
             helper.make_node("Add", ["f2", "h"], ["y"], name="add2")]
    return nodes, {"w1": "random", "w2": "random", "s1": scale_a, "s2": scale_b}


def test_finds_a_chain_of_blocks_and_their_weights():
    nodes, inits = _chain()
    model = _model(nodes, inits)
    first, second = find_blocks(model)
    assert [n.name for n in first.nodes] == ["mm1", "relu1", "mul1"]
    assert first.x.name == "x" and first.output.name == "h"
    assert second.x.name == "h" and second.add.name == "add2"   # (f, x) input order too
    assert [w.name for w in second.weights()] == ["w2"]          # the scalar is structure
    assert first.signature == second.signature
    assert [len(g) for g in identical_groups([first, second])] == [2]


def test_structural_constants_split_signatures():
    nodes, inits = _chain(scale_a=2.0, scale_b=3.0)
    first, second = find_blocks(_model(nodes, inits))
    assert first.signature != second.signature
    assert len(identical_groups([first, second])) == 2


def test_what_is_not_a_block():
    nodes, inits = _chain()
    # an inner value (relu1's output) also read outside the branch
    leak = _model(nodes + [helper.make_node("Neg", ["r1"], ["z"], name="neg")], inits,
                  outputs=("y", "z"))
    assert [b.add.name for b in find_blocks(leak)] == ["add2"]
    # a graph output inside the branch
    exposed = _model(nodes, inits, outputs=("y", "m2"))
    assert [b.add.name for b in find_blocks(exposed)] == ["add1"]
    # a branch reading another graph input is not f(x)
    other = [helper.make_node("Mul", ["x", "u"], ["f"], name="mul"),
             helper.make_node("Add", ["x", "f"], ["y"], name="add")]
    assert find_blocks(_model(other, {}, inputs=("x", "u"))) == []
    # a plain sum of two inputs, and x + x
    assert find_blocks(_model([helper.make_node("Add", ["x", "u"], ["y"])], {},
                              inputs=("x", "u"))) == []
    assert find_blocks(_model([helper.make_node("Add", ["x", "x"], ["y"])], {})) == []


def test_blocks_do_not_nest():
    """An outer x + g(x) whose g holds the inner block h = x' + f(x'): only the inner one."""
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="pre"),
             helper.make_node("MatMul", ["a", "w1"], ["m"], name="mm1"),
             helper.make_node("Add", ["a", "m"], ["h"], name="inner"),
             helper.make_node("MatMul", ["h", "w2"], ["g"], name="mm2"),
             helper.make_node("Add", ["x", "g"], ["y"], name="outer")]
    blocks = find_blocks(_model(nodes, {"w1": "random", "w2": "random"}))
    assert [b.add.name for b in blocks] == ["inner"]


def test_exported_transformer_blocks(tmp_path):
    model = load_model(export_transformer(tmp_path / "t.onnx", layers=2))
    blocks = find_blocks(model)
    assert len(blocks) == 4
    attention, mlp = identical_groups(blocks)
    assert [b.label for b in attention] == ["/blocks.0/Add", "/blocks.2/Add"]
    assert [b.label for b in mlp] == ["/blocks.1/Add_1", "/blocks.3/Add_1"]
    # LayerNorm scale and bias, then q, k, v, out (weight and bias); fc1, fc2 likewise
    assert len(attention[0].weights()) == 10 and len(mlp[0].weights()) == 6
    assert all(is_weight(w) for b in blocks for w in b.weights())
    inside = {id(n) for b in blocks for n in (*b.nodes, b.add)}
    outside = [n.name for n in model.graph if id(n) not in inside]
    assert outside and all(not name.startswith("/blocks.") for name in outside)
