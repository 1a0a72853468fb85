"""Names of the TensorIR blocks kiln's importer emits and kiln's schedule rules look up.

The importer builds a kernel with these block names (``te.compute(..., name=...)``) and
a rule finds it again by name (``sch.get_sblock``): one definition keeps the two in step.
"""

from __future__ import annotations

#: Grouped int4 GEMV (``importer.grouped_gemv``, scheduled by ``schedules.quant_gemv``):
#: per-group partial sums ``part[m, g, n]`` of ``x * code``,
GROUPED_PARTIAL = "kiln_gemv_group_sum"
#: the output ``y[m, n] = sum_g s[g, n] * (part - offset * xsum)``,
GROUPED_OUTPUT = "kiln_gemv"
#: and the per-group sums of ``x`` (only with a zero point or int4's offset).
GROUPED_XSUM = "kiln_gemv_x_sum"
#: kiln's sparse kernel (``importer.sparse_kernel``, scheduled by ``schedules.sparse_dense``):
#: ``y[m, n] = sum_j values * x[m, column]``, and its bias epilogue.
SPARSE_DENSE = "kiln_sparse_dense"
SPARSE_BIAS = "kiln_sparse_bias"
#: Integer dense (``importer.int8_dense``, scheduled by ``schedules.int8_dense``): the
#: int32 dot products ``acc[m, n]`` and the requantizing epilogue that reads them.
INT8_ACC = "kiln_int8_acc"
INT8_OUTPUT = "kiln_int8_out"
#: Integer depthwise conv (``importer.int8_conv``, scheduled by ``schedules.int8_window``):
#: the int32 window sums ``acc[b, oh, ow, c]`` (its epilogue is ``INT8_OUTPUT``).
INT8_DW_ACC = "kiln_int8_dw_acc"
#: MoE top-k dispatch (``importer.moe_kernels``, scheduled by ``schedules.grouped_gemm``):
#: the pairs per expert and each expert's first padded row (tiny serial kernels), each
#: (token, slot) pair's row in expert order (counting sort), the sorted rows'
#: token/slot/expert, the grouped GEMMs (first layer, its GLU up-projection, the
#: activation; second layer times the gate) and the combine back to token order.
MOE_COUNT = "kiln_moe_count"
MOE_FIRST = "kiln_moe_first"
MOE_RANK = "kiln_moe_rank"
MOE_ROWS = "kiln_moe_rows"
MOE_UP = "kiln_moe_up"
MOE_GLU = "kiln_moe_glu"
MOE_ACT = "kiln_moe_act"
MOE_DOWN = "kiln_moe_down"
MOE_GATED = "kiln_moe_gated"
MOE_COMBINE = "kiln_moe_combine"
