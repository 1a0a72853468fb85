"""The kiln op domain: its names, and that the passes' function bodies use them."""

from __future__ import annotations

import onnx_ir as ir

from kiln.compiler.core import kiln_domain
from kiln.passes.quant import kiln_ops


def test_is_kiln_op_needs_domain_and_name():
    assert kiln_domain.is_kiln_op("kiln", "UnpackBits")
    assert kiln_domain.is_kiln_op(kiln_domain.DOMAIN, kiln_domain.DEQUANTIZE_TABLE)
    assert not kiln_domain.is_kiln_op("", "UnpackBits")
    assert not kiln_domain.is_kiln_op("kiln", "Gather")
    assert not kiln_domain.is_kiln_op("kiln.internal", "DequantizeTable")


def test_every_op_has_a_function_body_in_the_domain():
    model = ir.Model(ir.Graph([], [], nodes=[], opset_imports={"": 21}), ir_version=10)
    for name in sorted(kiln_domain.OPS):
        kiln_ops.ensure_function(model, name)
    assert set(model.functions) == {(kiln_domain.DOMAIN, name, "") for name in kiln_domain.OPS}
    assert model.opset_imports[kiln_domain.DOMAIN] == kiln_domain.DOMAIN_VERSION
