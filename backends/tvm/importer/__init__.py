"""kiln's ONNX -> Relax importer: TVM's ONNX importer with kiln's forms added.

    mod = lower_to_relax(model, target_name="host")

=====================  =================================================================
lower                  the entry point: checks, the import under kiln's converter table
prepare                the backend's own ONNX copy: refolding, kiln functions, index masks
packed_weights         4-bit weights as packed nibbles, codebook weights as index + table
nibbles                the packed 4-bit layouts (flat ONNX order, 32-column tiles)
internal_ops           the internal ops ``prepare`` writes and the converters read
converters             the converter table for one import (TVM's + kiln's, traced)
context                one import's state shared by the converters (4-bit decodes, node)
weight_converters      blocked/packed DequantizeLinear, kiln.DequantizeTable, codebook,
                       kiln.UnpackBits: one decode kernel reading the compressed weight
grouped_gemv           MatMul of a few rows on a blocked 4-bit weight as one kernel
standard_converters    Sum, Clip, ConvTranspose, ScatterND in forms kernels use well
decode                 the Relax/TE decode builders (``(code - zero_point) * scale``)
expr_types             shapes and dtypes of Relax expressions, ONNX attribute values
=====================  =================================================================
"""

from __future__ import annotations

from .lower import check_static_inputs, lower_to_relax, supported_op_types, symbolic_ranges, unsupported_ops

__all__ = ["check_static_inputs", "lower_to_relax", "supported_op_types", "symbolic_ranges",
           "unsupported_ops"]
