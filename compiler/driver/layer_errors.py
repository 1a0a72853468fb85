"""Which layers a lossy pass cost most: each contraction's output (Conv, ConvTranspose,
Gemm, MatMul and their quantized/kiln forms) compared before and after the pass.

Before a lossy pass runs, :func:`probe` records the outputs of every contraction node on
the first verification sample (one ONNX Runtime run exposing them as outputs). After it,
:meth:`LayerProbe.after` runs the rewritten model on the same sample and reports, per
contraction whose output value still exists under the same name (passes keep names), the
SQNR of that activation against its value before the pass, in graph order. The error
accumulates along the graph, so the layers where the SQNR drops are the ones that cost.
The report's per-layer view (report.json ``layers``, report.html's chart) shows them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from kiln.backends.ort import collect_activations
from kiln.compiler.core import graph as kir
from kiln.compiler.core.metrics import sqnr_db

logger = logging.getLogger(__name__)

CONTRACTIONS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "QLinearConv", "QLinearMatMul",
                "MatMulInteger", "ConvInteger", "MatMulNBits")
#: the most layers probed (a larger model: the first ones by graph order are skipped)
MAX_LAYERS = 400


@dataclass
class LayerProbe:
    names: dict[str, tuple[str, str]]          # value name -> (node name, op)
    reference: dict[str, np.ndarray]
    sample: dict[str, np.ndarray]

    def after(self, model: ir.Model) -> list[dict]:
        present = {v.name for node in kir.nodes(model) for v in node.outputs if v.name}
        names = [n for n in self.names if n in present]
        if not names:
            return []
        try:
            values = collect_activations(model, names, [self.sample])
        except Exception as error:  # the per-layer view is extra: never fail a compile
            logger.info("per-layer errors not measured: %s", error)
            return []
        rows = []
        for name in names:
            before, now = self.reference[name], values[name][0]
            if np.shape(before) != np.shape(now) or before.dtype.kind != "f":
                continue
            node, op = self.names[name]
            value = sqnr_db(before, now)
            rows.append({"node": node, "op": op, "output": name,
                         "sqnr_db": None if not np.isfinite(value) else round(value, 2)})
        return rows


def probe(model: ir.Model, samples: list[dict[str, np.ndarray]]) -> LayerProbe | None:
    """Record the contractions' outputs on the first sample (None: nothing to probe)."""
    if not samples:
        return None
    names: dict[str, tuple[str, str]] = {}
    for node in kir.nodes(model):
        if node.op_type in CONTRACTIONS and node.outputs and node.outputs[0].name:
            names[node.outputs[0].name] = (node.name or node.outputs[0].name, node.op_type)
    if not names:
        return None
    names = dict(list(names.items())[-MAX_LAYERS:])
    try:
        values = collect_activations(model, list(names), samples[:1])
    except Exception as error:
        logger.info("per-layer errors not measured: %s", error)
        return None
    return LayerProbe(names, {k: v[0] for k, v in values.items()}, samples[0])
