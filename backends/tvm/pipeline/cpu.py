"""The CPU build (every LLVM target: x86-64, arm64): the one pipeline CPU builds, tests
and bench/ compile with.

    legalize  inference batch norm folded into the conv before it or into a multiply-add
              (:mod:`kiln.backends.tvm.batchnorm`: what follows then fuses), convolutions
              channels-last (NHWC/OHWI, :mod:`kiln.backends.tvm.layout`), any other batch
              norm decomposed (it fuses into the conv epilogue), constant
              transposes folded; small-k TopK as a heap per row (:mod:`kiln.backends.tvm.topk`);
              library dispatch; ops to TensorIR with erf/GELU/exp/
              sigmoid/tanh as vectorizable polynomials (``schedules.fast_math``);
              constant folding with compressed weights kept compressed; fusion; each
              weight decode fused into the matmul/conv that reads it (kiln's
              decode_contraction / decode_conv rules decode inside the kernel)
    schedule  tuning records first, then kiln's CPU rules (``schedules.registry``) for
              the rest, constant weight packing moved to compile time
    finalize  TVM's CPU dataflow lowering and VM lowering (``relax.backend.cpu_generic``)
"""

from __future__ import annotations

from collections.abc import Callable

import tvm
from tvm import relax
from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

from kiln.backends.tvm.batchnorm import fold_inference_batchnorm
from kiln.backends.tvm.fuse_decode import CPU_CONSUMERS, fuse_decode_into_contraction
from kiln.backends.tvm.layout import channels_last_convs, fold_constant_transposes
from kiln.backends.tvm.pipeline.common import (
    PassList,
    fusion_passes,
    join_phases,
    library_dispatch_passes,
    tuning_record_passes,
)
from kiln.backends.tvm.schedules.fast_math import cpu_legalize_map
from kiln.backends.tvm.schedules.registry import cpu_schedule_passes
from kiln.backends.tvm.topk import select_topk


def legalize_passes(target: tvm.target.Target, *, channels_last: bool = True) -> PassList:
    """Layout rewrites, library dispatch, legalization and fusion, decode fusion.

    ``channels_last=False`` keeps convolutions as imported (NCHW), as a build does where
    TVM's layout inference gives up on a graph (tests check both forms of each rule).
    """
    return [
        fold_inference_batchnorm(),
        *([channels_last_convs()] if channels_last else []),
        relax.transform.DecomposeOpsForInference(),
        fold_constant_transposes(),
        select_topk,  # before library dispatch: small-k TopK as kiln's heap kernel
        *library_dispatch_passes(target),
        *fusion_passes(target, cpu_legalize_map()),
        fuse_decode_into_contraction(CPU_CONSUMERS),
    ]


def schedule_passes(target: tvm.target.Target, database=None) -> PassList:
    """Records from ``database`` (a MetaSchedule database or None), then kiln's rules."""
    return [*tuning_record_passes(database), *cpu_schedule_passes(target)]


def finalize_passes(target: tvm.target.Target) -> PassList:
    """Dataflow lowering, memory planning, VM lowering."""
    return cpu_generic.dataflow_lower_passes(target) + cpu_generic.finalize_passes(target)


def get_pipeline(target: tvm.target.Target, database=None,
                 on_scheduled: Callable[[tvm.IRModule], None] | None = None, *,
                 channels_last: bool = True) -> tvm.transform.Pass:
    """The CPU build as one pass for ``tvm.compile(mod, target, relax_pipeline=...)``."""
    return join_phases(target, "kiln_cpu_pipeline",
                       legalize_passes(target, channels_last=channels_last),
                       schedule_passes(target, database), finalize_passes(target),
                       on_scheduled)
