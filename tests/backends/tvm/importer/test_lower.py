"""Lowering to Relax: unsupported-op report, static shapes, compressed weights kept."""

from __future__ import annotations

import onnx_ir as ir
import pytest

from kiln.backends.tvm import lower_to_relax, resolve_target
from kiln.backends.tvm.pipeline import legalize_passes
from kiln.compiler.core.errors import LoweringError
from kiln.compiler.testing.onnx_models import (
    blocked_int4_matmul,
    tiny_cnn,
    to_ir,
    with_unsupported_ops,
)


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

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            Collect().visit_expr(func)
    return found


def test_int4_weights_stay_packed_through_folding():
    """The 128x64 int4 weight is 4096 bytes of uint8 after lowering and after the
    legalize phase's constant folding: no float32 copy of it appears."""
    import tvm

    mod = lower_to_relax(to_ir(blocked_int4_matmul(k=128, n=64)))
    # 32-column nibble tiles: P[n // 32, k, n % 16] (importer.nibbles.pack_nibbles_tiled)
    assert ("uint8", (2, 128, 16)) in _constants(mod)
    target = resolve_target("host")
    with target.tvm_target():
        legalized = tvm.transform.Sequential(legalize_passes(target))(mod)
    constants = _constants(legalized)
    assert ("uint8", (2, 128, 16)) in constants
    assert not [c for c in constants if c[0] == "float32" and c[1] == (128, 64)]
