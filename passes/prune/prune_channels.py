"""prune_channels: structured pruning of conv output channels and linear neurons.

The channel graph (:mod:`.channel_graph`) splits the model into prune groups: dims
coupled through residual adds, concats, depthwise/grouped convs, normalization,
activations and flattening must lose the same channels. In each group every unit
(a class of coupled channel positions) gets a score, summed over the group's
producers (the Conv/Gemm/MatMul whose weight slices make the unit):

    l1:          s_u = sum_p ( sum |W_p[u]| + |b_p[u]| )
    l2:          s_u = sqrt( sum_p ( sum W_p[u]^2 + b_p[u]^2 ) )
    activation:  s_u = sum_c mean |x_c[..., u, ...]|   (calibration; x_c the inputs the
                 group's consumers read: after bias, normalization and activation, what
                 a channel passes on; the producers' outputs if nothing consumes them)
    random:      a seeded draw (an ablation baseline)

and the ``floor(amount * U)`` lowest-scored units go (the kept count is rounded up to
a multiple of ``round_to`` and never below ``min_keep``). Then every weight slice that
makes a removed channel, and every weight slice that reads one downstream, is cut
out (:mod:`.channel_slice`): initializers and value shapes really shrink.

Attention heads: a Reshape that splits the channel axis into ``[heads, d]`` and the
MatMuls of two activations (``Q K^T``, ``P V``) couple the Q, K and V projections'
output columns of one head and the output projection's input rows, so a unit is a
head; the Reshapes' head counts shrink with it.

The rewrite is exact when it removes only units whose producers' weights and biases
are all zero and nothing between producer and consumer maps zero to non-zero (an
added constant, a BatchNormalization's shift, a Sigmoid): ``zero_only: true`` removes
only those (it checks those three kinds of op). A zero head is exact too: its scores
are zero, its Softmax uniform, and its zero V makes its output zero. Otherwise the
rewrite is lossy, checked by SQNR.
A group already pruned by this pass is refused (a second run changes nothing).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import onnx_ir as ir
from pydantic import Field

from kiln.compiler.core import graph as kir
from kiln.compiler.core.pass_api import Candidate, KilnPass, PassConfig

from .channel_graph import (
    ChannelGraph,
    ChannelGroup,
    Dim,
    Producer,
    const_array,
    infer_missing_shapes,
)
from .channel_slice import Kept, shrink

PRUNED_KEY = "kiln.pruned_channels"


class PruneChannelsConfig(PassConfig):
    """Options of ``prune_channels``."""

    amount: float = Field(default=0.5, ge=0.0, lt=1.0,
                          description="fraction of each group's channels removed")
    criterion: Literal["l1", "l2", "activation", "random"] = Field(
        default="l1", description="how channels are ranked (activation: calibration)")
    round_to: int = Field(default=1, ge=1,
                          description="kept channels per group rounded up to a multiple")
    min_keep: int = Field(default=1, ge=1, description="channels kept per group at least")
    zero_only: bool = Field(default=False,
                            description="remove only all-zero channels (exact; amount ignored)")
    seed: int = Field(default=0, description="seed of criterion: random")


def producer_norms(producer: Producer, power: int) -> np.ndarray:
    """Per output channel: sum |w|^power over the weight slice and the bias."""
    weight = const_array(producer.weight)
    assert weight is not None
    w = np.moveaxis(np.abs(weight.astype(np.float64)), producer.weight_axis, 0)
    norms = (w.reshape(w.shape[0], -1) ** power).sum(axis=1)
    bias = const_array(producer.bias)
    if bias is not None and bias.ndim >= 1 and bias.shape[-1] == norms.shape[0]:
        b = np.abs(bias.astype(np.float64)).reshape(-1, norms.shape[0])
        norms = norms + (b ** power).sum(axis=0)
    return norms


def weight_scores(group: ChannelGroup, power: int) -> np.ndarray:
    scores = group.unit_scores({p.out_dim: producer_norms(p, power) for p in group.producers})
    return np.sqrt(scores) if power == 2 else scores


# activations that map an all-zero channel to a non-zero one
NONZERO_AT_ZERO = frozenset({"Sigmoid", "HardSigmoid", "Exp", "Cos", "Softplus", "Log",
                             "Reciprocal"})


def _channel_abs(array: np.ndarray, axis: int, rank: int, size: int) -> np.ndarray:
    """Per channel of output ``axis``: sum |array| over the other axes (broadcast aware)."""
    a = axis - (rank - array.ndim)
    mags = np.abs(array.astype(np.float64))
    if a >= 0 and array.shape[a] == size:
        return np.moveaxis(mags, a, 0).reshape(size, -1).sum(axis=1)
    return np.full(size, mags.sum())  # broadcast: the same shift on every channel


def shift_scores(group: ChannelGroup, values: dict[str, ir.Value]) -> dict[Dim, np.ndarray]:
    """Per dim of the group, how far the op that makes it moves a zero channel away from
    zero: a constant added or subtracted (a MatMul's bias), a BatchNormalization's
    ``B - scale * mean / sqrt(var + eps)``, an InstanceNormalization's B; infinite for an
    activation with f(0) != 0."""
    shifts = {}
    for dim in group.dims:
        value = values.get(dim[0])
        node = value.producer() if value is not None else None
        if node is None:
            continue
        size, rank = group.sizes[dim], len(value.shape or ())
        if node.op_type in ("Add", "Sub"):
            arrays = [const_array(v) for v in node.inputs]
            terms = [_channel_abs(a, dim[1], rank, size) for a in arrays if a is not None]
            if terms:
                shifts[dim] = sum(terms)
        elif node.op_type == "BatchNormalization":
            scale, bias, mean, var = (const_array(v) for v in node.inputs[1:5])
            if all(a is not None for a in (scale, bias, mean, var)):
                eps = node.attributes.get_float("epsilon", 1e-5)
                shifts[dim] = np.abs(bias - scale * mean / np.sqrt(var + eps))
        elif node.op_type == "InstanceNormalization":
            bias = const_array(node.inputs[2])
            if bias is not None:
                shifts[dim] = np.abs(bias.astype(np.float64))
        elif node.op_type in NONZERO_AT_ZERO:
            shifts[dim] = np.full(size, np.inf)
    return shifts


def zero_units(group: ChannelGroup, values: dict[str, ir.Value] | None = None) -> np.ndarray:
    """The units whose producers' weights and biases are all exactly zero and that no op
    of the group shifts away from zero (see :func:`shift_scores`)."""
    scores = weight_scores(group, 1)
    if values is not None:
        scores = scores + group.unit_scores(shift_scores(group, values))
    return np.nonzero(scores == 0)[0]


def activation_dims(group: ChannelGroup) -> list[Dim]:
    """What criterion ``activation`` measures: the inputs the group's consumers read (after
    bias, normalization and activation: what a channel passes on), else the producers'
    outputs."""
    return group.consumed or [p.out_dim for p in group.producers]


def keep_count(units: int, amount: float, round_to: int, min_keep: int) -> int:
    keep = units - math.floor(amount * units)
    keep = math.ceil(keep / round_to) * round_to
    return min(units, max(keep, min_keep))


def top_units(scores: np.ndarray, keep: int) -> np.ndarray:
    """The ``keep`` highest-scored units (ties: the lower index stays), sorted."""
    order = np.lexsort((np.arange(len(scores)), -scores))
    return np.sort(order[:keep])


def already_pruned(group: ChannelGroup) -> bool:
    return all(p.node.metadata_props.get(PRUNED_KEY) for p in group.producers)


def prune_groups(model: ir.Model, plans: Sequence[tuple[ChannelGroup, np.ndarray]], *,
                 mark: bool = False) -> int:
    """Cut every group down to its kept units (``mark``: record it on the producers, so
    ``prune_channels`` refuses them next time). Returns how many nodes changed."""
    kept: Kept = {}
    for group, units in plans:
        kept.update(group.kept_positions(units))
        if mark:
            for producer in group.producers:
                producer.node.metadata_props[PRUNED_KEY] = f"{len(units)}/{group.units}"
    return shrink(model, kept)


class PruneChannels(KilnPass):
    """Remove the lowest-ranked channels of every prune group (see the module doc)."""

    name = "prune_channels"
    config_class = PruneChannelsConfig
    exact = False
    needs_calibration = True  # read only by criterion: activation

    def prepare(self, model: ir.Model) -> int:
        infer_missing_shapes(model)  # shapes only: nothing to verify
        return 0

    def candidates(self, model: ir.Model) -> list[Candidate]:
        found = []
        graph = ChannelGraph(model)
        groups = [g for g in graph.groups if any(self.selected(p.node) for p in g.producers)]
        activation = self._activation_scores(model, groups) \
            if self.config.criterion == "activation" else {}
        for group in groups:
            anchor = group.producers[0].node
            nodes = tuple(p.node for p in group.producers)

            def refuse(reason: str, group=group, anchor=anchor, nodes=nodes) -> Candidate:
                return Candidate(anchor, group.label, reason=reason, nodes=nodes)

            outside = [kir.node_label(p.node) for p in group.producers if not self.selected(p.node)]
            if outside:
                found.append(refuse(f"coupled with unselected {', '.join(outside)}"))
            elif group.reason is not None:
                found.append(refuse(group.reason))
            elif already_pruned(group):
                found.append(refuse("already pruned"))
            else:
                units = self._choose(group, activation, graph.values)
                if len(units) == group.units:
                    found.append(refuse("no all-zero channels" if self.config.zero_only
                                        else f"nothing to remove of {group.units} channels"))
                else:
                    found.append(Candidate(anchor, group.label, nodes=nodes,
                                           data=(group, units)))
        return found

    def _activation_scores(self, model: ir.Model, groups: list[ChannelGroup]
                           ) -> dict[tuple[str, int], np.ndarray]:
        """Mean |x| per channel of every dim the activation criterion reads (calibration)."""
        if self.calibration is None:
            raise ValueError("criterion 'activation' needs calibration samples")
        dims = [d for g in groups if g.reason is None for d in activation_dims(g)]
        if not dims:
            return {}
        acts = self.calibration.activations(model, sorted({name for name, _ in dims}))
        scores = {}
        for name, axis in dims:
            arrays = [np.moveaxis(np.abs(np.asarray(a, dtype=np.float64)), axis, 0)
                      for a in acts[name]]
            sums = sum(a.reshape(a.shape[0], -1).mean(axis=1) for a in arrays)
            scores[(name, axis)] = sums / len(arrays)
        return scores

    def _choose(self, group: ChannelGroup, activation,
                values: dict[str, ir.Value]) -> np.ndarray:
        cfg = self.config
        if cfg.zero_only:
            zero = set(zero_units(group, values).tolist())
            keep = np.array([u for u in range(group.units) if u not in zero], dtype=np.int64)
            return keep if len(keep) >= cfg.min_keep else np.arange(min(cfg.min_keep,
                                                                         group.units))
        if cfg.criterion == "activation":
            scores = group.unit_scores({d: activation[d] for d in activation_dims(group)})
        elif cfg.criterion == "random":
            rng = np.random.default_rng([cfg.seed, group.index])
            scores = rng.random(group.units)
        else:
            scores = weight_scores(group, 1 if cfg.criterion == "l1" else 2)
        return top_units(scores, keep_count(group.units, cfg.amount, cfg.round_to,
                                            cfg.min_keep))

    def rewrite(self, model: ir.Model, accepted: Sequence[Candidate]) -> int:
        before = sum(c.data[0].units for c in accepted)
        after = sum(len(c.data[1]) for c in accepted)
        prune_groups(model, [c.data for c in accepted], mark=True)
        self.note = f"kept {after} of {before} channel units in {len(accepted)} groups"
        return len(accepted)
