"""``kiln compile --measure``: is the compressed module faster? After a host build, time it
against the uncompressed model built for the same target and against ONNX Runtime running
the uncompressed model, and say why when compression did not pay.

    measure: {kiln_ms, kiln_uncompressed_ms, ort_ms, runs, compressed, slower, reasons}

in report.json (medians of ``runs`` interleaved calls after a warm-up, A B C A B C ..., on
the first verification sample or a seeded random input). When no lossy pass changed the
model, the compiled module is the uncompressed one (``compressed: false``, no second build).
When ``kiln_ms > kiln_uncompressed_ms`` kiln warns with the reasons that apply:

- too small: the uncompressed module runs in under ``SMALL_MS`` or holds under
  ``SMALL_BYTES`` of weights, so fixed per-call work (decoding, quantizing activations)
  is not paid back by the memory traffic saved;
- dequantize overhead: the activations quantized and dequantized around each layer
  (QuantizeLinear / DynamicQuantizeLinear), and the weights decoded in their kernels;
- layers left in fp32: Conv/Gemm/MatMul layers whose weights stayed float (refused,
  not selected, or kept in float by a fallback).

Timings are what this machine measured once; they are reported, never asserted.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from kiln.compiler.core import graph as kir

logger = logging.getLogger(__name__)

DEFAULT_RUNS = 20
WARMUP = 3
#: A module faster than this (uncompressed) is "too small" for compression to pay.
SMALL_MS = 0.5
SMALL_BYTES = 1 << 20
WEIGHT_OPS = ("Conv", "Gemm", "MatMul")


def _median_ms(fns: dict[str, Callable[[], Any]], runs: int) -> dict[str, float]:
    for fn in fns.values():
        for _ in range(WARMUP):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: round(statistics.median(v), 4) for name, v in samples.items()}


def _feeds(model: ir.Model, samples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if samples:
        return samples[0]
    rng = np.random.default_rng(0)
    return {v.name: rng.standard_normal([int(d) for d in kir.shape_list(v)]).astype(
        kir.numpy_dtype(v)) for v in kir.graph_inputs(model)}


def _float_weight_layers(model: ir.Model) -> tuple[int, int]:
    """(weight layers whose weight is still a float constant, all weight layers)."""
    total = left = 0
    for node in kir.nodes(model):
        if node.op_type not in WEIGHT_OPS or len(node.inputs) < 2 or node.inputs[1] is None:
            continue
        weight = node.inputs[1]
        producer = weight.producer()
        decoded = producer is not None and (producer.op_type == "DequantizeLinear"
                                            or "kiln.quant" in producer.metadata_props)
        is_float = kir.constant_tensor(weight) is not None
        if decoded or is_float:           # else an activation x activation product
            total += 1
            left += is_float
    return left, total


def slower_reasons(compressed: ir.Model, uncompressed_ms: float, uncompressed_bytes: int
                   ) -> list[str]:
    """Why a compressed module can be slower than the uncompressed one (see the module)."""
    reasons = []
    if uncompressed_ms < SMALL_MS or uncompressed_bytes < SMALL_BYTES:
        reasons.append(f"too small: the uncompressed module runs in {uncompressed_ms:.3g} ms "
                       f"with {uncompressed_bytes / 1e6:.2g} MB of weights, too little to "
                       "pay for decoding and quantizing on every call")
    ops = [n.op_type for n in kir.nodes(compressed)]
    activations = ops.count("QuantizeLinear") + ops.count("DynamicQuantizeLinear")
    decodes = sum(1 for n in kir.nodes(compressed) if n.op_type == "DequantizeLinear"
                  and kir.constant_tensor(n.inputs[0]) is not None)
    if activations or decodes:
        reasons.append(f"dequantize overhead: {activations} activation(s) quantized and "
                       f"dequantized in float, {decodes} weight(s) decoded in their kernels, "
                       "on every call")
    left, total = _float_weight_layers(compressed)
    if left:
        reasons.append(f"layers left in fp32: {left} of {total} Conv/Gemm/MatMul layers")
    return reasons or ["no cause kiln recognizes (profile it: python -m bench.profile)"]


def measure_build(result, target, out: Path, progress: Callable[[str], Any] | None = None,
                  runs: int = DEFAULT_RUNS) -> dict[str, Any]:
    """Time ``out``'s compiled module (just built from ``result``) against the uncompressed
    model (built for ``target`` in a scratch folder) and ONNX Runtime; the report's
    ``measure`` entry. A warning is logged when the compressed module is slower."""
    from kiln.backends import tvm as tvm_backend
    from kiln.backends.ort import ReferenceRunner
    from kiln.compiler.core.frontend import load_model

    say = progress or (lambda _text: None)
    preset = tvm_backend.resolve_target(target)
    if not preset.runs_on_this_host():
        return {"skipped": f"built for {preset.name}, which does not run on this machine"}
    inputs = kir.graph_inputs(result.model)
    if any(not isinstance(d, int) for v in inputs for d in kir.shape_list(v)):
        return {"skipped": "symbolic input dims: measure a build with static shapes"}
    shapes = {v.name: [int(d) for d in kir.shape_list(v)] for v in inputs}
    source = load_model(result.source, input_shapes=shapes)
    feeds = _feeds(result.model, result.samples)
    compressed = any(p.modified and not p.exact and not p.skipped for p in result.report.passes)
    compiled = tvm_backend.load(out)
    ort = ReferenceRunner(source, optimize="all", label="the uncompressed model")
    fns: dict[str, Callable[[], Any]] = {"kiln_ms": lambda: compiled(**feeds),
                                         "ort_ms": lambda: ort.run(feeds)}
    with tempfile.TemporaryDirectory(prefix="kiln-measure-") as scratch:
        if compressed:
            say("measure: building the uncompressed model")
            tvm_backend.build_artifact(source, preset, Path(scratch),
                                       model_hash=f"uncompressed-{result.model_hash}")
            plain = tvm_backend.load(scratch)
            fns["kiln_uncompressed_ms"] = lambda: plain(**feeds)
        say(f"measure: timing {len(fns)} modules ({runs} runs each)")
        times = _median_ms(fns, runs)
    times.setdefault("kiln_uncompressed_ms", times["kiln_ms"])
    entry: dict[str, Any] = {"kiln_ms": times["kiln_ms"],
                             "kiln_uncompressed_ms": times["kiln_uncompressed_ms"],
                             "ort_ms": times["ort_ms"], "runs": runs, "compressed": compressed,
                             "slower": compressed and times["kiln_ms"] > times[
                                 "kiln_uncompressed_ms"]}
    if entry["slower"]:
        entry["reasons"] = slower_reasons(result.model, times["kiln_uncompressed_ms"],
                                          kir.count_weight_bytes(source))
        logger.warning("the compressed module is slower than the uncompressed one "
                       "(%.3g ms vs %.3g ms): %s", times["kiln_ms"],
                       times["kiln_uncompressed_ms"], "; ".join(entry["reasons"]))
    return entry


def measure_lines(entry: dict[str, Any] | None) -> list[str]:
    """Console lines for a report's ``measure`` entry."""
    if not entry:
        return []
    if "skipped" in entry:
        return [f"measure: skipped ({entry['skipped']})"]
    line = (f"measure: kiln {entry['kiln_ms']:.3g} ms, uncompressed "
            f"{entry['kiln_uncompressed_ms']:.3g} ms, ONNX Runtime {entry['ort_ms']:.3g} ms "
            f"(median of {entry['runs']})")
    lines = [line]
    if entry.get("slower"):
        lines.append("warning: the compressed module is slower than the uncompressed one: "
                     + "; ".join(entry["reasons"]))
    return lines
