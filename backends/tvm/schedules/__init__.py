"""kiln's default CPU schedules (no tuning budget) and the Relax phase that applies them.

TVM 0.27's CPU build leaves every kernel a naive loop nest. These rules give each
PrimFunc a schedule right after fusion, from what its blocks compute:

=============  ==========================================================================
rule           kernels
=============  ==========================================================================
decode_conv    a quantized conv with its weight decode fused in: each task decodes an
               output-channel panel of the weight into a small local buffer, then runs
               the contraction micro-kernel (``quant_conv``).
decode_        a quantized matmul/dense with its decode fused in: decoded inside the K
contraction    loop (GEMV) or per panel (GEMM); kiln's grouped int4 GEMV (``quant_gemv``).
contraction    ``C += A * B`` with one column iter: dense, matmul, batch matmul, conv2d
               (NHWC on CPU, see ``backends/tvm/layout.py``; NCHW where layout
               conversion gives up: 1x1, KxK, strided, grouped-as-dense).
               Register tile MR x NR (NR a few SIMD vectors of output channels /
               columns), constant weights packed ``[N/NR, ..., NR]`` at compile time,
               parallel outer loops, the fused epilogue applied in the tile write-back.
               When N has no register tile (a 6625-class head) C's rows are vectorized.
elementwise    all-injective kernels: inlined, parallel outer loops, vectorized rows.
window         depthwise conv, pooling: vectorized along the output's innermost axis
               (channels in NHWC); a sum over a few stacked inputs reads them inline.
reduction      softmax / layer norm: parallel rows (one row: a single thread), each row
               reduction ``rfactor``-ed into vector partial sums; other reductions:
               dlight's CPU Reduction rule.
inner_         one reduction over the innermost axes (ReduceSum/Mean/Max/L2 over the
reduction      last axes or every axis): reduction loops fused, ``rfactor``-ed into
               vector partial results, outputs in parallel (``reduce``).
whole_         reductions of every element to one value (a layer norm or variance over
reduction      every axis): each reduction fused and ``rfactor``-ed into vector partial
               results, the element-wise blocks vectorized (``whole_reduction``).
row_tables     per-row tables with a side output (a runtime-scale Resize's tap indices
               and normalized weights): what the last output needs computed per row
               under its row loop, parallel rows when large (``row_tables``).
ir_builder     TOPI's hand-written CPU kernels (ScatterND/Elements, NMS, TopK's sort
               call): TOPI's loops kept, its plain copy / fill loops made parallel,
               the TensorIR blocks beside them element-wise (``ir_builder``).
fallback       anything else: outer loops parallel (named by ``unscheduled_kernels``).
=============  ==========================================================================

Rules are objects (``rule.KilnRule``, dlight's ``ScheduleRule`` shape:
``apply(func, target, tunable)``) in one ordered list, ``registry.RULES``, most
specific first; a new rule is a class in its module and one line there. Kernels that
have a MetaSchedule tuning record (``kiln.backends.tvm.tuning``) are scheduled by it
before these rules run (rule name ``tuned``). ``fast_math`` legalizes
erf/GELU/exp/softmax to vectorizable polynomials before fusion (the CPU legalize
phase's custom map).

The CPU build (``kiln.backends.tvm.pipeline.cpu``, the only one) runs
``cpu_schedule_passes(target)`` between fusion and the dataflow lowering;
``unscheduled_kernels(mod)`` names the PrimFuncs left at TVM's default (or with only
the fallback rule) in a module after the schedule phase.
"""

from __future__ import annotations

from kiln.backends.tvm.schedules.registry import (
    RULES,
    cpu_schedule_passes,
    schedule_rules_used,
    unscheduled_kernels,
)

__all__ = ["RULES", "cpu_schedule_passes", "schedule_rules_used", "unscheduled_kernels"]
