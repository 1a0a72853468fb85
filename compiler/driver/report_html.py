"""report.html: the compile report as one self-contained page (no network, no scripts).

Sections, each shown only when the report has the data:

- the pass table (the same rows as ``report.json``'s passes);
- size: parameters and weight bytes after each pass (bar charts, the source first);
- error: SQNR of each pass against the model before it and against the source model,
  and per output when the model has several;
- per layer, for each lossy pass: the SQNR of every contraction's output against the
  model before the pass (driver.layer_errors), and the worst layers in a table; layers
  an accuracy fallback kept in float are listed;
- latency: the compiled module, the uncompressed one and ONNX Runtime
  (``kiln compile --measure``), and the compiled module's check against ONNX Runtime.

Charts are PNG images drawn by matplotlib (Agg, no display) and embedded as base64
``data:`` URIs, so the page opens anywhere, offline. An infinite SQNR (identical outputs)
is drawn at the top of the axis and labelled "exact".
"""

from __future__ import annotations

import base64
import io
import math
from html import escape
from typing import Any

#: where an "exact" (infinite) SQNR is drawn
EXACT_DB = 150.0
#: worst layers listed per lossy pass
WORST_LAYERS = 10


def _figure(width: float = 7.0, height: float = 3.0):
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(fig) -> str:
    buffer = io.BytesIO()
    # no timestamps or software strings: the same report gives the same bytes
    fig.savefig(buffer, format="png", metadata={"Software": None})
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f"<img alt='chart' src='data:image/png;base64,{data}'>"


def _db(value: float | None) -> float:
    if value is None or (isinstance(value, float) and math.isinf(value) and value > 0):
        return EXACT_DB
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return 0.0
    return min(float(value), EXACT_DB)


def _label(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isinf(value) and value > 0):
        return "exact"
    return f"{value:.1f}"


def _bars(ax, labels: list[str], values: list[float], *, color: str, texts: list[str]):
    positions = range(len(labels))
    bars = ax.bar(positions, values, color=color)
    ax.set_xticks(list(positions), labels, rotation=20, ha="right", fontsize=8)
    for bar, text in zip(bars, texts):
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=7)


def size_chart(report) -> str:
    labels = ["source"] + [p.name for p in report.passes]
    params = [report.params_source] + [p.params_after for p in report.passes]
    nbytes = [report.bytes_source] + [p.bytes_after for p in report.passes]
    fig = _figure(9.0, 3.0)
    left, right = fig.subplots(1, 2)
    _bars(left, labels, params, color="#4c72b0", texts=[f"{v:,}" for v in params])
    left.set_title("parameters after each pass", fontsize=9)
    unit, scale = ("MB", 1e6) if max(nbytes, default=0) >= 1e6 else ("KB", 1e3)
    _bars(right, labels, [b / scale for b in nbytes], color="#55a868",
          texts=[f"{b / scale:.3g}" for b in nbytes])
    right.set_title(f"weight bytes after each pass ({unit})", fontsize=9)
    return _png(fig)


def error_chart(report) -> str | None:
    verified = [p for p in report.passes if p.modified and p.sqnr_db is not None]
    if not verified:
        return None
    fig = _figure(7.0, 3.0)
    ax = fig.subplots()
    labels = [p.name for p in verified]
    width = 0.4
    xs = list(range(len(labels)))
    ax.bar([x - width / 2 for x in xs], [_db(p.sqnr_db) for p in verified], width,
           label="vs the model before", color="#c44e52")
    ax.bar([x + width / 2 for x in xs], [_db(p.sqnr_db_vs_source) for p in verified], width,
           label="vs the source model", color="#8172b2")
    for x, p in zip(xs, verified):
        ax.annotate(_label(p.sqnr_db), (x - width / 2, _db(p.sqnr_db)), ha="center",
                    va="bottom", fontsize=7)
    ax.set_xticks(xs, labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("SQNR (dB)")
    ax.set_title("error of each pass (worst output)", fontsize=9)
    ax.legend(fontsize=7)
    return _png(fig)


def outputs_chart(report) -> str | None:
    passes = [p for p in report.passes if len(p.outputs_sqnr_db) > 1]
    if not passes:
        return None
    names = list(passes[0].outputs_sqnr_db)
    fig = _figure(7.0, 3.0)
    ax = fig.subplots()
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [j + i * width for j in range(len(passes))]
        ax.bar(xs, [_db(p.outputs_sqnr_db.get(name)) for p in passes], width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(passes))],
                  [p.name for p in passes], fontsize=8)
    ax.set_ylabel("SQNR (dB)")
    ax.set_title("error per output (vs the model before the pass)", fontsize=9)
    ax.legend(fontsize=7)
    return _png(fig)


def layers_chart(p) -> str:
    values = [_db(layer["sqnr_db"]) for layer in p.layers]
    fig = _figure(9.0, 3.4)
    ax = fig.subplots()
    worst = sorted(range(len(values)), key=lambda i: values[i])[:WORST_LAYERS]
    colors = ["#c44e52" if i in worst else "#4c72b0" for i in range(len(values))]
    ax.bar(range(len(values)), values, color=colors)
    if len(values) <= 40:
        ax.set_xticks(range(len(values)), [layer["node"] for layer in p.layers],
                      rotation=60, ha="right", fontsize=7)
    else:
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("layer (graph order)")
    ax.set_ylabel("output SQNR (dB)")
    ax.set_title(f"{p.name}: each layer's output vs before the pass "
                 f"(red: the {len(worst)} worst)", fontsize=9)
    return _png(fig)


def latency_chart(measure: dict[str, Any]) -> str | None:
    rows = [(label, measure.get(key)) for label, key in
            (("kiln", "kiln_ms"), ("kiln, uncompressed", "kiln_uncompressed_ms"),
             ("ONNX Runtime", "ort_ms"))]
    rows = [(label, v) for label, v in rows if isinstance(v, (int, float))]
    if not rows:
        return None
    fig = _figure(5.0, 2.6)
    ax = fig.subplots()
    _bars(ax, [r[0] for r in rows], [r[1] for r in rows], color="#dd8452",
          texts=[f"{r[1]:.3g} ms" for r in rows])
    ax.set_ylabel("ms per call")
    ax.set_title("latency (median)", fontsize=9)
    return _png(fig)


def _table(head: list[str], rows: list[list[Any]]) -> str:
    return ("<table><tr>" + "".join(f"<th>{escape(h)}</th>" for h in head) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in row) + "</tr>"
                      for row in rows) + "</table>")


def _pass_rows(report) -> list[list[Any]]:
    rows = []
    for p in report.passes:
        d = p.to_dict()
        rows.append([p.name + (" (undone)" if p.skipped else ""), p.matched, p.refused,
                     "yes" if p.modified else "no", f"{p.params_before:,}",
                     f"{p.params_after:,}", f"{p.bytes_before:,}", f"{p.bytes_after:,}",
                     _label(p.sqnr_db) if p.modified else "", _label(p.sqnr_db_vs_source),
                     d["max_abs_err"] if d["max_abs_err"] is not None else "",
                     p.worst_output or "", d["seconds"], p.note])
    return rows


STYLE = ("body{font-family:sans-serif;margin:1.5em;max-width:1100px}"
         "table{border-collapse:collapse;margin:0.5em 0}"
         "td,th{padding:2px 8px;text-align:right;border-bottom:1px solid #ddd;font-size:13px}"
         "td:first-child,th:first-child{text-align:left}img{max-width:100%}"
         "h2{margin-top:1.4em;font-size:1.15em}.muted{color:#666}")


def render(report) -> str:
    """The page for a :class:`~kiln.compiler.driver.report.CompileReport`."""
    parts = [f"<h1>kiln: {escape(report.model)}</h1>",
             f"<p class='muted'>spec {escape(report.spec)} &middot; kiln "
             f"{escape(report.kiln_version)} &middot; {report.verify_samples} verification "
             f"samples &middot; status {escape(report.status)}"
             + (f" &middot; model hash {escape(report.model_hash)}" if report.model_hash else "")
             + "</p>"]
    if report.error:
        parts.append(f"<p><b>failed:</b> {escape(str(report.error.get('message')))}</p>")
    parts.append("<h2>Passes</h2>")
    parts.append(_table(["pass", "matched", "refused", "changed", "params before",
                         "params after", "bytes before", "bytes after", "SQNR dB",
                         "SQNR vs source", "max abs err", "worst output", "seconds", "note"],
                        _pass_rows(report)))
    total = report.total()
    parts.append(f"<p>total: {total['params_before']:,} &rarr; {total['params_after']:,} "
                 f"parameters, {total['bytes_before']:,} &rarr; {total['bytes_after']:,} "
                 f"weight bytes, SQNR vs source {_label(total['sqnr_db'])} dB</p>")
    parts.append("<h2>Size</h2>" + size_chart(report))
    for title, chart in (("Error", error_chart(report)),
                         ("Error per output", outputs_chart(report))):
        if chart:
            parts.append(f"<h2>{title}</h2>{chart}")
    for p in report.passes:
        if p.exact or not (p.layers or p.kept_float):
            continue
        parts.append(f"<h2>Per layer: {escape(p.name)}</h2>")
        if p.layers:
            parts.append(layers_chart(p))
            worst = sorted(p.layers, key=lambda layer: _db(layer["sqnr_db"]))[:WORST_LAYERS]
            parts.append(_table(["layer", "op", "output SQNR dB"],
                                [[w["node"], w["op"], _label(w["sqnr_db"])] for w in worst]))
        if p.kept_float:
            parts.append("<p>kept in float by the accuracy fallback:</p>" + _table(
                ["layer", "rank", "why"],
                [[k.get("node"), k.get("rank"), k.get("why", "")] for k in p.kept_float]))
    measure = getattr(report, "measure", None)
    chart = latency_chart(measure) if isinstance(measure, dict) else None
    compiled = report.compiled_lines()
    if chart or compiled:
        parts.append("<h2>Compiled module</h2>" + (chart or ""))
        parts.extend(f"<p>{escape(line)}</p>" for line in compiled)
    return ("<!doctype html><html><head><meta charset='utf-8'><title>kiln report: "
            f"{escape(report.model)}</title><style>{STYLE}</style></head><body>"
            + "\n".join(parts) + "</body></html>\n")
