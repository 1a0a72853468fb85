"""moe_merge_experts: average similar experts of a MoE layer.

Experts are compared by the cosine similarity of their flattened weights; the most similar
pair is merged, repeatedly, until ``experts`` are left. A merged expert's weights are the
average of its members' weighted by their routing share s_e on the calibration samples
(MC-SMoE style). Its router column is the members' mean and its bias gains log(n) for n
members: when the members' logits agree (l), exp(l) summed n times is exp(l + log n), so
the merged expert keeps the members' summed softmax mass. Lossy (checked by SQNR).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from pydantic import Field

from kiln.compiler.core.pass_api import PassConfig
from kiln.passes.moe.form import Expert, MoeLayer
from kiln.passes.moe.layer_pass import MoeLayerPass


class MoeMergeExpertsConfig(PassConfig):
    """Options of ``moe_merge_experts``."""

    experts: int = Field(ge=1, description="experts left after merging")


def _average(members: list[Expert], weights: np.ndarray) -> Expert:
    w = weights / weights.sum() if weights.sum() > 0 else np.full(len(members), 1 / len(members))

    def avg(key: str):
        arrays = [getattr(m, key) for m in members]
        return None if arrays[0] is None else sum(wi * a for wi, a in zip(w, arrays))
    return Expert(avg("w1"), avg("w2"), avg("b1"), avg("b2"), avg("w3"), avg("b3"))


def merge_groups(layer: MoeLayer, target: int) -> list[list[int]]:
    """Groups of expert indices, merging the most similar pair (cosine of the weights,
    groups compared by their mean) until ``target`` groups are left."""
    flats = [e.flat() for e in layer.experts]
    groups = [[i] for i in range(layer.num_experts)]
    while len(groups) > target:
        means = [np.mean([flats[i] for i in g], axis=0) for g in groups]
        unit = np.stack([m / max(np.linalg.norm(m), 1e-30) for m in means])
        sim = unit @ unit.T
        np.fill_diagonal(sim, -np.inf)
        a, b = np.unravel_index(int(np.argmax(sim)), sim.shape)
        a, b = min(a, b), max(a, b)
        groups[a] = groups[a] + groups[b]
        del groups[b]
    return groups


class MoeMergeExperts(MoeLayerPass):
    """Merge similar experts into their routing-weighted average."""

    name = "moe_merge_experts"
    config_class = MoeMergeExpertsConfig
    needs_calibration = True

    def transform(self, model: ir.Model, layer: MoeLayer) -> tuple[MoeLayer, str] | str:
        target = self.config.experts
        if target >= layer.num_experts:
            return f"the layer has {layer.num_experts} experts, not more than {target}"
        if layer.k is not None and target < layer.k:
            return f"{target} experts is fewer than k={layer.k}"
        share = self.routing_share(model, layer)
        groups = merge_groups(layer, target)
        experts = [_average([layer.experts[i] for i in g], share[g]) for g in groups]
        columns = np.stack([layer.router_w[:, g].mean(axis=1) for g in groups], axis=1)
        bias = np.zeros(len(groups)) if layer.router_b is None else \
            np.array([layer.router_b[g].mean() for g in groups])
        if layer.gate == "softmax":
            bias = bias + np.log([len(g) for g in groups]) * layer.temperature
        new = layer.with_(experts=experts, router_w=columns,
                          router_b=bias if np.any(bias) or layer.router_b is not None else None)
        merged = [g for g in groups if len(g) > 1]
        return new, f"{target} experts (merged {merged})"
