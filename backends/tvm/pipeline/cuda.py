"""The CUDA build.

    legalize  library dispatch; ops to TensorIR, constant folding with compressed
              weights kept compressed, fusion; each weight decode fused into the
              matmul/conv that reads it (dlight's GEMV/Matmul rules schedule the decode
              prologue inside the contraction)
    schedule  tuning records first, then dlight's GPU rules
    finalize  TVM's CUDA dataflow lowering and VM lowering (``relax.backend.cuda``)
"""

from __future__ import annotations

from collections.abc import Callable

import tvm
from tvm.relax.backend.cuda import pipeline as cuda
from tvm.s_tir import dlight

from kiln.backends.tvm.fuse_decode import fuse_decode_into_contraction
from kiln.backends.tvm.pipeline.common import (
    PassList,
    fusion_passes,
    join_phases,
    library_dispatch_passes,
    tuning_record_passes,
)


def legalize_passes(target: tvm.target.Target) -> PassList:
    """Library dispatch, legalization and fusion, decode fusion."""
    return [*library_dispatch_passes(target), *fusion_passes(target),
            fuse_decode_into_contraction()]


def schedule_passes(target: tvm.target.Target, database=None) -> PassList:
    """Records from ``database`` (a MetaSchedule database or None), then dlight's rules."""
    return [
        *tuning_record_passes(database),
        dlight.ApplyDefaultSchedule(
            dlight.gpu.Matmul(),
            dlight.gpu.GEMV(),
            dlight.gpu.Reduction(),
            dlight.gpu.GeneralReduction(),
            dlight.gpu.Fallback(),
        ),
    ]


def finalize_passes(target: tvm.target.Target) -> PassList:
    """Dataflow lowering, memory planning, VM lowering."""
    return cuda.dataflow_lower_passes(target) + cuda.finalize_passes(target)


def get_pipeline(target: tvm.target.Target, database=None,
                 on_scheduled: Callable[[tvm.IRModule], None] | None = None
                 ) -> tvm.transform.Pass:
    """The CUDA build as one pass for ``tvm.compile(mod, target, relax_pipeline=...)``."""
    return join_phases(target, "kiln_cuda_pipeline", legalize_passes(target),
                       schedule_passes(target, database), finalize_passes(target),
                       on_scheduled)
