"""Models of one kiln-domain op on constant inputs, with the op's function body attached
(ONNX Runtime runs the body; kiln's TVM importer converts the op itself)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from kiln.compiler.core import kiln_domain
from kiln.passes.quant import kiln_ops


def unpack_bits_model(packed: np.ndarray, bits: int, shape: list[int], *,
                      reader: str | None = None, opset: int = 21) -> ir.Model:
    """``y = [reader](kiln.UnpackBits(packed){bits, shape})``, ``packed`` an initializer.

    ``reader`` (a standard op with one input and one output, e.g. ``Identity``) makes
    the codes an input of another op, as a mask feeding an index computation is.
    """
    graph = ir.Graph([], [], nodes=[], opset_imports={"": opset})
    model = ir.Model(graph, ir_version=10)
    kiln_ops.ensure_function(model, kiln_domain.UNPACK_BITS)
    value = ir.Value(name="packed", shape=ir.Shape(packed.shape),
                     type=ir.TensorType(ir.DataType.UINT8), const_value=ir.tensor(packed))
    graph.register_initializer(value)
    node = ir.Node(kiln_domain.DOMAIN, kiln_domain.UNPACK_BITS, [value],
                   [ir.AttrInt64("bits", bits), ir.AttrInt64s("shape", list(shape))],
                   num_outputs=1)
    graph.append(node)
    out = node.outputs[0]
    if reader is not None:
        follow = ir.Node("", reader, [out], num_outputs=1)
        graph.append(follow)
        out = follow.outputs[0]
    out.name, out.shape, out.type = "y", ir.Shape(shape), ir.TensorType(ir.DataType.UINT8)
    graph.outputs.append(out)
    return model
