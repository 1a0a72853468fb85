"""The shared shape of the MoE passes: recognize each layer (``form.recognize``), change
its description (``transform``, or a refusal reason), write it back in the documented
form (``emit.emit``). ``kiln plan`` shows each layer found, with its experts and k, as the
candidate's label.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from kiln.compiler.core import graph as kir
from kiln.compiler.core.errors import PassError
from kiln.compiler.core.pass_api import Candidate, KilnPass, remove_unused_initializers
from kiln.passes.moe.emit import MIN_OPSET, emit, model_opset
from kiln.passes.moe.form import MoeLayer, recognize


class MoeLayerPass(KilnPass):
    """Base of the passes that rewrite recognized MoE layers."""

    exact = False

    def transform(self, model: ir.Model, layer: MoeLayer) -> tuple[MoeLayer, str] | str:
        """The new description and a few words on the change, or why the layer is left."""
        raise NotImplementedError

    def candidates(self, model: ir.Model) -> list[Candidate]:
        found = []
        opset = model_opset(model)
        for node, layer in recognize(model, self.selected):
            if isinstance(layer, str):
                found.append(Candidate(node, f"{kir.node_label(node)}: not a MoE layer",
                                       reason=layer))
                continue
            label = layer.describe()
            if opset < MIN_OPSET:
                found.append(Candidate(node, label, reason=f"model opset {opset} < {MIN_OPSET}"))
                continue
            changed = self.transform(model, layer)
            if isinstance(changed, str):
                found.append(Candidate(node, label, reason=changed, nodes=layer.nodes))
                continue
            new, what = changed
            found.append(Candidate(node, f"{label} -> {what}", nodes=layer.nodes, data=new))
        return found

    def rewrite(self, model: ir.Model, accepted: Sequence[Candidate]) -> int:
        renamed: dict[int, ir.Value] = {}
        read: set[str] = set()
        for candidate in accepted:
            layer: MoeLayer = candidate.data
            if id(layer.x) in renamed:
                layer = layer.with_(x=renamed[id(layer.x)])
            read |= {v.name for n in layer.nodes for v in n.inputs
                     if v is not None and v.name and v.is_initializer()}
            old = layer.y
            renamed[id(old)] = emit(model, layer, name=self.name)
        remove_unused_initializers(model.graph, sorted(read))
        return len(accepted)

    # -- routing statistics ----------------------------------------------------------------
    def routing_share(self, model: ir.Model, layer: MoeLayer) -> np.ndarray:
        """Each expert's share of the routing decisions on the calibration samples (top-k
        choices; for a dense mixture, its mean gate value); sums to 1."""
        if self.calibration is None:
            raise PassError("needs calibration data (run it through the pipeline, or pass a "
                            "CalibrationContext)", pass_name=self.name)
        gate = layer.gate_value
        if gate is None or not gate.name:
            raise PassError(f"{layer.y.name}: the gate value has no name", pass_name=self.name)
        probs = np.concatenate([np.asarray(a, np.float64).reshape(-1, layer.num_experts)
                                for a in self.calibration.activations(model, [gate.name])
                                [gate.name]])
        if layer.k is None:
            share = probs.sum(axis=0)
        else:
            chosen = np.argsort(-probs, axis=1, kind="stable")[:, :layer.k]
            share = np.bincount(chosen.ravel(), minlength=layer.num_experts).astype(np.float64)
        return share / max(share.sum(), 1e-30)
