"""A small pre-LayerNorm transformer (PyTorch, exported to ONNX) for the block passes
(``drop_blocks``, ``share_blocks``, ``template_share``), their tests and bench.

Each of the ``layers`` layers is two residual blocks: x + attn(LN(x)) (multi-head
self-attention written with MatMul/Softmax, static shapes) and x + mlp(LN(x)) (Linear,
GELU, Linear); a final LayerNorm and a Linear head follow. The input is float
``[1, tokens, dim]`` named ``x`` (no embedding: the passes care about the blocks).

``tie="all"`` copies layer 0's weights into every layer (identical blocks: sharing them
is exact); ``tie="pairs"`` makes layers 2i and 2i+1 equal. ``damp`` scales the last
projection of each block so that the blocks stay close to the identity (deep trained
transformers are; random ones are not), which keeps dropping or sharing measurable.
The blocks listed in ``quiet`` (indices in execution order: 2i is layer i's attention,
2i+1 its MLP) get their last projection scaled by ``QUIET_SCALE`` on top: near-identity
blocks, the ones ``drop_blocks`` should find.

``residual_mlp`` is a plain ONNX stack of residual MLP blocks (no torch export, few
kernel kinds: a quick TVM build).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

#: extra scale of the last projection of a ``quiet`` block
QUIET_SCALE = 1e-3


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, tokens: int) -> None:
        super().__init__()
        self.heads, self.tokens, self.head_dim = heads, tokens, dim // heads
        self.norm = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(1, self.tokens, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        q, k, v = self._split(self.q(h)), self._split(self.k(h)), self._split(self.v(h))
        scores = torch.softmax(q @ k.transpose(2, 3) / math.sqrt(self.head_dim), dim=-1)
        mixed = (scores @ v).transpose(1, 2).reshape(1, self.tokens, self.heads * self.head_dim)
        return x + self.out(mixed)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm(x))))


class TinyTransformer(nn.Module):
    """``layers`` pre-LN transformer layers on ``[1, tokens, dim]``, then LN and a head."""

    def __init__(self, layers: int = 4, dim: int = 32, heads: int = 4, hidden: int = 64,
                 tokens: int = 8, *, tie: str = "none", damp: float = 0.3,
                 quiet: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            self.blocks.append(Attention(dim, heads, tokens))
            self.blocks.append(FeedForward(dim, hidden))
        with torch.no_grad():
            for block in self.blocks:
                last = block.out if isinstance(block, Attention) else block.fc2
                last.weight.mul_(damp)
                last.bias.mul_(damp)
            for i in range(2, len(self.blocks)):
                source = {"all": i % 2, "pairs": i - 2 if (i // 2) % 2 else None}.get(tie)
                if source is not None:
                    self.blocks[i].load_state_dict(self.blocks[source].state_dict())
            for i in quiet:
                block = self.blocks[i]
                last = block.out if isinstance(block, Attention) else block.fc2
                last.weight.mul_(QUIET_SCALE)
                last.bias.mul_(QUIET_SCALE)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def export_transformer(path: str | Path, *, layers: int = 4, dim: int = 32, heads: int = 4,
                       hidden: int = 64, tokens: int = 8, tie: str = "none",
                       damp: float = 0.3, quiet: tuple[int, ...] = (),
                       seed: int = 0) -> Path:
    """Write a seeded ``TinyTransformer`` as ONNX (opset 17, input ``x``, output ``y``)."""
    torch.manual_seed(seed)
    module = TinyTransformer(layers, dim, heads, hidden, tokens, tie=tie, damp=damp,
                             quiet=quiet).eval()
    path = Path(path)
    x = torch.randn(1, tokens, dim)
    torch.onnx.export(module, (x,), path, dynamo=False, input_names=["x"], output_names=["y"],
                      opset_version=17, do_constant_folding=True)
    return path


def residual_mlp(blocks: int = 4, dim: int = 128, hidden: int = 512, *, seed: int = 0,
                 batch: int = 4) -> ir.Model:
    """``blocks`` residual MLP blocks x + relu(x W1 + b1) W2 on ``x[batch, dim]`` (ONNX built
    directly, distinct seeded weights): few kernel kinds, so a TVM build of it is quick."""
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"
    for i in range(blocks):
        for name, shape, scale in ((f"w1_{i}", (dim, hidden), dim ** -0.5),
                                   (f"b1_{i}", (hidden,), 0.1),
                                   (f"w2_{i}", (hidden, dim), 0.3 * hidden ** -0.5)):
            array = (rng.standard_normal(shape) * scale).astype(np.float32)
            inits.append(numpy_helper.from_array(array, name))
        nodes += [helper.make_node("MatMul", [x, f"w1_{i}"], [f"m{i}"], name=f"fc1_{i}"),
                  helper.make_node("Add", [f"m{i}", f"b1_{i}"], [f"a{i}"], name=f"bias_{i}"),
                  helper.make_node("Relu", [f"a{i}"], [f"r{i}"], name=f"relu_{i}"),
                  helper.make_node("MatMul", [f"r{i}", f"w2_{i}"], [f"f{i}"], name=f"fc2_{i}"),
                  helper.make_node("Add", [x, f"f{i}"], [f"h{i}"], name=f"residual_{i}")]
        x = f"h{i}"
    nodes.append(helper.make_node("Identity", [x], ["y"], name="out"))
    graph = helper.make_graph(
        nodes, "residual_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                              [batch, dim])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, dim])],
        initializer=inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    return ir.serde.deserialize_model(proto)
