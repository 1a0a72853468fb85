"""A symbolic-shape build fuses what the fixed-shape build fuses
(``kiln.backends.tvm.pipeline.symbolic_shapes``): a static dim read from a partly symbolic
``Shape`` folds to a constant, and reshapes over a symbolic dim fuse with the transposes
around them."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from kiln.compiler.driver.symbolic import load_with_symbols

tvm = pytest.importorskip("tvm")

#: the compiled module against ONNX Runtime (data movement and one multiply: exact)
MATCH_TOL = 1e-6


def _heads_model(path):
    """x [1, S, 192] -> [S, 1, 3, 64] -> [3, S, 1, 64], head 1 picked by a Gather (as
    torch's exporter writes ``qkv[1]``: TVM's importer normalizes the index through
    the input's shape), then [S, 4, 16] -> [4, S, 16] * 0.5."""
    def const(name, values, dims=None):
        return helper.make_node("Constant", [], [name], value=helper.make_tensor(
            name, TensorProto.INT64, [len(values)] if dims is None else dims, values))

    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0, 2]),
             const("s1", [-1, 1, 3, 64]), helper.make_node("Reshape", ["t", "s1"], ["r"]),
             helper.make_node("Transpose", ["r"], ["u"], perm=[2, 0, 1, 3]),
             const("index", [1], []),
             helper.make_node("Gather", ["u", "index"], ["g"], axis=0),
             const("s2", [-1, 4, 16]), helper.make_node("Reshape", ["g", "s2"], ["h"]),
             helper.make_node("Transpose", ["h"], ["p"], perm=[1, 0, 2]),
             helper.make_node("Constant", [], ["half"], value=helper.make_tensor(
                 "half", TensorProto.FLOAT, [], [0.5])),
             helper.make_node("Mul", ["p", "half"], ["y"])]
    graph = helper.make_graph(
        nodes, "heads", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "S", 192])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, "S", 16])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_reshape_groups():
    from kiln.backends.tvm.pipeline.symbolic_shapes import reshape_groups

    s = tvm.tirx.Var("S", "int64")
    i64 = [tvm.tirx.IntImm("int64", n) for n in range(257)]
    assert reshape_groups([s, i64[1], i64[256]], [s, i64[4], i64[64]]) == [([0], [0]),
                                                                           ([2], [1, 2])]
    assert reshape_groups([i64[4], s, i64[64]], [i64[1], i64[4], s, i64[64]]) == [
        ([0], [1]), ([1], [2]), ([2], [3])]
    assert reshape_groups([s, i64[4]], [s * 4]) is None  # the symbolic dim merged
    assert reshape_groups([i64[2], s], [s, i64[2]]) is None  # moved: not a reshape group


def test_symbolic_build_runs_the_fixed_builds_kernels(tmp_path):
    from kiln.backends.tvm import build_artifact, load

    path = _heads_model(tmp_path / "heads.onnx")
    symbolic = build_artifact(load_with_symbols(str(path), {"x": [1, "S=2..64", 192]}), "host",
                              tmp_path / "sym", model_hash="t")
    fixed = build_artifact(load_with_symbols(str(path), {"x": [1, 8, 192]}), "host",
                           tmp_path / "fixed", model_hash="t")
    # before: shape_to_tensor, take, add/where per index, and each reshape kept the
    # transposes around it apart (6 kernels against the fixed build's 3)
    assert len(symbolic.rules) == len(fixed.rules), (symbolic.rules, fixed.rules)
    assert not any("shape_to_tensor" in name for name in symbolic.rules)
    compiled = load(tmp_path / "sym")
    session = ort.InferenceSession(str(path))
    rng = np.random.default_rng(0)
    for size in (2, 7, 64):
        x = rng.standard_normal((1, size, 192)).astype(np.float32)
        np.testing.assert_allclose(compiled(x)[0], session.run(None, {"x": x})[0],
                                   rtol=MATCH_TOL, atol=MATCH_TOL)
