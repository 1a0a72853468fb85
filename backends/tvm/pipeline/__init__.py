"""The Relax build pipeline: one per target family, each a module of phase functions
returning plain pass lists and one entry point (the way TVM's own
``relax/backend/<family>/pipeline.py`` are written)::

    cpu   kiln.backends.tvm.pipeline.cpu    legalize_passes / schedule_passes /
    cuda  kiln.backends.tvm.pipeline.cuda   finalize_passes (target) -> list;
                                            get_pipeline(target, database, on_scheduled)

There is no ``if cuda:`` inside a phase. Builds, tuning, tests and bench/ all use these
(``relax_pipeline``, ``legalize_passes``, ``schedule_passes`` pick the family of a
:class:`~kiln.backends.tvm.targets.ResolvedTarget`).
"""

from __future__ import annotations

from collections.abc import Callable

import tvm

from kiln.backends.tvm.pipeline import cpu, cuda
from kiln.backends.tvm.pipeline.common import PassList
from kiln.backends.tvm.targets import ResolvedTarget

#: Target family (``ResolvedTarget.family``) -> its pipeline module.
FAMILIES = {"cpu": cpu, "cuda": cuda}


def relax_pipeline(target: ResolvedTarget, database=None,
                   on_scheduled: Callable[[tvm.IRModule], None] | None = None
                   ) -> tvm.transform.Pass:
    """The family's whole build as one pass (for ``tvm.compile``): ``database`` is the
    tuning records applied before the rules (see :mod:`kiln.backends.tvm.tuning`);
    ``on_scheduled`` sees the module after the schedule phase."""
    return FAMILIES[target.family].get_pipeline(target.tvm_target(), database, on_scheduled)


def legalize_passes(target: ResolvedTarget) -> PassList:
    """The family's legalize phase (run it under ``target.tvm_target()``)."""
    return FAMILIES[target.family].legalize_passes(target.tvm_target())


def schedule_passes(target: ResolvedTarget, database=None) -> PassList:
    """The family's schedule phase (run it under ``target.tvm_target()``)."""
    return FAMILIES[target.family].schedule_passes(target.tvm_target(), database)


__all__ = ["FAMILIES", "legalize_passes", "relax_pipeline", "schedule_passes"]
