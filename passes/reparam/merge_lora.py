"""merge_lora: fold LoRA adapters into the base weight, x W + s (x A) B -> x (W + s A B).

Two sources of adapters:

- in the graph: an ``Add`` of a base linear layer (``MatMul(x, W)`` [+ ``Add(bias)``] or
  ``Gemm``) and ``[Mul(s)] <- MatMul(., B) <- [Mul(g)] <- MatMul(x, A)`` reading the same
  x, with W, A, B, s and g constants (as peft and the torch exporter write it). g is a
  SoRA-style gate vector of length r between A and B (a scalar is folded into s). Conv
  LoRA (peft's lora.Conv2d) too: A a Conv of the base's kernel, strides and pads with r
  outputs, B a 1x1 Conv: W' = W + s sum_r B[:, r] g_r A[r] (group 1 only);
- a safetensors file (``adapters``) with peft key names ``P.lora_A.weight`` [r, in] and
  ``P.lora_B.weight`` [out, r] (optionally ``P.lora_gate`` [r]), added to the base layer
  whose module path (the dynamo exporter's ``pkg.torch.onnx.name_scopes`` metadata, via
  ``kir.module_path``, or a TorchScript export's node name ``/P/.../MatMul``) is P or
  ``P.base_layer``, or whose weight initializer is ``P.weight`` / ``P.base_layer.weight``;
  a leading ``base_model.model.`` is ignored. The scale is ``alpha / r`` (``alpha``
  option; unset: 1), or peft's own from its ``adapter_config.json`` (``adapter_config``
  option): ``lora_alpha`` (a matching ``alpha_pattern`` entry first) over r, or over
  sqrt(r) with ``use_rslora``. A file's adapters change what the model computes on purpose (the
  model before the pass has none), so such a spec entry runs as :class:`MergeLoraFile`,
  checked like a lossy pass (its SQNR against the model without them is reported) rather
  than to float32 tolerance; adapters in the graph are exact.

With A [in, r], B [r, out] in MatMul orientation: W' = W + s A diag(g) B; Gemm and MatMul
biases of the adapter add s (b_A diag(g) B + b_B) to the base bias. Ranks whose gate has
|g| <= ``gate_threshold`` are dropped (a gate exactly 0 contributes nothing: exact).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir
from pydantic import Field, model_validator

from kiln.compiler.core import graph as kir
from kiln.compiler.core.errors import KilnError
from kiln.compiler.core.pass_api import (
    Candidate,
    KilnPass,
    PassConfig,
    add_initializer,
    remove_unused_initializers,
    replace_value,
)

PEFT_PREFIX = "base_model.model."
PEFT_CONFIG = "adapter_config.json"
logger = logging.getLogger(__name__)


class MergeLoraConfig(PassConfig):
    """Options of ``merge_lora``."""

    adapters: str | None = Field(default=None, description="safetensors file of peft-style "
                                 "adapters (None: merge the adapters found in the graph)")
    alpha: float | None = Field(default=None, gt=0, description="LoRA alpha of the file's "
                                "adapters: scale alpha/r (None: scale 1)")
    adapter_config: str | None = Field(default=None, description="peft's adapter_config.json "
                                       "for the file's adapters: the scale from its "
                                       "lora_alpha, alpha_pattern and use_rslora")
    gate_threshold: float = Field(default=0.0, ge=0, description="drop ranks whose gate "
                                  "has |g| <= this")

    @model_validator(mode="after")
    def _one_scale(self) -> MergeLoraConfig:
        if self.adapter_config is not None and (self.alpha is not None or self.adapters is None):
            raise ValueError("adapter_config goes with adapters, and instead of alpha")
        return self


@dataclass
class _Linear:
    """A linear layer y = x W (+ bias) with W [in, out] in MatMul orientation."""

    node: ir.Node
    x: ir.Value
    weight: np.ndarray
    bias: np.ndarray | None
    bias_add: ir.Node | None = None   # the Add(bias) after a MatMul


@dataclass
class _Lora:
    base: _Linear
    delta: np.ndarray                 # added to W, [in, out]
    bias: np.ndarray | None           # added to the bias
    dead: list[ir.Node]               # adapter nodes and the Add (graph adapters)
    add: ir.Node | None
    dropped: int


def _const(value: ir.Value | None) -> np.ndarray | None:
    tensor = kir.constant_tensor(value)
    return None if tensor is None else tensor.numpy()


def _linear(node: ir.Node | None) -> _Linear | None:
    if node is None or node.domain != "" or node.op_type not in ("MatMul", "Gemm"):
        return None
    weight = _const(node.inputs[1])
    if weight is None or weight.ndim != 2:
        return None
    weight = weight.astype(np.float64)
    if node.op_type == "MatMul":
        return _Linear(node, node.inputs[0], weight, None)
    if node.attributes.get_int("transA", 0):
        return None
    if node.attributes.get_int("transB", 0):
        weight = weight.T
    weight = weight * node.attributes.get_float("alpha", 1.0)
    bias = None
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        c = _const(node.inputs[2])
        if c is None or c.size != weight.shape[1]:
            return None
        bias = c.astype(np.float64).reshape(-1) * node.attributes.get_float("beta", 1.0)
    return _Linear(node, node.inputs[0], weight, bias)


def _conv(node: ir.Node | None) -> _Linear | None:
    """A Conv with constant kernel (and bias), as a _Linear whose weight keeps the Conv
    layout [out, in, *k]."""
    if node is None or node.domain != "" or node.op_type != "Conv" \
            or node.attributes.get_int("group", 1) != 1:
        return None
    weight = _const(node.inputs[1])
    bias_value = node.inputs[2] if len(node.inputs) > 2 else None
    bias = _const(bias_value) if bias_value is not None else None
    if weight is None or (bias_value is not None and bias is None):
        return None
    return _Linear(node, node.inputs[0], weight.astype(np.float64),
                   None if bias is None else bias.astype(np.float64).reshape(-1))


def _geometry(node: ir.Node, spatial: int) -> tuple:
    a = node.attributes
    return (tuple(a.get_ints("strides", [1] * spatial)), tuple(a.get_ints("pads", [0] * 2 * spatial)),
            tuple(a.get_ints("dilations", [1] * spatial)), a.get_string("auto_pad", "NOTSET"))


def _conv_delta(base: _Linear, lora_a: _Linear, lora_b: _Linear,
                gate: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray | None,
                                                             int] | str:
    """Conv LoRA (peft's lora.Conv2d): A a Conv like the base with r outputs, B a 1x1 Conv:
    W' = W + s sum_r B[:, r] g_r A[r]; returns (delta without s, bias without s, dropped)."""
    spatial = base.weight.ndim - 2
    a, b = lora_a.weight, lora_b.weight
    rank = a.shape[0]
    if a.shape[1:] != base.weight.shape[1:] or b.shape[:2] != (base.weight.shape[0], rank) \
            or any(k != 1 for k in b.shape[2:]):
        return "Conv adapter shapes do not match the base"
    if _geometry(lora_a.node, spatial) != _geometry(base.node, spatial) or \
            _geometry(lora_b.node, spatial) != ((1,) * spatial, (0,) * 2 * spatial,
                                                (1,) * spatial, "NOTSET"):
        return "Conv adapter strides, pads or dilations differ from the base"
    if gate.size not in (1, rank):
        return f"gate has {gate.size} values, rank {rank}"
    g, dropped = _gated(gate, rank, threshold)
    b2 = b.reshape(b.shape[0], rank) * g
    delta = np.tensordot(b2, a, axes=(1, 0))
    bias = None
    if lora_a.bias is not None or lora_b.bias is not None:
        bias = np.zeros(base.weight.shape[0])
        if lora_a.bias is not None:
            bias += b2 @ lora_a.bias
        if lora_b.bias is not None:
            bias += lora_b.bias
    return delta, bias, dropped


def _base(value: ir.Value) -> _Linear | None:
    """The base layer computing ``value``: Gemm, MatMul, or MatMul + Add(constant bias)."""
    producer = value.producer()
    layer = _linear(producer)
    if layer is not None or producer is None or producer.op_type != "Add":
        return layer
    for i in (0, 1):
        inner = _linear(producer.inputs[i].producer())
        bias = _const(producer.inputs[1 - i])
        if inner is not None and inner.node.op_type == "MatMul" and bias is not None \
                and bias.size == inner.weight.shape[1] and len(producer.inputs[i].uses()) == 1:
            inner.bias = bias.astype(np.float64).reshape(-1)
            inner.bias_add = producer
            return inner
    return None


def _scaled(value: ir.Value) -> tuple[ir.Value, np.ndarray, ir.Node | None]:
    """Strip a Mul by a constant: (the other operand, the constant, the Mul)."""
    producer = value.producer()
    if producer is not None and producer.op_type == "Mul" and producer.domain == "":
        for i in (0, 1):
            c = _const(producer.inputs[1 - i])
            if c is not None and _const(producer.inputs[i]) is None:
                return producer.inputs[i], c.astype(np.float64), producer
    return value, np.ones(()), None


def _single_use(value: ir.Value) -> bool:
    return len(value.uses()) == 1 and not value.is_graph_output()


def load_adapters(path: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    if not Path(path).is_file():
        raise KilnError(f"merge_lora: adapter file {path!r} does not exist")
    try:
        return dict(load_file(path))
    except Exception as error:  # safetensors raises its own SafetensorError
        raise KilnError(f"merge_lora: {path!r} is not a safetensors file: {error}") from error


def _torchscript_path(node: ir.Node) -> str:
    """A TorchScript export's module path from its node name (``/enc/layers.0/fc1/MatMul``
    -> ``enc.layers.0.fc1``), '' for other names."""
    parts = (node.name or "").split("/")
    if len(parts) < 3 or parts[0] or not all(parts[1:-1]):
        return ""
    return ".".join(parts[1:-1])


def _peft_config(path: str) -> dict:
    if not Path(path).is_file():
        raise KilnError(f"merge_lora: adapter config {path!r} does not exist")
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise KilnError(f"merge_lora: {path!r} is not a JSON file: {error}") from error
    if not isinstance(config, dict):
        raise KilnError(f"merge_lora: {path!r} holds no JSON object")
    return config


def _peft_scale(config: dict, module: str, rank: int) -> float:
    """peft's LoRA scale for one module: lora_alpha (an alpha_pattern entry matching the
    module path, as peft matches it, first) / r, or / sqrt(r) with use_rslora."""
    try:
        alpha = float(config.get("lora_alpha", 8))
        for pattern, value in (config.get("alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({pattern})$", module):
                alpha = float(value)
                break
    except (TypeError, ValueError, AttributeError, re.error) as error:
        raise KilnError(f"merge_lora: adapter config: lora_alpha / alpha_pattern: {error}") \
            from None
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _gated(gate: np.ndarray, rank: int, threshold: float) -> tuple[np.ndarray, int]:
    gate = np.broadcast_to(gate.reshape(-1) if gate.ndim else gate, (rank,)).copy()
    keep = np.abs(gate) > threshold
    gate[~keep] = 0.0
    return gate, int((~keep).sum())


class MergeLora(KilnPass):
    """Merge LoRA adapters (in the graph or from a safetensors file) into the base weights."""

    name = "merge_lora"
    config_class = MergeLoraConfig
    exact = True

    @classmethod
    def for_options(cls, config: MergeLoraConfig) -> type[KilnPass]:
        """The class a spec entry with these options runs (the driver asks)."""
        return cls if config.adapters is None else MergeLoraFile

    def candidates(self, model: ir.Model) -> list[Candidate]:
        if self.config.adapters is not None:
            return self._file_candidates(model)
        found = []
        for node in self.selected_nodes(model):
            if node.op_type == "Add" and node.domain == "":
                candidate = self._graph_candidate(node)
                if candidate is not None:
                    found.append(candidate)
        return found

    def _graph_candidate(self, add: ir.Node) -> Candidate | None:
        for i in (0, 1):
            conv = _conv(add.inputs[i].producer())
            if conv is not None:
                candidate = self._conv_candidate(add, i, conv)
                if candidate is not None:
                    return candidate
                continue
            base = _base(add.inputs[i])
            if base is None:
                continue
            tail, scale, mul_s = _scaled(add.inputs[1 - i])
            lora_b = _linear(tail.producer())
            if lora_b is None:
                continue
            head, gate, mul_g = _scaled(lora_b.x)
            lora_a = _linear(head.producer())
            if lora_a is None or lora_a.x is not base.x or lora_a.node is base.node:
                continue
            label = f"{kir.node_label(base.node)} <- {kir.node_label(lora_a.node)}, " \
                    f"{kir.node_label(lora_b.node)}"
            rank = lora_a.weight.shape[1]
            if lora_b.weight.shape[0] != rank or lora_a.weight.shape[0] != base.weight.shape[0] \
                    or lora_b.weight.shape[1] != base.weight.shape[1]:
                return Candidate(add, label, reason="adapter shapes do not match the base")
            if scale.size != 1:
                return Candidate(add, label, reason="LoRA scale is not a scalar")
            if gate.size not in (1, rank):
                return Candidate(add, label, reason=f"gate has {gate.size} values, rank {rank}")
            reason = self._inner_reason(add, i, base, lora_a, mul_g, lora_b, mul_s)
            if reason:
                return Candidate(add, label, reason=reason)
            g, dropped = _gated(gate, rank, self.config.gate_threshold)
            s = float(scale.reshape(()))
            delta = s * (lora_a.weight * g) @ lora_b.weight
            bias = None
            if lora_a.bias is not None or lora_b.bias is not None:
                bias = np.zeros(base.weight.shape[1])
                if lora_a.bias is not None:
                    bias += (lora_a.bias * g) @ lora_b.weight
                if lora_b.bias is not None:
                    bias += lora_b.bias
                bias *= s
                if base.node.op_type == "MatMul" and base.bias_add is None:
                    return Candidate(add, label, reason="the adapter has a bias, the base "
                                     "MatMul none")
            dead = [n for n in (add, mul_s, lora_b.node, mul_g, lora_a.node) if n is not None]
            return Candidate(add, label, nodes=(base.node, *dead),
                             data=_Lora(base, delta, bias, dead, add, dropped))
        return None

    def _conv_candidate(self, add: ir.Node, i: int, base: _Linear) -> Candidate | None:
        tail, scale, mul_s = _scaled(add.inputs[1 - i])
        lora_b = _conv(tail.producer())
        if lora_b is None:
            return None
        head, gate, mul_g = _scaled(lora_b.x)
        lora_a = _conv(head.producer())
        if lora_a is None or lora_a.x is not base.x or lora_a.node is base.node:
            return None
        label = f"{kir.node_label(base.node)} <- {kir.node_label(lora_a.node)}, " \
                f"{kir.node_label(lora_b.node)}"
        if scale.size != 1:
            return Candidate(add, label, reason="LoRA scale is not a scalar")
        found = _conv_delta(base, lora_a, lora_b, gate, self.config.gate_threshold)
        if isinstance(found, str):
            return Candidate(add, label, reason=found)
        reason = self._inner_reason(add, i, base, lora_a, mul_g, lora_b, mul_s)
        if reason:
            return Candidate(add, label, reason=reason)
        delta, bias, dropped = found
        s = float(scale.reshape(()))
        dead = [n for n in (add, mul_s, lora_b.node, mul_g, lora_a.node) if n is not None]
        return Candidate(add, label, nodes=(base.node, *dead), data=_Lora(
            base, s * delta, None if bias is None else s * bias, dead, add, dropped))

    @staticmethod
    def _inner_reason(add, i, base, lora_a, mul_g, lora_b, mul_s) -> str | None:
        inner = [v for v in (lora_a.node.outputs[0], mul_g and mul_g.outputs[0],
                             lora_b.node.outputs[0], mul_s and mul_s.outputs[0])
                 if v is not None]
        if any(not _single_use(v) for v in inner):
            return "an adapter value is used outside the adapter"
        if base.node.outputs[0].is_graph_output() or len(add.inputs[i].uses()) != 1:
            return "the base output has other consumers"
        if any(n is not base.node for n, _ in base.node.inputs[1].uses()):
            return f"base weight {base.node.inputs[1].name!r} is shared"
        return None

    def _file_candidates(self, model: ir.Model) -> list[Candidate]:
        assert self.config.adapters is not None
        tensors = load_adapters(self.config.adapters)
        peft = None if self.config.adapter_config is None else \
            _peft_config(self.config.adapter_config)
        beside = Path(self.config.adapters).with_name(PEFT_CONFIG)
        if peft is None and self.config.alpha is None and beside.is_file():
            logger.warning("merge_lora: %s is not read: the scale is 1 (give adapter_config: "
                           "%s, or alpha)", beside, beside)
        prefixes = sorted({k[:-len(".lora_A.weight")] for k in tensors
                           if k.endswith(".lora_A.weight")})
        if not prefixes:
            raise KilnError(f"merge_lora: {self.config.adapters!r} has no '*.lora_A.weight' "
                            "tensors")
        layers: dict[str, _Linear] = {}
        for node in self.selected_nodes(model):
            layer = _linear(node)
            if layer is None:
                continue
            names = set()
            for path in (kir.module_path(node), _torchscript_path(node)):
                names |= {path, path.removesuffix(".base_layer")} if path else set()
            weight_name = node.inputs[1].name or ""
            for suffix in (".base_layer.weight", ".weight"):
                if weight_name.endswith(suffix):
                    names.add(weight_name[:-len(suffix)])
                    break
            for name in names - {""}:
                layers.setdefault(name, layer)
        found = []
        for prefix in prefixes:
            key = prefix.removeprefix(PEFT_PREFIX)
            layer = layers.get(key)
            if layer is None:
                raise KilnError(f"merge_lora: adapter {prefix!r} in {self.config.adapters} "
                                f"matches no MatMul/Gemm (module paths: "
                                f"{', '.join(sorted(layers)) or 'none'})")
            label = f"{kir.node_label(layer.node)} <- {prefix}"
            a = tensors[f"{prefix}.lora_A.weight"].astype(np.float64)
            b = tensors.get(f"{prefix}.lora_B.weight")
            if b is None:
                raise KilnError(f"merge_lora: {self.config.adapters}: {prefix}.lora_B.weight "
                                "is missing")
            b = b.astype(np.float64)
            rank = a.shape[0]
            if a.shape[1] != layer.weight.shape[0] or b.shape != (layer.weight.shape[1], rank):
                raise KilnError(f"merge_lora: adapter {prefix!r} A {list(a.shape)}, B "
                                f"{list(b.shape)} do not fit {kir.node_label(layer.node)} "
                                f"(in {layer.weight.shape[0]}, out {layer.weight.shape[1]})")
            if any(n is not layer.node for n, _ in layer.node.inputs[1].uses()):
                found.append(Candidate(layer.node, label, reason="base weight is shared"))
                continue
            gate = tensors.get(f"{prefix}.lora_gate", np.ones(rank))
            g, dropped = _gated(gate.astype(np.float64), rank, self.config.gate_threshold)
            scale = _peft_scale(peft, key, rank) if peft is not None else \
                self.config.alpha / rank if self.config.alpha is not None else 1.0
            delta = scale * (a.T * g) @ b.T
            found.append(Candidate(layer.node, label, nodes=(layer.node,),
                                   data=_Lora(layer, delta, None, [], None, dropped)))
        return found

    def rewrite(self, model: ir.Model, accepted: Sequence[Candidate]) -> int:
        graph = model.graph
        dropped = 0
        for candidate in accepted:
            lora: _Lora = candidate.data
            self._merge(graph, lora)
            dropped += lora.dropped
        self.note = f"{len(accepted)} adapter(s) merged" + (
            f", {dropped} gated rank(s) dropped" if dropped else "")
        return len(accepted)

    def _merge(self, graph: ir.Graph, lora: _Lora) -> None:
        base = lora.base
        node = base.node
        weight_value = node.inputs[1]
        stored = _const(weight_value)
        dtype = stored.dtype
        delta = lora.delta
        if node.op_type == "Gemm":
            delta = delta / node.attributes.get_float("alpha", 1.0)
            if node.attributes.get_int("transB", 0):
                delta = delta.T
        merged = stored.astype(np.float64) + delta
        old = [v.name for v in node.inputs[1:] if v is not None and v.name]
        node.replace_input_with(1, add_initializer(graph, f"{weight_value.name}_merged",
                                                   merged.astype(dtype)))
        if lora.bias is not None:
            self._add_bias(graph, base, lora.bias, old)
        if lora.add is not None:
            out = base.bias_add.outputs[0] if base.bias_add is not None else node.outputs[0]
            old += [v.name for n in lora.dead for v in n.inputs if v is not None and v.name]
            replace_value(graph, lora.add.outputs[0], out)
            for dead in lora.dead:
                graph.remove(dead, safe=True)
        remove_unused_initializers(graph, old)

    def _add_bias(self, graph: ir.Graph, base: _Linear, extra: np.ndarray,
                  old: list[str]) -> None:
        node = base.node
        if base.bias_add is not None:
            add = base.bias_add
            i = 1 if _const(add.inputs[1]) is not None else 0
            value = add.inputs[i]
            bias = _const(value)
            old.append(value.name or "")
            add.replace_input_with(i, add_initializer(
                graph, f"{value.name}_merged", (bias.astype(np.float64) + extra.reshape(
                    bias.shape)).astype(bias.dtype)))
            return
        if node.op_type in ("Gemm", "Conv"):
            beta = node.attributes.get_float("beta", 1.0) if node.op_type == "Gemm" else 1.0
            dtype = kir.numpy_dtype(node.inputs[1])
            current = np.zeros_like(extra) if base.bias is None else base.bias
            total = (current + extra) / beta
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                old.append(node.inputs[2].name or "")
                node.replace_input_with(2, add_initializer(graph, f"{node.inputs[2].name}_merged",
                                                           total.astype(dtype)))
            else:
                node.resize_inputs(3)
                node.replace_input_with(2, add_initializer(
                    graph, f"{node.name or 'gemm'}_bias_merged", total.astype(dtype)))
            return
        raise AssertionError("refused in candidates: an adapter bias on a bias-less MatMul")


class MergeLoraFile(MergeLora):
    """``merge_lora`` with ``adapters`` from a file: the merged model computes base + adapter,
    not what the model before the pass did, so the driver checks it as a lossy pass."""

    exact = False
