"""Check a pass numerically, the way kiln checks its own: for pass authors' tests.

``check_pass(my_pass, model)`` runs ONNX Runtime on the model before and after the pass
(the same seeded inputs), then holds the pass to its contract:

- an exact pass (``exact = True``) keeps every output within float32 tolerance
  (:data:`~kiln.compiler.testing.reference.REL_TOL`, relative to max |y|);
- a lossy one keeps every output's SQNR at or above ``min_sqnr_db``.

It raises ``AssertionError`` naming the output and the figure when the contract does not
hold, and returns a :class:`PassCheck` (the measured figures, the pass's candidates and
its note) so a test can assert more (how many places were rewritten, a refusal reason).

``seeded_inputs(model)`` makes the inputs: standard normal floats, small non-negative
integers, one array per graph input of static shape.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from kiln.compiler.core import graph as kir
from kiln.compiler.core.metrics import relative_error, sqnr_db
from kiln.compiler.core.pass_api import Candidate, KilnPass

from .reference import REL_TOL, ort_outputs


@dataclass(frozen=True)
class PassCheck:
    """What :func:`check_pass` measured."""

    modified: bool
    rewritten: int                    # accepted candidates
    candidates: list[Candidate]
    note: str
    sqnr_db: dict[str, float]         # output name -> SQNR of after vs before
    relative_error: dict[str, float]  # output name -> max |after - before| / max |before|


def seeded_inputs(model: ir.Model, seed: int = 0) -> dict[str, np.ndarray]:
    """One seeded array per graph input (every dimension must be static)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in kir.graph_inputs(model):
        shape = kir.shape_list(value)
        if any(not isinstance(d, int) for d in shape):
            raise ValueError(f"input {value.name!r} has a dynamic shape {shape}: "
                             "pass feeds= with arrays for it")
        dtype = value.dtype.numpy() if value.dtype is not None else np.dtype(np.float32)
        if np.issubdtype(dtype, np.floating):
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[value.name] = rng.random(shape) > 0.5
        else:
            feeds[value.name] = rng.integers(0, 4, size=shape).astype(dtype)
    return feeds


def check_pass(kiln_pass: KilnPass, model: ir.Model,
               feeds: Mapping[str, np.ndarray] | None = None, *,
               min_sqnr_db: float | None = None, rel_tol: float = REL_TOL) -> PassCheck:
    """Run ``kiln_pass`` on ``model`` (in place) and check its outputs against the model
    before it with ONNX Runtime; see the module docstring."""
    if not kiln_pass.exact and min_sqnr_db is None:
        raise ValueError(f"pass {kiln_pass.name!r} is lossy: give min_sqnr_db")
    feeds = dict(feeds) if feeds is not None else seeded_inputs(model)
    names = [value.name for value in model.graph.outputs]
    before = ort_outputs(copy.deepcopy(model), feeds)
    result = kiln_pass(model)
    after = ort_outputs(model, feeds)
    sqnr, rel = {}, {}
    for name, ref, out in zip(names, before, after, strict=True):
        assert np.shape(ref) == np.shape(out), \
            f"output {name!r}: shape {np.shape(out)} after the pass, {np.shape(ref)} before"
        sqnr[name] = sqnr_db(ref, out)
        rel[name] = relative_error(out, ref)
        if kiln_pass.exact:
            assert rel[name] <= rel_tol, (
                f"exact pass {kiln_pass.name!r} changed output {name!r}: relative error "
                f"{rel[name]:.3g} > {rel_tol:g}")
        else:
            assert min_sqnr_db is not None
            assert sqnr[name] >= min_sqnr_db, (
                f"pass {kiln_pass.name!r}: output {name!r} SQNR {sqnr[name]:.1f} dB "
                f"< {min_sqnr_db:g} dB")
    accepted = sum(1 for c in kiln_pass.last_candidates if c.accepted)
    return PassCheck(result.modified, accepted, list(kiln_pass.last_candidates),
                     kiln_pass.note, sqnr, rel)


def is_exact(check: PassCheck) -> bool:
    """True when every output came out bit-identical (SQNR +inf)."""
    return all(math.isinf(v) and v > 0 for v in check.sqnr_db.values())


__all__ = ["PassCheck", "check_pass", "is_exact", "seeded_inputs"]
