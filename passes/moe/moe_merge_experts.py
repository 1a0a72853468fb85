"""moe_merge_experts: average similar experts of a MoE layer.

With s_e each expert's routing share on the calibration samples and c_ab the cosine
similarity of two experts' flattened weights, the pair (or group, by its mean) with the
lowest merge cost min(s_a, s_b) * (1 - c_ab) is merged, repeatedly, until ``experts`` are
left: rarely chosen experts go into their nearest neighbour first, similar ones are
averaged (MC-SMoE style). A merged expert's weights are its members' average weighted by
s_e. Its router column is the s-weighted mean of theirs, and its bias gains log(n_eff),
n_eff = (sum s)^2 / sum s^2: when n members with equal shares have equal logits l,
sum exp(l) = exp(l + log n); when one member carries all the share, its logit is kept.
Lossy (checked by SQNR).
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
    w = _weights(weights)

    def avg(key: str):
        arrays = [getattr(m, key) for m in members]
        return None if arrays[0] is None else sum(wi * a for wi, a in zip(w, arrays))
    return Expert(avg("w1"), avg("w2"), avg("b1"), avg("b2"), avg("w3"), avg("b3"))


def merge_groups(layer: MoeLayer, share: np.ndarray, target: int) -> list[list[int]]:
    """Groups of expert indices: the lowest-cost pair (see the module docstring) merged
    until ``target`` groups are left."""
    flats = [e.flat() for e in layer.experts]
    groups = [[i] for i in range(layer.num_experts)]
    while len(groups) > target:
        means = [np.mean([flats[i] for i in g], axis=0) for g in groups]
        unit = np.stack([m / max(np.linalg.norm(m), 1e-30) for m in means])
        shares = np.array([share[g].sum() for g in groups])
        cost = np.minimum.outer(shares, shares) * (1.0 - unit @ unit.T)
        np.fill_diagonal(cost, np.inf)
        a, b = np.unravel_index(int(np.argmin(cost)), cost.shape)
        a, b = min(a, b), max(a, b)
        groups[a] = groups[a] + groups[b]
        del groups[b]
    return groups


def _weights(share: np.ndarray) -> np.ndarray:
    total = share.sum()
    return share / total if total > 0 else np.full(len(share), 1 / len(share))


def _effective_members(share: np.ndarray) -> float:
    w = _weights(share)
    return float(1.0 / np.sum(w * w))


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
        groups = merge_groups(layer, share, target)
        experts = [_average([layer.experts[i] for i in g], share[g]) for g in groups]
        columns = np.stack([layer.router_w[:, g] @ _weights(share[g]) for g in groups], axis=1)
        bias = np.zeros(len(groups)) if layer.router_b is None else \
            np.array([layer.router_b[g] @ _weights(share[g]) for g in groups])
        if layer.gate == "softmax":
            bias = bias + np.log([_effective_members(share[g]) for g in groups]) \
                * layer.temperature
        new = layer.with_(experts=experts, router_w=columns,
                          router_b=bias if np.any(bias) or layer.router_b is not None else None)
        merged = [g for g in groups if len(g) > 1]
        return new, f"{target} experts (merged {merged})"
