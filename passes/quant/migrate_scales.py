"""migrate_scales: move per-input-channel activation scales into the weights
(SmoothQuant; LLM-FP4's "per-channel activation scales reparameterized as
exponential biases of weights").

For the nodes (Conv/Gemm/MatMul) that read one activation x, with a_j = max|x_j|
over the calibration samples and w_j = max |W| over input channel j of all of them:

    s_j = a_j^alpha / w_j^(1 - alpha)        (``pow2: true``: s_j = 2^round(log2 s_j))
    x' = x / s  (folded into a LayerNormalization's scale and bias when x is its output
                 and nothing else reads it, else one Mul(x, 1/s) before the nodes)
    W' = W * s  along the input-channel axis

x' W' = x W: exact up to float rounding, and bit-exact with ``pow2`` (scaling by a
power of two is exact). The point is to make x' easier to quantize (outlier channels
move into the weights). Consumers already migrated (metadata ``kiln.migrated``) are
skipped, so a second run changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from pydantic import Field

from kiln.compiler.core import graph as kir
from kiln.compiler.core.errors import PassError
from kiln.compiler.core.pass_api import (
    Candidate,
    KilnPass,
    PassConfig,
    add_initializer,
    remove_unused_initializers,
    unique_name,
)
from kiln.passes.quant.weights import WEIGHT_OPS, WeightSite, find_weight

MIGRATED_KEY = "kiln.migrated"
#: Scales are kept in [1/MAX_SCALE, MAX_SCALE] (a dead channel must not blow up a weight).
MAX_SCALE = 2.0 ** 20


class MigrateScalesConfig(PassConfig):
    """Options of ``migrate_scales``."""

    alpha: float = Field(default=0.5, ge=0.0, le=1.0,
                         description="migration strength: 0 keeps x, 1 moves all of max|x| into W")
    pow2: bool = Field(default=False, description="round scales to powers of two (bit-exact)")


@dataclass
class _Migration:
    x: ir.Value
    sites: list[WeightSite]
    layernorm: ir.Node | None
    scale: np.ndarray | None = None


def _channel_axis(node: ir.Node) -> int:
    return 1 if node.op_type == "Conv" else -1


def _foldable_layernorm(x: ir.Value, users: set[int]) -> ir.Node | None:
    """The LayerNormalization producing x when its scale/bias can absorb 1/s."""
    producer = x.producer()
    if producer is None or producer.op_type != "LayerNormalization" or producer.domain not in (
            "", "ai.onnx"):
        return None
    if producer.attributes.get_int("axis", -1) != -1 or x.is_graph_output():
        return None
    if any(o.uses() or o.is_graph_output() for o in producer.outputs[1:]):
        return None
    if {id(n) for n, _ in x.uses()} != users:
        return None
    for value in producer.inputs[1:3]:
        if value is not None and (kir.constant_tensor(value) is None
                                  or any(n is not producer for n, _ in value.uses())):
            return None
    return producer


class MigrateScales(KilnPass):
    """Move per-input-channel activation scales into the weights (x/s, W*s)."""

    name = "migrate_scales"
    config_class = MigrateScalesConfig
    exact = True
    needs_calibration = True

    def candidates(self, model: ir.Model) -> list[Candidate]:
        groups: dict[str, _Migration] = {}
        found: list[Candidate] = []
        for node in self.selected_nodes(model):
            if node.op_type not in WEIGHT_OPS or node.domain not in ("", "ai.onnx"):
                continue
            label = kir.node_label(node)
            if MIGRATED_KEY in node.metadata_props:
                found.append(Candidate(node, label, reason="scales already migrated"))
                continue
            site = find_weight(node)
            if isinstance(site, str):
                found.append(Candidate(node, label, reason=site))
                continue
            if node.op_type == "Conv" and node.attributes.get_int("group", 1) != 1:
                found.append(Candidate(node, label, reason="grouped Conv"))
                continue
            if node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
                found.append(Candidate(node, label, reason="Gemm with transA"))
                continue
            x = node.inputs[0]
            group = groups.setdefault(x.name, _Migration(x, [], None))
            group.sites.append(site)
        migrations = [g for g in groups.values()
                      if len({s.array.shape[s.in_axis] for s in g.sites}) == 1]
        for g in groups.values():
            if g not in migrations:
                for s in g.sites:
                    found.append(Candidate(s.node, kir.node_label(s.node),
                                           reason="consumers of the activation disagree on "
                                                  "its channel count"))
        if migrations:
            self._scales(model, migrations)
        for g in migrations:
            users = {id(s.node) for s in g.sites}
            g.layernorm = _foldable_layernorm(g.x, users)
            where = f"into {kir.node_label(g.layernorm)}" if g.layernorm else "as a Mul"
            labels = ", ".join(kir.node_label(s.node) for s in g.sites)
            found.append(Candidate(g.sites[0].node, f"{labels} <- {g.x.name} ({where})",
                                   nodes=tuple(s.node for s in g.sites), data=g))
        return found

    def _scales(self, model: ir.Model, migrations: list[_Migration]) -> None:
        if self.calibration is None:
            raise PassError("needs calibration data (run it through the pipeline, or pass a "
                            "CalibrationContext)", pass_name=self.name)
        inputs = {v.name for v in kir.graph_inputs(model)}
        inner = [g.x.name for g in migrations if g.x.name not in inputs]
        values = self.calibration.activations(model, inner) if inner else {}
        for g in migrations:
            samples = values[g.x.name] if g.x.name in values else [
                s[g.x.name] for s in self.calibration.samples]
            axis = _channel_axis(g.sites[0].node)
            a = np.max([np.abs(np.moveaxis(np.asarray(v, np.float64), axis, -1))
                        .reshape(-1, np.shape(v)[axis]).max(axis=0) for v in samples], axis=0)
            w = np.max([np.abs(np.moveaxis(s.array.astype(np.float64), s.in_axis, -1))
                        .reshape(-1, s.array.shape[s.in_axis]).max(axis=0) for s in g.sites],
                       axis=0)
            alpha = self.config.alpha
            with np.errstate(divide="ignore", invalid="ignore"):
                scale = np.power(a, alpha) / np.power(w, 1 - alpha)
            scale = np.where(np.isfinite(scale) & (scale > 0), scale, 1.0)
            scale = np.clip(scale, 1 / MAX_SCALE, MAX_SCALE)
            if self.config.pow2:
                scale = np.exp2(np.round(np.log2(scale)))
            g.scale = scale

    def rewrite(self, model: ir.Model, accepted: Sequence[Candidate]) -> int:
        graph = model.graph
        for candidate in accepted:
            g: _Migration = candidate.data
            dtype = g.sites[0].array.dtype
            inverse = (1.0 / g.scale).astype(dtype)
            if g.layernorm is not None:
                self._fold_into_layernorm(graph, g.layernorm, inverse)
            else:
                self._insert_mul(graph, g, inverse)
            for site in g.sites:
                shape = [1] * site.array.ndim
                shape[site.in_axis] = -1
                w = (site.array.astype(np.float64) * g.scale.reshape(shape)).astype(dtype)
                old = site.value
                site.node.replace_input_with(1, add_initializer(graph, f"{old.name}_migrated", w))
                site.node.metadata_props[MIGRATED_KEY] = "1"
                if old.name:
                    remove_unused_initializers(graph, [old.name])
        return len(accepted)

    @staticmethod
    def _fold_into_layernorm(graph: ir.Graph, ln: ir.Node, inverse: np.ndarray) -> None:
        for index in (1, 2):
            value = ln.inputs[index] if len(ln.inputs) > index else None
            if value is None:
                continue
            array = kir.constant_tensor(value).numpy()
            new = add_initializer(graph, f"{value.name}_migrated",
                                  (array.astype(np.float64) * inverse).astype(array.dtype))
            ln.replace_input_with(index, new)
            remove_unused_initializers(graph, [value.name])

    @staticmethod
    def _insert_mul(graph: ir.Graph, g: _Migration, inverse: np.ndarray) -> None:
        axis = _channel_axis(g.sites[0].node)
        shape = (-1,) if axis == -1 else (-1, 1, *(1,) * (g.sites[0].array.ndim - 3))
        factor = add_initializer(graph, f"{g.x.name}_inverse_scale", inverse.reshape(shape))
        mul = ir.Node("", "Mul", [g.x, factor], num_outputs=1,
                      name=unique_name(graph, f"{g.x.name}_migrate"),
                      metadata_props={MIGRATED_KEY: "1"})
        out = mul.outputs[0]
        out.name = unique_name(graph, f"{g.x.name}_migrated")
        out.shape, out.type = g.x.shape, g.x.type
        first = min((s.node for s in g.sites), key=lambda n: list(graph).index(n))
        graph.insert_before(first, mul)
        for site in g.sites:
            site.node.replace_input_with(0, out)
