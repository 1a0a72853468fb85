"""moe_router: change how a MoE layer routes.

    p = softmax(logits / t)   (``temperature: t``; sigmoid gates alike)
    (v, i) = topk(p, k)       (``k``: experts per token; ``k: 0`` makes a dense mixture)
    v = v / sum(v)            (``renormalize``)

Lossy unless nothing changes (checked by SQNR). The layer is written back in the
documented form (docs/moe.md): top-k with sparse dispatch, or the stacked dense mixture.
A top-k layer that already routes this way but is in another form (a torch export's own
loop over experts: ``torch.where`` + ``index_add``) is written in the sparse dispatch form
too (``reemit``, on by default): the same math, and the form a TVM build lowers to the
grouped sparse dispatch. A layer kiln wrote already is left ("already routes that way").
"""

from __future__ import annotations

import onnx_ir as ir
from pydantic import Field

from kiln.compiler.core.pass_api import PassConfig
from kiln.passes.moe.form import MoeLayer
from kiln.passes.moe.layer_pass import MoeLayerPass


class MoeRouterConfig(PassConfig):
    """Options of ``moe_router`` (unset: keep the layer's own)."""

    k: int | None = Field(default=None, ge=0, description="experts per token (0: dense mixture)")
    renormalize: bool | None = Field(default=None,
                                     description="divide the top-k gate values by their sum")
    temperature: float = Field(default=1.0, gt=0.0, description="logits are divided by it")
    reemit: bool = Field(default=True, description="write a top-k layer that already routes "
                         "this way in the sparse dispatch form when it is in another form "
                         "(e.g. a torch export's loop over experts)")


class MoeRouter(MoeLayerPass):
    """Change a MoE layer's k, renormalization or temperature."""

    name = "moe_router"
    config_class = MoeRouterConfig

    def transform(self, model: ir.Model, layer: MoeLayer) -> tuple[MoeLayer, str] | str:
        c = self.config
        k = layer.k if c.k is None else (c.k or None)
        if k is not None and k > layer.num_experts:
            return f"k={k} is more than the layer's {layer.num_experts} experts"
        renormalize = layer.renormalize if c.renormalize is None else c.renormalize
        if k is None:
            renormalize = False
        temperature = layer.temperature * c.temperature
        if (k, renormalize, temperature) == (layer.k, layer.renormalize, layer.temperature):
            if k is None or layer.emitted or not c.reemit:
                return "already routes that way"
            return layer, f"top-{k} as before, written in the sparse dispatch form"
        new = layer.with_(k=k, renormalize=renormalize, temperature=temperature)
        what = f"top-{k}" if k else "dense mixture"
        return new, f"{what}{', renormalized' if renormalize else ''}, temperature {temperature:g}"
