"""Which samples calibrate and which verify: held out, never the same ones.

With a data source (``npz:``, ``folder:``, ``module:function``) and a pass that
calibrates, kiln reads ``calibration.samples + verify.samples`` samples and splits them:
calibration gets the first ones, verification the **last** ``verify.samples`` (held
out). A source with fewer samples keeps its last ``min(verify.samples, n - 1)`` for
verification; a source with a single sample is used for both, and the report says so.
``verify.inputs: npz:PATH`` replaces the held-out part. With ``random``, calibration
draws from its own seeded stream (``calibration.seed``), verification from
``verify.seed``'s: they never share inputs even when the seeds are equal.

What was used (source, counts, held out or not) is in report.json (``calibration``)
and printed by ``kiln compile``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import onnx_ir as ir

from kiln.compiler.core.errors import SpecError
from kiln.compiler.core.spec import Spec
from kiln.compiler.core.spec.schema import RandomSource
from kiln.compiler.driver.verify import Feeds, make_samples, verification_samples

#: Mixed into ``calibration.seed`` so random calibration inputs differ from verification's.
CALIBRATION_STREAM = 1


@dataclass
class SampleSets:
    """The calibration and verification inputs of one compile, and where they came from."""

    source: str
    calibration: list[Feeds] = field(default_factory=list)
    verification: list[Feeds] = field(default_factory=list)
    held_out: bool = True
    verify_from: str = ""          # "held out of the source", "verify.inputs", "random"
    used_by: list[str] = field(default_factory=list)   # passes that read the calibration

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "samples": len(self.calibration),
                "verification_samples": len(self.verification),
                "verification_from": self.verify_from, "held_out": self.held_out,
                "used_by": list(self.used_by)}

    def describe(self) -> str:
        """One console line: ``calibration: npz:x.npz, 8 samples (used by quantize); ...``."""
        used = f" (used by {', '.join(self.used_by)})" if self.used_by else " (not used)"
        text = (f"calibration: {self.source}, {len(self.calibration)} samples{used}; "
                f"verification: {len(self.verification)} samples, {self.verify_from}")
        return text if self.held_out else text + " (the calibration samples: too few to hold out)"


def split_held_out(samples: list[Feeds], verify_count: int) -> tuple[list[Feeds], list[Feeds],
                                                                     bool]:
    """(calibration, verification, held_out): the last ``verify_count`` samples verify
    (at most ``len - 1``, so calibration keeps one); a single sample does both."""
    if len(samples) < 2:
        return samples, samples, False
    held = min(verify_count, len(samples) - 1)
    return samples[:-held], samples[-held:], True


def _located(spec: Spec, make):
    try:
        return make()
    except SpecError as error:
        if error.file is None and error.line is None:
            raise spec.error(("calibration", "source"), error.detail) from None
        raise


def sample_sets(model: ir.Model, spec: Spec, *, calibrate: bool) -> SampleSets:
    """The inputs for calibration (when ``calibrate``) and verification (when enabled)."""
    source = spec.calibration.source
    sets = SampleSets(source=source.yaml_form())
    verify = spec.verify.enabled
    random = isinstance(source, RandomSource)
    if not calibrate:
        sets.verification = verification_samples(model, spec) if verify else []
        sets.verify_from = "verify.inputs" if spec.verify.inputs is not None else \
            "random (seeded)" if random else f"the first samples of {sets.source}"
        return sets
    cal_count = spec.calibration.samples
    if random:
        sets.calibration = make_samples(model, spec, count=cal_count, seed=[  # type: ignore[arg-type]
            spec.calibration.seed, CALIBRATION_STREAM])
    if spec.verify.inputs is not None or random:
        sets.verification = verification_samples(model, spec) if verify else []
        sets.verify_from = "verify.inputs" if spec.verify.inputs is not None else \
            f"random (seed {spec.verify.seed}, not the calibration draws)"
        if not random:
            sets.calibration = _located(spec, lambda: make_samples(model, spec, count=cal_count))
        return sets
    wanted = cal_count + (spec.verify.samples if verify else 0)
    everything = _located(spec, lambda: make_samples(model, spec, count=wanted))
    if not verify:
        sets.calibration = everything[:cal_count]
        return sets
    sets.calibration, sets.verification, sets.held_out = split_held_out(everything,
                                                                        spec.verify.samples)
    sets.verify_from = f"the last {len(sets.verification)} samples of {sets.source} (held out)"
    return sets
