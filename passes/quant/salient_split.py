"""salient_split: PTQ1.61-style mixed 4-bit / 1-bit weights for MatMul and Gemm.

The ``salient`` fraction of input channels (rows of W[K, N]) with the largest
activation norm ||x_j||_2 over the calibration samples keep 4 bits (symmetric INT4,
one scale per output column); the other rows are binarized, sign(w) * a, with
a = mean|w| over blocks of ``block`` rows per column. Which rows are salient is a
1-bit channel mask. Graph form (standard ops plus ``kiln.UnpackBits`` and
``kiln.DequantizeTable``, see ``kiln_ops``):

    mask    = Cast(UnpackBits(mask_bits){bits=1, shape=[K]}, bool)
    rows    = Concat(NonZero(mask), NonZero(Not(mask)))            # salient rows first
    W_s     = DequantizeLinear(q4: INT4[K_s, N], s[N], axis=1)
    W_b     = DequantizeTable(UnpackBits(signs){bits=1}, [-1, 1], a[K_b/block, N]){axis=0}
    W^      = ScatterND(zeros[K, N], rows, Concat(W_s, W_b))        (Transpose for transB=1)

``select_by: weight | random`` choose the rows by weight norm or at random instead
(ablations; PTQ1.61 reports activation norm as the better criterion).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import ml_dtypes
import numpy as np
import onnx_ir as ir
from pydantic import Field

from kiln.compiler.core import graph as kir
from kiln.compiler.core import kiln_domain, packing
from kiln.compiler.core.errors import PassError
from kiln.compiler.core.opset import BLOCKED_OPSET, ensure_opset
from kiln.compiler.core.pass_api import (
    Candidate,
    KilnPass,
    PassConfig,
    add_initializer,
    remove_unused_initializers,
    unique_name,
)
from kiln.passes.quant import formats, kiln_ops
from kiln.passes.quant.emit import int_attribute
from kiln.passes.quant.weights import QUANT_KEY, WeightSite, find_weight


class SalientSplitConfig(PassConfig):
    """Options of ``salient_split``."""

    salient: float = Field(default=0.2, gt=0.0, lt=1.0,
                           description="fraction of input channels kept at 4 bits")
    block: int = Field(default=128, ge=1, description="rows per binarization scale")
    select_by: Literal["activation", "weight", "random"] = "activation"
    seed: int = 0


@dataclass
class _Split:
    site: WeightSite
    k: np.ndarray           # [K, N] canonical weight (input channels first)
    mask: np.ndarray        # [K] bool: salient rows
    bits_per_weight: float = 0.0


def salient_rows(k: np.ndarray, norms: np.ndarray | None, fraction: float, how: str,
                 seed: int) -> np.ndarray:
    """The 1-bit mask of the ``fraction`` of rows of k[K, N] to keep at 4 bits."""
    count = max(1, int(round(fraction * k.shape[0])))
    if how == "activation":
        score = norms
    elif how == "weight":
        score = np.linalg.norm(k, axis=1)
    else:
        score = np.random.default_rng(seed).random(k.shape[0])
    mask = np.zeros(k.shape[0], dtype=bool)
    mask[np.argsort(-score, kind="stable")[:count]] = True
    return mask


def split_quantize(k: np.ndarray, mask: np.ndarray, block: int):
    """(int4 codes, column scales, sign bits, block scales, reconstruction) of k[K, N]."""
    sal = k[mask]
    q = formats.quantize_int(sal.T, 4, symmetric=True, clip_search=False)   # per column
    rest = k[~mask].astype(np.float64)
    blocks = -(-rest.shape[0] // block)
    pad = blocks * block - rest.shape[0]
    padded = np.concatenate([np.abs(rest), np.zeros((pad, rest.shape[1]))])
    counts = np.minimum(block, rest.shape[0] - np.arange(blocks) * block)[:, None]
    alpha = padded.reshape(blocks, block, -1).sum(axis=1) / counts
    signs = (rest >= 0).astype(np.uint8)
    recon = np.empty_like(k, dtype=np.float64)
    recon[mask] = q.dequantized.T
    recon[~mask] = np.where(signs, 1.0, -1.0) * np.repeat(alpha, block, axis=0)[:rest.shape[0]]
    return q.codes.T, q.scale, signs, alpha, recon


class SalientSplit(KilnPass):
    """Keep the input channels with the largest activation norm at 4 bits, binarize the rest."""

    name = "salient_split"
    config_class = SalientSplitConfig
    exact = False
    needs_calibration = True

    def candidates(self, model: ir.Model) -> list[Candidate]:
        found: list[Candidate] = []
        sites: list[WeightSite] = []
        for node in self.selected_nodes(model):
            if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx"):
                continue
            label = kir.node_label(node)
            site = find_weight(node)
            if isinstance(site, str):
                found.append(Candidate(node, label, reason=site))
            elif node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
                found.append(Candidate(node, label, reason="Gemm with transA"))
            elif site.array.shape[site.in_axis] < 2:
                found.append(Candidate(node, label, reason="fewer than 2 input channels"))
            else:
                sites.append(site)
        norms = self._norms(model, sites) if self.config.select_by == "activation" else {}
        total_bits = total = 0.0
        for site in sites:
            k = site.array if site.in_axis == 0 else site.array.T
            mask = salient_rows(k, norms.get(site.node.inputs[0].name), self.config.salient,
                                self.config.select_by, self.config.seed)
            split = _Split(site, k, mask)
            ks, n = int(mask.sum()), k.shape[1]
            kb = k.shape[0] - ks
            split.bits_per_weight = (ks * n * 4 + n * 32 + kb * n + -(-kb // self.config.block)
                                     * n * 32 + k.shape[0]) / k.size
            total_bits += split.bits_per_weight * k.size
            total += k.size
            found.append(Candidate(site.node, f"{kir.node_label(site.node)} [{ks}/{k.shape[0]} "
                                   f"channels at 4 bits, {split.bits_per_weight:.2f} bits/weight]",
                                   nodes=(site.node,), data=split))
        if total:
            self.note = f"{total_bits / total:.2f} bits/weight over {len(sites)} weights"
        return found

    def _norms(self, model: ir.Model, sites: list[WeightSite]) -> dict[str, np.ndarray]:
        if not sites:
            return {}
        if self.calibration is None:
            raise PassError("select_by: activation needs calibration data", pass_name=self.name)
        names = sorted({s.node.inputs[0].name for s in sites})
        inputs = {v.name for v in kir.graph_inputs(model)}
        inner = [n for n in names if n not in inputs]
        values = self.calibration.activations(model, inner) if inner else {}
        norms = {}
        for name in names:
            samples = values[name] if name in values else [s[name] for s in
                                                           self.calibration.samples]
            squares = sum(np.square(np.asarray(v, np.float64)).reshape(-1, np.shape(v)[-1])
                          .sum(axis=0) for v in samples)
            norms[name] = np.sqrt(squares)
        return norms

    def rewrite(self, model: ir.Model, accepted: Sequence[Candidate]) -> int:
        ensure_opset(model, BLOCKED_OPSET, pass_name=self.name)
        kiln_ops.ensure_function(model, kiln_ops.UNPACK_BITS)
        kiln_ops.ensure_function(model, kiln_ops.DEQUANTIZE_TABLE)
        for candidate in accepted:
            self._apply(model, candidate.data)
        kiln_ops.sync_function_opsets(model)
        return len(accepted)

    def _apply(self, model: ir.Model, split: _Split) -> None:
        graph = model.graph
        site, k, mask = split.site, split.k, split.mask
        dtype = site.array.dtype
        codes, col_scale, signs, alpha, _ = split_quantize(k, mask, self.config.block)
        base = site.value.name or "weight"
        tag = {QUANT_KEY: "salient_split"}
        nodes: list[ir.Node] = []

        def init(suffix, array):
            return add_initializer(graph, f"{base}_{suffix}", np.asarray(array))

        def op(op_type, inputs, suffix, domain="", **attributes):
            node = ir.Node(domain, op_type, inputs,
                           [int_attribute(a, v) for a, v in attributes.items()],
                           num_outputs=1, name=unique_name(graph, f"{base}_{suffix}"),
                           metadata_props=dict(tag))
            node.outputs[0].name = unique_name(graph, f"{base}_{suffix}")
            nodes.append(node)
            return node.outputs[0]

        K, N = k.shape
        bits = op("UnpackBits", [init("mask", packing.pack_bits(mask.astype(np.uint8), 1))],
                  "mask_codes", kiln_domain.DOMAIN, bits=1, shape=[K])
        as_bool = op("Cast", [bits], "mask_bool", to=ir.DataType.BOOL)
        salient_rows_ = op("NonZero", [as_bool], "salient_rows")
        other_rows = op("NonZero", [op("Not", [as_bool], "mask_not")], "other_rows")
        rows = op("Transpose", [op("Concat", [salient_rows_, other_rows], "rows_1k", axis=1)],
                  "rows")                                                    # [K, 1]
        w_s = op("DequantizeLinear", [init("salient_q", codes.astype(ml_dtypes.int4)),
                                      init("salient_scale", col_scale.astype(dtype))],
                 "salient_dequantized", axis=1)
        sign_codes = op("UnpackBits", [init("signs", packing.pack_bits(signs, 1))],
                        "sign_codes", kiln_domain.DOMAIN, bits=1, shape=list(signs.shape))
        w_b = op("DequantizeTable", [sign_codes, init("sign_table", np.array([-1, 1], dtype)),
                                     init("block_scale", alpha.astype(dtype))],
                 "binary_dequantized", kiln_domain.DOMAIN, axis=0, block_size=self.config.block)
        stacked = op("Concat", [w_s, w_b], "stacked", axis=0)
        zeros = init("zeros_shape", np.array([K, N], dtype=np.int64))
        empty = op("ConstantOfShape", [zeros], "zeros")
        nodes[-1].attributes["value"] = ir.AttrTensor("value", ir.tensor(np.zeros(1, dtype)))
        out = op("ScatterND", [empty, rows, stacked], "dequantized")
        if site.in_axis == 1:
            out = op("Transpose", [out], "dequantized_t", perm=[1, 0])
        out.shape, out.type = site.value.shape, site.value.type
        graph.insert_before(site.node, nodes)
        old = site.value
        site.node.replace_input_with(1, out)
        if old.name:
            remove_unused_initializers(graph, [old.name])
