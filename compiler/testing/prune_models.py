"""Small seeded models for structured pruning (tests and the channel-pruned bench cases):
a CNN whose channels are coupled every way the channel graph knows (residual add,
depthwise conv, concat, grouped conv, BatchNorm, flatten into a Gemm), an MLP, and a
torch-exported transformer block with separate Q/K/V projections (attention heads)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper

from kiln.compiler.testing.quant_models import build, init


def coupled_cnn(seed: int = 0, zero_channels: dict[str, list[int]] | None = None,
                width: int = 8, size: int = 8) -> ir.Model:
    """x[1, 4, size, size] -> conv1 -> relu -> conv2 (+ conv1's relu: residual) -> relu = a;
    dw (depthwise 3x3 on a) -> bn -> relu = d; concat(a, d) -> conv3 (1x1) -> relu
    -> gconv (group 2) -> relu -> GlobalAveragePool -> Flatten -> Gemm(10) -> y.

    ``zero_channels`` zeroes output channels (weights and bias) of the named convs."""
    rng = np.random.default_rng(seed)
    c, c3, c4 = width, width * 3 // 2, width
    weights = {
        "conv1.weight": rng.standard_normal((c, 4, 3, 3)) * 0.3,
        "conv1.bias": rng.standard_normal(c) * 0.1,
        "conv2.weight": rng.standard_normal((c, c, 3, 3)) * 0.2,
        "conv2.bias": rng.standard_normal(c) * 0.1,
        "dw.weight": rng.standard_normal((c, 1, 3, 3)) * 0.5,
        "dw.bias": rng.standard_normal(c) * 0.1,
        "conv3.weight": rng.standard_normal((c3, 2 * c, 1, 1)) * 0.3,
        "conv3.bias": rng.standard_normal(c3) * 0.1,
        "gconv.weight": rng.standard_normal((c4, c3 // 2, 3, 3)) * 0.3,
        "gconv.bias": rng.standard_normal(c4) * 0.1,
        "fc.weight": rng.standard_normal((10, c4)) * 0.3,
        "fc.bias": rng.standard_normal(10) * 0.1,
    }
    for name, channels in (zero_channels or {}).items():
        weights[f"{name}.weight"][channels] = 0.0
        weights[f"{name}.bias"][channels] = 0.0
    inits = [init(k, v) for k, v in weights.items()]
    inits += [init("bn.scale", rng.uniform(0.5, 1.5, c)), init("bn.B", np.zeros(c)),
              init("bn.mean", np.zeros(c)), init("bn.var", np.ones(c))]
    conv = helper.make_node
    nodes = [
        conv("Conv", ["x", "conv1.weight", "conv1.bias"], ["c1"], name="conv1", pads=[1] * 4),
        conv("Relu", ["c1"], ["r1"], name="relu1"),
        conv("Conv", ["r1", "conv2.weight", "conv2.bias"], ["c2"], name="conv2", pads=[1] * 4),
        conv("Add", ["c2", "r1"], ["s"], name="residual"),
        conv("Relu", ["s"], ["a"], name="relu2"),
        conv("Conv", ["a", "dw.weight", "dw.bias"], ["d0"], name="dw", pads=[1] * 4, group=c),
        conv("BatchNormalization", ["d0", "bn.scale", "bn.B", "bn.mean", "bn.var"], ["d1"],
             name="bn"),
        conv("Relu", ["d1"], ["d"], name="relu3"),
        conv("Concat", ["a", "d"], ["cat"], name="concat", axis=1),
        conv("Conv", ["cat", "conv3.weight", "conv3.bias"], ["c3"], name="conv3"),
        conv("Relu", ["c3"], ["r3"], name="relu4"),
        conv("Conv", ["r3", "gconv.weight", "gconv.bias"], ["g"], name="gconv", pads=[1] * 4,
             group=2),
        conv("Relu", ["g"], ["rg"], name="relu5"),
        conv("GlobalAveragePool", ["rg"], ["p"], name="pool"),
        conv("Flatten", ["p"], ["f"], name="flatten", axis=1),
        conv("Gemm", ["f", "fc.weight", "fc.bias"], ["y"], name="fc", transB=1),
    ]
    shapes = {"c1": [1, c, size, size], "r1": [1, c, size, size], "c2": [1, c, size, size],
              "s": [1, c, size, size], "a": [1, c, size, size], "d0": [1, c, size, size],
              "d1": [1, c, size, size], "d": [1, c, size, size], "cat": [1, 2 * c, size, size],
              "c3": [1, c3, size, size], "r3": [1, c3, size, size], "g": [1, c4, size, size],
              "rg": [1, c4, size, size], "p": [1, c4, 1, 1], "f": [1, c4]}
    model = build(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                               [1, 4, size, size])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])])
    _set_shapes(model, shapes)
    return model


def mlp(d_in: int = 32, hidden: int = 64, d_out: int = 10, batch: int = 4, seed: int = 0,
        zero_neurons: dict[str, list[int]] | None = None, spread: float = 0.0) -> ir.Model:
    """x[batch, d_in] -> MatMul(fc1) + b1 -> Relu -> Gemm(fc2, transB) -> Relu -> MatMul(fc3)
    -> y. ``zero_neurons`` zeroes output neurons (weight columns/rows and bias) of fc1/fc2;
    ``spread`` > 0 scales fc1's and fc2's neurons by log-normal factors (exp(spread * z)), so
    that some neurons matter much more than others."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((d_in, hidden)) / np.sqrt(d_in)
    b1 = rng.standard_normal(hidden) * 0.1
    if spread:
        scale = np.exp(spread * rng.standard_normal(hidden))
        w1, b1 = w1 * scale, b1 * scale
    w2 = rng.standard_normal((hidden, hidden)) / np.sqrt(hidden)
    b2 = rng.standard_normal(hidden) * 0.1
    w3 = rng.standard_normal((hidden, d_out)) / np.sqrt(hidden)
    if spread:
        scale = np.exp(spread * rng.standard_normal(hidden))
        w2, b2 = w2 * scale[:, None], b2 * scale
    zero = zero_neurons or {}
    w1[:, zero.get("fc1", [])] = 0.0
    b1[zero.get("fc1", [])] = 0.0
    w2[zero.get("fc2", [])] = 0.0
    b2[zero.get("fc2", [])] = 0.0
    inits = [init("fc1.weight", w1), init("fc1.bias", b1), init("fc2.weight", w2),
             init("fc2.bias", b2), init("fc3.weight", w3)]
    nodes = [helper.make_node("MatMul", ["x", "fc1.weight"], ["h0"], name="fc1"),
             helper.make_node("Add", ["h0", "fc1.bias"], ["h1"], name="fc1_bias"),
             helper.make_node("Relu", ["h1"], ["h"], name="relu1"),
             helper.make_node("Gemm", ["h", "fc2.weight", "fc2.bias"], ["g"], name="fc2",
                              transB=1),
             helper.make_node("Relu", ["g"], ["r"], name="relu2"),
             helper.make_node("MatMul", ["r", "fc3.weight"], ["y"], name="fc3")]
    model = build(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                               [batch, d_in])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, d_out])])
    _set_shapes(model, {name: [batch, hidden] for name in ("h0", "h1", "h", "g", "r")})
    return model


def _set_shapes(model: ir.Model, shapes: dict[str, list[int]]) -> None:
    for node in model.graph:
        for value in node.outputs:
            if value.name in shapes:
                value.shape = ir.Shape(shapes[value.name])
                value.type = ir.TensorType(ir.DataType.FLOAT)


def attention_block(d_model: int = 32, heads: int = 4, ffn: int = 64, batch: int = 2,
                    seq: int = 8, seed: int = 0, zero_heads: list[int] | None = None,
                    dynamo: bool = True) -> ir.Model:
    """A pre-norm transformer block exported from torch: LayerNorm -> separate Q, K, V
    Linears -> view [B, S, H, d] -> softmax(Q K^T / sqrt(d)) V -> merge heads -> output
    Linear (+ x) -> Linear/Relu/Linear FFN (+ residual). ``zero_heads`` zeroes those
    heads' Q, K and V output columns (weights and biases), so their output is exactly 0.
    ``dynamo``: the torch.export exporter (False: the TorchScript one, Constant nodes)."""
    import tempfile
    from pathlib import Path

    import onnx
    import torch

    torch.manual_seed(seed)
    module = _attention_module(d_model, heads, ffn).eval()
    hd = d_model // heads
    with torch.no_grad():
        for h in zero_heads or []:
            for lin in (module.q, module.k, module.v):
                lin.weight[h * hd:(h + 1) * hd] = 0.0
                lin.bias[h * hd:(h + 1) * hd] = 0.0
    x = torch.randn(batch, seq, d_model, generator=torch.Generator().manual_seed(seed + 1))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "attention.onnx"
        if dynamo:
            torch.onnx.export(module, (x,), path, dynamo=True, input_names=["x"],
                              output_names=["y"], external_data=False, verbose=False)
        else:
            torch.onnx.export(module, (x,), path, dynamo=False, input_names=["x"],
                              output_names=["y"])
        return ir.from_proto(onnx.load(str(path)))


def _attention_module(d_model: int, heads: int, ffn: int):
    """The torch module of :func:`attention_block` (torch is imported only when needed)."""
    import torch
    from torch import nn

    class AttentionBlock(nn.Module):
        def __init__(self, d_model: int, heads: int, ffn: int) -> None:
            super().__init__()
            self.heads = heads
            self.norm = nn.LayerNorm(d_model)
            self.q, self.k, self.v, self.o = (nn.Linear(d_model, d_model) for _ in range(4))
            self.fc1, self.fc2 = nn.Linear(d_model, ffn), nn.Linear(ffn, d_model)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, s, d = x.shape
            hd = d // self.heads
            y = self.norm(x)
            q, k, v = (lin(y).view(b, s, self.heads, hd).transpose(1, 2)
                       for lin in (self.q, self.k, self.v))
            attn = torch.softmax(q @ k.transpose(-2, -1) / hd ** 0.5, dim=-1)
            x = x + self.o((attn @ v).transpose(1, 2).reshape(b, s, d))
            return x + self.fc2(torch.relu(self.fc1(x)))

    return AttentionBlock(d_model, heads, ffn)
