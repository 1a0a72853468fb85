"""share_blocks (lossy; exact on identical weights): structurally identical residual blocks
in a group use one set of weights, stored once (FoldGPT's block sharing).

Blocks x + f(x) with the same signature (:mod:`.blocks`: the same nodes, attributes and
structural constants; only weight values differ) are taken in graph order and cut into
groups of ``group_size`` consecutive ones (FoldGPT pairs adjacent layers: 2), or one group
of all of them (``group_size: all``). In a group every weight slot s (the same input of the
same node of each block) gets one tensor:

- ``first``: the first block's W_1,s (its initializer is kept, the others point at it);
- ``mean``: (1/n) sum_l W_l,s, a new initializer;
- ``medoid``: the block m minimizing sum_l sum_s ||W_l,s - W_m,s||^2; its weights are kept.

The blocks' nodes then read the shared initializers, so model.onnx (and the compiled
library, which embeds one constant per distinct tensor) holds them once; the other copies
are removed when nothing else reads them (a weight also read outside the block keeps its
other users). Blocks whose weights are already identical give the model back exactly. The
note gives the weight bytes before and after and the largest relative change
||W_l - W_shared|| / ||W_l||.

``select`` picks blocks by their Add node. Refused: a group member whose weight is a graph
input (a caller may feed it), a block with no identical block in its group, and a group
that already reads one set of weights (so a second run changes nothing).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import onnx_ir as ir
from pydantic import Field, model_validator

from kiln.compiler.core import graph as kir
from kiln.compiler.core.pass_api import Candidate, KilnPass, PassConfig, add_initializer

from .blocks import ResidualBlock, find_blocks, identical_groups, remove_unused_constants


class ShareBlocksConfig(PassConfig):
    """Options of ``share_blocks``."""

    group_size: int | Literal["all"] = Field(default=2, description=(
        "consecutive identical blocks per group (2: adjacent pairs), or all"))
    weights: Literal["first", "mean", "medoid"] = Field(default="first", description=(
        "the group's weights: the first block's, the mean, or the medoid block's"))

    @model_validator(mode="after")
    def _group_size(self) -> ShareBlocksConfig:
        if isinstance(self.group_size, int) and self.group_size < 2:
            raise ValueError(f"group_size {self.group_size}: a group needs at least 2 blocks")
        return self


def chunk(blocks: list[ResidualBlock], size: int | str) -> list[list[ResidualBlock]]:
    """Consecutive groups of ``size`` blocks (the last may be shorter), or one group."""
    if size == "all":
        return [blocks]
    return [blocks[i:i + int(size)] for i in range(0, len(blocks), int(size))]


def medoid(arrays: list[list[np.ndarray]]) -> int:
    """Index of the member (a list of slot arrays) closest to all others in squared L2."""
    flat = [np.concatenate([a.astype(np.float64).ravel() for a in member]) for member in arrays]
    costs = [sum(float(np.sum((f - g) ** 2)) for g in flat) for f in flat]
    return int(np.argmin(costs))


class ShareBlocks(KilnPass):
    """Structurally identical residual blocks in a group read one set of weights."""

    name = "share_blocks"
    config_class = ShareBlocksConfig
    exact = False

    def candidates(self, model: ir.Model) -> list[Candidate]:
        config: ShareBlocksConfig = self.config  # type: ignore[assignment]
        found = []
        for same in identical_groups(find_blocks(model, self.selected)):
            for group in chunk(same, config.group_size):
                found.append(self._inspect(group))
        return found

    def _inspect(self, group: list[ResidualBlock]) -> Candidate:
        label = " + ".join(b.label for b in group)
        anchor = group[0].add

        def refuse(reason: str) -> Candidate:
            return Candidate(anchor, label, reason=reason)

        if len(group) < 2:
            return refuse("no structurally identical block in its group")
        for block in group:
            fed = [w.name for w in block.weights() if w.is_graph_input()]
            if fed:
                return refuse(f"weight {fed[0]!r} of {block.label} is a graph input")
        slots = len(group[0].weight_slots)
        if all(len({id(b.weights()[s]) for b in group}) == 1 for s in range(slots)):
            return refuse("the blocks already share their weights")
        nodes = tuple(n for b in group for n in b.nodes)
        return Candidate(anchor, label, nodes=nodes, data=group)

    def rewrite(self, model: ir.Model, accepted: Sequence[Candidate]) -> int:
        config: ShareBlocksConfig = self.config  # type: ignore[assignment]
        graph = model.graph
        worst = 0.0
        bytes_before = kir.count_weight_bytes(model)
        for candidate in accepted:
            group: list[ResidualBlock] = candidate.data
            arrays = [b.weight_arrays() for b in group]
            old = list({id(w): w for b in group for w in b.weights()}.values())
            shared = self._shared(graph, group, arrays, config.weights)
            for block, member in zip(group, arrays):
                for (i, j), value, array in zip(block.weight_slots, shared, member):
                    target = kir.constant_tensor(value).numpy()  # type: ignore[union-attr]
                    norm = float(np.linalg.norm(array.astype(np.float64)))
                    diff = float(np.linalg.norm(array.astype(np.float64) - target))
                    worst = max(worst, diff / norm if norm else (0.0 if diff == 0 else np.inf))
                    block.nodes[i].replace_input_with(j, value)
            remove_unused_constants(graph, old)
        groups = len(accepted)
        blocks = sum(len(c.data) for c in accepted)
        change = "exact (identical weights)" if worst == 0 else \
            f"largest relative weight change {worst:.4g}"
        self.note = (f"{blocks} blocks in {groups} group{'s' if groups != 1 else ''} share "
                     f"weights ({config.weights}): weight bytes {bytes_before} -> "
                     f"{kir.count_weight_bytes(model)}; {change}")
        return groups

    @staticmethod
    def _shared(graph: ir.Graph, group: list[ResidualBlock], arrays: list[list[np.ndarray]],
                how: str) -> list[ir.Value]:
        """The value each weight slot of the group reads from now on."""
        if how == "first":
            return group[0].weights()
        if how == "medoid":
            return group[medoid(arrays)].weights()
        values = []
        for s, value in enumerate(group[0].weights()):
            stack = np.stack([member[s].astype(np.float64) for member in arrays])
            mean = stack.mean(axis=0).astype(arrays[0][s].dtype)
            values.append(add_initializer(graph, f"{value.name}.shared", mean))
        return values
