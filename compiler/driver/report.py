"""The compile report: per pass, what it matched and changed, what it cost in
size and error, and how long it took; written as report.json and shown as a table.

The total counts only the passes whose result was kept (a pass undone by
``on_budget_exceeded: skip_pass`` is listed, marked skipped, but changes nothing).
``status`` is ``ok``, or ``failed`` with the error and the passes that ran before it.
``model_hash`` is the hash of the shipped files (:mod:`kiln.compiler.core.digest`),
the same value as in manifest.json."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any


def _finite(x: float | None) -> float | None:
    if x is None or math.isinf(x) or math.isnan(x):
        return None
    return round(x, 4) if abs(x) >= 1e-3 else x


@dataclass
class PassReport:
    name: str
    matched: int = 0
    refused: int = 0
    modified: bool = False
    params_before: int = 0
    params_after: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    sqnr_db: float | None = math.inf        # vs the model before the pass (inf: identical)
    max_abs_err: float | None = 0.0
    sqnr_db_vs_source: float | None = math.inf
    max_abs_err_vs_source: float | None = 0.0
    worst_output: str | None = None
    exact: bool = True
    skipped: bool = False
    note: str = ""
    seconds: float = 0.0
    #: layers ``on_budget_exceeded: fallback`` kept in float: node, rank, sqnr_db alone, why
    kept_float: list[dict[str, Any]] = field(default_factory=list)
    #: SQNR of each output vs the model before the pass (None: identical)
    outputs_sqnr_db: dict[str, float | None] = field(default_factory=dict)
    #: lossy passes: each contraction's output SQNR vs before the pass (driver.layer_errors)
    layers: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["outputs_sqnr_db"] = {k: _finite(v) for k, v in self.outputs_sqnr_db.items()}
        for key in ("sqnr_db", "sqnr_db_vs_source", "max_abs_err", "max_abs_err_vs_source"):
            data[key] = _finite(data[key])
        data["seconds"] = round(self.seconds, 4)
        return data


@dataclass
class CompiledReport:
    """The TVM build and its check against ONNX Runtime."""

    target: str
    library: str
    build_seconds: float
    verified: bool
    sqnr_db: float | None = None
    max_abs_err: float | None = None
    binary: str = ""
    # Kernels no kiln rule (nor tuning record) scheduled, by name.
    unscheduled: list[str] = field(default_factory=list)
    #: each sparse MatMul/Gemm weight the backend looked at: node, kernel ("sparse" or
    #: "dense"), layout, stored density, the cost model's expected speedup, reason
    sparse_kernels: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["sqnr_db"] = _finite(self.sqnr_db)
        data["build_seconds"] = round(self.build_seconds, 3)
        return data


@dataclass
class CompileReport:
    model: str
    spec: str
    kiln_version: str
    passes: list[PassReport] = field(default_factory=list)
    params_source: int = 0
    bytes_source: int = 0
    load_seconds: float = 0.0
    verify_samples: int = 0
    compiled: CompiledReport | None = None
    model_hash: str = ""
    onnx_bytes: int | None = None
    status: str = "ok"
    #: a failed compile: {"kind": error class, "message": text, "pass": failing pass or None}
    error: dict[str, Any] | None = None
    #: where calibration and verification samples came from (driver.samples.SampleSets)
    calibration: Any = None
    #: ``kiln compile --measure``: latencies of the compiled, uncompressed and ORT runs
    #: (driver.measure); None when not measured
    measure: dict[str, Any] | None = None

    def fail(self, error: Exception) -> None:
        """Mark the report failed with ``error`` (the passes listed are those that ran)."""
        self.status = "failed"
        self.error = {"kind": type(error).__name__, "message": str(error),
                      "pass": getattr(error, "pass_name", None)}

    def total(self) -> dict[str, Any]:
        kept = [p for p in self.passes if not p.skipped]
        last = kept[-1] if kept else None
        return {
            "passes": len(self.passes),
            "modified": sum(1 for p in kept if p.modified),
            "params_before": self.params_source,
            "params_after": last.params_after if last else self.params_source,
            "bytes_before": self.bytes_source,
            "bytes_after": last.bytes_after if last else self.bytes_source,
            "sqnr_db": _finite(last.sqnr_db_vs_source) if last else None,
            "max_abs_err": _finite(last.max_abs_err_vs_source) if last else 0.0,
            "seconds": round(self.load_seconds + sum(p.seconds for p in self.passes)
                             + (self.compiled.build_seconds if self.compiled else 0.0), 3),
        }

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "status": self.status,
            "model": self.model,
            "spec": self.spec,
            "kiln_version": self.kiln_version,
            "model_hash": self.model_hash,
            "verify_samples": self.verify_samples,
            "calibration": self.calibration.to_dict() if self.calibration else None,
            "load_seconds": round(self.load_seconds, 3),
            "passes": [p.to_dict() for p in self.passes],
            "total": self.total(),
            "onnx_bytes": self.onnx_bytes,
            "compiled": self.compiled.to_dict() if self.compiled else None,
        }
        if self.measure is not None:
            data["measure"] = self.measure
        if self.error is not None:
            data["error"] = self.error
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    def to_html(self) -> str:
        """A self-contained HTML page with charts (:mod:`kiln.compiler.driver.report_html`)."""
        from kiln.compiler.driver.report_html import render

        return render(self)

    def table(self):
        """A rich Table of the passes and the total."""
        from rich.table import Table

        def sqnr(x: float | None) -> str:
            if x is None or (isinstance(x, float) and math.isinf(x) and x > 0):
                return "exact"
            return f"{x:.1f}"

        table = Table(title=f"kiln: {self.model} with spec {self.spec}", title_justify="left")
        for column in ("pass", "matched", "refused", "changed", "params", "weight bytes",
                       "SQNR dB", "max err", "vs source", "s"):
            table.add_column(column, justify="left" if column == "pass" else "right",
                             no_wrap=True)
        for p in self.passes:
            name = p.name + (" (skipped)" if p.skipped else "")
            table.add_row(name, str(p.matched), str(p.refused), "yes" if p.modified else "no",
                          f"{_short(p.params_before)}->{_short(p.params_after)}",
                          f"{_short(p.bytes_before)}->{_short(p.bytes_after)}",
                          sqnr(p.sqnr_db), f"{p.max_abs_err or 0:.2g}",
                          sqnr(p.sqnr_db_vs_source), f"{p.seconds:.2f}")
        total = self.total()
        table.add_row("total", "", "", str(total["modified"]),
                      f"{_short(total['params_before'])}->{_short(total['params_after'])}",
                      f"{_short(total['bytes_before'])}->{_short(total['bytes_after'])}", "",
                      f"{total['max_abs_err'] or 0:.2g}", sqnr(total["sqnr_db"]),
                      f"{total['seconds']:.2f}", style="bold")
        return table

    def summary_lines(self) -> list[str]:
        """Console lines after the table: the calibration source, layers kept in float."""
        lines = [self.calibration.describe()] if self.calibration else []
        lines += [f"{p.name}: {len(p.kept_float)} layer(s) kept in "
                  f"{p.kept_float[0].get('precision', 'float')}: " + ", ".join(
            f"{k['node']} (rank {k['rank']})" for k in p.kept_float) for p in self.passes
            if p.kept_float]
        return lines

    def compiled_lines(self) -> list[str]:
        if not self.compiled:
            return []
        c = self.compiled
        check = (f"matches ONNX Runtime: SQNR {sqnr_text(c.sqnr_db)}, max abs error "
                 f"{c.max_abs_err:.3g}" if c.verified else f"not run here ({c.binary})")
        lines = [f"built {c.library} for {c.target} in {c.build_seconds:.1f} s; {check}"]
        if c.unscheduled:
            shown = ", ".join(c.unscheduled[:8]) + (" ..." if len(c.unscheduled) > 8 else "")
            lines.append(f"{len(c.unscheduled)} kernel(s) left at TVM's default schedule: {shown}")
        if c.sparse_kernels:
            sparse = [k["node"] for k in c.sparse_kernels if k["kernel"] == "sparse"]
            lines.append(f"sparse kernel for {len(sparse)} of {len(c.sparse_kernels)} sparse "
                         "layer(s)" + (": " + ", ".join(sparse) if sparse else
                                       " (none is expected to beat the dense kernel)"))
        if self.measure is not None:
            from kiln.compiler.driver.measure import measure_lines

            lines += measure_lines(self.measure)
        return lines


def sqnr_text(x: float | None) -> str:
    if x is None or math.isinf(x):
        return "exact"
    return f"{x:.1f} dB"


def _short(n: int) -> str:
    """1234567 -> '1.23M' (tables); exact numbers are in report.json."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)
