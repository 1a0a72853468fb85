"""moe_dense_to_sparse: a dense softmax-gated mixture y = sum_e p_e f_e(x) becomes top-k
dispatch y = sum_{j<k} v_j f_{i_j}(x), (v, i) = topk(p, k), v renormalized to sum 1
(``renormalize``), where only the k chosen experts run on a token (the documented sparse
form, docs/moe.md). Lossy: the dropped experts' share of p (checked by SQNR).
"""

from __future__ import annotations

import onnx_ir as ir
from pydantic import Field

from kiln.compiler.core.pass_api import PassConfig
from kiln.passes.moe.form import MoeLayer
from kiln.passes.moe.layer_pass import MoeLayerPass


class MoeDenseToSparseConfig(PassConfig):
    """Options of ``moe_dense_to_sparse``."""

    k: int = Field(default=2, ge=1, description="experts each token is dispatched to")
    renormalize: bool = Field(default=True, description="top-k gate values sum to 1")


class MoeDenseToSparse(MoeLayerPass):
    """Dense-gated mixture -> top-k sparse dispatch."""

    name = "moe_dense_to_sparse"
    config_class = MoeDenseToSparseConfig

    def transform(self, model: ir.Model, layer: MoeLayer) -> tuple[MoeLayer, str] | str:
        if layer.k is not None:
            return f"already top-{layer.k}"
        if self.config.k > layer.num_experts:
            return f"k={self.config.k} is more than the layer's {layer.num_experts} experts"
        new = layer.with_(k=self.config.k, renormalize=self.config.renormalize)
        return new, f"top-{self.config.k} sparse dispatch"
