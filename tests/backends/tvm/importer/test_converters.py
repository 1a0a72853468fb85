"""The converter table of one import (importer.converters): kiln's entries over TVM's,
bound to the import's context, each traced so a failure names its node."""

from __future__ import annotations

import pytest

from kiln.backends.tvm.importer import internal_ops, supported_op_types
from kiln.backends.tvm.importer.context import ImportContext
from kiln.backends.tvm.importer.converters import TracedConverter, kiln_converters
from kiln.compiler.core import kiln_domain

pytest.importorskip("tvm")


def _tvm_table() -> dict:
    from tvm.relax.frontend.onnx import onnx_frontend

    return onnx_frontend._get_convert_map()


def test_kiln_entries_extend_tvms_table():
    base = _tvm_table()
    table = kiln_converters(base, ImportContext())
    assert set(base) < set(table)
    assert kiln_domain.OPS | internal_ops.OPS <= set(table)
    for op in ("DequantizeLinear", "MatMul", "Clip", "ConvTranspose", "ScatterND", "Sum"):
        assert table[op] is not base[op]
    assert table["Relu"] is base["Relu"]
    assert set(table) <= supported_op_types()


def test_tracing_records_the_node_in_the_context():
    context = ImportContext()

    class Echo:
        @classmethod
        def get_converter(cls, opset):
            return lambda bb, inputs, attr, params: (opset, inputs)

    convert = TracedConverter("Relu", Echo, context).get_converter(13)
    assert convert(None, ["a"], {"tvm_custom": {"name": "relu_7"}}, None) == (13, ["a"])
    assert context.node == ("Relu", "relu_7")


def test_each_import_has_its_own_context():
    """Decodes recorded in one context are not seen by another (no shared state)."""
    first, second = ImportContext(), ImportContext()
    first.record_decode("var", object())
    assert first.decode_of("var") is not None and second.decode_of("var") is None
