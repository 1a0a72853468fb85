"""What one weight becomes under a ``quantize`` config: its codes, scales, zero points or
tables, the form of the graph that decodes it, its bits per weight and its SQNR.

The quantizers themselves are in ``formats``; ``emit`` turns a plan into nodes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np

from kiln.compiler.core import packing
from kiln.compiler.core.metrics import sqnr_db
from kiln.compiler.core.opset import BLOCKED_OPSET, PER_AXIS_OPSET
from kiln.passes.quant import formats, gptq
from kiln.passes.quant.config import (
    Clip,
    CodebookWeights,
    FloatWeights,
    Granularity,
    IntWeights,
    PerGroup,
    PerTensor,
    PowerWeights,
    WeightQuant,
)
from kiln.passes.quant.weights import Grouping, WeightSite


@dataclass
class WeightPlan:
    """The arrays and attributes of one quantized weight; ``form`` names its decode graph."""

    form: str                           # dq | unpack_dq | table | power | codebook
    description: str
    bits_per_weight: float
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    attributes: dict[str, Any] = field(default_factory=dict)
    weight_sqnr_db: float = math.inf
    activation: tuple[float, int] | None = None   # static (scale, zero point)
    input_mean: np.ndarray | None = None           # E[x] per input channel (bias correction)
    activation_dtype: str | None = None            # overrides the config's (int16 fallback)

    @property
    def opset(self) -> int:
        if self.activation_dtype == "int16":
            return BLOCKED_OPSET                        # 16-bit QuantizeLinear
        if self.form == "dq" and "block_size" not in self.attributes and \
                self.arrays["q"].dtype in (np.int8, np.uint8):
            return PER_AXIS_OPSET
        return BLOCKED_OPSET


_INT_STORAGE = {8: (np.int8, np.uint8), 4: (ml_dtypes.int4, ml_dtypes.uint4)}


def _grouping(granularity: Granularity, site: WeightSite) -> Grouping:
    shape = tuple(site.array.shape)
    if isinstance(granularity, PerGroup):
        return Grouping("group", shape, site.out_axis, site.in_axis, granularity.size)
    kind = "per_tensor" if isinstance(granularity, PerTensor) else "per_channel"
    return Grouping(kind, shape, site.out_axis, site.in_axis)


def _granularity_text(granularity: Granularity) -> str:
    if isinstance(granularity, PerGroup):
        return f"g{granularity.size}"
    return "per_tensor" if isinstance(granularity, PerTensor) else "per_channel"


def _param_bits(*arrays: np.ndarray | None) -> int:
    return sum(a.size * 8 * a.dtype.itemsize for a in arrays if a is not None)


def _plan_int(site: WeightSite, bits: int, symmetric: bool, granularity: Granularity,
              clip: Clip, dtype_name: str, wdtype: np.dtype,
              hessian: gptq.Hessian | None = None, code_bits: int | None = None) -> WeightPlan:
    """``bits``-bit storage; the codes span ``code_bits`` (fewer: ``reduce_range``)."""
    code_bits = code_bits or bits
    grouping = _grouping(granularity, site)
    g = grouping.view(site.array)
    q = formats.quantize_int(g, code_bits, symmetric=symmetric,
                             clip_search=clip == "mse_search")
    if hessian is not None:
        q = gptq.rounded(q, grouping, site, hessian, code_bits, symmetric)
    scale = grouping.params(q.scale).astype(wdtype)
    deq = grouping.unview(q.dequantized)
    attrs = grouping.dequantize_attributes()
    text = f"{dtype_name} {_granularity_text(granularity)}" + (" mse" if clip != "none" else "") \
        + (" gptq" if hessian is not None else "") \
        + (f" {code_bits}-bit range" if code_bits != bits else "")
    n = site.array.size
    if bits in _INT_STORAGE:
        storage = _INT_STORAGE[bits][0 if symmetric else 1]
        codes = grouping.unview(q.codes).astype(storage)
        zp = None if symmetric else grouping.params(q.zero_point).astype(storage)
        bpw = (n * bits + _param_bits(scale) + (zp.size * bits if zp is not None else 0)) / n
        arrays = {"q": codes, "scale": scale} | ({"zero_point": zp} if zp is not None else {})
        return WeightPlan("dq", text, bpw, arrays, attrs, sqnr_db(site.array, deq))
    offset = 2 ** (bits - 1) if symmetric else 0
    codes = (grouping.unview(q.codes) + offset).astype(np.uint8)
    zp_groups = np.full(q.scale.shape, offset) if symmetric else q.zero_point
    zp = grouping.params(zp_groups).astype(np.uint8)
    packed = packing.pack_bits(codes, bits)
    bpw = (packed.size * 8 + _param_bits(scale) + zp.size * bits) / n
    return WeightPlan("unpack_dq", text, bpw, {"packed": packed, "scale": scale, "zero_point": zp},
                 attrs | {"bits": bits, "shape": list(codes.shape)}, sqnr_db(site.array, deq))


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
                wdtype: np.dtype) -> WeightPlan:
    grouping = _grouping(granularity, site)
    g = grouping.view(site.array)
    search = clip == "mse_search"
    n = site.array.size
    text = f"{dtype} {_granularity_text(granularity)}" + (" mse" if search else "")
    if dtype.startswith("fp8"):
        q = formats.quantize_fp8(g, dtype, clip_search=search)
        scale = grouping.params(q.scale).astype(wdtype)
        codes = grouping.unview(q.codes)
        return WeightPlan("dq", text, (n * 8 + _param_bits(scale)) / n,
                     {"q": codes, "scale": scale}, grouping.dequantize_attributes(),
                     sqnr_db(site.array, grouping.unview(q.dequantized)))
    q = formats.quantize_fp4(g, dtype, clip_search=search)
    scale, axis, block = _table_layout(grouping, q.scale)
    scale = scale.astype(wdtype)
    table = packing.fp4_table(dtype).astype(wdtype)
    codes = grouping.unview(q.codes).astype(ml_dtypes.uint4)
    return WeightPlan("table", text, (n * 4 + _param_bits(scale, table)) / n,
                 {"codes": codes, "table": table, "scale": scale},
                 {"axis": axis, "block_size": block},
                 sqnr_db(site.array, grouping.unview(q.dequantized)))


def _plan_power(site: WeightSite, cfg: PowerWeights, wdtype: np.dtype) -> WeightPlan:
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
    return WeightPlan("power", text, (n * cfg.bits + _param_bits(scale)) / n,
                 {"q": codes, "scale": scale,
                  "inverse_exponent": np.array(1.0 / exponent, dtype=wdtype)},
                 grouping.dequantize_attributes(),
                 sqnr_db(site.array, grouping.unview(q.dequantized)))


def _plan_codebook(site: WeightSite, cfg: CodebookWeights, wdtype: np.dtype) -> WeightPlan | str:
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
    return WeightPlan("codebook", f"codebook k={k} d={cfg.vector}", bpw,
                 {"index": index, "codebook": codebook,
                  "shape": np.array(w.shape, dtype=np.int64)}, {}, sqnr_db(w, deq))


def plan_weight(site: WeightSite, weights: WeightQuant,
                hessian: gptq.Hessian | None = None) -> WeightPlan | str:
    """What the weight of ``site`` becomes under ``weights`` (or why it cannot); with a
    ``hessian`` (integer weights only) the codes are GPTQ's rather than the nearest."""
    wdtype = site.array.dtype
    if isinstance(weights, IntWeights):
        return _plan_int(site, weights.bits, weights.is_symmetric, weights.granularity,
                         weights.clip, weights.dtype, wdtype, hessian, weights.code_bits)
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
