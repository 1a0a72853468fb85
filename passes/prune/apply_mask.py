"""apply_mask: multiply binary masks or real gates from a safetensors file into weights.

The file's keys are **initializer names** (what ``torch.onnx.export`` calls a parameter:
``layer1.0.conv1.weight``, the module path plus ``.weight``); each tensor is either

- a mask of the weight's shape (or broadcastable to it): ``W' = W * M``, or
- a 1-D gate over the output channels of the one Conv/Gemm/MatMul that uses the weight
  (length C_out): ``W'[c] = W[c] * g_c`` and, when the node has a bias, ``b'[c] = b[c] * g_c``
  (the channel's output is scaled by g_c).

With ``drop: true`` every channel that is all zero after masking (weights and bias) is
then removed with ``prune_channels``' machinery (exact: a zero channel contributes
nothing; groups the channel graph refuses keep their zeros, the note says how many).
A key naming no initializer, or a tensor that fits neither form, is refused with the
reason. Masked weights are marked, so a second run changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir
from pydantic import Field

from kiln.compiler.core import graph as kir
from kiln.compiler.core.errors import KilnError
from kiln.compiler.core.pass_api import Candidate, KilnPass, PassConfig

from .channel_graph import ChannelGraph, const_array, infer_missing_shapes, producer_of
from .channel_slice import replace_const, replace_initializer
from .prune_channels import producer_norms, prune_groups, zero_units

MASKED_KEY = "kiln.masked"


class ApplyMaskConfig(PassConfig):
    """Options of ``apply_mask``."""

    file: str = Field(description="safetensors file: initializer name -> mask or gate")
    drop: bool = Field(default=False,
                       description="remove the channels left all zero (structured)")


@dataclass(frozen=True)
class _Mask:
    key: str
    array: np.ndarray
    gate: bool                   # a 1-D output-channel gate (bias scaled too)


def load_masks(path: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    if not Path(path).is_file():
        raise KilnError(f"apply_mask: mask file {path!r} does not exist")
    try:
        return dict(load_file(path))
    except Exception as error:  # safetensors raises its own SafetensorError
        raise KilnError(f"apply_mask: {path!r} is not a safetensors file: {error}") from error


def _users(value: ir.Value) -> list[ir.Node]:
    return list({id(n): n for n, _ in value.uses()}.values())


class ApplyMask(KilnPass):
    """Multiply masks/gates from a safetensors file into weights; optionally drop channels."""

    name = "apply_mask"
    config_class = ApplyMaskConfig
    exact = False

    def candidates(self, model: ir.Model) -> list[Candidate]:
        graph = model.graph
        found = []
        for key, array in sorted(load_masks(self.config.file).items()):
            value = graph.initializers.get(key)
            if value is None:
                found.append(Candidate(None, key, reason=f"no initializer named {key!r}"))
                continue
            users = _users(value)
            if users and not all(self.selected(n) for n in users):
                continue
            label = f"{key} ({', '.join(kir.node_label(n) for n in users) or 'unused'})"
            reason, mask = self._check(key, value, array, users)
            found.append(Candidate(users[0] if users else None, label, reason=reason,
                                   nodes=tuple(users), data=mask))
        return found

    def _check(self, key: str, value: ir.Value, array: np.ndarray, users: list[ir.Node]
               ) -> tuple[str | None, _Mask | None]:
        if value.metadata_props.get(MASKED_KEY):
            return "already masked", None
        weight = const_array(value)
        assert weight is not None
        array = np.asarray(array, dtype=np.float64)
        producer = producer_of(users[0]) if len(users) == 1 else None
        if array.ndim == 1 and producer is not None and producer.weight is value and \
                array.shape[0] == weight.shape[producer.weight_axis] and \
                array.shape != weight.shape:
            return None, _Mask(key, array, gate=True)
        try:
            np.broadcast_to(array, weight.shape)
        except ValueError:
            return (f"mask shape {list(array.shape)} fits neither weight shape "
                    f"{list(weight.shape)} nor its output channels"), None
        return None, _Mask(key, array, gate=False)

    def rewrite(self, model: ir.Model, accepted: Sequence[Candidate]) -> int:
        graph = model.graph
        for candidate in accepted:
            mask: _Mask = candidate.data
            value = graph.initializers[mask.key]
            weight = const_array(value)
            assert weight is not None
            if mask.gate:
                node = candidate.nodes[0]
                producer = producer_of(node)
                assert producer is not None
                shape = [1] * weight.ndim
                shape[producer.weight_axis] = -1
                new = weight * mask.array.reshape(shape)
                bias = const_array(producer.bias)
                if bias is not None and bias.shape[-1:] == mask.array.shape:
                    replace_const(graph, node, 2, (bias * mask.array).astype(bias.dtype))
            else:
                new = weight * mask.array
            masked = replace_initializer(graph, value, new.astype(weight.dtype))
            masked.metadata_props[MASKED_KEY] = "1"
        notes = [f"masked {len(accepted)} weights"]
        if self.config.drop:
            notes.append(self._drop(model))
        self.note = "; ".join(notes)
        return len(accepted)

    def _drop(self, model: ir.Model) -> str:
        infer_missing_shapes(model)
        plans, removed, stuck = [], 0, 0
        graph = ChannelGraph(model)
        for group in graph.groups:
            if group.reason is not None:
                stuck += sum(int((producer_norms(p, 1) == 0).sum()) for p in group.producers)
                continue
            # values: a channel a later bias Add or activation shifts from zero is not zero
            zero = set(zero_units(group, graph.values).tolist())
            if not zero:
                continue
            keep = np.array([u for u in range(group.units) if u not in zero], dtype=np.int64)
            if len(keep) == 0:
                keep = np.array([0])
            plans.append((group, keep))
            removed += group.units - len(keep)
        prune_groups(model, plans)
        note = f"dropped {removed} zero channels in {len(plans)} groups"
        return note + (f"; {stuck} zero channels kept (their groups are refused)"
                       if stuck else "")
