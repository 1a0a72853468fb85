"""The importer's internal ONNX ops: written by :mod:`.prepare`, read by the converters.

They never leave the backend (the ONNX model kiln writes keeps standard ops and the
``kiln`` domain); they exist so that a packed weight reaches TVM's importer as one node
whose converter emits one decode kernel reading the packed bytes.
"""

from __future__ import annotations

#: The domain of the internal ops (imported by the backend's own ONNX copy only).
DOMAIN = "kiln.internal"
#: ``DequantizeLinear`` whose x is packed nibbles (attributes: element, shape, axis,
#: layout, block_size, output_dtype).
PACKED_DEQUANTIZE = "KilnDequantizeLinearPacked"
#: ``kiln.DequantizeTable`` whose codes are packed nibbles (element, shape, axis,
#: block_size, layout).
PACKED_TABLE = "KilnDequantizeTablePacked"
#: A codebook weight ``Reshape(Gather(codebook, Cast(index)), shape)`` (attribute shape).
CODEBOOK = "KilnCodebookDecode"
#: MatMul/Gemm on a sparse weight packed in row groups (inputs x, values, columns[, bias];
#: attributes layout, n, k): :mod:`.sparse_weights`, :mod:`.sparse_kernel`.
SPARSE_DENSE = "KilnSparseDense"
#: A QDQ MatMul/Gemm chain as one integer kernel (inputs x_q, packed weight, comp, mult,
#: bias; attributes isa, k, n, x_signed, activation, out_dtype, out_scale, out_zero):
#: :mod:`.int8_chains`.
INT8_DENSE = "KilnInt8Dense"
#: A QDQ KxK / strided / depthwise Conv chain as one integer kernel on NHWC (inputs x_q,
#: weight, comp, mult, bias; attributes mode, kernel, strides, dilations, pads, zx and
#: INT8_DENSE's): :mod:`.int8_conv`.
INT8_CONV = "KilnInt8Conv"
#: kiln's top-k MoE dispatch after the TopK (inputs x, values, indices, W1, b1, W2, b2,
#: W3, b3; attribute activation): :mod:`.moe_dispatch`, :mod:`.moe_kernels`.
MOE_DISPATCH = "KilnMoeDispatch"
#: Every internal op.
OPS = frozenset({PACKED_DEQUANTIZE, PACKED_TABLE, CODEBOOK, SPARSE_DENSE, INT8_DENSE, INT8_CONV,
                 MOE_DISPATCH})
