"""load_time: weights mixed from shared constants (template_share) move out of main into
kiln_init; a product of unshared constants, a shared weight read directly and a model
without either stay as they are; their packing for the matmul kernels runs in kiln_init;
the runtime calls kiln_init once and passes its results."""

from __future__ import annotations

import threading

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from kiln.backends.tvm import lower_to_relax
from kiln.backends.tvm.load_time import (
    INIT_FUNCTION,
    MANIFEST_KEY,
    move_shared_mixing_to_load_time,
)
from kiln.compiler.testing.block_models import residual_mlp
from kiln.compiler.testing.quant_models import feeds, run
from kiln.passes.share.share_blocks import ShareBlocks, ShareBlocksConfig
from kiln.passes.share.template_share import TemplateShare, TemplateShareConfig

#: TVM's float32 kernels vs ONNX Runtime's
TVM_TOL = 1e-4


def _templates(blocks: int = 4) -> ir.Model:
    model = residual_mlp(blocks)
    TemplateShare(TemplateShareConfig(templates=2))(model)
    return model


def _product_of_unshared_constants() -> ir.Model:
    """y = x @ (A @ B): a mix of two constants no other computation reads."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("a", (16, 4)), ("b", (4, 16)))]
    nodes = [helper.make_node("MatMul", ["a", "b"], ["w"]),
             helper.make_node("MatMul", ["x", "w"], ["y"])]
    graph = helper.make_graph(
        nodes, "product", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 16])], initializer=inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ir.serde.deserialize_model(proto)


def test_template_mixes_move_to_kiln_init():
    mod = lower_to_relax(_templates(), target_name="host")
    moved, count = move_shared_mixing_to_load_time(mod)
    assert count == 8                                   # w1 and w2 of 4 blocks
    main = moved["main"]
    assert len(main.params) == 1 + 8
    assert [tuple(int(d) for d in p.ty.shape) for p in main.params[1:]] == \
        [(128, 512), (512, 128)] * 4
    assert len(moved[INIT_FUNCTION].params) == 0
    assert len(moved[INIT_FUNCTION].ret_ty.fields) == 8
    assert _constant_calls(main) == 0 < _constant_calls(mod["main"])


def _constant_calls(func) -> int:
    """Calls in ``func`` whose operands are all constants (what folding would store)."""
    import tvm
    from tvm import relax

    found = []

    def visit(node) -> None:
        if isinstance(node, relax.Call) and node.args and all(
                isinstance(a, tvm.ir.GenericConst) for a in node.args
                if isinstance(a.ty, relax.TensorType)) and any(
                isinstance(a.ty, relax.TensorType) for a in node.args):
            found.append(node)

    relax.analysis.post_order_visit(func, visit)
    return len(found)


@pytest.mark.parametrize("make", [
    residual_mlp,
    _product_of_unshared_constants,
    lambda: _shared_blocks(),
], ids=["plain", "unshared-product", "share-blocks"])
def test_nothing_to_move(make):
    mod = lower_to_relax(make(), target_name="host")
    same, count = move_shared_mixing_to_load_time(mod)
    assert count == 0 and same is mod


def _shared_blocks() -> ir.Model:
    model = residual_mlp()
    ShareBlocks(ShareBlocksConfig(group_size="all"))(model)
    return model


def test_runtime_computes_the_weights_once_per_library(tmp_path):
    from kiln.backends.tvm.build import build_artifact
    from kiln.backends.tvm.manifest import read_manifest
    from kiln.backends.tvm.runtime import load

    model = _templates(2)
    built = build_artifact(model, "host", tmp_path, model_hash="load-time")
    assert read_manifest(tmp_path).extra[MANIFEST_KEY] == 4
    # the weights are packed for the matmul kernels, at load time (kiln_init)
    matmuls = [k for k in built.rules if "matmul" in k and "prepack" in k]
    assert sorted(k.endswith("_weight_prepack") for k in matmuls) == [False, False, True, True]
    inputs = feeds(model, seed=5)
    (want,) = run(model, inputs)
    compiled = load(tmp_path, threads=1)
    results: list[np.ndarray] = []
    worker = threading.Thread(target=lambda: results.append(compiled(inputs["x"])[0]))
    worker.start()
    worker.join()
    results.append(compiled(inputs["x"])[0])
    for got in results:                                   # a second thread's VM too
        np.testing.assert_allclose(got, want, rtol=TVM_TOL, atol=TVM_TOL)
