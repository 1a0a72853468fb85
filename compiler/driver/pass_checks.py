"""Checks the driver runs after each pass: no silent no-ops, and calibration that says
where its data came from.

- A lossy pass that rewrote nothing warns with its most common refusal reasons
  (``pass 'quantize' changed nothing: 54 nodes: weight is not a constant``); with
  ``strict: true`` in the spec (``kiln compile --strict``) it is a PassError (exit 2).
- A pass that read the calibration samples is named in the report's ``calibration``
  entry; when those samples are ``random``, kiln warns that the activation ranges were
  measured on random inputs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from kiln.compiler.core.errors import PassError
from kiln.compiler.core.pass_api import CalibrationContext, KilnPass, refusal_summary
from kiln.compiler.core.spec import Spec
from kiln.compiler.core.spec.schema import RandomSource
from kiln.compiler.driver.report import PassReport
from kiln.compiler.driver.samples import SampleSets

logger = logging.getLogger(__name__)

RANDOM_CALIBRATION_HINT = ("give real data: calibration.source: npz:PATH, folder:PATH "
                           "(with preprocess) or module:function")


def no_op_message(instance: KilnPass) -> str:
    """Why a pass changed nothing, by refusal reason (most common first)."""
    reasons = refusal_summary(instance.last_candidates)
    return "changed nothing: " + (reasons or "no candidate among the selected nodes")


def after_pass(name: str, instance: KilnPass, p: PassReport, spec: Spec,
               calibration: CalibrationContext | None, sets: SampleSets | None,
               ran: Sequence[str]) -> None:
    """Warn (or, strict, fail) on a lossy no-op; record and warn about calibration use."""
    if not type(instance).exact and p.matched == 0:
        message = no_op_message(instance)
        if spec.strict:
            raise PassError(f"{message} (strict: a lossy pass must change something)",
                            pass_name=name, ran_before=list(ran))
        logger.warning("pass %r %s", name, message)
        p.note = "; ".join(filter(None, [p.note, message]))
    if calibration is None or not calibration.used:
        return
    calibration.used = False
    if sets is not None and name not in sets.used_by:
        sets.used_by.append(name)
    if isinstance(spec.calibration.source, RandomSource) and not type(instance).exact:
        logger.warning("pass %r calibrated on %d random inputs (calibration.source: random): "
                       "activation ranges may not match real data; %s", name,
                       len(calibration.samples), RANDOM_CALIBRATION_HINT)
        calibration.used = False  # reading .samples above set it again
