"""quantize: post-training quantization of Conv/Gemm/MatMul weights (and optionally
their input activations), one typed mode per spec entry, selectable per part of
the model with ``select``. Policy (which nodes, which format) is the typed config
(``config``); what each weight becomes is ``plan``, activation ranges ``calibrate``,
the ONNX form ``emit``; a model below the opset a form needs is raised first
(``kiln.compiler.core.opset``). Every emitted node carries the metadata key
``kiln.quant``; a weight that is already the output of a dequantize is refused,
so a second run changes nothing.

Weight forms (W^ is what the Conv/Gemm/MatMul consumes; g = group size along the
input-channel axis, s/z per group or per output channel, see ``formats``):

- ``int8 | int4 | uint8 | uint4``: standard ``DequantizeLinear(q, s[, z])`` with
  ``axis`` (per channel) or ``axis, block_size`` (groups, opset 21); q is an
  INT8/INT4/UINT8/UINT4 initializer (4-bit packed two per byte in the file).
- ``int3 | int2`` (and ``uint3 | uint2``): ``kiln.UnpackBits(packed){bits, shape}`` ->
  uint8 codes -> standard blocked ``DequantizeLinear(codes, s, z)``; a symmetric
  format stores q + 2^(b-1) with z = 2^(b-1). (ONNX INT2 needs opset 25; kiln stays on 21.)
- ``fp8_e4m3 | fp8_e5m2``: ``DequantizeLinear`` of a FLOAT8E4M3FN/FLOAT8E5M2 initializer.
- ``fp4_e2m1 | fp4_e3m0``: UINT4 codes (the FLOAT4E2M1 bit pattern for E2M1) ->
  ``kiln.DequantizeTable(codes, table[16], s){axis, block_size}``: ONNX Runtime 1.32
  implements neither Cast nor DequantizeLinear for FLOAT4E2M1, so kiln uses its
  function (see ``kiln_ops``). ``exponent_search`` picks, per layer, the lowest-MSE
  of E2M1 / E3M0 / INT4 (FP8: E4M3 / E5M2 / INT8), each with its clip search (LLM-FP4).
- ``power`` (NUPES): y = DequantizeLinear(q, s) of t = sign(w)|w|^a quantized as a
  symmetric int; W^ = Sign(y) * Pow(Abs(y), 1/a); a searched per layer or fixed.
- ``codebook``: k-means (seeded, deterministic) over length-d runs of the weight
  (C order); W^ = Reshape(Gather(codebook[k, d], Cast(index: uint8|uint16)), shape).

Activations (``activations:``), on the first input of each rewritten node:
static: QuantizeLinear(x, s, z) -> DequantizeLinear with per-tensor s, z from
calibration (min/max, percentile, the MSE-best clip of the range, or ``search``: the clip
with the least error in the outputs of the layers that read x, see ``calibrate``);
dynamic: DynamicQuantizeLinear(x) -> DequantizeLinear (uint8, computed at run time).

``bias_correction: true`` adds (W - W^) E[x] to each layer's bias (``bias_correction``),
E[x] per input channel from the calibration samples.

``rounding: gptq`` (integer weights) chooses the codes column by column so that each
layer's output on the calibration inputs moves least (``gptq``), with the scales of
round-to-nearest; with static activations H is over the quantized inputs.

Bits per weight (codes, scales, zero points, tables) are in every candidate's label
and in ``note``.

Before matching, ``prepare`` folds weights the graph computes from constants
(``ConstantOfShape``, ``Reshape``/``Transpose``/``Cast`` of an initializer...: see
``fold_weights``), so such models quantize; ``note`` says how many nodes were folded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import onnx_ir as ir

from kiln.compiler.core import graph as kir
from kiln.compiler.core.errors import PassError
from kiln.compiler.core.opset import PER_AXIS_OPSET, ensure_opset
from kiln.compiler.core.pass_api import Candidate, KilnPass
from kiln.passes.quant import gptq, kiln_ops
from kiln.passes.quant.bias_correction import (
    apply_correction,
    correction_problem,
    dequantized,
    mean_per_channel,
    output_shift,
)
from kiln.passes.quant.calibrate import calibrate_range, consumer_of, fake_quant, widened
from kiln.passes.quant.config import ActivationQuant, QuantizeConfig
from kiln.passes.quant.emit import drop_constant, emit_activation_qdq, emit_weight
from kiln.passes.quant.fold_weights import fold_weight_paths
from kiln.passes.quant.plan import WeightPlan, plan_weight
from kiln.passes.quant.weights import WEIGHT_OPS, find_weight


class Quantize(KilnPass):
    """Quantize Conv/Gemm/MatMul weights (int, FP8/FP4, power, codebook) and activations."""

    name = "quantize"
    config_class = QuantizeConfig
    exact = False
    needs_calibration = True
    portable_candidates = True      # a WeightPlan is arrays and attributes only
    #: what ``higher_precision`` makes of a layer (the fallback's report names it)
    higher_precision_name = "int16 activations"
    #: op types of the weight-path nodes ``prepare`` folded (for ``note``)
    folded: list[str] = []

    def prepare(self, model: ir.Model) -> int:
        folded = fold_weight_paths(model, self.selected_nodes(model))
        self.folded = folded
        return len(folded)

    def candidates(self, model: ir.Model) -> list[Candidate]:
        found: list[Candidate] = []
        cfg: QuantizeConfig = self.config
        activations = cfg.activations
        for node in self.selected_nodes(model):
            if node.op_type not in WEIGHT_OPS or node.domain not in ("", "ai.onnx"):
                continue
            label = kir.node_label(node)
            site = find_weight(node)
            if isinstance(site, str):
                found.append(Candidate(node, label, reason=site))
                continue
            x = node.inputs[0]
            if activations is not None and (x is None or x.dtype not in (ir.DataType.FLOAT,
                                                                         None)):
                found.append(Candidate(node, label, reason="activation is not float32"))
                continue
            plan = plan_weight(site, cfg.weights)
            if isinstance(plan, str):
                found.append(Candidate(node, label, reason=plan))
                continue
            found.append(Candidate(node, label, nodes=(node,), data=plan))
        static = activations is not None and not activations.dynamic
        if static or cfg.bias_correction or cfg.rounding == "gptq":
            self._calibrate(model, [c for c in found if c.accepted],
                            activations if static else None)
        found = [replace(c, label=f"{c.label} [{c.data.description}, {c.data.bits_per_weight:.2f}"
                         f" bits/weight, weight SQNR {c.data.weight_sqnr_db:.1f} dB]")
                 if c.accepted else c for c in found]
        accepted = [c for c in found if c.accepted]
        if accepted:
            total = sum(c.anchor.inputs[1].const_value.size for c in accepted)
            bits = sum(c.data.bits_per_weight * c.anchor.inputs[1].const_value.size
                       for c in accepted)
            self.note = f"{bits / total:.2f} bits/weight over {len(accepted)} weights"
        if self.folded:
            kinds = ", ".join(sorted(set(self.folded)))
            self.note = "; ".join(filter(None, [self.note, f"folded {len(self.folded)} "
                                                f"weight-path node(s) ({kinds}) first"]))
        return found

    def _calibrate(self, model: ir.Model, accepted: list[Candidate],
                   cfg: ActivationQuant | None) -> None:
        if not accepted:
            return
        if self.calibration is None:
            raise PassError("static activation quantization needs calibration data "
                            "(run it through the pipeline, or pass a CalibrationContext)",
                            pass_name=self.name)
        names = sorted({c.anchor.inputs[0].name for c in accepted})
        inputs = {v.name for v in kir.graph_inputs(model)}
        inner = [n for n in names if n not in inputs]
        values = self.calibration.activations(model, inner) if inner else {}
        for name in names:
            if name in inputs:
                values[name] = [s[name] for s in self.calibration.samples]
        readers: dict[str, list] = {}
        sites = {id(c.anchor): find_weight(c.anchor) for c in accepted}
        for c in accepted:
            readers.setdefault(c.anchor.inputs[0].name, []).append(consumer_of(sites[id(c.anchor)]))
        ranges = {name: calibrate_range(values[name], cfg, readers[name]) for name in names} \
            if cfg is not None else {}
        for c in accepted:
            if self.config.rounding == "gptq":
                self._round(c, sites[id(c.anchor)], values[c.anchor.inputs[0].name],
                            ranges.get(c.anchor.inputs[0].name))
            if cfg is not None:
                c.data.activation = ranges[c.anchor.inputs[0].name]
            if self.config.bias_correction:
                c.data.input_mean = mean_per_channel(values[c.anchor.inputs[0].name], c.anchor,
                                                     sites[id(c.anchor)].array.shape[2:])

    def _round(self, candidate: Candidate, site, values, activation) -> None:
        """The candidate's plan again, in place, with GPTQ's codes (``rounding: gptq``); H
        from the inputs as the layer reads them (quantized, with a static range)."""
        if gptq.hessian_problem(candidate.anchor) is not None:
            return
        quantize = None
        if activation is not None:
            dtype = self.config.activations.dtype
            quantize = lambda v: fake_quant(np.asarray(v, np.float32), *activation, dtype)  # noqa: E731
        plan = plan_weight(site, self.config.weights, gptq.hessian(values, site, quantize))
        if not isinstance(plan, str):
            vars(candidate.data).update(vars(plan))

    def higher_precision(self, candidate: Candidate) -> Candidate | None:
        """The candidate with int16 activations over the same calibrated range (the first
        step of ``on_budget_exceeded: fallback``, before float); None without static ones."""
        cfg = self.config.activations
        plan: WeightPlan = candidate.data
        if cfg is None or cfg.dynamic or plan.activation is None or plan.activation_dtype:
            return None
        wide = replace(plan, activation=widened(plan.activation, cfg.dtype),
                       activation_dtype="int16")
        return replace(candidate, label=f"{candidate.label} (int16 activations)", data=wide)

    def rewrite(self, model: ir.Model, accepted: Sequence[Candidate]) -> int:
        needed = max(c.data.opset for c in accepted)
        if self.config.activations is not None:
            needed = max(needed, PER_AXIS_OPSET)
        ensure_opset(model, needed, pass_name=self.name)
        graph = model.graph
        activation_cache: dict[str, ir.Value] = {}
        uncorrected = 0
        for candidate in accepted:
            node: ir.Node = candidate.anchor
            plan: WeightPlan = candidate.data
            old = node.inputs[1]
            delta = None
            if self.config.bias_correction:
                delta = self._shift(node, plan)
                uncorrected += delta is None
            new_nodes, weight = emit_weight(model, old, plan)
            graph.insert_before(node, new_nodes)
            node.replace_input_with(1, weight)
            drop_constant(graph, old)
            if delta is not None:
                apply_correction(graph, node, delta, weight.dtype.numpy())
            if self.config.activations is not None:
                emit_activation_qdq(graph, node, self.config.activations, plan,
                                    activation_cache)
        kiln_ops.sync_function_opsets(model)
        if self.config.bias_correction:
            self.note = "; ".join(filter(None, [self.note, f"bias corrected on "
                                                f"{len(accepted) - uncorrected} of "
                                                f"{len(accepted)} layers"]))
        return len(accepted)

    @staticmethod
    def _shift(node: ir.Node, plan: WeightPlan):
        """(W - W^) E[x] for a DequantizeLinear plan whose node can take it, else None."""
        site = find_weight(node)
        if plan.form != "dq" or plan.input_mean is None or isinstance(site, str) \
                or correction_problem(node) is not None:
            return None
        w_hat = dequantized(plan.arrays, plan.attributes, site.array.shape)
        return output_shift(site, w_hat, plan.input_mean)
