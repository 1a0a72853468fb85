"""equalize: cross-layer equalization of consecutive weight layers (Nagel et al. 2019, DFQ).

For a pair ``A -> [act] -> B`` (A, B each a Conv, Gemm or MatMul with a constant weight;
act one of Relu, LeakyRelu, PRelu, Clip or nothing), with r1_i = max |W_A| over A's output
channel i and r2_i = max |W_B| over the weights of B that read channel i:

    s_i = sqrt(r1_i * r2_i) / r2_i                 (= sqrt(r1_i / r2_i))
    W_A'[i] = W_A[i] / s_i,   b_A'[i] = b_A[i] / s_i,   W_B'[:, i] = W_B[:, i] * s_i

after which both layers have the range sqrt(r1_i r2_i) on channel i, so one per-tensor
or per-channel int8 grid fits both. The function is unchanged because act is positively
homogeneous, act(x / s) = act(x) / s for s > 0 (Relu, LeakyRelu, PRelu with any slope);
a ``Clip(lo, hi)`` (ReLU6) is not, so it becomes ``Min(Max(x, lo / s), hi / s)`` with the
bounds per channel: exact as well. A grouped or depthwise B reads channel i through the
output rows of i's group at in-group index ``i mod (C / groups)``. Scales are kept in
[1 / max_scale, max_scale] (over all sweeps): a tiny r1 with a large bias would otherwise
blow up the activation's range; a dead channel (r below 1e-6 of its layer's largest)
keeps s = 1.

Chains (A -> B -> C) are swept ``iterations`` times, each pair on the weights the previous
pair left. Equalized layers are marked (metadata ``kiln.equalized``): a second run changes
nothing. Refused, with the reason: a weight or bias that is not a constant or is shared,
an intermediate value that something else reads, an activation that is not homogeneous
(HardSwish, Sigmoid...), a BatchNormalization in between (run ``fold_batchnorm`` first).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
from pydantic import Field

from kiln.compiler.core import graph as kir
from kiln.compiler.core.pass_api import (
    Candidate,
    KilnPass,
    PassConfig,
    add_initializer,
    remove_unused_initializers,
    unique_name,
)
from kiln.passes.quant.weights import WEIGHT_OPS, WeightSite, find_weight

EQUALIZED_KEY = "kiln.equalized"
#: Activations with act(x / s) = act(x) / s for s > 0.
HOMOGENEOUS = ("Relu", "LeakyRelu", "PRelu")
CLIP = "Clip"
#: A channel whose range is below this fraction of its layer's largest is dead: s = 1.
DEAD = 1e-6


class EqualizeConfig(PassConfig):
    """Options of ``equalize``."""

    iterations: int = Field(default=1, ge=1, le=100,
                            description="sweeps over the pairs (chains converge over sweeps)")
    max_scale: float = Field(default=100.0, ge=1.0, description="each channel's total "
                             "scale is kept in [1/max_scale, max_scale]")


@dataclass
class _Pair:
    first: WeightSite
    second: WeightSite
    act: ir.Node | None
    scales: list[np.ndarray] = field(default_factory=list)


def _sole_user(value: ir.Value) -> ir.Node | None:
    users = {id(n): n for n, _ in value.uses()}
    if len(users) != 1 or value.is_graph_output():
        return None
    return next(iter(users.values()))


def _bias(node: ir.Node, channels: int) -> np.ndarray | None | str:
    """A's bias as an array (None: no bias), or why it cannot be scaled."""
    if len(node.inputs) < 3 or node.inputs[2] is None:
        return None
    value = node.inputs[2]
    tensor = kir.constant_tensor(value)
    if tensor is None:
        return "bias is not a constant"
    if any(n is not node for n, _ in value.uses()) or value.is_graph_output():
        return f"bias {value.name!r} is shared"
    array = tensor.numpy()
    if array.shape != (channels,):
        return f"bias has shape {list(array.shape)}, not [{channels}]"
    return array


def _first_problem(site: WeightSite) -> str | None:
    node = site.node
    if node.op_type == "Gemm" and (node.attributes.get_int("transA", 0)
                                   or node.attributes.get_float("alpha", 1.0) <= 0):
        return "Gemm with transA or alpha <= 0"
    channels = site.array.shape[site.out_axis]
    bias = _bias(node, channels)
    return bias if isinstance(bias, str) else None


def _clip_bounds(node: ir.Node) -> tuple[np.ndarray | None, np.ndarray | None] | str:
    if "min" in node.attributes or "max" in node.attributes:
        return "Clip with attribute bounds (opset < 11)"
    bounds = []
    for index in (1, 2):
        value = node.inputs[index] if len(node.inputs) > index else None
        if value is None:
            bounds.append(None)
            continue
        tensor = kir.constant_tensor(value)
        if tensor is None or tensor.numpy().size != 1:
            return "Clip bounds are not scalar constants"
        bounds.append(tensor.numpy().astype(np.float64).reshape(()))
    return bounds[0], bounds[1]


def _channel_rows(site: WeightSite, channels: int) -> list[tuple[slice, int]] | str:
    """For each input channel i of B: (output rows that read it, its in-group index)."""
    node = site.node
    groups = node.attributes.get_int("group", 1) if node.op_type == "Conv" else 1
    per_group_in = site.array.shape[site.in_axis]
    if per_group_in * groups != channels:
        return f"reads {per_group_in * groups} channels, the layer before gives {channels}"
    out = site.array.shape[site.out_axis]
    rows = out // groups
    return [(slice((i // per_group_in) * rows, (i // per_group_in + 1) * rows),
             i % per_group_in) for i in range(channels)]


def _output_ranges(w: np.ndarray, out_axis: int) -> np.ndarray:
    moved = np.moveaxis(np.abs(w.astype(np.float64)), out_axis, 0)
    return moved.reshape(moved.shape[0], -1).max(axis=1)


def _input_ranges(w: np.ndarray, site: WeightSite, rows: list[tuple[slice, int]]) -> np.ndarray:
    moved = np.moveaxis(np.abs(w.astype(np.float64)), (site.out_axis, site.in_axis), (0, 1))
    return np.array([moved[r, j].max() for r, j in rows])


class Equalize(KilnPass):
    """Cross-layer equalization of Conv/Gemm/MatMul pairs through homogeneous activations."""

    name = "equalize"
    config_class = EqualizeConfig
    exact = True

    def candidates(self, model: ir.Model) -> list[Candidate]:
        found: list[Candidate] = []
        for node in self.selected_nodes(model):
            if node.op_type not in WEIGHT_OPS or node.domain not in ("", "ai.onnx"):
                continue
            label = kir.node_label(node)
            found.append(self._pair(node, label))
        return [c for c in found if c is not None]

    def _pair(self, node: ir.Node, label: str) -> Candidate | None:
        user = _sole_user(node.outputs[0])
        act = None
        if user is not None and (user.op_type in HOMOGENEOUS or user.op_type == CLIP) \
                and user.domain in ("", "ai.onnx"):
            act, user = user, _sole_user(user.outputs[0])
        if user is None or user.op_type not in WEIGHT_OPS or user.domain not in ("", "ai.onnx") \
                or not self.selected(user):
            if user is not None and user.op_type == "BatchNormalization":
                return Candidate(node, label, reason="BatchNormalization follows: run "
                                 "fold_batchnorm first")
            return None     # not the first layer of a pair: nothing to say
        where = node.outputs[0] if act is None else act.outputs[0]
        pair_label = f"{label} -> {kir.node_label(act) + ' -> ' if act else ''}" \
                     f"{kir.node_label(user)}"
        if EQUALIZED_KEY in node.metadata_props:
            return Candidate(node, pair_label, reason="already equalized")
        if user.inputs[0] is not where:
            return Candidate(node, pair_label, reason="the second layer reads it as its weight")
        if act is not None and act.op_type == CLIP and isinstance(_clip_bounds(act), str):
            return Candidate(node, pair_label, reason=_clip_bounds(act))
        if act is not None and act.op_type == "PRelu" and \
                kir.constant_tensor(act.inputs[1]) is None:
            return Candidate(node, pair_label, reason="PRelu slope is not a constant")
        first, second = find_weight(node), find_weight(user)
        for site in (first, second):
            if isinstance(site, str):
                return Candidate(node, pair_label, reason=site)
        problem = _first_problem(first)
        if problem is None and user.op_type == "Gemm" and user.attributes.get_int("transA", 0):
            problem = "second Gemm has transA"
        if problem is None:
            rows = _channel_rows(second, first.array.shape[first.out_axis])
            problem = rows if isinstance(rows, str) else None
        if problem is not None:
            return Candidate(node, pair_label, reason=problem)
        return Candidate(node, pair_label, nodes=tuple(n for n in (node, act, user) if n),
                         data=_Pair(first, second, act))

    def rewrite(self, model: ir.Model, accepted: Sequence[Candidate]) -> int:
        pairs: list[_Pair] = [c.data for c in accepted]
        weights = {id(p.first.node): p.first.array.astype(np.float64) for p in pairs}
        weights |= {id(p.second.node): p.second.array.astype(np.float64) for p in pairs}
        biases: dict[int, np.ndarray] = {}
        for p in pairs:
            bias = _bias(p.first.node, p.first.array.shape[p.first.out_axis])
            if isinstance(bias, np.ndarray):
                biases[id(p.first.node)] = bias.astype(np.float64)
        limit = self.config.max_scale
        for _ in range(self.config.iterations):
            for p in pairs:
                a, b = id(p.first.node), id(p.second.node)
                channels = p.first.array.shape[p.first.out_axis]
                rows = _channel_rows(p.second, channels)
                r1 = _output_ranges(weights[a], p.first.out_axis)
                r2 = _input_ranges(weights[b], p.second, rows)
                with np.errstate(divide="ignore", invalid="ignore"):
                    s = np.sqrt(r1 / r2)
                dead = (r1 <= DEAD * r1.max()) | (r2 <= DEAD * r2.max()) | ~np.isfinite(s)
                s = np.where(dead, 1.0, s)
                done = np.prod(p.scales, axis=0) if p.scales else np.ones_like(s)
                s = np.clip(done * s, 1 / limit, limit) / done
                shape = [1] * weights[a].ndim
                shape[p.first.out_axis] = -1
                weights[a] = weights[a] / s.reshape(shape)
                if a in biases:
                    biases[a] = biases[a] / s
                moved = np.moveaxis(weights[b], (p.second.out_axis, p.second.in_axis), (0, 1))
                for i, (r, j) in enumerate(rows):
                    moved[r, j] *= s[i]
                p.scales.append(s)
        graph = model.graph
        for p in pairs:
            total = np.prod(p.scales, axis=0)
            if p.act is not None and p.act.op_type == CLIP:
                self._rescale_clip(graph, p, total)
        done: set[int] = set()
        for p in pairs:
            for site in (p.first, p.second):
                if id(site.node) in done:
                    continue
                done.add(id(site.node))
                self._replace(graph, site.node, 1, weights[id(site.node)].astype(site.array.dtype))
                if id(site.node) in biases:
                    self._replace(graph, site.node, 2,
                                  biases[id(site.node)].astype(site.array.dtype))
            p.first.node.metadata_props[EQUALIZED_KEY] = "1"
        self.note = f"{len(pairs)} pair(s) equalized"
        return len(pairs)

    @staticmethod
    def _replace(graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray) -> None:
        old = node.inputs[index]
        node.replace_input_with(index, add_initializer(graph, f"{old.name}_equalized", array))
        if old.name:
            remove_unused_initializers(graph, [old.name])
            producer = old.producer()
            if producer is not None and producer.op_type == "Constant" and not old.uses():
                graph.remove(producer, safe=True)

    @staticmethod
    def _rescale_clip(graph: ir.Graph, p: _Pair, s: np.ndarray) -> None:
        """Clip(x, lo, hi) on x / s -> Min(Max(x, lo / s), hi / s), bounds per channel."""
        clip = p.act
        lo, hi = _clip_bounds(clip)
        x = clip.inputs[0]
        rank = len(x.shape) if x.shape is not None else p.first.array.ndim
        shape = [1] * rank
        shape[1 if p.first.node.op_type == "Conv" else rank - 1] = -1
        dtype = p.first.array.dtype
        current, made = x, []
        for bound, op in ((lo, "Max"), (hi, "Min")):
            if bound is None:
                continue
            limit = add_initializer(graph, f"{clip.name or 'clip'}_{op.lower()}_equalized",
                                    (bound / s).astype(dtype).reshape(shape))
            node = ir.Node("", op, [current, limit], num_outputs=1,
                           name=unique_name(graph, f"{clip.name or 'clip'}_{op.lower()}"),
                           metadata_props={EQUALIZED_KEY: "1"})
            node.outputs[0].name = unique_name(graph, f"{x.name}_{op.lower()}")
            node.outputs[0].shape, node.outputs[0].type = x.shape, x.type
            made.append(node)
            current = node.outputs[0]
        out = clip.outputs[0]
        graph.insert_before(clip, made)
        if not made:
            current = x
        for user, index in list(out.uses()):
            user.replace_input_with(index, current)
        old_bounds = [v for v in clip.inputs[1:] if v is not None]
        graph.remove(clip, safe=True)
        remove_unused_initializers(graph, [v.name for v in old_bounds if v.name])
        if made:
            made[-1].outputs[0].name = unique_name(graph, out.name or "clipped")
