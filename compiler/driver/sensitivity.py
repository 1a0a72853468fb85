"""Per-layer sensitivity of a lossy pass, and the fallback that keeps the most sensitive
layers in float until the budget holds.

**Sensitivity** of a layer (a candidate the pass accepts: one Conv/Gemm/MatMul for
``quantize``) is the SQNR of the model's outputs, on the verification samples, when the
pass rewrites that layer alone and leaves every other layer in float. The lower the SQNR,
the more sensitive the layer. ``kiln plan --sensitivity`` prints the ranking.

**Fallback** (``verify.on_budget_exceeded: fallback``): when a lossy pass breaks its
budget, kiln ranks the layers by sensitivity. A pass with a higher-precision form of a
layer (``higher_precision``; ``quantize``: int16 activations over the same calibrated range,
int8 weights) first gets the k most sensitive layers in that form, k searched as below up
to all layers; if that never holds (or the pass has none), it keeps the k most sensitive
ones in float,
k chosen as the smallest that meets the budget: k = 1, 2, 4, ... until the budget holds,
then a bisection between the last k that failed and the first that held (log2(n) + a few
verified runs; it assumes more float layers never hurt, which holds in practice and is
checked: the chosen model is verified like any pass result). If even n - 1 float layers
break the budget, the pass fails (or is undone) as without fallback. The report lists the
layers kept (``precision``: float or int16 activations) with their SQNR alone and rank.

Candidates are computed once, on a copy of the model before the pass (``PassTrial``);
every trial rewrites a subset of them on a fresh copy, so calibration runs once (for a
pass whose candidates point into the model, ``portable_candidates = False``, each copy
finds its candidates again).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import onnx_ir as ir

from kiln.compiler.core import graph as kir
from kiln.compiler.core.pass_api import CalibrationContext, Candidate, KilnPass, PassConfig
from kiln.compiler.driver.verify import ErrorMetrics, Feeds, compare

Runner = Callable[[ir.Model], list[list]]


@dataclass(frozen=True)
class LayerSensitivity:
    """The output error when the pass rewrites this layer alone (rank 1: most sensitive)."""

    node: str
    label: str
    sqnr_db: float
    max_abs_err: float
    rank: int = 0
    index: int = -1          # the candidate's position in ``PassTrial.accepted``

    def to_dict(self) -> dict[str, Any]:
        sqnr = None if math.isinf(self.sqnr_db) or math.isnan(self.sqnr_db) else \
            round(self.sqnr_db, 3)
        return {"node": self.node, "rank": self.rank, "sqnr_db": sqnr,
                "max_abs_err": float(self.max_abs_err), "label": self.label}


def _positions(model: ir.Model, nodes: Sequence[ir.Node]) -> list[int]:
    index = {id(n): i for i, n in enumerate(kir.nodes(model))}
    return [index[id(n)] for n in nodes]


class PassTrial:
    """A lossy pass's accepted candidates on a copy of ``model`` (before the pass), and
    copies of that model with any subset of them rewritten."""

    def __init__(self, model: ir.Model, pass_class: type[KilnPass], config: PassConfig,
                 selected: Callable[[ir.Node], bool] | None,
                 calibration: CalibrationContext | None) -> None:
        self._proto = ir.serde.serialize_model(model)
        self._selected_at = None if selected is None else [
            i for i, n in enumerate(kir.nodes(model)) if selected(n)]
        self.pass_class = pass_class
        self.config = config
        self.calibration = calibration
        self._accepted: list[Candidate] | None = None
        self._where: list[tuple[int, list[int]]] = []

    def _copy(self) -> ir.Model:
        return ir.serde.deserialize_model(self._proto)

    def _instance(self, model: ir.Model) -> KilnPass:
        selected = None
        if self._selected_at is not None:
            nodes = list(kir.nodes(model))
            ids = {id(nodes[i]) for i in self._selected_at}
            selected = lambda node: id(node) in ids  # noqa: E731
        return self.pass_class(self.config, selected=selected, calibration=self.calibration
                               if self.pass_class.needs_calibration else None)

    @property
    def accepted(self) -> list[Candidate]:
        """The candidates the pass accepts (computed once: calibration runs here)."""
        if self._accepted is None:
            base = self._copy()
            instance = self._instance(base)
            instance.prepare(base)
            self._proto = ir.serde.serialize_model(base)   # trials start from the prepared model
            found = instance.candidates(base)
            self._accepted = [c for c in found if c.accepted]
            self._where = [(_positions(base, [c.anchor])[0] if c.anchor is not None else -1,
                            _positions(base, c.nodes)) for c in self._accepted]
        return self._accepted

    @property
    def has_higher_precision(self) -> bool:
        """Whether the pass offers a higher-precision form of a candidate (``quantize``:
        int16 activations), tried before float by the fallback."""
        return callable(getattr(self.pass_class, "higher_precision", None)) and any(
            self._instance(self._copy()).higher_precision(c) is not None for c in self.accepted)

    def build(self, rewrite: Sequence[int], higher: Collection[int] = ()) -> ir.Model:
        """A copy of the (prepared) model with the accepted candidates ``rewrite`` rewritten,
        those also in ``higher`` in the pass's higher-precision form where it has one."""
        accepted = self.accepted
        model = self._copy()
        if not rewrite:
            return model
        nodes = list(kir.nodes(model))
        instance = self._instance(model)
        if self.pass_class.portable_candidates:
            chosen = []
            for i in sorted(rewrite):
                anchor, inside = self._where[i]
                chosen.append(replace(accepted[i], anchor=nodes[anchor] if anchor >= 0
                                      else None, nodes=tuple(nodes[j] for j in inside)))
        else:  # the candidates' data points into the model: find them again on this copy
            again = {_positions(model, [c.anchor])[0]: c for c in instance.candidates(model)
                     if c.accepted and c.anchor is not None}
            chosen = [again[self._where[i][0]] for i in sorted(rewrite)
                      if self._where[i][0] in again]
            rewrite = [i for i in sorted(rewrite) if self._where[i][0] in again]
        if higher:
            chosen = [(instance.higher_precision(c) or c) if i in higher else c
                      for i, c in zip(sorted(rewrite), chosen)]
        instance.rewrite(model, chosen)
        return model


def ort_runner(samples: list[Feeds]) -> Runner:
    """Runs a model on ``samples`` with ONNX Runtime (one session per model)."""
    from kiln.backends.ort import ReferenceRunner

    def run(model: ir.Model) -> list[list]:
        runner = ReferenceRunner(model, label="sensitivity trial")
        return [runner.run(feeds) for feeds in samples]
    return run


def layer_sensitivity(trial: PassTrial, run: Runner, reference: list[list],
                      output_names: Sequence[str], *, rtol: float = 1e-4,
                      atol: float = 1e-5,
                      progress: Callable[[str], Any] | None = None) -> list[LayerSensitivity]:
    """Each accepted candidate rewritten alone: output SQNR against ``reference``; sorted
    most sensitive (lowest SQNR) first, ranks from 1."""
    found = []
    total = len(trial.accepted)
    for i, candidate in enumerate(trial.accepted):
        if progress:
            progress(f"sensitivity {i + 1}/{total}")
        metrics = compare(reference, run(trial.build([i])), output_names, rtol=rtol, atol=atol)
        node = candidate.anchor
        found.append(LayerSensitivity(kir.node_label(node) if node is not None else
                                      candidate.label, candidate.label,
                                      metrics.sqnr_db, metrics.max_abs_err, index=i))
    found.sort(key=lambda s: (s.sqnr_db, s.index))
    return [replace(s, rank=r + 1) for r, s in enumerate(found)]


Judge = Callable[[list[list]], tuple[str | None, ErrorMetrics, ErrorMetrics]]


@dataclass
class Fallback:
    """The kept result of a fallback: the model, its outputs and which layers stayed float."""

    model: ir.Model
    outputs: list[list]
    vs_prev: ErrorMetrics
    vs_source: ErrorMetrics
    kept_float: list[LayerSensitivity]
    rewritten: int
    trials: int
    budget: str = ""
    ranking: list[LayerSensitivity] = field(default_factory=list)
    #: what the kept layers became: "float", or the pass's higher precision ("int16 activations")
    precision: str = "float"

    def note(self) -> str:
        names = ", ".join(f"{s.node} ({_db(s.sqnr_db)} alone)" for s in self.kept_float[:6])
        more = f" and {len(self.kept_float) - 6} more" if len(self.kept_float) > 6 else ""
        where = "in float" if self.precision == "float" else f"with {self.precision}"
        text = (f"fallback: {len(self.kept_float)} of {len(self.ranking)} layers kept {where} "
                f"(the most sensitive) so the budget holds: {names}{more}")
        if 2 * len(self.kept_float) > len(self.ranking):
            text += (f" (most layers kept {where}: calibrate on data like the model's own, "
                     "or relax the budget)")
        return text

    def kept_float_dicts(self) -> list[dict[str, Any]]:
        """The kept layers, each with its ``precision`` and why (report.json)."""
        return [s.to_dict() | {"precision": self.precision,
                               "why": f"rank {s.rank} of {len(self.ranking)} by sensitivity "
                               f"(output SQNR {_db(s.sqnr_db)} with this layer alone "
                               "quantized); the budget failed with it quantized"}
                for s in self.kept_float]


def _db(x: float) -> str:
    return "exact" if math.isinf(x) and x > 0 else f"{x:.1f} dB"


def _fewest(n: int, holds: Callable[[int], bool]) -> int | None:
    """The smallest k in 1..n-1 (``last``: n) with ``holds(k)``: k = 1, 2, 4, ... then a
    bisection (it assumes holding is monotone in k); None if none holds."""
    lo, hi, k = 0, None, 1
    while hi is None and k < n:        # k = 1, 2, 4, ..., n - 1
        if holds(k):
            hi = k
        else:
            lo = k
            k = n if k == n - 1 else min(2 * k, n - 1)
    if hi is None:
        return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if holds(mid):
            hi = mid
        else:
            lo = mid
    return hi


def fall_back(trial: PassTrial, run: Runner, reference: list[list],
              output_names: Sequence[str], judge: Judge, *,
              progress: Callable[[str], Any] | None = None) -> Fallback | None:
    """The fewest most-sensitive layers to keep in higher precision so that ``judge`` (the
    budget check of a run's outputs: (failure or None, vs previous, vs source)) passes;
    None when no fallback with at least one layer rewritten meets it.

    When the pass has a higher-precision form (``quantize``: int16 activations) the k most
    sensitive layers are tried in it first (k up to all of them); only if that never holds
    are the k most sensitive kept in float, the rest rewritten as the pass writes them."""
    ranking = layer_sensitivity(trial, run, reference, output_names, progress=progress)
    order = [s.index for s in ranking]
    n = len(order)
    results: dict[tuple[str, int], tuple] = {}

    def attempt(precision: str, k: int) -> bool:
        if (precision, k) not in results:
            if progress:
                progress(f"fallback: {k} layer(s) {precision}")
            kept = set(order[:k])
            if precision == "float":
                model = trial.build([i for i in range(n) if i not in kept])
            else:
                model = trial.build(range(n), higher=kept)
            outputs = run(model)
            failure, vs_prev, vs_source = judge(outputs)
            results[precision, k] = (model, outputs, failure, vs_prev, vs_source)
        return results[precision, k][2] is None

    steps = []
    if trial.has_higher_precision:
        steps.append((trial.pass_class.higher_precision_name, n + 1))
    steps.append(("float", n))
    for precision, limit in steps:
        k = _fewest(limit, lambda k, p=precision: attempt(p, k))
        if k is not None:
            model, outputs, _, vs_prev, vs_source = results[precision, k]
            return Fallback(model, outputs, vs_prev, vs_source, ranking[:k],
                            n - k if precision == "float" else n, len(results),
                            ranking=ranking, precision=precision)
    return None


def ranking_lines(name: str, ranking: Sequence[LayerSensitivity], *, top: int = 20) -> list[str]:
    """The console form of a ranking (most sensitive first)."""
    lines = [f"{name}: sensitivity of {len(ranking)} layers (output SQNR with the layer "
             "alone rewritten; lowest first)"]
    for s in ranking[:top]:
        lines.append(f"  {s.rank:>3}. {_db(s.sqnr_db):>9}  {s.label}")
    if len(ranking) > top:
        lines.append(f"  ... {len(ranking) - top} more (--json lists all)")
    return lines
