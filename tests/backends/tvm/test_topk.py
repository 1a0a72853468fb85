"""TopK as kiln's heap kernel (backends.tvm.topk): the same values and indices as ONNX
Runtime (largest / smallest, any axis, ties by the lower index, NaN above every number,
float16 and int32 data, a MoE router's k=2 of 8), the kernel scheduled; a big k keeps
TVM's sort."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from kiln.backends.tvm import build_artifact, load
from kiln.compiler.testing.onnx_models import to_ir
from kiln.compiler.testing.reference import ort_outputs

pytest.importorskip("tvm")

from kiln.backends.tvm.topk import selects  # noqa: E402


def topk_model(shape, k: int, axis: int, largest: int, dtype=TensorProto.FLOAT):
    graph = helper.make_graph(
        [helper.make_node("TopK", ["x", "k"], ["values", "indices"], axis=axis,
                          largest=largest)], "topk",
        [helper.make_tensor_value_info("x", dtype, list(shape))],
        [helper.make_tensor_value_info("values", dtype, None),
         helper.make_tensor_value_info("indices", TensorProto.INT64, None)],
        [numpy_helper.from_array(np.array([k], np.int64), "k")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _data(shape, dtype, rng):
    if dtype == np.int32:
        return rng.integers(-6, 6, shape).astype(np.int32)  # many ties
    x = rng.integers(-6, 6, shape).astype(np.float32)  # many ties
    x.flat[::11] = np.nan
    x.flat[5::13] = -0.0  # equal to 0.0: ordered by index
    x.flat[7::17] = np.inf
    return x.astype(dtype)


def _build(tmp_path, model):
    result = build_artifact(to_ir(model), "host", tmp_path, model_hash="sha256:test")
    return result, load(tmp_path)


@pytest.mark.parametrize("shape, k, axis, largest, dtype", [
    ((4, 300), 10, -1, 1, np.float32),
    ((4, 300), 10, -1, 0, np.float32),
    ((3, 50, 5), 7, 1, 1, np.float32),   # not the last axis: strided rows
    ((64, 8), 2, -1, 1, np.float32),     # a MoE router's top 2 of 8 experts
    ((2, 9), 9, -1, 0, np.float32),      # k = n
    ((4, 3000), 1, -1, 1, np.float32),
    ((2, 500), 20, -1, 1, np.float16),
    ((3, 400), 16, -1, 0, np.int32),
], ids=["largest", "smallest", "axis-1", "moe", "k-eq-n", "k-1", "float16", "int32"])
def test_heap_kernel_matches_ort(tmp_path, shape, k, axis, largest, dtype):
    onnx_dtype = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    model = topk_model(shape, k, axis, largest, onnx_dtype)
    x = _data(shape, dtype, np.random.default_rng(4))
    result, module = _build(tmp_path, model)
    assert result.rules.get("kiln_topk") == "ir_builder", result.rules
    assert result.unscheduled == []
    got = module(x=x)
    want = ort_outputs(model, {"x": x})
    np.testing.assert_array_equal(np.asarray(got[1]), want[1])
    np.testing.assert_array_equal(np.asarray(got[0]), want[0])  # NaN == NaN here


def test_a_big_k_keeps_the_sort(tmp_path):
    assert selects(256, 300) and selects(1000, 8400) and not selects(4200, 8400)
    assert not selects(0, 8) and not selects(9, 8)
    model = topk_model((2, 600), 400, -1, 1)
    x = np.random.default_rng(5).standard_normal((2, 600)).astype(np.float32)
    result, module = _build(tmp_path, model)
    assert "kiln_topk" not in result.rules
    got = module(x=x)
    np.testing.assert_array_equal(np.asarray(got[1]), ort_outputs(model, {"x": x})[1])



def test_a_symbolic_row_count_serves_every_size():
    """A MoE router built for any token count (``--dim tokens=1..256``): one kernel."""
    import tvm
    from tvm import relax

    from kiln.backends.tvm.pipeline import relax_pipeline
    from kiln.backends.tvm.schedules import unscheduled_kernels
    from kiln.backends.tvm.targets import resolve_target

    from .schedules.relax_models import relax_module

    def fn(bb, v):
        both = bb.emit(relax.op.topk(v, 2, -1, "both", True, "int64"))
        return bb.emit(relax.TupleGetItem(both, 1))

    target, scheduled = resolve_target("host"), []
    mod = relax_module(fn, np.zeros((1, 8), np.float32),
                       shapes=[[tvm.tirx.Var("n", "int64"), 8]])
    vm = relax.VirtualMachine(tvm.compile(mod, target=target.tvm_target(), relax_pipeline=(
        relax_pipeline(target, None, scheduled.append))), tvm.cpu())
    assert "kiln_topk" in [g.name_hint for g in scheduled[-1].functions]
    assert unscheduled_kernels(scheduled[-1]) == []
    for rows in (1, 5, 37):
        x = np.random.default_rng(rows).standard_normal((rows, 8)).astype(np.float32)
        got = vm["main"](tvm.runtime.tensor(x)).numpy()
        np.testing.assert_array_equal(got, np.argsort(-x, axis=1, kind="stable")[:, :2])
