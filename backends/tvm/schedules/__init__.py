"""kiln's default CPU schedules (no tuning budget) and the Relax pipeline that applies them.

Skeleton: filled in by later commits.
"""

from __future__ import annotations

from kiln.backends.tvm.schedules.pipeline import (
    cpu_build_pipeline,
    cpu_schedule_passes,
    unscheduled_kernels,
)

__all__ = ["cpu_build_pipeline", "cpu_schedule_passes", "unscheduled_kernels"]
