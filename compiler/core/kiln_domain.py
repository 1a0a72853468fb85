"""The ``kiln`` ONNX domain: its name, version and op names (one definition for all layers).

Quantized weights use two ops beyond standard ONNX. The passes store each as a
model-local function (``kiln.passes.quant.kiln_ops`` builds the bodies, which ONNX
Runtime runs); a backend may match the op by (:data:`DOMAIN`, name) and emit a fused
kernel instead (``kiln.backends.tvm.importer``).

``kiln.UnpackBits(packed: uint8[ceil(n*bits/8)]) -> uint8[shape]``, attributes
``bits`` (1..8) and ``shape`` (ints; n = prod(shape)):
    code i (C order) is bits ``[i*bits, (i+1)*bits)`` of the little-endian bit stream
    of ``packed``; equivalently every run of 8 codes (zero padded at the end) is
    ``bits`` bytes of the little-endian word ``sum_j code_j << (j*bits)``
    (numpy: :func:`kiln.compiler.core.packing.unpack_bits`).

``kiln.DequantizeTable(codes: int, table: float[L], scale: float) -> float``,
attributes ``axis`` and ``block_size``:
    ``y[i] = table[codes[i]] * scale[i with i[axis] -> i[axis] // block_size]``
    (``scale`` has the codes' rank; dims other than ``axis`` are either full or 1).
"""

from __future__ import annotations

#: The op domain of kiln's model-local functions.
DOMAIN = "kiln"
#: The version the model imports :data:`DOMAIN` at.
DOMAIN_VERSION = 1
UNPACK_BITS = "UnpackBits"
DEQUANTIZE_TABLE = "DequantizeTable"
#: Every op of the domain.
OPS = frozenset({UNPACK_BITS, DEQUANTIZE_TABLE})


def is_kiln_op(domain: str, op_type: str) -> bool:
    """Whether (``domain``, ``op_type``) names one of kiln's ops."""
    return domain == DOMAIN and op_type in OPS
