"""Bias correction (Nagel et al. 2019, DFQ) for ``quantize``'s ``bias_correction: true``.

Quantizing W shifts the expected output of a layer: E[W^ x] - E[W x] = (W^ - W) E[x]. With
E[x] per input channel from the calibration samples (the float model's activations), each
layer's bias absorbs the opposite shift, so the mean output is kept:

    Conv    b'[o] = b[o] + sum_{j, k} (W - W^)[o, j, k] E[x_{g(o), j}]    (g: o's group)
    Gemm    C' = C + alpha / beta (E[x] (W - W^))                           (C [N] or [1, N])
    MatMul  one Add(delta) after it, delta = E[x] (W - W^)

For a 2-D Conv E[x] is taken per kernel tap, over exactly the (zero-padded, strided)
positions that tap reads, so the mean shift is removed exactly on the calibration samples;
other Convs use the channel mean (borders slightly off). Only the ``DequantizeLinear`` forms (int8/int4/
uint*) are decoded here (W^ = (q - z) s, per tensor, per axis or blocked); other forms are
left uncorrected and named in the pass's note.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from kiln.compiler.core.pass_api import add_initializer, unique_name
from kiln.passes.quant.weights import QUANT_KEY, WeightSite

CORRECTED_KEY = "kiln.bias_corrected"


def dequantized(plan_arrays: dict[str, np.ndarray], attributes: dict, shape: tuple) -> np.ndarray:
    """W^ of a ``dq`` plan: (q - z) * s with DequantizeLinear's axis / block_size layout."""
    q = np.asarray(plan_arrays["q"]).astype(np.float64)
    scale = np.asarray(plan_arrays["scale"]).astype(np.float64)
    zero = np.asarray(plan_arrays.get("zero_point", np.zeros((), np.int8))).astype(np.float64)
    if scale.ndim == 0:
        return (q - zero) * scale
    axis = attributes.get("axis", 1) % len(shape)
    block = attributes.get("block_size", 0)
    if not block:
        view = [1] * len(shape)
        view[axis] = -1
        return (q - zero.reshape(view) if zero.ndim else q - zero) * scale.reshape(view)
    scale = np.repeat(scale, block, axis=axis).take(range(shape[axis]), axis=axis)
    if zero.ndim:
        zero = np.repeat(zero, block, axis=axis).take(range(shape[axis]), axis=axis)
    return (q - zero) * scale


def _window_means(values: list[np.ndarray], node: ir.Node, kernel: tuple[int, int]
                  ) -> np.ndarray | None:
    """E[x_j] over the positions each kernel tap (kh, kw) reads, zero padding included:
    [C, kh, kw]; None where the Conv is not 2-D with explicit pads."""
    if np.ndim(values[0]) != 4 or node.attributes.get_string("auto_pad", "NOTSET") != "NOTSET":
        return None
    pads = list(node.attributes.get_ints("pads", [0, 0, 0, 0]))
    strides = list(node.attributes.get_ints("strides", [1, 1]))
    dilations = list(node.attributes.get_ints("dilations", [1, 1]))
    total = None
    for v in values:
        x = np.pad(np.asarray(v, np.float64), [(0, 0), (0, 0), (pads[0], pads[2]),
                                                (pads[1], pads[3])])
        out_h = (x.shape[2] - dilations[0] * (kernel[0] - 1) - 1) // strides[0] + 1
        out_w = (x.shape[3] - dilations[1] * (kernel[1] - 1) - 1) // strides[1] + 1
        taps = np.empty((x.shape[1], *kernel))
        for i in range(kernel[0]):
            for j in range(kernel[1]):
                h0, w0 = i * dilations[0], j * dilations[1]
                window = x[:, :, h0:h0 + strides[0] * (out_h - 1) + 1:strides[0],
                           w0:w0 + strides[1] * (out_w - 1) + 1:strides[1]]
                taps[:, i, j] = window.mean(axis=(0, 2, 3))
        total = taps if total is None else total + taps
    return total / len(values)


def mean_per_channel(values: list[np.ndarray], node: ir.Node,
                     kernel: tuple[int, ...] = ()) -> np.ndarray:
    """E[x] per input channel (Gemm/MatMul: the last axis); for a 2-D Conv per channel
    and kernel tap, [C, kh, kw], over exactly the positions the tap reads (exact shift)."""
    if node.op_type == "Conv" and len(kernel) == 2:
        taps = _window_means(values, node, (int(kernel[0]), int(kernel[1])))
        if taps is not None:
            return taps
    axis = 1 if node.op_type == "Conv" else -1
    sums = [np.moveaxis(np.asarray(v, np.float64), axis, -1).reshape(-1, np.shape(v)[axis])
            for v in values]
    return np.concatenate(sums).mean(axis=0)


def output_shift(site: WeightSite, w_hat: np.ndarray, mean_x: np.ndarray) -> np.ndarray:
    """delta = (W - W^) E[x] per output channel."""
    err = site.array.astype(np.float64) - w_hat
    node = site.node
    if node.op_type == "Conv":
        groups = node.attributes.get_int("group", 1)
        out, per_group = err.shape[0], err.shape[1]
        rows = np.arange(out) // (out // groups)
        if mean_x.ndim == 3:                       # per tap: exact
            taps = mean_x.reshape(groups, per_group, *mean_x.shape[1:])[rows]
            return (err * taps).reshape(out, -1).sum(axis=1)
        summed = err.reshape(out, per_group, -1).sum(axis=2)                      # [O, C/g]
        means = mean_x.reshape(groups, per_group)[rows]
        return (summed * means).sum(axis=1)
    matrix = np.moveaxis(err, site.in_axis, 0)                                     # [K, N]
    delta = mean_x @ matrix
    if node.op_type == "Gemm":
        delta = delta * node.attributes.get_float("alpha", 1.0)
    return delta


def correction_problem(node: ir.Node) -> str | None:
    """Why a node's bias cannot take the correction (None: it can)."""
    if node.op_type == "Gemm":
        if node.attributes.get_int("transA", 0):
            return "Gemm with transA"
        if node.attributes.get_float("beta", 1.0) == 0:
            return "Gemm with beta 0"
    if node.op_type in ("Conv", "Gemm") and len(node.inputs) > 2 and node.inputs[2] is not None:
        bias = node.inputs[2]
        if bias.const_value is None:
            return "bias is not a constant"
        if any(n is not node for n, _ in bias.uses()) or bias.is_graph_output():
            return f"bias {bias.name!r} is shared"
        if node.op_type == "Gemm" and bias.const_value.numpy().size != bias.const_value.numpy() \
                .shape[-1]:
            return "Gemm bias is not one row"
    return None


def apply_correction(graph: ir.Graph, node: ir.Node, delta: np.ndarray, dtype: np.dtype) -> None:
    """Add ``delta`` to ``node``'s bias (made when absent), or an Add after a MatMul."""
    node.metadata_props[CORRECTED_KEY] = "1"
    if node.op_type == "MatMul":
        y = node.outputs[0]
        users = list(y.uses())
        shift = add_initializer(graph, f"{y.name or 'y'}_bias_correction", delta.astype(dtype))
        add = ir.Node("", "Add", [y, shift], num_outputs=1,
                      name=unique_name(graph, f"{node.name or 'matmul'}_bias_correction"),
                      metadata_props={QUANT_KEY: "bias correction"})
        out = add.outputs[0]
        out.shape, out.type = y.shape, y.type
        graph.insert_after(node, [add])
        for user, index in users:
            user.replace_input_with(index, out)
        if y.is_graph_output():
            outputs = graph.outputs
            outputs[outputs.index(y)] = out
            out.name, y.name = y.name, unique_name(graph, f"{y.name}_uncorrected")
        else:
            out.name = unique_name(graph, f"{y.name or 'y'}_corrected")
        return
    scale = 1.0 / node.attributes.get_float("beta", 1.0) if node.op_type == "Gemm" else 1.0
    old = node.inputs[2] if len(node.inputs) > 2 else None
    if old is None:
        array = (delta * scale).astype(dtype)
        name = f"{node.name or node.op_type}_bias_corrected"
    else:
        current = old.const_value.numpy()
        array = (current.astype(np.float64) + (delta * scale).reshape(current.shape)
                 ).astype(current.dtype)
        name = f"{old.name}_corrected"
    new = add_initializer(graph, name, array)
    if old is None:
        node.resize_inputs(3)
        node.replace_input_with(2, new)
    else:
        node.replace_input_with(2, new)
        if old.name and not old.uses() and old.name in graph.initializers:
            del graph.initializers[old.name]
