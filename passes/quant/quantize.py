"""quantize: post-training quantization of Conv/Gemm/MatMul weights (and optionally
their input activations), one typed mode per spec entry, selectable per part of
the model with ``select``. Policy (which nodes, which format) is the config;
mechanism (the ONNX form) is below. Every emitted node carries the metadata key
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
calibration (min/max, percentile or the MSE-best clip of the range);
dynamic: DynamicQuantizeLinear(x) -> DequantizeLinear (uint8, computed at run time).

Bits per weight (codes, scales, zero points, tables) are in every candidate's label
and in ``note``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union

import ml_dtypes
import numpy as np
import onnx_ir as ir
from pydantic import Field, field_validator, model_validator

from kiln.compiler import ir as kir
from kiln.compiler.errors import PassError
from kiln.compiler.pass_api import (Candidate, KilnPass, PassConfig, add_initializer,
                                    remove_unused_initializers, unique_name)
from kiln.passes.quant import formats, kiln_ops
from kiln.passes.quant.weights import (QUANT_KEY, WEIGHT_OPS, Grouping, WeightSite,
                                       find_weight)

logger = logging.getLogger(__name__)

#: Opset of blocked DequantizeLinear, INT4/UINT4 and FLOAT8 (and of kiln's functions).
BLOCKED_OPSET = 21
#: Opset of per-axis QuantizeLinear/DequantizeLinear.
PER_AXIS_OPSET = 13


# -- config ---------------------------------------------------------------------------------

class Group(PassConfig):
    """Blocks of ``group`` consecutive input channels share a scale."""

    group: int = Field(ge=8, le=4096, description="input channels per scale (32..256 typical)")


Granularity = Union[Literal["per_channel", "per_tensor"], Group]
Clip = Literal["none", "mse_search"]


class IntWeights(PassConfig):
    """Uniform integer weights; ``uint*`` (or ``symmetric: false``) store a zero point."""

    dtype: Literal["int8", "int4", "int3", "int2", "uint8", "uint4", "uint3", "uint2"]
    granularity: Granularity = "per_channel"
    symmetric: bool | None = Field(default=None, description="default: true for int*, false "
                                   "for uint*")
    clip: Clip = "none"

    @model_validator(mode="after")
    def _symmetric_matches_dtype(self) -> "IntWeights":
        if self.dtype.startswith("uint") and self.symmetric:
            raise ValueError(f"dtype {self.dtype!r} stores a zero point; symmetric must be false")
        return self

    @property
    def is_symmetric(self) -> bool:
        return not self.dtype.startswith("uint") if self.symmetric is None else self.symmetric

    @property
    def bits(self) -> int:
        return formats.bits_of(self.dtype)


class FloatWeights(PassConfig):
    """Floating-point weights with a scale per group (FP8 E4M3/E5M2, FP4 E2M1/E3M0)."""

    dtype: Literal["fp8_e4m3", "fp8_e5m2", "fp4_e2m1", "fp4_e3m0"]
    granularity: Granularity = Group(group=128)
    clip: Clip = "mse_search"
    exponent_search: bool = Field(default=False, description="per layer, keep the lowest-MSE "
                                  "of the formats of this width (E2M1/E3M0/INT4 or E4M3/E5M2/INT8)")


class PowerWeights(PassConfig):
    """NUPES: sign(w)|w|^a quantized uniformly; a searched per layer or fixed."""

    dtype: Literal["power"]
    bits: Literal[4, 8] = 4
    exponent: float | Literal["search"] = "search"
    granularity: Granularity = Group(group=128)
    clip: Clip = "mse_search"

    @field_validator("exponent")
    @classmethod
    def _positive(cls, value: Any) -> Any:
        if isinstance(value, float) and not 0.1 <= value <= 4.0:
            raise ValueError(f"exponent {value} is not in [0.1, 4]")
        return value


class CodebookWeights(PassConfig):
    """k-means codebook over runs of ``vector`` weights; indices uint8 (k <= 256) or uint16."""

    dtype: Literal["codebook"]
    vector: int = Field(default=4, ge=1, le=64)
    centroids: int = Field(default=256, ge=2, le=65536)
    iterations: int = Field(default=15, ge=0, le=1000)
    seed: int = 0


WeightQuant = Annotated[Union[IntWeights, FloatWeights, PowerWeights, CodebookWeights],
                        Field(discriminator="dtype")]


class ActivationQuant(PassConfig):
    """Per-tensor activation quantization: static (calibrated) or dynamic (at run time)."""

    dtype: Literal["int8", "uint8"] = "uint8"
    calibration: Literal["minmax", "percentile", "mse"] = "minmax"
    percentile: float = Field(default=99.99, gt=50, le=100)
    dynamic: bool = Field(default=False, description="DynamicQuantizeLinear (always uint8)")


class QuantizeConfig(PassConfig):
    """Options of ``quantize``."""

    weights: WeightQuant = IntWeights(dtype="int8")
    activations: Literal["none"] | ActivationQuant = "none"


# -- plans: what one weight becomes -----------------------------------------------------------

@dataclass
class _Plan:
    form: str                           # dq | unpack_dq | table | power | codebook
    description: str
    bits_per_weight: float
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    attributes: dict[str, Any] = field(default_factory=dict)
    weight_sqnr_db: float = math.inf
    activation: tuple[float, int] | None = None   # static (scale, zero point)

    @property
    def opset(self) -> int:
        if self.form == "dq" and "block_size" not in self.attributes and \
                self.arrays["q"].dtype in (np.int8, np.uint8):
            return PER_AXIS_OPSET
        return BLOCKED_OPSET


_INT_STORAGE = {8: (np.int8, np.uint8), 4: (ml_dtypes.int4, ml_dtypes.uint4)}


def _grouping(granularity: Granularity, site: WeightSite) -> Grouping:
    shape = tuple(site.array.shape)
    if isinstance(granularity, Group):
        return Grouping("group", shape, site.out_axis, site.in_axis, granularity.group)
    return Grouping(granularity, shape, site.out_axis, site.in_axis)


def _granularity_text(granularity: Granularity) -> str:
    return f"g{granularity.group}" if isinstance(granularity, Group) else granularity


def _sqnr(reference: np.ndarray, approx: np.ndarray) -> float:
    noise = float(np.sum((reference.astype(np.float64) - approx) ** 2))
    signal = float(np.sum(reference.astype(np.float64) ** 2))
    return math.inf if noise == 0 else 10 * math.log10(max(signal, 1e-300) / noise)


def _param_bits(*arrays: np.ndarray | None) -> int:
    return sum(a.size * 8 * a.dtype.itemsize for a in arrays if a is not None)


def _plan_int(site: WeightSite, bits: int, symmetric: bool, granularity: Granularity,
              clip: Clip, dtype_name: str, wdtype: np.dtype) -> _Plan:
    grouping = _grouping(granularity, site)
    g = grouping.view(site.array)
    q = formats.quantize_int(g, bits, symmetric=symmetric, clip_search=clip == "mse_search")
    scale = grouping.params(q.scale).astype(wdtype)
    deq = grouping.unview(q.dequantized)
    attrs = grouping.dequantize_attributes()
    text = f"{dtype_name} {_granularity_text(granularity)}" + (" mse" if clip != "none" else "")
    n = site.array.size
    if bits in _INT_STORAGE:
        storage = _INT_STORAGE[bits][0 if symmetric else 1]
        codes = grouping.unview(q.codes).astype(storage)
        zp = None if symmetric else grouping.params(q.zero_point).astype(storage)
        bpw = (n * bits + _param_bits(scale) + (zp.size * bits if zp is not None else 0)) / n
        arrays = {"q": codes, "scale": scale} | ({"zero_point": zp} if zp is not None else {})
        return _Plan("dq", text, bpw, arrays, attrs, _sqnr(site.array, deq))
    offset = 2 ** (bits - 1) if symmetric else 0
    codes = (grouping.unview(q.codes) + offset).astype(np.uint8)
    zp_groups = np.full(q.scale.shape, offset) if symmetric else q.zero_point
    zp = grouping.params(zp_groups).astype(np.uint8)
    packed = formats.pack_bits(codes, bits)
    bpw = (packed.size * 8 + _param_bits(scale) + zp.size * bits) / n
    return _Plan("unpack_dq", text, bpw, {"packed": packed, "scale": scale, "zero_point": zp},
                 attrs | {"bits": bits, "shape": list(codes.shape)}, _sqnr(site.array, deq))


def _table_layout(grouping: Grouping, per_group: np.ndarray) -> tuple[np.ndarray, int, int]:
    """(scale in kiln.DequantizeTable's layout, axis, block_size)."""
    rank = len(grouping.shape)
    if grouping.kind == "group":
        return grouping.params(per_group), grouping.in_axis, grouping.size
    if grouping.kind == "per_channel":
        shape = [1] * rank
        shape[grouping.out_axis] = grouping.shape[grouping.out_axis]
        return per_group.reshape(shape), grouping.out_axis, 1
    return per_group.reshape([1] * rank), 0, grouping.shape[0]


def _plan_float(site: WeightSite, dtype: str, granularity: Granularity, clip: Clip,
                wdtype: np.dtype) -> _Plan:
    grouping = _grouping(granularity, site)
    g = grouping.view(site.array)
    search = clip == "mse_search"
    n = site.array.size
    text = f"{dtype} {_granularity_text(granularity)}" + (" mse" if search else "")
    if dtype.startswith("fp8"):
        q = formats.quantize_fp8(g, dtype, clip_search=search)
        scale = grouping.params(q.scale).astype(wdtype)
        codes = grouping.unview(q.codes)
        return _Plan("dq", text, (n * 8 + _param_bits(scale)) / n,
                     {"q": codes, "scale": scale}, grouping.dequantize_attributes(),
                     _sqnr(site.array, grouping.unview(q.dequantized)))
    q = formats.quantize_fp4(g, dtype, clip_search=search)
    scale, axis, block = _table_layout(grouping, q.scale)
    scale = scale.astype(wdtype)
    table = formats.fp4_table(dtype).astype(wdtype)
    codes = grouping.unview(q.codes).astype(ml_dtypes.uint4)
    return _Plan("table", text, (n * 4 + _param_bits(scale, table)) / n,
                 {"codes": codes, "table": table, "scale": scale},
                 {"axis": axis, "block_size": block},
                 _sqnr(site.array, grouping.unview(q.dequantized)))


def _plan_power(site: WeightSite, cfg: PowerWeights, wdtype: np.dtype) -> _Plan:
    grouping = _grouping(cfg.granularity, site)
    g = grouping.view(site.array)
    search = cfg.clip == "mse_search"
    if cfg.exponent == "search":
        exponent, q = formats.search_power(g, cfg.bits, clip_search=search)
    else:
        exponent = float(cfg.exponent)
        q = formats.quantize_power(g, cfg.bits, exponent, clip_search=search)
    storage = _INT_STORAGE[cfg.bits][0]
    codes = grouping.unview(q.codes).astype(storage)
    scale = grouping.params(q.scale).astype(wdtype)
    n = site.array.size
    text = f"power a={exponent:g} int{cfg.bits} {_granularity_text(cfg.granularity)}"
    return _Plan("power", text, (n * cfg.bits + _param_bits(scale)) / n,
                 {"q": codes, "scale": scale,
                  "inverse_exponent": np.array(1.0 / exponent, dtype=wdtype)},
                 grouping.dequantize_attributes(),
                 _sqnr(site.array, grouping.unview(q.dequantized)))


def _plan_codebook(site: WeightSite, cfg: CodebookWeights, wdtype: np.dtype) -> _Plan | str:
    w = site.array
    if w.size % cfg.vector:
        return f"weight has {w.size} elements, not a multiple of vector {cfg.vector}"
    points = w.reshape(-1, cfg.vector)
    k = min(cfg.centroids, points.shape[0])
    centroids, assignment = formats.kmeans(points, k, iterations=cfg.iterations, seed=cfg.seed)
    index_dtype = np.uint8 if k <= 256 else np.uint16
    index = assignment.astype(index_dtype)
    codebook = centroids.astype(wdtype)
    deq = codebook[assignment].reshape(w.shape)
    bpw = (index.size * 8 * index.dtype.itemsize + _param_bits(codebook)) / w.size
    return _Plan("codebook", f"codebook k={k} d={cfg.vector}", bpw,
                 {"index": index, "codebook": codebook,
                  "shape": np.array(w.shape, dtype=np.int64)}, {}, _sqnr(w, deq))


def plan_weight(site: WeightSite, weights: WeightQuant) -> _Plan | str:
    """What the weight of ``site`` becomes under ``weights`` (or why it cannot)."""
    wdtype = site.array.dtype
    if isinstance(weights, IntWeights):
        return _plan_int(site, weights.bits, weights.is_symmetric, weights.granularity,
                         weights.clip, weights.dtype, wdtype)
    if isinstance(weights, FloatWeights):
        if not weights.exponent_search:
            return _plan_float(site, weights.dtype, weights.granularity, weights.clip, wdtype)
        width = formats.bits_of(weights.dtype)
        names = ["fp4_e2m1", "fp4_e3m0"] if width == 4 else ["fp8_e4m3", "fp8_e5m2"]
        tried = [_plan_float(site, name, weights.granularity, weights.clip, wdtype)
                 for name in names]
        tried.append(_plan_int(site, width, True, weights.granularity, weights.clip,
                               f"int{width}", wdtype))
        best = max(tried, key=lambda p: p.weight_sqnr_db)
        best.description += " (searched: " + ", ".join(
            f"{p.description.split()[0]} {p.weight_sqnr_db:.1f} dB" for p in tried) + ")"
        return best
    if isinstance(weights, PowerWeights):
        return _plan_power(site, weights, wdtype)
    return _plan_codebook(site, weights, wdtype)


# -- activation calibration -----------------------------------------------------------------

_ACT_RANGE = {"uint8": (0, 255), "int8": (-128, 127)}
#: Clip ratios of the calibrated range tried by ``calibration: mse``.
ACTIVATION_CLIP_GRID = np.linspace(1.0, 0.3, 36)
#: At most this many values enter the MSE search (a deterministic stride subsample).
ACTIVATION_MSE_VALUES = 1 << 20


def _qparams(lo: float, hi: float, dtype: str) -> tuple[float, int]:
    qmin, qmax = _ACT_RANGE[dtype]
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / (qmax - qmin) or 1.0
    zero_point = int(np.clip(round(qmin - lo / scale), qmin, qmax))
    return float(scale), zero_point


def _fake_quant(x: np.ndarray, scale: float, zero_point: int, dtype: str) -> np.ndarray:
    qmin, qmax = _ACT_RANGE[dtype]
    return (np.clip(np.round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale


def calibrate_range(values: Sequence[np.ndarray], cfg: ActivationQuant) -> tuple[float, int]:
    """Per-tensor (scale, zero point) of an activation from its calibration values."""
    flat = np.concatenate([np.asarray(v, dtype=np.float64).reshape(-1) for v in values])
    if cfg.calibration == "percentile":
        lo, hi = np.percentile(flat, [100 - cfg.percentile, cfg.percentile])
        return _qparams(float(lo), float(hi), cfg.dtype)
    lo, hi = float(flat.min()), float(flat.max())
    if cfg.calibration == "minmax":
        return _qparams(lo, hi, cfg.dtype)
    sample = flat[::max(1, flat.size // ACTIVATION_MSE_VALUES)]
    best, best_err = _qparams(lo, hi, cfg.dtype), math.inf
    for c in ACTIVATION_CLIP_GRID:
        params = _qparams(c * lo, c * hi, cfg.dtype)
        err = float(np.mean((_fake_quant(sample, *params, cfg.dtype) - sample) ** 2))
        if err < best_err:
            best, best_err = params, err
    return best


# -- the pass ---------------------------------------------------------------------------------

class Quantize(KilnPass):
    """Quantize Conv/Gemm/MatMul weights (int, FP8/FP4, power, codebook) and activations."""

    name = "quantize"
    config_class = QuantizeConfig
    exact = False
    needs_calibration = True

    def candidates(self, model: ir.Model) -> list[Candidate]:
        found: list[Candidate] = []
        cfg: QuantizeConfig = self.config
        activations = cfg.activations if isinstance(cfg.activations, ActivationQuant) else None
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
            found.append(Candidate(node, f"{label} [{plan.description}, "
                                   f"{plan.bits_per_weight:.2f} bits/weight, weight SQNR "
                                   f"{plan.weight_sqnr_db:.1f} dB]", nodes=(node,), data=plan))
        if activations is not None and not activations.dynamic:
            self._calibrate(model, [c for c in found if c.accepted], activations)
        accepted = [c for c in found if c.accepted]
        if accepted:
            total = sum(c.anchor.inputs[1].const_value.size for c in accepted)
            bits = sum(c.data.bits_per_weight * c.anchor.inputs[1].const_value.size
                       for c in accepted)
            self.note = f"{bits / total:.2f} bits/weight over {len(accepted)} weights"
        return found

    def _calibrate(self, model: ir.Model, accepted: list[Candidate],
                   cfg: ActivationQuant) -> None:
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
        ranges = {name: calibrate_range(values[name], cfg) for name in names}
        for c in accepted:
            c.data.activation = ranges[c.anchor.inputs[0].name]

    def rewrite(self, model: ir.Model, accepted: Sequence[Candidate]) -> int:
        needed = max(c.data.opset for c in accepted)
        if isinstance(self.config.activations, ActivationQuant):
            needed = max(needed, PER_AXIS_OPSET)
        ensure_opset(model, needed)
        graph = model.graph
        activation_cache: dict[str, ir.Value] = {}
        for candidate in accepted:
            node: ir.Node = candidate.anchor
            plan: _Plan = candidate.data
            old = node.inputs[1]
            new_nodes, weight = _emit_weight(model, old, plan)
            graph.insert_before(node, new_nodes)
            node.replace_input_with(1, weight)
            _drop_constant(graph, old)
            if isinstance(self.config.activations, ActivationQuant):
                self._quantize_activation(graph, node, plan, activation_cache)
        kiln_ops.sync_function_opsets(model)
        return len(accepted)

    def _quantize_activation(self, graph: ir.Graph, node: ir.Node, plan: _Plan,
                             cache: dict[str, ir.Value]) -> None:
        cfg: ActivationQuant = self.config.activations
        x = node.inputs[0]
        if x.name in cache:
            node.replace_input_with(0, cache[x.name])
            return
        base = x.name or "x"
        tag = {QUANT_KEY: f"activation {'dynamic uint8' if cfg.dynamic else cfg.dtype}"}
        if cfg.dynamic:
            dql = ir.Node("", "DynamicQuantizeLinear", [x], num_outputs=3,
                          name=unique_name(graph, f"{base}_dynamic_quantize"), metadata_props=tag)
            q, s, z = dql.outputs
            q.name, s.name, z.name = (unique_name(graph, f"{base}_{p}")
                                      for p in ("quantized", "scale", "zero_point"))
            dq = ir.Node("", "DequantizeLinear", [q, s, z], num_outputs=1,
                         name=unique_name(graph, f"{base}_dequantize"), metadata_props=tag)
            new = [dql, dq]
        else:
            scale, zp = plan.activation
            zdtype = np.uint8 if cfg.dtype == "uint8" else np.int8
            s = add_initializer(graph, f"{base}_scale", np.array(scale, dtype=np.float32))
            z = add_initializer(graph, f"{base}_zero_point", np.array(zp, dtype=zdtype))
            ql = ir.Node("", "QuantizeLinear", [x, s, z], num_outputs=1,
                         name=unique_name(graph, f"{base}_quantize"), metadata_props=tag)
            ql.outputs[0].name = unique_name(graph, f"{base}_quantized")
            dq = ir.Node("", "DequantizeLinear", [ql.outputs[0], s, z], num_outputs=1,
                         name=unique_name(graph, f"{base}_dequantize"), metadata_props=tag)
            new = [ql, dq]
        out = dq.outputs[0]
        out.name = unique_name(graph, f"{base}_dequantized")
        out.shape, out.type = x.shape, x.type
        graph.insert_before(node, new)
        node.replace_input_with(0, out)
        cache[x.name] = out


def ensure_opset(model: ir.Model, needed: int) -> None:
    """Raise the model's default opset to ``needed`` (converting its nodes) and its IR version
    to one that knows 4-bit types and local functions."""
    current = model.opset_imports.get("", 1)
    if current < needed:
        from onnxscript import version_converter

        version_converter.convert_version(model, needed)
        model.opset_imports[""] = max(model.opset_imports.get("", needed), needed)
        logger.info("raised the model's opset from %d to %d", current, needed)
    if needed >= BLOCKED_OPSET:
        model.ir_version = max(model.ir_version or 0, 10)


def _drop_constant(graph: ir.Graph, value: ir.Value) -> None:
    if value.uses() or value.is_graph_output():
        return
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant":
        graph.remove(producer, safe=True)
    elif value.name:
        remove_unused_initializers(graph, [value.name])


def _emit_weight(model: ir.Model, old: ir.Value, plan: _Plan) -> tuple[list[ir.Node], ir.Value]:
    """Initializers and nodes computing W^ for ``plan``; returns (nodes, W^)."""
    graph = model.graph
    base = old.name or "weight"
    tag = {QUANT_KEY: plan.description}
    a = plan.arrays

    def init(suffix: str, array: np.ndarray) -> ir.Value:
        return add_initializer(graph, f"{base}_{suffix}", array)

    def node(domain: str, op: str, inputs: list[ir.Value | None], suffix: str,
             attributes: dict[str, Any] | None = None) -> ir.Node:
        attrs = [int_attribute(k, v) for k, v in (attributes or {}).items()]
        made = ir.Node(domain, op, inputs, attrs, num_outputs=1,
                       name=unique_name(graph, f"{base}_{suffix}"), metadata_props=dict(tag))
        made.outputs[0].name = unique_name(graph, f"{base}_{suffix}")
        return made

    nodes: list[ir.Node] = []
    if plan.form in ("dq", "power"):
        inputs = [init("quantized", a["q"]), init("scale", a["scale"])]
        if "zero_point" in a:
            inputs.append(init("zero_point", a["zero_point"]))
        nodes.append(node("", "DequantizeLinear", inputs, "dequantized", plan.attributes))
        if plan.form == "power":
            y = nodes[-1].outputs[0]
            nodes.append(node("", "Abs", [y], "abs"))
            nodes.append(node("", "Pow", [nodes[-1].outputs[0],
                                          init("inverse_exponent", a["inverse_exponent"])], "pow"))
            nodes.append(node("", "Sign", [y], "sign"))
            nodes.append(node("", "Mul", [nodes[-1].outputs[0], nodes[-2].outputs[0]],
                              "power_dequantized"))
    elif plan.form == "unpack_dq":
        kiln_ops.ensure_function(model, kiln_ops.UNPACK_BITS)
        unpack = node(kiln_ops.DOMAIN, kiln_ops.UNPACK_BITS, [init("packed", a["packed"])],
                      "codes", {"bits": plan.attributes["bits"],
                                "shape": plan.attributes["shape"]})
        attrs = {k: v for k, v in plan.attributes.items() if k in ("axis", "block_size")}
        nodes += [unpack, node("", "DequantizeLinear",
                               [unpack.outputs[0], init("scale", a["scale"]),
                                init("zero_point", a["zero_point"])], "dequantized", attrs)]
    elif plan.form == "table":
        kiln_ops.ensure_function(model, kiln_ops.DEQUANTIZE_TABLE)
        nodes.append(node(kiln_ops.DOMAIN, kiln_ops.DEQUANTIZE_TABLE,
                          [init("codes", a["codes"]), init("table", a["table"]),
                           init("scale", a["scale"])], "dequantized", plan.attributes))
    else:  # codebook
        cast = node("", "Cast", [init("index", a["index"])], "index64",
                    {"to": ir.DataType.INT64})
        gather = node("", "Gather", [init("codebook", a["codebook"]), cast.outputs[0]],
                      "vectors", {"axis": 0})
        nodes += [cast, gather, node("", "Reshape", [gather.outputs[0], init("shape", a["shape"])],
                                     "dequantized")]
    out = nodes[-1].outputs[0]
    out.shape, out.type = old.shape, old.type
    return nodes, out


def int_attribute(name: str, value: Any) -> ir.Attr:
    if isinstance(value, ir.DataType):
        return ir.AttrInt64(name, int(value))
    if isinstance(value, (list, tuple)):
        return ir.AttrInt64s(name, [int(v) for v in value])
    return ir.AttrInt64(name, int(value))
