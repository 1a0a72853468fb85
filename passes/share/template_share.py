"""template_share (lossy; exact when K = L): the same-role weights of L identical residual
blocks become combinations of K shared templates (MixtureGrowth's template mixing, least
squares).

Structurally identical blocks (:mod:`.blocks`) have the same weight slots; the matrices
(rank >= 2 weights: MatMul, Gemm, Conv kernels) of one slot over the L blocks form a group,
stacked as the rows of A [L, n] (each flattened). The best rank-K approximation of A in the
least-squares sense is its truncated SVD (Eckart-Young), so with A = U S V^T:

    T = S_K V_K^T   [K, n]   the templates, stored once
    C = U_K         [L, K]   the coefficients; W_l ~ sum_k C[l, k] T_k = C[l] @ T

In the graph each block's weight becomes ``Reshape(MatMul(c_l, T), shape)`` with c_l [1, K]
(a computation of constants, placed right before the node that reads it), so model.onnx
holds K n + L K numbers instead of L n; with K < L it is smaller. The TVM build keeps
it so in model.so: the mixes run once when the library is loaded, not at build time
(``backends/tvm/load_time``), so the library also holds T and the c_l once (the weights
live in memory, not in the file). Re-loading the written model through kiln's frontend
folds the MatMul into L full weights. With K >= L the reconstruction is exact (to float32
rounding) and saves nothing.

The note gives, per group, the relative reconstruction error ||W_l - C[l] T|| / ||W_l||
(largest over the layers) and the weight bytes before and after. Refused: a group with
fewer than 2 layers or fewer layers than ``templates``, a weight that is a graph input, a
slot all the blocks already read from one tensor, and weights this pass made (templates
and coefficients are marked), so a second run changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from pydantic import Field

from kiln.compiler.core import graph as kir
from kiln.compiler.core.pass_api import Candidate, KilnPass, PassConfig, add_initializer

from .blocks import ResidualBlock, find_blocks, identical_groups, remove_unused_constants

#: metadata key on the initializers this pass creates ("templates" or "coefficients")
TEMPLATE_KEY = "kiln.template_share"


class TemplateShareConfig(PassConfig):
    """Options of ``template_share``."""

    templates: int = Field(default=2, ge=1, description=(
        "K: shared templates per group of same-role weights (exact when K >= layers)"))


@dataclass
class _Group:
    blocks: list[ResidualBlock]
    slot: int
    values: list[ir.Value]


def templates_of(stack: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares rank-k factors of ``stack`` [L, n]: coefficients [L, k] and templates
    [k, n] with ``coefficients @ templates`` the best rank-k approximation."""
    u, s, vt = np.linalg.svd(stack.astype(np.float64), full_matrices=False)
    k = min(k, len(s))
    return u[:, :k], s[:k, None] * vt[:k]


class TemplateShare(KilnPass):
    """Same-role weights of identical blocks as combinations of K shared templates."""

    name = "template_share"
    config_class = TemplateShareConfig
    exact = False

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        #: group label -> largest relative reconstruction error of its layers (last run)
        self.errors: dict[str, float] = {}

    def candidates(self, model: ir.Model) -> list[Candidate]:
        found = []
        for same in identical_groups(find_blocks(model, self.selected)):
            for slot, (i, j) in enumerate(same[0].weight_slots):
                values = [b.nodes[i].inputs[j] for b in same]
                tensor = kir.constant_tensor(values[0])
                if tensor is None or len(tensor.shape) < 2:
                    continue  # vectors (biases, norms) stay
                found.append(self._inspect(_Group(same, slot, values)))  # type: ignore[arg-type]
        return found

    def _inspect(self, group: _Group) -> Candidate:
        first = group.blocks[0]
        i, _ = first.weight_slots[group.slot]
        anchor = first.nodes[i]
        label = f"{kir.node_label(anchor)} input {group.values[0].name}"
        if len(group.blocks) > 1:
            label += f" (+{len(group.blocks) - 1} blocks)"

        def refuse(reason: str) -> Candidate:
            return Candidate(anchor, label, reason=reason)

        k = self.config.templates  # type: ignore[attr-defined]
        made = [v for v in group.values if v.metadata_props.get(TEMPLATE_KEY)]
        if made:
            return refuse(f"{made[0].name} is a template_share "
                          f"{made[0].metadata_props[TEMPLATE_KEY]} tensor")
        if len(group.blocks) < 2:
            return refuse("no structurally identical block to share templates with")
        if len(group.blocks) < k:
            return refuse(f"{len(group.blocks)} layers, fewer than {k} templates")
        fed = [v.name for v in group.values if v.is_graph_input()]
        if fed:
            return refuse(f"weight {fed[0]!r} is a graph input")
        if len({id(v) for v in group.values}) == 1:
            return refuse("the blocks already read one tensor")
        nodes = tuple(b.nodes[b.weight_slots[group.slot][0]] for b in group.blocks)
        return Candidate(anchor, label, nodes=nodes, data=group)

    def rewrite(self, model: ir.Model, accepted: Sequence[Candidate]) -> int:
        graph = model.graph
        k = self.config.templates  # type: ignore[attr-defined]
        bytes_before = kir.count_weight_bytes(model)
        self.errors = {}
        for candidate in accepted:
            group: _Group = candidate.data
            arrays = [kir.constant_tensor(v).numpy() for v in group.values]  # type: ignore
            dtype, shape = arrays[0].dtype, arrays[0].shape
            stack = np.stack([a.astype(np.float64).ravel() for a in arrays])
            coefficients, templates = templates_of(stack, k)
            approx = coefficients.astype(dtype).astype(np.float64) @ \
                templates.astype(dtype).astype(np.float64)
            norms = np.linalg.norm(stack, axis=1)
            errors = np.linalg.norm(stack - approx, axis=1) / np.maximum(norms, 1e-30)
            self.errors[candidate.label] = float(errors.max())
            base = group.values[0].name or "weight"
            t = add_initializer(graph, f"{base}.templates", templates.astype(dtype))
            t.metadata_props[TEMPLATE_KEY] = "templates"
            target = add_initializer(graph, f"{base}.template_shape",
                                     np.array(shape, dtype=np.int64))
            for layer, block in enumerate(group.blocks):
                i, j = block.weight_slots[group.slot]
                node = block.nodes[i]
                c = add_initializer(graph, f"{base}.coefficients_{layer}",
                                    coefficients[layer:layer + 1].astype(dtype))
                c.metadata_props[TEMPLATE_KEY] = "coefficients"
                flat = ir.Node("", "MatMul", [c, t], name=f"{c.name}/mix", num_outputs=1)
                weight = ir.Node("", "Reshape", [flat.outputs[0], target],
                                 name=f"{c.name}/reshape", num_outputs=1)
                flat.outputs[0].name = f"{c.name}.mixed"
                weight.outputs[0].name = f"{c.name}.weight"
                weight.outputs[0].shape = ir.Shape(shape)
                weight.outputs[0].type = ir.TensorType(ir.DataType.from_numpy(dtype))
                graph.insert_before(node, [flat, weight])
                node.replace_input_with(j, weight.outputs[0])
            remove_unused_constants(graph, group.values)
        worst = max(self.errors.values(), default=0.0)
        self.note = (f"{len(accepted)} weight group{'s' if len(accepted) != 1 else ''} as "
                     f"{k} templates each: largest relative reconstruction error "
                     f"{worst:.4g}; weight bytes {bytes_before} -> "
                     f"{kir.count_weight_bytes(model)}")
        return len(accepted)
