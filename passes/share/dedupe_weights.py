"""dedupe_weights: store byte-identical initializers once.

Initializers with the same dtype, shape and bytes are merged into the first
one (in graph order); every user of a duplicate is pointed at it. Exact by
construction. An initializer that is also a graph input is left alone (a
caller may feed a different value), and so is one that is a graph output.
With ``select``, only initializers whose every user is a selected node count.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import onnx_ir as ir
from pydantic import Field

from kiln.compiler.core import graph as kir
from kiln.compiler.core.pass_api import Candidate, KilnPass, PassConfig


class DedupeWeightsConfig(PassConfig):
    """Options of ``dedupe_weights``."""

    min_elements: int = Field(default=1, ge=1,
                              description="ignore initializers smaller than this")


class DedupeWeights(KilnPass):
    """Store byte-identical initializers once and point every user at the kept copy."""

    name = "dedupe_weights"
    config_class = DedupeWeightsConfig
    exact = True

    def candidates(self, model: ir.Model) -> list[Candidate]:
        groups: dict[tuple, list[ir.Value]] = {}
        for value in model.graph.initializers.values():
            tensor = value.const_value
            if tensor is None or kir.tensor_size(tensor) < self.config.min_elements:
                continue
            users = [node for node, _ in value.uses()]
            if not users or not all(self.selected(node) for node in users):
                continue
            digest = hashlib.sha256(tensor.tobytes()).hexdigest()
            key = (tensor.dtype, tuple(int(d) for d in tensor.shape.dims), digest)
            groups.setdefault(key, []).append(value)
        found = []
        for values in groups.values():
            if len(values) < 2:
                continue
            fixed = [v for v in values if v.is_graph_input() or v.is_graph_output()]
            label = " = ".join(v.name for v in values)
            if len(fixed) > 1:
                found.append(Candidate(None, label, reason="the copies are graph inputs or "
                                       "outputs (a caller may set them)"))
                continue
            keep = fixed[0] if fixed else values[0]
            drop = tuple(v for v in values if v is not keep)
            found.append(Candidate(None, label, data=(keep, drop)))
        return found

    def rewrite(self, model: ir.Model, accepted: Sequence[Candidate]) -> int:
        graph = model.graph
        for candidate in accepted:
            keep, drop = candidate.data
            for value in drop:
                value.replace_all_uses_with(keep)
                del graph.initializers[value.name]
        return len(accepted)
