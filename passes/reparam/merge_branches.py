"""merge_branches: RepVGG-style parallel Conv branches summed by Add -> one Conv.

Branches read the same input x and are summed by a tree of Adds. Each branch is a Conv
(kernel k, optionally followed by an inference BatchNormalization), a BatchNormalization
of x alone, or x itself. With the BN of a branch folded (s = gamma/sqrt(var+eps),
t = beta - mean*s: W_i' = W_i*s, b_i' = b_i*s + t), convolution is linear in the kernel:

    sum_i conv(x, W_i', b_i') = conv(x, sum_i pad_K(W_i'), sum_i b_i')

where pad_K centres a k-kernel in the largest branch kernel K (k and K odd, each branch
padded k//2 with the same stride, so the outputs line up), and an identity branch is the
K-kernel with 1 at the centre of in-group channel o mod (C/groups) of output o (stride 1,
C_in = C_out). Groups must agree. Exact up to float rounding (sums done in float64).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from kiln.compiler.core import graph as kir
from kiln.compiler.core.pass_api import (
    Candidate,
    KilnPass,
    PassConfig,
    add_initializer,
    copy_metadata,
    remove_unused_initializers,
    replace_value,
)


class MergeBranchesConfig(PassConfig):
    """Options of ``merge_branches`` (none: every mergeable Add tree is merged)."""


@dataclass
class _Branch:
    nodes: list[ir.Node]           # the Conv and/or BatchNormalization (empty: identity)
    kernel: np.ndarray | None      # [C_out, C_in/groups, *k] in float64; None: identity
    bias: np.ndarray | None        # per output channel (float64) or None
    conv: ir.Node | None = None
    scale: np.ndarray | None = None  # an identity branch's BatchNorm scale (None: 1)


@dataclass
class _Merge:
    adds: list[ir.Node]
    branches: list[_Branch]
    main: ir.Node                  # the Conv with the largest kernel (attributes are kept)
    weight: np.ndarray
    bias: np.ndarray


def _const(value: ir.Value | None) -> np.ndarray | None:
    tensor = kir.constant_tensor(value)
    return None if tensor is None else tensor.numpy()


def _only_user(value: ir.Value) -> ir.Node | None:
    users = {id(node): node for node, _ in value.uses()}
    if len(users) != 1 or value.is_graph_output():
        return None
    return next(iter(users.values()))


def _add_tree(root: ir.Node) -> tuple[list[ir.Node], list[ir.Value]]:
    """The Adds summing into ``root`` (each inner one used only by the tree) and the leaves."""
    adds, leaves, stack = [root], [], list(root.inputs)
    while stack:
        value = stack.pop()
        producer = value.producer()
        if producer is not None and producer.op_type == "Add" and producer.domain == "" \
                and _only_user(value) is not None and value.shape == root.outputs[0].shape:
            adds.append(producer)
            stack.extend(producer.inputs)
        else:
            leaves.append(value)
    return adds, leaves


def _bn_affine(bn: ir.Node) -> tuple[np.ndarray, np.ndarray] | str:
    if bn.attributes.get_int("training_mode", 0) or any(
            o.uses() or o.is_graph_output() for o in bn.outputs[1:]):
        return "BatchNormalization is in training mode"
    params = [_const(v) for v in bn.inputs[1:5]]
    if len(params) != 4 or any(p is None for p in params):
        return "BatchNormalization parameters are not constants"
    gamma, beta, mean, var = (p.astype(np.float64).reshape(-1) for p in params)
    scale = gamma / np.sqrt(var + bn.attributes.get_float("epsilon", 1e-5))
    return scale, beta - mean * scale


def _conv_branch(conv: ir.Node, bn: ir.Node | None) -> _Branch | str:
    if conv.attributes.get_string("auto_pad", "NOTSET") != "NOTSET":
        return "Conv uses auto_pad"
    weight = _const(conv.inputs[1])
    if weight is None:
        return "Conv weight is not a constant"
    if any(n is not conv for n, _ in conv.inputs[1].uses()) or conv.inputs[1].is_graph_input():
        return f"Conv weight {conv.inputs[1].name!r} is shared"
    bias_value = conv.inputs[2] if len(conv.inputs) > 2 else None
    bias = _const(bias_value) if bias_value is not None else np.zeros(weight.shape[0])
    if bias is None:
        return "Conv bias is not a constant"
    kernel = weight.astype(np.float64)
    bias = bias.astype(np.float64)
    if bn is not None:
        affine = _bn_affine(bn)
        if isinstance(affine, str):
            return affine
        s, t = affine
        kernel = kernel * s.reshape((-1,) + (1,) * (kernel.ndim - 1))
        bias = bias * s + t
    return _Branch([conv] + ([bn] if bn is not None else []), kernel, bias, conv)


def _branch(leaf: ir.Value, sources: list[ir.Value]) -> _Branch | str:
    """The branch computing ``leaf`` (``sources``: the inputs of the tree's Convs)."""
    producer = leaf.producer()
    if any(leaf is s for s in sources) or producer is None or producer.domain != "" \
            or producer.op_type not in ("Conv", "BatchNormalization"):
        return _Branch([], None, None)
    if producer.op_type == "Conv":
        return _conv_branch(producer, None)
    data = producer.inputs[0]
    inner = data.producer() if data is not None else None
    if inner is not None and inner.op_type == "Conv" and inner.domain == "" \
            and _only_user(data) is producer:
        return _conv_branch(inner, producer)
    affine = _bn_affine(producer)
    if isinstance(affine, str):
        return affine
    return _Branch([producer], None, affine[1], None, affine[0])


def _conv_attrs(conv: ir.Node, kernel: np.ndarray) -> tuple:
    spatial = kernel.ndim - 2
    return (tuple(conv.attributes.get_ints("strides", [1] * spatial)),
            tuple(conv.attributes.get_ints("dilations", [1] * spatial)),
            conv.attributes.get_int("group", 1))


class MergeBranches(KilnPass):
    """Merge parallel Conv / BatchNorm / identity branches summed by Add into one Conv."""

    name = "merge_branches"
    config_class = MergeBranchesConfig
    exact = True
    portable_candidates = False

    def candidates(self, model: ir.Model) -> list[Candidate]:
        found: list[Candidate] = []
        inner: set[int] = set()
        adds = [n for n in self.selected_nodes(model) if n.op_type == "Add" and n.domain == ""]
        for node in reversed(adds):  # outermost Add first; its tree covers the inner ones
            if id(node) in inner:
                continue
            tree, leaves = _add_tree(node)
            if len(leaves) < 2:
                continue
            candidate = self._inspect(tree, leaves)
            if candidate is None:
                continue
            found.append(candidate)
            if candidate.accepted:
                inner.update(id(a) for a in tree)
        return found

    def _inspect(self, tree: list[ir.Node], leaves: list[ir.Value]) -> Candidate | None:
        root = tree[0]
        label = kir.node_label(root)
        conv_inputs = []
        for leaf in leaves:
            producer = leaf.producer()
            if producer is not None and producer.op_type in ("Conv", "BatchNormalization"):
                inner = producer if producer.op_type == "Conv" else producer.inputs[0].producer()
                if inner is not None and inner.op_type == "Conv" and (
                        inner is producer or _only_user(producer.inputs[0]) is producer):
                    conv_inputs.append(inner.inputs[0])
        if not conv_inputs:
            return None
        branches: list[_Branch] = []
        sources: list[ir.Value] = []
        for leaf in leaves:
            found = _branch(leaf, conv_inputs)
            if isinstance(found, str):
                return Candidate(root, label, reason=found)
            if found.conv is not None:
                sources.append(found.conv.inputs[0])
            elif found.nodes:
                sources.append(found.nodes[0].inputs[0])
            else:
                sources.append(leaf)
            branches.append(found)
        if not any(b.conv is not None for b in branches):
            return None
        if any(s is not sources[0] for s in sources):
            return None  # branches of different inputs: not a reparameterizable block
        for branch in branches:  # inner values of a branch must feed only the branch
            for node in branch.nodes[:-1]:
                if _only_user(node.outputs[0]) is None:
                    return Candidate(root, label, reason=f"{kir.node_label(node)} output is "
                                     "used outside the branch")
        convs = [b for b in branches if b.conv is not None]
        main = max(convs, key=lambda b: b.kernel.shape[2:])
        assert main.conv is not None and main.kernel is not None
        strides, dilations, groups = _conv_attrs(main.conv, main.kernel)
        big = main.kernel.shape[2:]
        if any(d != 1 for d in dilations):
            return Candidate(root, label, reason="dilated Conv")
        c_out = main.kernel.shape[0]
        c_in = main.kernel.shape[1] * groups
        weight = np.zeros((c_out, c_in // groups, *big))
        bias = np.zeros(c_out)
        for branch in branches:
            if branch.conv is not None:
                assert branch.kernel is not None
                small = branch.kernel.shape[2:]
                if _conv_attrs(branch.conv, branch.kernel) != (strides, dilations, groups):
                    return Candidate(root, label, reason="branches differ in strides, "
                                     "dilations or groups")
                if branch.kernel.shape[:2] != weight.shape[:2]:
                    return Candidate(root, label, reason="branches differ in channels")
                pads = list(branch.conv.attributes.get_ints("pads", [0] * 2 * len(small)))
                if any(k % 2 == 0 for k in small) or any(
                        k > b for k, b in zip(small, big)) or pads != [k // 2 for k in small] * 2:
                    return Candidate(root, label, reason=f"{kir.node_label(branch.conv)}: kernel "
                                     f"{list(small)} with pads {pads} is not centred in "
                                     f"{list(big)}")
                offset = tuple(slice((b - k) // 2, (b - k) // 2 + k) for k, b in zip(small, big))
                weight[(slice(None), slice(None), *offset)] += branch.kernel
                bias += branch.bias
                continue
            if any(s != 1 for s in strides) or c_in != c_out:
                return Candidate(root, label, reason="identity branch with stride or "
                                 "channel change")
            scale = branch.scale if branch.scale is not None else np.ones(c_out)
            if scale.shape[0] != c_out:
                return Candidate(root, label, reason="BatchNormalization channels differ")
            centre = tuple(b // 2 for b in big)
            per_group = c_in // groups
            for o in range(c_out):
                weight[(o, o % per_group, *centre)] += scale[o]
            if branch.bias is not None:
                bias += branch.bias
        nodes = tuple(tree) + tuple(n for b in branches for n in b.nodes)
        text = " + ".join(kir.node_label(b.conv) if b.conv is not None else
                          (kir.node_label(b.nodes[0]) if b.nodes else "identity")
                          for b in branches)
        return Candidate(root, f"{label} <- {text}", nodes=nodes,
                         data=_Merge(tree, branches, main.conv, weight, bias))

    def rewrite(self, model: ir.Model, accepted: Sequence[Candidate]) -> int:
        graph = model.graph
        for candidate in accepted:
            merge: _Merge = candidate.data
            main = merge.main
            dtype = kir.numpy_dtype(main.inputs[1])
            base = main.name or "conv"
            new_w = add_initializer(graph, f"{main.inputs[1].name}_merged",
                                    merge.weight.astype(dtype))
            new_b = add_initializer(graph, f"{base}_bias_merged", merge.bias.astype(dtype))
            attributes = [a for a in main.attributes.values() if a.name != "pads"]
            attributes.append(ir.AttrInt64s("pads", [k // 2 for k in merge.weight.shape[2:]] * 2))
            new = ir.Node("", "Conv", [main.inputs[0], new_w, new_b], attributes=attributes,
                          name=main.name, num_outputs=1)
            copy_metadata(main, new)
            root = merge.adds[0]
            new.outputs[0].shape = root.outputs[0].shape
            new.outputs[0].type = root.outputs[0].type
            graph.insert_before(root, new)
            old = [v.name for b in merge.branches for n in b.nodes for v in n.inputs[1:]
                   if v is not None and v.name]
            replace_value(graph, root.outputs[0], new.outputs[0])
            dead = list(merge.adds) + [n for b in merge.branches for n in reversed(b.nodes)]
            for node in dead:
                graph.remove(node, safe=True)
            remove_unused_initializers(graph, old)
        return len(accepted)
