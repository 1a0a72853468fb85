"""Lowering to Relax: unsupported-op report, static shapes, compressed weights kept."""

from __future__ import annotations

import onnx_ir as ir
import pytest

from kiln.backends.tvm import lower_to_relax, resolve_target
from kiln.backends.tvm.pipeline import build_phases
from kiln.compiler.core.errors import LoweringError

from .onnx_models import blocked_int4_matmul, tiny_cnn, to_ir, with_unsupported_ops


def test_unsupported_ops_are_all_listed_once():
    with pytest.raises(LoweringError) as info:
        lower_to_relax(to_ir(with_unsupported_ops()), target_name="host")
    error = info.value
    assert error.ops == {"Loop": "loop_1", "com.microsoft::Gelu": "ms_gelu",
                         "MelWeightMatrix": "mel_1"}
    message = str(error)
    assert message.startswith("target 'host': 3 unsupported op type(s)")
    assert "mel_2" not in message  # one node named per op type


def test_dynamic_input_is_refused():
    model = to_ir(tiny_cnn())
    model.graph.inputs[0].shape = ir.Shape(["batch", 3, 32, 32])
    with pytest.raises(LoweringError, match="static shapes.*'x'"):
        lower_to_relax(model)


def _constants(mod):
    """(dtype, shape) of every constant the Relax main function uses."""
    from tvm import relax
    from tvm.relax.expr_functor import PyExprVisitor, visitor

    found = []

    @visitor
    class Collect(PyExprVisitor):
        def visit_generic_const_(self, op):
            found.append((str(op.value.dtype), tuple(op.value.shape)))

    for _, func in mod.functions.items():
        if isinstance(func, relax.Function):
            Collect().visit_expr(func)
    return found


def test_int4_weights_stay_packed_through_folding():
    """The 128x64 int4 weight is 4096 bytes of uint8 after lowering and after the
    legalize phase's constant folding: no float32 copy of it appears."""
    import tvm

    mod = lower_to_relax(to_ir(blocked_int4_matmul(k=128, n=64)))
    # 32-column nibble tiles: P[n // 32, k, n % 16] (dequantize.pack_nibbles_tiled)
    assert ("uint8", (2, 128, 16)) in _constants(mod)
    target = resolve_target("host")
    with target.tvm_target():
        legalized = tvm.transform.Sequential(build_phases(target).legalize)(mod)
    constants = _constants(legalized)
    assert ("uint8", (2, 128, 16)) in constants
    assert not [c for c in constants if c[0] == "float32" and c[1] == (128, 64)]


def test_decode_fuses_into_its_matmul_and_stays_exact(tmp_path):
    """With fusion (the CUDA legalize phase), the int4 decode and the matmul become one
    PrimFunc that reads the packed uint8 weight; built for the host it is still exact."""
    import numpy as np
    import tvm
    from tvm import relax, tirx

    from kiln.backends.tvm.fuse_decode import fuse_decode_into_contraction
    from kiln.backends.tvm.pipeline import _legalize

    from .onnx_models import REL_TOL, ort_outputs, relative_error

    model = blocked_int4_matmul(k=128, n=64, m=8)  # 8 rows: past the grouped-GEMV form
    mod = lower_to_relax(to_ir(model))
    target = resolve_target("host")
    with target.tvm_target():
        fused = tvm.transform.Sequential(_legalize(target.tvm_target(), fuse_decode=True))(mod)
    kernels = {gv.name_hint: f for gv, f in fused.functions.items() if isinstance(f, tirx.PrimFunc)}
    assert len(kernels) == 1 and "matmul" in next(iter(kernels))
    assert ("uint8", (2, 128, 16)) in _constants(fused)
    with target.tvm_target():
        unchanged = fuse_decode_into_contraction()(fused)  # nothing left to fuse
    assert len(unchanged.functions) == len(fused.functions)

    executable = tvm.compile(fused, target=target.tvm_target())
    vm = relax.VirtualMachine(executable, tvm.cpu())
    x = np.random.default_rng(3).standard_normal((8, 128)).astype(np.float32)
    out = vm["main"](tvm.runtime.tensor(x)).numpy()
    (ref,) = ort_outputs(model, {"x": x}, optimize=False)
    assert relative_error(out, ref) < REL_TOL


def _single_node_model(node, inits, x_shape, opset: int = 13):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [node], "single", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, None)], inits)
    return onnx.shape_inference.infer_shapes(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))


def _build_and_compare(model, x, tmp_path):
    import numpy as np

    from kiln.backends.tvm import build_artifact, load

    from .onnx_models import REL_TOL, ort_outputs, relative_error

    build_artifact(to_ir(model), "host", tmp_path, model_hash="sha256:test")
    out = load(tmp_path)(x)
    out = out[0] if isinstance(out, (list, tuple)) else out
    (ref,) = ort_outputs(model, {"x": x})
    assert out.shape == ref.shape
    assert relative_error(out, ref) < REL_TOL


@pytest.mark.parametrize("kernel, strides, bias, rewritten", [
    ((2, 2), (2, 2), True, True),     # the DB-head / U-Net upsampler
    ((2, 3), (2, 3), False, True),
    ((3, 3), (2, 2), True, False),    # overlapping taps: the importer's conv2d_transpose
])
def test_conv_transpose_without_overlap_is_a_1x1_conv(kernel, strides, bias, rewritten, tmp_path):
    import numpy as np
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((6, 5, *kernel)).astype(np.float32), "w")]
    inputs = ["x", "w"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(5).astype(np.float32), "b"))
        inputs.append("b")
    node = helper.make_node("ConvTranspose", inputs, ["y"], kernel_shape=list(kernel),
                            strides=list(strides))
    model = _single_node_model(node, inits, [1, 6, 7, 9])
    script = lower_to_relax(to_ir(model)).script()
    assert ("conv2d_transpose" not in script) == rewritten
    _build_and_compare(model, rng.standard_normal((1, 6, 7, 9)).astype(np.float32), tmp_path)


@pytest.mark.parametrize("opset, bounds", [(13, (0.0, 6.0)), (13, (None, 1.0)), (6, (-1.0, 1.0)),
                                           (13, (float("nan"), 0.5))])
def test_clip_with_constant_bounds_is_relax_max_min(opset, bounds, tmp_path):
    import numpy as np
    from onnx import helper, numpy_helper

    lo, hi = bounds
    if opset < 11:
        node = helper.make_node("Clip", ["x"], ["y"], min=lo, max=hi)
        inits = []
    else:
        names = ["x", "lo" if lo is not None else "", "hi"]
        node = helper.make_node("Clip", names, ["y"])
        inits = [numpy_helper.from_array(np.array(v, np.float32), n)
                 for n, v in (("lo", lo), ("hi", hi)) if v is not None]
    model = _single_node_model(node, inits, [1, 4, 8, 8], opset)
    script = lower_to_relax(to_ir(model)).script()
    assert "R.call_tir" not in script and "R.minimum" in script
    x = np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32) * 4
    _build_and_compare(model, x, tmp_path)
