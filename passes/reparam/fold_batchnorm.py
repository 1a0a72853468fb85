"""fold_batchnorm: fold an inference BatchNormalization (or a per-channel Mul/Add)
into the Conv, Gemm or MatMul before it.

With s = gamma / sqrt(var + eps) and t = beta - mean * s, per output channel:

    Conv/Gemm:  W' = W * s (output-channel axis),  b' = b * s + t
    MatMul:     W' = W * s (last axis), then one Add(t) replaces the BatchNormalization

A per-channel ``Mul(c)`` then optional ``Add(d)`` folds the same way (s = c, t = d).
The rewrite is exact up to float rounding. It refuses, with a reason, when the
weight or bias is not a constant, when the weight is used by another node,
when the producer's output has other consumers, or when the scale is not per
output channel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from pydantic import Field

from kiln.compiler.core import graph as kir
from kiln.compiler.core.pass_api import (
    Candidate,
    KilnPass,
    PassConfig,
    add_initializer,
    copy_metadata,
    remove_unused_initializers,
    replace_value,
    unique_name,
)

PRODUCERS = ("Conv", "Gemm", "MatMul")
FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


class FoldBatchNormConfig(PassConfig):
    """Options of ``fold_batchnorm``."""

    mul_add: bool = Field(default=True, description="also fold per-channel Mul/Add after the op")


@dataclass
class _Fold:
    producer: ir.Node
    tail: list[ir.Node]          # the BatchNormalization, or the Mul [and Add]
    scale: np.ndarray            # per output channel (length C) or scalar
    shift: np.ndarray | None     # per output channel (length C), scalar, or None
    channels: int


def _const(value: ir.Value | None) -> np.ndarray | None:
    tensor = kir.constant_tensor(value)
    return None if tensor is None else tensor.numpy()


def _single_consumer(value: ir.Value) -> ir.Node | None:
    users = {id(node): node for node, _ in value.uses()}
    return next(iter(users.values())) if len(users) == 1 else None


def _out_channels(producer: ir.Node, weight: np.ndarray) -> int:
    if producer.op_type == "Conv":
        return weight.shape[0]
    if producer.op_type == "Gemm":
        trans_b = producer.attributes.get_int("transB", 0)
        return weight.shape[0] if trans_b else weight.shape[1]
    return weight.shape[-1]


def _per_channel(array: np.ndarray, channels: int, out_rank: int, axis: int) -> np.ndarray | None:
    """Reduce a broadcastable constant to one value per output channel, or None."""
    if array.ndim > out_rank:
        return None
    shape = (1,) * (out_rank - array.ndim) + array.shape
    for i, dim in enumerate(shape):
        if i == axis % out_rank:
            if dim not in (1, channels):
                return None
        elif dim != 1:
            return None
    flat = array.reshape(shape[axis % out_rank])
    return np.broadcast_to(flat, (channels,)).astype(np.float64)


def _output_rank(producer: ir.Node, weight: np.ndarray) -> int | None:
    out = producer.outputs[0]
    if out.shape is not None:
        return len(out.shape)
    if producer.op_type == "Conv":
        return weight.ndim
    if producer.op_type == "Gemm":
        return 2
    data = producer.inputs[0]
    return len(data.shape) if data is not None and data.shape is not None else None


class FoldBatchNorm(KilnPass):
    """Fold BatchNormalization or per-channel Mul/Add into the Conv/Gemm/MatMul before it."""

    name = "fold_batchnorm"
    config_class = FoldBatchNormConfig
    exact = True

    def candidates(self, model: ir.Model) -> list[Candidate]:
        found = []
        for node in self.selected_nodes(model):
            if node.op_type in PRODUCERS and node.domain == "":
                candidate = self._inspect(node)
                if candidate is not None:
                    found.append(candidate)
        return found

    def _inspect(self, producer: ir.Node) -> Candidate | None:
        out = producer.outputs[0]
        consumer = _single_consumer(out)
        users = {id(n) for n, _ in out.uses()}
        followers = [n for n, _ in out.uses()]
        tail_ops = {"BatchNormalization"} | ({"Mul", "Add"} if self.config.mul_add else set())
        if not any(n.op_type in tail_ops for n in followers):
            return None
        label = kir.node_label(producer)

        def refuse(reason: str) -> Candidate:
            return Candidate(producer, label, reason=reason)

        if len(users) > 1:
            return refuse(f"output of {producer.op_type} has {len(users)} consumers")
        if out.is_graph_output():
            return refuse(f"output of {producer.op_type} is a graph output")
        assert consumer is not None
        weight_index = 1
        weight_value = producer.inputs[weight_index] if len(producer.inputs) > 1 else None
        weight = _const(weight_value)
        if weight is None:
            return refuse("weight is not a constant")
        if weight_value is not None and weight_value.dtype not in FLOAT_TYPES:
            return refuse(f"weight dtype {weight_value.dtype} is not floating point")
        other_users = {kir.node_label(n) for n, _ in weight_value.uses() if n is not producer}
        if other_users or weight_value.is_graph_output() or weight_value.is_graph_input():
            who = ", ".join(sorted(other_users)) or "the graph interface"
            return refuse(f"weight {weight_value.name!r} is shared with {who}")
        if producer.op_type == "MatMul" and weight.ndim != 2:
            return refuse(f"MatMul weight has rank {weight.ndim}, expected 2")
        if producer.op_type == "Conv" and len(producer.inputs) > 2 and producer.inputs[2] is not None:
            if _const(producer.inputs[2]) is None:
                return refuse("bias is not a constant")
            if [n for n, _ in producer.inputs[2].uses() if n is not producer]:
                return refuse(f"bias {producer.inputs[2].name!r} is shared")
        if producer.op_type == "Gemm":
            if producer.attributes.get_int("transA", 0) not in (0, 1):
                return refuse("unexpected transA")
            if len(producer.inputs) > 2 and producer.inputs[2] is not None \
                    and _const(producer.inputs[2]) is None:
                return refuse("Gemm C is not a constant")
        channels = _out_channels(producer, weight)
        out_rank = _output_rank(producer, weight)

        if consumer.op_type == "BatchNormalization":
            return self._inspect_bn(producer, consumer, label, channels, out_rank, refuse)
        return self._inspect_mul_add(producer, consumer, label, channels, out_rank, refuse)

    def _inspect_bn(self, producer, bn, label, channels, out_rank, refuse) -> Candidate:
        if bn.inputs[0] is not producer.outputs[0]:
            return refuse("BatchNormalization does not take the op's output as its data input")
        if any(o.uses() or o.is_graph_output() for o in bn.outputs[1:]):
            return refuse("BatchNormalization is in training mode (running stats are used)")
        if bn.attributes.get_int("training_mode", 0):
            return refuse("BatchNormalization has training_mode=1")
        params = [_const(v) for v in bn.inputs[1:5]]
        if any(p is None for p in params):
            return refuse("BatchNormalization parameters are not constants")
        gamma, beta, mean, var = (p.astype(np.float64).reshape(-1) for p in params)
        if gamma.shape[0] != channels:
            return refuse(f"BatchNormalization has {gamma.shape[0]} channels, the op {channels}")
        if producer.op_type in ("Gemm", "MatMul") and out_rank not in (2,):
            return refuse(f"{producer.op_type} output rank is {out_rank}: BatchNormalization "
                          "would normalize axis 1, not the output channels")
        eps = bn.attributes.get_float("epsilon", 1e-5)
        scale = gamma / np.sqrt(var + eps)
        shift = beta - mean * scale
        return Candidate(producer, f"{label} <- {kir.node_label(bn)}",
                         nodes=(producer, bn),
                         data=_Fold(producer, [bn], scale, shift, channels))

    def _inspect_mul_add(self, producer, first, label, channels, out_rank, refuse) -> Candidate:
        if out_rank is None:
            return refuse("output shape unknown (bind input shapes first)")
        axis = 1 if producer.op_type == "Conv" else -1
        tail: list[ir.Node] = []
        scale: np.ndarray | None = None
        shift: np.ndarray | None = None
        node: ir.Node | None = first
        if node.op_type == "Mul":
            other = node.inputs[1] if node.inputs[0] is producer.outputs[0] else node.inputs[0]
            c = _const(other)
            if c is None:
                return refuse("Mul operand is not a constant")
            scale = _per_channel(c, channels, out_rank, axis)
            if scale is None:
                return refuse(f"Mul operand of shape {list(c.shape)} is not per output channel")
            if producer.op_type == "MatMul" and out_rank != 2 and c.ndim > 1:
                pass
            tail.append(node)
            if node.outputs[0].is_graph_output():
                node = None
            else:
                node = _single_consumer(node.outputs[0])
        if node is not None and node.op_type == "Add" and producer.op_type != "MatMul":
            src = tail[-1].outputs[0] if tail else producer.outputs[0]
            other = node.inputs[1] if node.inputs[0] is src else node.inputs[0]
            d = _const(other)
            shift = None if d is None else _per_channel(d, channels, out_rank, axis)
            if shift is not None:
                tail.append(node)
            elif not tail:
                return refuse("Add operand is not a per-output-channel constant")
        if not tail:
            return refuse("no per-channel Mul/Add to fold")
        if scale is None:
            scale = np.ones(channels, dtype=np.float64)
        return Candidate(producer, f"{label} <- " + " + ".join(kir.node_label(n) for n in tail),
                         nodes=(producer, *tail),
                         data=_Fold(producer, tail, scale, shift, channels))

    def rewrite(self, model: ir.Model, accepted: Sequence[Candidate]) -> int:
        graph = model.graph
        done = 0
        for candidate in accepted:
            fold: _Fold = candidate.data
            self._apply(graph, fold)
            done += 1
        return done

    def _apply(self, graph: ir.Graph, fold: _Fold) -> None:
        producer = fold.producer
        op = producer.op_type
        weight_value = producer.inputs[1]
        weight = _const(weight_value)
        dtype = weight.dtype
        s, t = fold.scale, fold.shift
        base = producer.name or op
        old_names = [v.name for v in producer.inputs if v is not None]

        if op == "Conv":
            w = weight.astype(np.float64) * s.reshape((-1,) + (1,) * (weight.ndim - 1))
            bias_value = producer.inputs[2] if len(producer.inputs) > 2 else None
            b = _const(bias_value)
            b = np.zeros(fold.channels) if b is None else b.astype(np.float64)
            b = b * s + (t if t is not None else 0.0)
            new_w = add_initializer(graph, f"{weight_value.name}_folded", w.astype(dtype))
            new_b = add_initializer(graph, f"{base}_bias_folded", b.astype(dtype))
            inputs = [producer.inputs[0], new_w, new_b]
            new = ir.Node("", "Conv", inputs, attributes=list(producer.attributes.values()),
                          name=producer.name, num_outputs=1)
            result = new.outputs[0]
            extra: list[ir.Node] = []
        elif op == "Gemm":
            trans_b = producer.attributes.get_int("transB", 0)
            alpha = producer.attributes.get_float("alpha", 1.0)
            beta = producer.attributes.get_float("beta", 1.0)
            w = weight.astype(np.float64) * (s.reshape(-1, 1) if trans_b else s.reshape(1, -1))
            c_value = producer.inputs[2] if len(producer.inputs) > 2 else None
            c = _const(c_value)
            c = np.zeros(fold.channels) if c is None else c.astype(np.float64)
            c = beta * c * s + (t if t is not None else 0.0)
            new_w = add_initializer(graph, f"{weight_value.name}_folded", w.astype(dtype))
            new_c = add_initializer(graph, f"{base}_bias_folded", c.astype(dtype))
            attributes = [a for a in producer.attributes.values() if a.name != "beta"]
            attributes.append(ir.AttrFloat32("beta", 1.0))
            if alpha != 1.0:
                # alpha scales A*B only; keep it, the fold already applied s to B.
                pass
            new = ir.Node("", "Gemm", [producer.inputs[0], new_w, new_c], attributes=attributes,
                          name=producer.name, num_outputs=1)
            result = new.outputs[0]
            extra = []
        else:  # MatMul: scale columns; the shift becomes one Add
            w = weight.astype(np.float64) * s.reshape(1, -1)
            new_w = add_initializer(graph, f"{weight_value.name}_folded", w.astype(dtype))
            new = ir.Node("", "MatMul", [producer.inputs[0], new_w], name=producer.name,
                          num_outputs=1)
            result = new.outputs[0]
            extra = []
            if t is not None:
                shift = add_initializer(graph, f"{base}_shift_folded", t.astype(dtype))
                add = ir.Node("", "Add", [result, shift], name=f"{base}_shift", num_outputs=1)
                copy_metadata(producer, add)
                extra.append(add)
                result = add.outputs[0]
        copy_metadata(producer, new)
        new.outputs[0].shape = producer.outputs[0].shape
        new.outputs[0].type = producer.outputs[0].type
        graph.insert_before(producer, new)
        if extra:
            graph.insert_after(new, extra)
            for node in extra:
                node.outputs[0].shape = producer.outputs[0].shape
                node.outputs[0].type = producer.outputs[0].type
        tail_inputs = [v.name for n in fold.tail for v in n.inputs if v is not None and v.name]
        if extra:
            new.outputs[0].name = unique_name(graph, f"{base}_unshifted")
        last = fold.tail[-1].outputs[0]
        replace_value(graph, last, result)
        for node in reversed(fold.tail):
            graph.remove(node, safe=True)
        graph.remove(producer, safe=True)
        remove_unused_initializers(graph, old_names + tail_inputs)
