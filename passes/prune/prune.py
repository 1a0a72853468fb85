"""prune (lossy): magnitude pruning of the constant weights of Conv, Gemm and MatMul.

Each weight is viewed as its reduction matrix R [out, K] (:mod:`.patterns`), scored by
``criterion`` (:mod:`.criteria`: ``|R|``, or ``|R_r|`` of its rank-r SVD), and the
lowest-scoring units are set to zero, ``W' = W * M`` with a binary mask M:

- ``pattern: unstructured`` (units: single weights) or ``block: [br, bc]`` (units:
  br x bc tiles of R, scored by their mean) with ``sparsity`` s, the fraction of units
  zeroed. ``scope: layer`` zeroes round(s * n_l) units of every layer; ``scope: global``
  ranks all layers' units together and keeps the round((1 - s) * sum n_l) best, so layers
  of small weights lose more (and at high s can lose everything: layer collapse).
  ``min_keep_per_layer`` (a count, or a fraction of the layer's units when below 1)
  keeps each layer's best units whatever the ranking says.
- ``pattern: "N:M"`` (2:4, 4:8): in every M consecutive weights along the reduction axis
  (input channels of a Conv) the N best are kept: sparsity 1 - N/M in every layer, the
  form sparse kernels use.

The note reports the zero fraction reached in each layer and overall. A weight used by
anything else than the one node is refused (pruning it would change the other users), as
are non-float weights and patterns that do not tile the weight; a weight the pass has
pruned already is refused too, so a second run changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_ir as ir
from pydantic import Field, model_validator

from kiln.compiler.core import graph as kir
from kiln.compiler.core.pass_api import (
    Candidate,
    KilnPass,
    PassConfig,
    add_initializer,
    remove_unused_initializers,
)

from .criteria import scores_for
from .patterns import (
    ReductionView,
    expand_units,
    fit_reason,
    global_masks,
    is_nm_sparse,
    layer_masks,
    nm_mask,
    parse_nm,
    unit_scores,
)

PRUNED_KEY = "kiln.pruned"
PRUNABLE_OPS = frozenset({"Conv", "Gemm", "MatMul"})
FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


class PruneConfig(PassConfig):
    """Options of ``prune``."""

    sparsity: float | None = Field(default=None, ge=0, lt=1, description=(
        "fraction of units zeroed (unstructured, block); N:M implies 1 - N/M"))
    scope: Literal["layer", "global"] = Field(default="layer", description=(
        "layer: every layer at `sparsity`; global: one ranking over all layers"))
    min_keep_per_layer: int | float = Field(default=0, ge=0, description=(
        "units every layer keeps: a count, or a fraction of its units when below 1"))
    pattern: str = Field(default="unstructured", description=(
        'unstructured | block (with `block`) | "N:M" (e.g. "2:4", along the input axis)'))
    block: tuple[int, int] | None = Field(default=None, description=(
        "[output rows, input columns] of a block (implies pattern: block)"))
    criterion: Literal["magnitude", "lowrank_magnitude"] = Field(default="magnitude",
                                                                 description=(
        "magnitude: |W|; lowrank_magnitude: |W_r| of the rank-`rank` SVD"))
    rank: int | None = Field(default=None, gt=0, description="r of lowrank_magnitude")

    @model_validator(mode="after")
    def _consistent(self) -> PruneConfig:
        if isinstance(self.min_keep_per_layer, float) and not self.min_keep_per_layer < 1:
            raise ValueError(f"min_keep_per_layer {self.min_keep_per_layer} is neither a "
                             "fraction below 1 nor an integer count")
        if self.block is not None and any(b < 1 for b in self.block):
            raise ValueError(f"block {list(self.block)} must be positive sizes")
        kind = self.kind
        if kind == "nm":
            n, m = self.nm  # type: ignore[misc]
            if not 0 < n < m:
                raise ValueError(f"pattern {self.pattern!r}: need 0 < N < M")
            if self.block is not None:
                raise ValueError("give block or an N:M pattern, not both")
            if self.sparsity is not None and abs(self.sparsity - (1 - n / m)) > 1e-9:
                raise ValueError(f"pattern {self.pattern!r} means sparsity {1 - n / m:g}, "
                                 f"not {self.sparsity:g} (leave sparsity out)")
        elif kind == "block" and self.block is None:
            raise ValueError("pattern: block needs `block: [rows, cols]`")
        elif kind not in ("unstructured", "block"):
            raise ValueError(f'pattern {self.pattern!r}: expected unstructured, block or "N:M"')
        if kind != "nm" and self.sparsity is None:
            raise ValueError(f"pattern {kind} needs `sparsity` (0 <= s < 1)")
        if (self.criterion == "lowrank_magnitude") != (self.rank is not None):
            raise ValueError("`rank` goes with criterion: lowrank_magnitude, and it needs one")
        return self

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_nm(self.pattern)

    @property
    def kind(self) -> str:
        """unstructured, block or nm."""
        if self.nm is not None:
            return "nm"
        if self.block is not None and self.pattern in ("unstructured", "block"):
            return "block"
        return self.pattern

    def describe(self) -> str:
        what = {"nm": self.pattern.strip(), "unstructured": "unstructured",
                "block": f"block {self.block[0]}x{self.block[1]}" if self.block else "block"}
        crit = "magnitude" if self.criterion == "magnitude" else f"rank-{self.rank} magnitude"
        scope = "" if self.kind == "nm" else f"{self.scope} "
        return f"{what[self.kind]}, {scope}{crit}"


@dataclass
class _Layer:
    node: ir.Node
    weight: ir.Value
    view: ReductionView
    matrix: np.ndarray            # R [out, K]
    scores: np.ndarray            # per unit (elements or blocks)


def _trans_b(node: ir.Node) -> bool:
    return node.op_type == "Gemm" and bool(node.attributes.get_int("transB", 0))


class Prune(KilnPass):
    """Zero the lowest-scoring weights (unstructured, block or N:M) of Conv/Gemm/MatMul."""

    name = "prune"
    config_class = PruneConfig
    exact = False

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        #: node name -> zero fraction of its weight after the last rewrite
        self.sparsity_by_layer: dict[str, float] = {}

    def candidates(self, model: ir.Model) -> list[Candidate]:
        found = []
        for node in self.selected_nodes(model):
            if node.op_type in PRUNABLE_OPS and node.domain == "" and len(node.inputs) > 1:
                found.append(self._inspect(node))
        return found

    def _inspect(self, node: ir.Node) -> Candidate:
        label = kir.node_label(node)
        value = node.inputs[1]

        def refuse(reason: str) -> Candidate:
            return Candidate(node, label, reason=reason)

        tensor = kir.constant_tensor(value)
        if value is None or tensor is None:
            return refuse("weight is not a constant")
        if value.dtype not in FLOAT_TYPES:
            return refuse(f"weight dtype {value.dtype} is not floating point")
        others = {kir.node_label(n) for n, _ in value.uses() if n is not node}
        if others or value.is_graph_output() or value.is_graph_input():
            who = ", ".join(sorted(others)) or "the graph interface"
            return refuse(f"weight {value.name!r} is shared with {who}")
        if value.metadata_props.get(PRUNED_KEY):
            return refuse(f"already pruned ({value.metadata_props[PRUNED_KEY]})")
        weight = tensor.numpy()
        if node.op_type == "Conv" and weight.ndim < 3:
            return refuse(f"Conv weight has rank {weight.ndim}")
        if node.op_type != "Conv" and weight.ndim != 2:
            return refuse(f"{node.op_type} weight has rank {weight.ndim}, expected 2")
        view = ReductionView(node.op_type, tuple(weight.shape), _trans_b(node))
        matrix = view.to_matrix(weight)
        config: PruneConfig = self.config  # type: ignore[assignment]
        nm = config.nm
        reason = fit_reason(matrix.shape, nm=nm, block=config.block if config.kind == "block"
                            else None, conv_in=weight.shape[1] if node.op_type == "Conv"
                            else None)
        if reason is not None:
            return refuse(reason)
        if nm is not None and is_nm_sparse(matrix, *nm):
            return refuse(f"already {nm[0]}:{nm[1]} sparse")
        scores = scores_for(matrix, config.criterion, config.rank)
        if config.kind == "block":
            scores = unit_scores(scores, config.block)
        return Candidate(node, label, nodes=(node,),
                         data=_Layer(node, value, view, matrix, scores))

    def _masks(self, layers: list[_Layer]) -> list[np.ndarray]:
        config: PruneConfig = self.config  # type: ignore[assignment]
        nm = config.nm
        if nm is not None:
            return [nm_mask(layer.scores, *nm) for layer in layers]
        choose = global_masks if config.scope == "global" else layer_masks
        block = config.block if config.kind == "block" else None
        units = choose([layer.scores for layer in layers], float(config.sparsity or 0.0),
                       config.min_keep_per_layer)
        return [expand_units(keep, block) for keep in units]

    def rewrite(self, model: ir.Model, accepted: Sequence[Candidate]) -> int:
        graph = model.graph
        config: PruneConfig = self.config  # type: ignore[assignment]
        layers: list[_Layer] = [c.data for c in accepted]
        zeros, total, parts = 0, 0, []
        self.sparsity_by_layer = {}
        for layer, mask in zip(layers, self._masks(layers), strict=True):
            old = layer.weight
            weight = layer.view.from_matrix(np.where(mask, layer.matrix, 0).astype(
                layer.matrix.dtype))
            new = add_initializer(graph, f"{old.name}_pruned", np.ascontiguousarray(weight))
            new.metadata_props[PRUNED_KEY] = config.describe()
            layer.node.replace_input_with(1, new)
            remove_unused_initializers(graph, [old.name] if old.name else [])
            z = int((weight == 0).sum())
            zeros, total = zeros + z, total + weight.size
            name = layer.node.name or kir.node_label(layer.node)
            self.sparsity_by_layer[name] = z / weight.size
            parts.append(f"{name} {100 * z / weight.size:.1f}%")
        if layers:
            self.note = (f"{config.describe()}: {100 * zeros / total:.1f}% of {total} weights "
                         f"zero over {len(layers)} layers ({', '.join(parts)})")
        return len(layers)

