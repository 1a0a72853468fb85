"""moe_prune_experts: drop the experts a MoE layer rarely routes to.

With s_e the expert's share of the top-k choices on the calibration samples (for a dense
mixture: of the gate mass), the experts with s_e < ``min_share`` are dropped (or all but
the ``keep`` most chosen), never below k. Their router columns go too, so the gate
renormalizes over the experts left: softmax over the kept logits (a sigmoid gate keeps its
values; with ``renormalize`` the top-k values are divided by their sum as before).
Lossy (checked by SQNR).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from pydantic import Field

from kiln.compiler.core.pass_api import PassConfig
from kiln.passes.moe.form import MoeLayer
from kiln.passes.moe.layer_pass import MoeLayerPass


class MoePruneExpertsConfig(PassConfig):
    """Options of ``moe_prune_experts``."""

    min_share: float = Field(default=0.05, ge=0.0, le=1.0,
                             description="drop experts chosen for less than this share")
    keep: int | None = Field(default=None, ge=1, description="keep the N most chosen experts")


def keep_experts(layer: MoeLayer, kept: np.ndarray) -> MoeLayer:
    """The layer with only the experts ``kept`` (indices, router columns with them)."""
    kept = np.sort(kept)
    return layer.with_(experts=[layer.experts[i] for i in kept],
                       router_w=layer.router_w[:, kept],
                       router_b=None if layer.router_b is None else layer.router_b[kept])


class MoePruneExperts(MoeLayerPass):
    """Drop rarely chosen experts (routing statistics from calibration data)."""

    name = "moe_prune_experts"
    config_class = MoePruneExpertsConfig
    needs_calibration = True

    def transform(self, model: ir.Model, layer: MoeLayer) -> tuple[MoeLayer, str] | str:
        share = self.routing_share(model, layer)
        order = np.argsort(-share, kind="stable")
        floor = max(layer.k or 1, 1)
        if self.config.keep is not None:
            count = max(min(self.config.keep, layer.num_experts), floor)
        else:
            count = max(int(np.sum(share >= self.config.min_share)), floor)
        if count >= layer.num_experts:
            return f"every expert is chosen for at least {self.config.min_share:g} of tokens" \
                if self.config.keep is None else f"keep={self.config.keep} keeps every expert"
        dropped = sorted(int(i) for i in order[count:])
        new = keep_experts(layer, order[:count])
        return new, (f"{count} experts (dropped {dropped}, routing share "
                     f"{share[dropped].sum():.3f})")
