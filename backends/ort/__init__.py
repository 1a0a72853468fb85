"""ONNX Runtime: the independent reference kiln checks every pass against."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from kiln.compiler.core import graph as kir
from kiln.compiler.core.errors import VerificationError

#: ``optimize=`` values: ORT's graph optimization levels by name.
OPTIMIZATION_LEVELS = ("none", "basic", "all")


_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")
_CPP_SOURCE = re.compile(r"\S+\.(?:h|hpp|cc|cpp):\d+\s+")


def ort_message(text: str) -> str:
    """ONNX Runtime's first error line without its status prefix and the C++ source path
    and function signature it puts in front (``/onnxruntime_src/...h:46 void f(...)``)."""
    lines = text.strip().splitlines()
    first = _ORT_PREFIX.sub("", lines[0]) if lines else ""
    source = _CPP_SOURCE.search(first)
    if source is None:
        return first
    rest = first[source.end():]
    start = rest.find("(")
    if 0 <= start < 200:
        depth = 0
        for i in range(start, len(rest)):          # skip the signature: balanced (...)
            depth += {"(": 1, ")": -1}.get(rest[i], 0)
            if depth == 0:
                rest = rest[i + 1:]
                break
    return (first[:source.start()] + rest.strip()).strip()


class ReferenceRunner:
    """An ONNX Runtime session over an ``onnx_ir`` model or ONNX proto (serialized once).

    ``optimize`` is ORT's graph optimization level. The default, "none", keeps ORT from
    rewriting the graph: the reference must be the model as written (with optimizations
    ORT swaps blocked DequantizeLinear+MatMul for its own MatMulNBits kernel, which rounds
    differently). "all" is how an application runs the model.
    """

    def __init__(self, model: ir.Model | onnx.ModelProto, *, threads: int = 0,
                 label: str = "the model", optimize: str = "none") -> None:
        import onnxruntime as ort

        if optimize not in OPTIMIZATION_LEVELS:
            raise ValueError(f"optimize={optimize!r}: expected one of {OPTIMIZATION_LEVELS}")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        options.graph_optimization_level = {
            "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[optimize]
        data = model.SerializeToString() if isinstance(model, onnx.ModelProto) \
            else kir.model_bytes(model)
        try:
            self.session = ort.InferenceSession(data, options,
                                                providers=["CPUExecutionProvider"])
        except Exception as error:
            first = ort_message(str(error))
            raise VerificationError(f"{label}: ONNX Runtime cannot load it: {first}") from error
        self.label = label
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return self.session.run(None, {k: feeds[k] for k in self.input_names})
        except Exception as error:
            first = ort_message(str(error))
            raise VerificationError(f"{self.label}: ONNX Runtime failed to run it: {first}") \
                from error


def run_model(model: ir.Model, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    return ReferenceRunner(model).run(feeds)


def collect_activations(model: ir.Model, names: list[str],
                        samples: list[Mapping[str, np.ndarray]], *,
                        progress: Callable[[int, int], Any] | None = None,
                        ) -> dict[str, list[np.ndarray]]:
    """Values of intermediate tensors (by name) on each sample, by exposing them as outputs.

    ``progress(done, total)`` is called after each sample."""
    proto = kir.to_proto(model)
    existing = {o.name for o in proto.graph.output}
    known = {v.name: v for v in list(proto.graph.value_info) + list(proto.graph.input)}
    for name in names:
        if name in existing:
            continue
        info = known.get(name) or onnx.helper.make_empty_tensor_value_info(name)
        proto.graph.output.append(info)
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    inputs = [i.name for i in session.get_inputs()]
    result: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for done, feeds in enumerate(samples, 1):
        values = session.run(names, {k: feeds[k] for k in inputs})
        for name, value in zip(names, values):
            result[name].append(value)
        if progress is not None:
            progress(done, len(samples))
    return result
