"""fold_scale: fold a constant per-column scale after a MatMul or Gemm into its weight.

    y = MatMul(x, W) * s      ->  y = MatMul(x, W * s)        (s: scalar or [N])
    y = Gemm(x, W, b) * s     ->  y = Gemm(x, W * s, b * s)   (transB: W's rows scaled)

Exact up to float32 rounding. Refused, with the reason, when the weight is not a
constant or is shared with another node, when the scale is not a constant or does not
broadcast along the output columns only, or when the product is also used unscaled.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir
from pydantic import Field

from kiln.compiler.core.pass_api import (
    Candidate,
    KilnPass,
    PassConfig,
    add_initializer,
    copy_metadata,
    replace_value,
)


class FoldScaleConfig(PassConfig):
    """Options of ``fold_scale``."""

    max_scale: float = Field(default=1e6, gt=0,
                             description="refuse scales larger than this in magnitude")


def _constant(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    tensor = value.const_value
    if tensor is None and value.producer() is not None and \
            value.producer().op_type == "Constant":
        attr = value.producer().attributes.get("value")
        tensor = attr.value if attr is not None else None
    return None if tensor is None else tensor.numpy()


class FoldScale(KilnPass):
    """Fold a constant scale after MatMul/Gemm into the weight (and Gemm's bias)."""

    name = "fold_scale"
    config_class = FoldScaleConfig
    exact = True

    def candidates(self, model: ir.Model) -> list[Candidate]:
        found = []
        for node in self.selected_nodes(model):
            if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx"):
                continue
            (product,) = node.outputs
            uses = list(product.uses())
            if len(uses) != 1 or uses[0][0].op_type != "Mul":
                continue               # nothing to fold: not a candidate at all
            mul = uses[0][0]
            found.append(self._check(node, mul))
        return found

    def _check(self, node: ir.Node, mul: ir.Node) -> Candidate:
        label = f"{node.name} * {mul.name}"
        product = node.outputs[0]
        scale_input = mul.inputs[1] if mul.inputs[0] is product else mul.inputs[0]
        weight = node.inputs[1]
        scale = _constant(scale_input)
        if scale is None:
            return Candidate(node, label, reason="the scale is not a constant")
        if weight is None or weight.const_value is None:
            return Candidate(node, label, reason="the weight is not a constant")
        if len({id(user) for user, _ in weight.uses()}) > 1:
            return Candidate(node, label, reason="the weight is shared with another node")
        if product.is_graph_output():
            return Candidate(node, label, reason="the unscaled product is a graph output")
        w = weight.const_value.numpy()
        columns = w.shape[0] if node.attributes.get_int("transB", 0) else w.shape[-1]
        rank = len(product.shape) if product.shape is not None else None
        if scale.ndim > 1 and (rank is None or scale.ndim > rank):
            return Candidate(node, label, reason=f"scale of rank {scale.ndim} may broadcast "
                                                 "the product to a higher rank")
        if scale.ndim > 1 and any(d != 1 for d in scale.shape[:-1]):
            return Candidate(node, label,
                             reason=f"scale shape {list(scale.shape)} is not per column")
        if scale.size not in (1, columns):
            return Candidate(node, label, reason=f"scale of {scale.size} values for "
                                                 f"{columns} output columns")
        if np.abs(scale).max(initial=0.0) > self.config.max_scale:
            return Candidate(node, label, reason="scale above max_scale")
        if node.op_type == "Gemm" and node.attributes.get_float("alpha", 1.0) != 1.0:
            return Candidate(node, label, reason="Gemm with alpha != 1")
        return Candidate(node, label, nodes=(node, mul), data=scale.reshape(-1))

    def rewrite(self, model: ir.Model, accepted: Sequence[Candidate]) -> int:
        graph = model.graph
        for candidate in accepted:
            node, mul = candidate.nodes
            scale = candidate.data
            weight = node.inputs[1].const_value.numpy()
            if node.op_type == "Gemm" and node.attributes.get_int("transB", 0):
                scaled = weight * scale.reshape(-1, 1)
            else:
                scaled = weight * scale
            node.replace_input_with(1, add_initializer(
                graph, f"{node.inputs[1].name}.scaled", scaled.astype(weight.dtype)))
            if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
                bias = _constant(node.inputs[2])
                if bias is not None:
                    beta = node.attributes.get_float("beta", 1.0)
                    if bias.ndim <= 1:  # scalar or [1] or [N]: becomes [N]
                        bias = np.broadcast_to(bias.reshape(-1), scaled.shape[:1]
                                               if node.attributes.get_int("transB", 0)
                                               else scaled.shape[-1:])
                    node.replace_input_with(2, add_initializer(
                        graph, f"{node.inputs[2].name}.scaled",
                        (bias * beta * scale).astype(bias.dtype)))
                    node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
            copy_metadata(mul, node)
            replace_value(graph, mul.outputs[0], node.outputs[0])
            graph.remove(mul, safe=True)
        self.note = f"folded {len(accepted)} scales"
        return len(accepted)


__all__ = ["FoldScale", "FoldScaleConfig"]
