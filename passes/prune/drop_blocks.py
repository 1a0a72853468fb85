"""drop_blocks (lossy): remove the residual blocks x + f(x) that change their input least.

Each residual block (:mod:`kiln.passes.share.blocks`) is scored on the calibration samples
by the cosine similarity of its input and output, ``cos(x_t, x_t + f(x_t))`` along the
last axis (the feature vector of each token or position), averaged over positions and
samples: a block whose output points where its input did adds little (ShortGPT's block
influence is 1 - this; FoldGPT drops such blocks before sharing the rest). The most
similar ``rate`` fraction (``round(rate * n)``) or ``count`` blocks are dropped: x + f(x)
becomes x, and f's nodes and weights leave the model. The scores come from one run of the
model as it was (one shot, not re-ranked after each drop).

``select`` picks blocks by their Add node (its name or module path). The note lists the
dropped blocks with their scores and the best score kept. Refused: a block whose output
is a graph output (nothing would be left to name it), and, after a run, every block (the
model records what was dropped, so a second run changes nothing: the rate counts the
blocks the model had).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir
from pydantic import Field, model_validator

from kiln.compiler.core import graph as kir
from kiln.compiler.core.errors import PassError
from kiln.compiler.core.pass_api import Candidate, KilnPass, PassConfig
from kiln.passes.share.blocks import ResidualBlock, find_blocks, remove_unused_constants

#: model metadata key recording the blocks a run dropped (idempotence)
DROPPED_KEY = "kiln.drop_blocks"


class DropBlocksConfig(PassConfig):
    """Options of ``drop_blocks``."""

    rate: float | None = Field(default=None, gt=0, lt=1, description=(
        "fraction of the residual blocks dropped (round(rate * blocks))"))
    count: int | None = Field(default=None, ge=1, description=(
        "number of residual blocks dropped (instead of rate)"))

    @model_validator(mode="after")
    def _one_of(self) -> DropBlocksConfig:
        if (self.rate is None) == (self.count is None):
            raise ValueError("give exactly one of `rate` (a fraction) or `count`")
        return self

    def wanted(self, blocks: int) -> int:
        if self.count is not None:
            return min(self.count, blocks)
        return int(round(self.rate * blocks))  # type: ignore[operator]


def token_cosine(x: np.ndarray, y: np.ndarray) -> float:
    """Mean over positions of cos(x, y) along the last axis (a zero vector scores 1 against
    itself and 0 against anything else)."""
    a = np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])
    b = np.asarray(y, np.float64).reshape(-1, np.shape(y)[-1])
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    dot = np.sum(a * b, axis=1)
    both_zero = (na == 0) & (nb == 0)
    cos = np.where(both_zero, 1.0, dot / np.maximum(na * nb, np.finfo(np.float64).tiny))
    return float(np.mean(cos))


def _x_of(block: ResidualBlock) -> ir.Value:
    """The block's input now (an earlier drop may have redirected the Add's input)."""
    return next(v for v in block.add.inputs if v is not block.y)  # type: ignore[misc]


class DropBlocks(KilnPass):
    """Drop the residual blocks whose output is most similar to their input."""

    name = "drop_blocks"
    config_class = DropBlocksConfig
    exact = False
    needs_calibration = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        #: block label -> cosine(x, x + f(x)) of the last run
        self.scores: dict[str, float] = {}

    def candidates(self, model: ir.Model) -> list[Candidate]:
        blocks = find_blocks(model, self.selected)
        done = model.metadata_props.get(DROPPED_KEY)
        if done:
            return [Candidate(b.add, b.label, reason=f"blocks already dropped ({done})")
                    for b in blocks]
        if not blocks:
            return []
        self.scores = self._score(model, blocks)
        config: DropBlocksConfig = self.config  # type: ignore[assignment]
        ranked = sorted(range(len(blocks)), key=lambda i: (-self.scores[blocks[i].label], i))
        rank = {i: r for r, i in enumerate(ranked)}
        droppable = [i for i in ranked if not blocks[i].output.is_graph_output()]
        drop = set(droppable[:config.wanted(len(blocks))])
        found = []
        for i, block in enumerate(blocks):
            score = self.scores[block.label]
            where = f"cosine {score:.6f}, rank {rank[i] + 1} of {len(blocks)}"
            if block.output.is_graph_output():
                found.append(Candidate(block.add, block.label, reason=(
                    f"its output is a graph output ({where})")))
            elif i in drop:
                found.append(Candidate(block.add, block.label,
                                       nodes=(*block.nodes, block.add), data=block))
            else:
                found.append(Candidate(block.add, block.label, reason=f"kept ({where})"))
        return found

    def _score(self, model: ir.Model, blocks: list[ResidualBlock]) -> dict[str, float]:
        if self.calibration is None:
            raise PassError("needs calibration data (run it through the pipeline, or pass a "
                            "CalibrationContext)", pass_name=self.name)
        inputs = {v.name for v in kir.graph_inputs(model)}
        names = sorted({v.name for b in blocks for v in (b.x, b.output)  # type: ignore[misc]
                        if v.name not in inputs})
        values = self.calibration.activations(model, names) if names else {}
        samples = self.calibration.samples

        def of(value: ir.Value) -> list[np.ndarray]:
            if value.name in values:
                return values[value.name]
            return [s[value.name] for s in samples]

        return {b.label: float(np.mean([token_cosine(x, y) for x, y in
                                        zip(of(b.x), of(b.output))])) for b in blocks}

    def rewrite(self, model: ir.Model, accepted: Sequence[Candidate]) -> int:
        graph = model.graph
        for candidate in accepted:
            block: ResidualBlock = candidate.data
            x = _x_of(block)
            block.output.replace_all_uses_with(x)
            constants = [v for n in block.nodes for v in n.inputs
                         if v is not None and kir.constant_tensor(v) is not None]
            for node in (block.add, *reversed(block.nodes)):
                graph.remove(node, safe=True)
            remove_unused_constants(graph, constants)
        dropped = ", ".join(f"{c.label} ({self.scores[c.label]:.6f})" for c in accepted)
        kept = [s for label, s in self.scores.items()
                if label not in {c.label for c in accepted}]
        model.metadata_props[DROPPED_KEY] = f"{len(accepted)} of {len(self.scores)}"
        self.note = (f"dropped {len(accepted)} of {len(self.scores)} blocks (cosine of input "
                     f"and output): {dropped}")
        if kept:
            self.note += f"; best kept {max(kept):.6f}"
        return len(accepted)

