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
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
from pydantic import Field, field_validator, model_validator

from kiln.compiler.core import graph as kir
from kiln.compiler.core.errors import PassError
from kiln.compiler.core.pass_api import (Candidate, KilnPass, PassConfig, add_initializer,
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
        ensure_opset(model, needed, pass_name=self.name)
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


# -- opset upgrade ----------------------------------------------------------------------------

#: Tensor attributes larger than this go through onnx's converter as a one-element stand-in
#: (only Constant/ConstantOfShape carry tensors; their upgrades never touch them).
_STAND_IN_ELEMENTS = 64
_TAG = re.compile(r"^[io](\d+)_(\d+)$")


def _default_opset(model: ir.Model) -> int:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))


def ensure_opset(model: ir.Model, needed: int, *, pass_name: str) -> None:
    """Raise the model's default opset to ``needed`` and its IR version to one that knows
    the opset (and, for ``BLOCKED_OPSET``, 4-bit types and local functions).

    Every standard-domain node whose operator changed between the two opsets (main graph,
    subgraphs, model-local functions) goes through onnx's version converter, all in one
    call but each node on its own, so only its own signature changes: a node whose upgrade
    is a version bump is left as it is; one whose inputs or attributes changed (ReduceMean's
    ``axes`` attribute -> input, Clip-6's ``min``/``max``...) is edited in place with the
    converter's new nodes (Constants) before it; one that becomes other nodes (Softmax-11's
    2-D coercion, Upsample -> Resize) is replaced, its outputs keeping their names and uses.
    Weights never leave the model. The converter's result is checked against the target
    opset's schemas, and the model changes only once every node has converted: otherwise
    ``PassError`` names the model's opset, the op and the node that block it. (onnxscript's
    converter, used before, starts at opset 18, inlines model-local functions and leaves a
    node it cannot convert as it was, under the new opset import.)
    """
    current = _default_opset(model)
    if current < needed:
        batches: dict[int, list[ir.Node]] = {}
        for container, opset in [(model.graph, current)] + [
                (f, f.opset_imports.get("", f.opset_imports.get("ai.onnx", current)))
                for f in model.functions.values()]:
            if opset >= needed:
                continue
            for node in ir.traversal.RecursiveGraphIterator(container):
                if node.domain in ("", "ai.onnx") and _op_changed(node, opset, needed,
                                                                  pass_name):
                    batches.setdefault(opset, []).append(node)
        # Some adapters need input ranks (Add-6 broadcast): infer what the model does not say.
        known = _inferred_types(model) if any(
            v is not None and (v.type is None or v.shape is None)
            for nodes in batches.values() for n in nodes for v in n.inputs) else {}
        names = _NameSource(model)
        upgrades: list[_Upgrade] = []
        retypes: list[_Retype] = []
        for opset, nodes in batches.items():
            planned, types = _plan_upgrades(nodes, opset, needed, pass_name, known)
            upgrades += planned
            retypes += types
        replaced: dict[ir.Value, ir.Value] = {}
        for upgrade in upgrades:                      # nothing has changed until here
            upgrade.apply(names, replaced)
        for value, dtype in retypes:                  # e.g. Dropout's mask: float -> bool
            replaced.get(value, value).dtype = dtype
        for opsets in [model.opset_imports] + [f.opset_imports for f in model.functions.values()]:
            for domain in ("", "ai.onnx"):
                if domain in opsets and opsets[domain] < needed:
                    opsets[domain] = needed
        model.opset_imports[""] = needed
        logger.info("raised the model's opset from %d to %d (%d nodes rewritten)", current,
                    needed, len(upgrades))
    min_ir = onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", needed)])
    model.ir_version = max(model.ir_version or 0, min_ir, 10 if needed >= BLOCKED_OPSET else 0)


def _op_changed(node: ir.Node, opset: int, needed: int, pass_name: str) -> bool:
    try:
        old = onnx.defs.get_schema(node.op_type, opset, "").since_version
    except onnx.defs.SchemaError:
        raise PassError(f"cannot raise the model from opset {opset} to {needed}: "
                        f"{node.op_type} ({kir.node_label(node)}) is not a standard op at "
                        f"opset {opset}", pass_name=pass_name) from None
    return onnx.defs.get_schema(node.op_type, needed, "").since_version != old


class _NameSource:
    """Fresh value names, unique across the model, for the converter's new values."""

    def __init__(self, model: ir.Model) -> None:
        self.taken: set[str] = set()
        for graph in [*model.graphs(), *model.functions.values()]:
            self.taken.update(v.name or "" for v in graph.inputs)
            if isinstance(graph, ir.Graph):
                self.taken.update(graph.initializers)
            for node in ir.traversal.RecursiveGraphIterator(graph):
                self.taken.update(v.name or "" for v in node.outputs)

    def __call__(self, base: str) -> str:
        name, i = base, 0
        while name in self.taken:
            i += 1
            name = f"{base}_{i}"
        self.taken.add(name)
        return name


@dataclass
class _Upgrade:
    """How one node becomes its target-opset form. ``new_nodes`` (the converter's, still
    reading its stand-in values, which ``sent`` maps to the model's) go before it; then
    either the node itself takes ``main``'s inputs and attributes (same op, same outputs) or
    ``new_nodes`` replace it, ``outputs[k]`` standing for its output k."""

    node: ir.Node
    new_nodes: list[ir.Node]
    sent: dict[str, ir.Value]
    main: ir.Node | None = None
    outputs: dict[int, ir.Value] = field(default_factory=dict)

    def apply(self, names: _NameSource, replaced: dict[ir.Value, ir.Value]) -> None:
        """Make the change; ``replaced`` maps the outputs of nodes replaced so far to the
        values that stand for them (a later node may read one)."""
        node, container = self.node, self.node.graph
        base = (node.outputs[0].name if node.outputs else None) or node.op_type.lower()
        keep = {id(v) for v in self.outputs.values()}
        for made in [*self.new_nodes, *([self.main] if self.main else [])]:
            for j, value in enumerate(made.inputs):
                if value is not None and value.name in self.sent and value.producer() is None:
                    made.replace_input_with(j, replaced.get(self.sent[value.name],
                                                            self.sent[value.name]))
        for i, made in enumerate(self.new_nodes):
            for key, value in node.metadata_props.items():
                made.metadata_props.setdefault(key, value)
            made.name = None if not node.name else node.name \
                if self.main is None and made is self.new_nodes[-1] else \
                f"{node.name}_{made.op_type}_{i}"
            for value in made.outputs:
                if id(value) not in keep:
                    value.name = names(f"{base}_{made.op_type.lower()}")
        container.insert_before(node, self.new_nodes)
        if self.main is not None:
            inputs = list(self.main.inputs)
            self.main.resize_inputs(0)
            node.resize_inputs(len(inputs))
            for j, value in enumerate(inputs):
                node.replace_input_with(j, value)
            node.attributes.clear()
            for attr in self.main.attributes.values():
                node.attributes[attr.name] = attr
            return
        for k, new in self.outputs.items():
            old = node.outputs[k]
            name = old.name
            old.replace_all_uses_with(new, replace_graph_outputs=True)
            new.type, new.shape = old.type or new.type, old.shape or new.shape
            old.name = None
            new.name = name
            replaced[old] = new
        container.remove(node, safe=True)


def _stand_in(node: ir.Node, i: int) -> tuple[onnx.NodeProto, bool]:
    """``node`` as a NodeProto with tagged input/output names (i{i}_{j} / o{i}_{k}), its
    subgraphs emptied and large tensors shrunk, never serialized (then the second item is
    True: the conversion must leave the node as it is)."""
    proto = onnx.NodeProto(op_type=node.op_type, name=node.name or "")
    proto.input.extend("" if v is None else f"i{i}_{j}" for j, v in enumerate(node.inputs))
    proto.output.extend("" if v.name == "" else f"o{i}_{k}" for k, v in enumerate(node.outputs))
    shrunk = False
    for attr in node.attributes.values():
        if attr.is_ref():
            proto.attribute.append(ir.serde.serialize_reference_attribute(attr))
        elif attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
            proto.attribute.append(onnx.helper.make_attribute(
                attr.name, onnx.GraphProto(), attr_type=onnx.AttributeProto.GRAPH))
            shrunk = True
        elif attr.type == ir.AttributeType.TENSOR and \
                attr.as_tensor().size > _STAND_IN_ELEMENTS:
            stand_in = np.zeros(1, attr.as_tensor().dtype.numpy())
            proto.attribute.append(onnx.helper.make_attribute(
                attr.name, ir.serde.serialize_tensor(ir.tensor(stand_in))))
            shrunk = True
        else:
            proto.attribute.append(ir.serde.serialize_attribute(attr))
    return proto, shrunk


def _inferred_types(model: ir.Model) -> dict[str, onnx.TypeProto]:
    """onnx's shape inference over the main graph, initializers sent as typed inputs (no
    data), the model left untouched."""
    graph = model.graph
    inputs = [ir.serde.serialize_value(v) for v in graph.inputs]
    taken = {v.name for v in graph.inputs}
    for name, value in graph.initializers.items():
        if name not in taken and value.const_value is not None:
            inputs.append(onnx.helper.make_tensor_value_info(
                name, int(value.const_value.dtype), list(value.const_value.shape)))
    proto = onnx.helper.make_model(
        onnx.helper.make_graph([ir.serde.serialize_node(n) for n in graph], "infer", inputs,
                               [ir.serde.serialize_value(v) for v in graph.outputs]),
        opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in model.opset_imports.items()],
        functions=[ir.serde.serialize_function(f) for f in model.functions.values()])
    proto.ir_version = max(model.ir_version or 0, 8 if model.functions else 3)
    try:
        proto = onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=True)
    except Exception:  # inference is best effort here
        return {}
    return {v.name: v.type for v in [*proto.graph.value_info, *proto.graph.output]}


def _value_info(value: ir.Value, name: str, known: dict[str, onnx.TypeProto]
                ) -> onnx.ValueInfoProto:
    info = ir.serde.serialize_value(value, name=name)
    if (value.type is None or value.shape is None) and value.name in known:
        info.type.CopyFrom(known[value.name])
    if not info.HasField("type"):
        info.type.tensor_type.elem_type = onnx.TensorProto.UNDEFINED
    return info


def _convert(protos: list[onnx.NodeProto], infos: list[onnx.ValueInfoProto], opset: int,
             needed: int) -> onnx.ModelProto:
    inputs = {name for p in protos for name in p.input if name}
    graph = onnx.helper.make_graph(
        protos, "upgrade", [i for i in infos if i.name in inputs],
        [onnx.helper.make_value_info(name, onnx.TypeProto()) for p in protos
         for name in p.output if name])
    mini = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    return onnx.version_converter.convert_version(mini, needed)


_Retype = tuple[ir.Value, ir.DataType]


def _plan_upgrades(nodes: list[ir.Node], opset: int, needed: int, pass_name: str,
                   known: dict[str, onnx.TypeProto]) -> tuple[list[_Upgrade], list[_Retype]]:
    """One onnx version-converter call for ``nodes`` (each its own island of the graph it is
    sent in), checked: ``_Upgrade``s for the nodes that do not just change version, and the
    outputs whose element type the target opset's type inference changes."""
    def fail(node: ir.Node, why: str) -> PassError:
        return PassError(f"cannot raise the model from opset {opset} to {needed}: "
                         f"{node.op_type} ({kir.node_label(node)}) {why}", pass_name=pass_name)

    stand_ins = [_stand_in(node, i) for i, node in enumerate(nodes)]
    infos = [_value_info(v, f"i{i}_{j}", known) for i, node in enumerate(nodes)
             for j, v in enumerate(node.inputs) if v is not None]
    try:
        converted = _convert([p for p, _ in stand_ins], infos, opset, needed)
    except Exception:  # find the op that blocks, for the message
        for op in dict.fromkeys(node.op_type for node in nodes):
            some = [i for i, node in enumerate(nodes) if node.op_type == op]
            try:
                _convert([stand_ins[i][0] for i in some], infos, opset, needed)
            except Exception as error:
                detail = (str(error).strip().splitlines() or [type(error).__name__])[0]
                detail = detail.rsplit("failed: ", 1)[-1]     # the C++ assertion's message
                raise fail(nodes[some[0]], f"does not convert ({detail})") from error
        raise
    if opset < 21 <= needed:
        _group_norm_21(converted.graph)
    ctx = onnx.checker.C.CheckerContext()
    ctx.ir_version = onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", needed)])
    ctx.opset_imports = {"": needed}
    owner = _owners(converted.graph)
    for made in converted.graph.node:
        try:
            onnx.checker.check_node(made, ctx)
        except Exception as error:  # the converter left an invalid node
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                   for a in made.attribute) and "graph" in str(error).lower():
                continue        # an emptied subgraph stand-in; the node is kept as it is
            node = nodes[owner[made.output[0] if made.output else made.name]]
            raise fail(node, f"converts to an invalid {made.op_type} "
                       f"({str(error).strip().splitlines()[0]})") from error
    types = _output_types(converted)
    retypes = [(v, types[f"o{i}_{k}"]) for i, node in enumerate(nodes)
               for k, v in enumerate(node.outputs)
               if v.dtype is not None and types.get(f"o{i}_{k}", v.dtype) != v.dtype]
    protos: dict[int, list[onnx.NodeProto]] = {}
    for made in converted.graph.node:
        if made.output[0] not in owner:
            raise PassError(f"cannot raise the model from opset {opset} to {needed}: onnx's "
                            f"converter made a {made.op_type} that adapts no node",
                            pass_name=pass_name)
        protos.setdefault(owner[made.output[0]], []).append(made)
    todo = [i for i, (proto, _) in enumerate(stand_ins)
            if not (len(protos.get(i, [])) == 1 and _same_node(protos[i][0], proto))]
    for i in todo:
        if stand_ins[i][1]:
            raise fail(nodes[i], "needs a rewrite of a graph or large tensor attribute")
    if not todo:
        return [], retypes
    graph = ir.serde.deserialize_model(converted).graph
    graph.outputs.clear()
    groups: dict[int, list[ir.Node]] = {}
    for made in graph:
        groups.setdefault(owner[made.outputs[0].name], []).append(made)
    upgrades = []
    for i in todo:
        node, group = nodes[i], groups.get(i, [])
        graph.remove(group)
        sent = {f"i{i}_{j}": v for j, v in enumerate(node.inputs) if v is not None}
        new_nodes: list[ir.Node] = []
        for made in group:              # the converter's initializers become Constants
            for j, value in enumerate(made.inputs):
                if value is not None and value.name not in sent and value.producer() is None:
                    if value.const_value is None:
                        raise fail(node, f"reads {value.name!r}, which the converter left "
                                   "undefined")
                    constant = ir.Node("", "Constant", [], [ir.AttrTensor(
                        "value", value.const_value)], num_outputs=1)
                    new_nodes.append(constant)
                    made.replace_input_with(j, constant.outputs[0])
        tagged = {int(m.group(2)): v for made in group for v in made.outputs
                  if (m := _TAG.match(v.name or "")) and v.name.startswith("o")}
        for k, value in enumerate(node.outputs):
            if k not in tagged and (value.uses() or value.is_graph_output()):
                raise fail(node, f"loses its output {value.name!r} in the conversion")
        main = group[-1] if group else None
        if main is not None and main.op_type == node.op_type and \
                len(main.outputs) == len(node.outputs) and \
                all(main.outputs[k] is v for k, v in tagged.items()):
            upgrades.append(_Upgrade(node, new_nodes + group[:-1], sent, main=main))
        else:
            upgrades.append(_Upgrade(node, new_nodes + group, sent, outputs=tagged))
    return upgrades, retypes


def _output_types(converted: onnx.ModelProto) -> dict[str, ir.DataType]:
    """Element types of the converted graph's outputs under the target opset's inference
    (the converter keeps those inferred at the source opset)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(converted)
    del probe.graph.value_info[:]
    for out in probe.graph.output:
        out.ClearField("type")
    try:
        probe = onnx.shape_inference.infer_shapes(probe)
    except Exception:  # inference is best effort here
        return {}
    return {out.name: ir.DataType(out.type.tensor_type.elem_type) for out in probe.graph.output
            if out.type.tensor_type.elem_type}


def _owners(graph: onnx.GraphProto) -> dict[str, int]:
    """For each value (and node) name of the converted graph, which sent node it belongs to:
    the converter only adds nodes connected to the node they adapt."""
    owner: dict[str, int] = {}
    for name in [n for node in graph.node for n in (*node.input, *node.output)]:
        if (m := _TAG.match(name)):
            owner[name] = int(m.group(1))
    changed = True
    while changed:
        changed = False
        for node in graph.node:
            names = [n for n in (*node.input, *node.output) if n]
            found = next((owner[n] for n in names if n in owner), None)
            if found is None:
                continue
            for n in names:
                if n not in owner:
                    owner[n] = found
                    changed = True
    return owner


def _same_node(a: onnx.NodeProto, b: onnx.NodeProto) -> bool:
    def key(p: onnx.NodeProto) -> tuple:
        return (p.op_type, p.domain or "", list(p.input), list(p.output),
                sorted(x.SerializeToString() for x in p.attribute))

    return key(a) == key(b)


def _group_norm_21(graph: onnx.GraphProto) -> None:
    """GroupNormalization-18's scale/bias are per group, 21's per channel: repeat them (onnx's
    own GroupNormalization_20_21 adapter is registered, then replaced by a compatible one)."""
    h = onnx.helper
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type == "GroupNormalization" and _TAG.match(node.input[1]):
            groups = next(a.i for a in node.attribute if a.name == "num_groups")
            p = f"{node.output[0]}_repeat"

            def const(name: str, values: list[int]) -> onnx.NodeProto:
                return h.make_node("Constant", [], [f"{p}_{name}"], value=h.make_tensor(
                    "", onnx.TensorProto.INT64, [len(values)], values))

            nodes += [h.make_node("Shape", [node.input[0]], [f"{p}_c"], start=1, end=2),
                      const("g", [groups]), h.make_node("Div", [f"{p}_c", f"{p}_g"],
                                                        [f"{p}_per"]),
                      const("one", [1]), h.make_node("Concat", [f"{p}_one", f"{p}_per"],
                                                     [f"{p}_expand"], axis=0),
                      const("column", [-1, 1]), const("flat", [-1])]
            for j in (1, 2):
                nodes += [h.make_node("Reshape", [node.input[j], f"{p}_column"], [f"{p}{j}_a"]),
                          h.make_node("Expand", [f"{p}{j}_a", f"{p}_expand"], [f"{p}{j}_b"]),
                          h.make_node("Reshape", [f"{p}{j}_b", f"{p}_flat"], [f"{p}{j}"])]
                node.input[j] = f"{p}{j}"
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)


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
