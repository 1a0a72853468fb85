"""kiln's top-k MoE dispatch in TVM (importer.moe_dispatch, .moe_kernels and the
grouped_gemm schedule rule): the emitted layer becomes one internal op, builds for host
into the sorted/grouped kernels and matches ONNX Runtime on the same graph (top-1 and
top-2, static and symbolic token counts); layers not in the emitted form are left alone."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from kiln.backends.tvm import build_artifact, load
from kiln.backends.tvm.importer import internal_ops
from kiln.backends.tvm.importer.moe_dispatch import MOE_KEY, find_dispatch_layers, fuse_moe_dispatch
from kiln.compiler.core import graph as kir
from kiln.compiler.core.frontend import bind_inputs, fold_constants
from kiln.compiler.testing.moe_models import DenseMoE, export
from kiln.passes.moe.moe_dense_to_sparse import MoeDenseToSparse, MoeDenseToSparseConfig

DIM, HIDDEN, EXPERTS = 16, 32, 4
#: float32 sums in another order than ONNX Runtime's (K up to 32)
FLOAT_TOL = 1e-5
#: the dispatch's GEMM kernels and the rule that must schedule them
GEMMS = ("kiln_moe_up", "kiln_moe_down")


@pytest.fixture(scope="module")
def dense_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("moe")
    return {act: export(DenseMoE(DIM, HIDDEN, EXPERTS, activation=act),
                        folder / f"dense_{act}.onnx", tokens=8, dim=DIM)
            for act in ("relu", "silu")}


@pytest.fixture(scope="module")
def dense_file(dense_files):
    return dense_files["relu"]


def _sparse(path, k: int) -> ir.Model:
    model = ir.from_proto(onnx.load(str(path)))
    assert MoeDenseToSparse(MoeDenseToSparseConfig(k=k))(model).modified
    return model


def _ort(model: ir.Model, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(kir.to_proto(model).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _tokens(t: int) -> np.ndarray:
    return np.random.default_rng(t).standard_normal((t, DIM)).astype(np.float32)


def test_emitted_layer_becomes_one_dispatch_op(dense_file):
    proto = kir.to_proto(_sparse(dense_file, 2))
    [layer] = find_dispatch_layers(proto)
    assert len(layer.experts) == EXPERTS and layer.activation == "relu"
    assert fuse_moe_dispatch(proto) == 1
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count(internal_ops.MOE_DISPATCH) == 1 and "TopK" in ops
    assert not {"NonZero", "GatherND", "ScatterND", "Sum"} & set(ops)
    [node] = [n for n in proto.graph.node if n.op_type == internal_ops.MOE_DISPATCH]
    w1 = next(t for t in proto.graph.initializer if t.name == node.input[3])
    assert list(w1.dims) == [EXPERTS, 1, DIM, HIDDEN]              # packed, one 32-column tile
    assert fuse_moe_dispatch(proto) == 0                      # nothing left to replace


def test_layers_not_in_the_emitted_form_are_left_alone(dense_file):
    dense = kir.to_proto(ir.from_proto(onnx.load(str(dense_file))))
    assert fuse_moe_dispatch(dense) == 0                      # no kiln.moe layer at all
    proto = kir.to_proto(_sparse(dense_file, 2))
    relu = next(n for n in proto.graph.node if n.op_type == "Relu")
    relu.op_type = "Softplus"                                 # an activation it cannot run
    assert find_dispatch_layers(proto) == []
    assert fuse_moe_dispatch(proto) == 0
    assert any(n.op_type == "ScatterND" for n in proto.graph.node)
    for node in proto.graph.node:                             # metadata gone: not recognized
        kept = [p for p in node.metadata_props if p.key != MOE_KEY]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)
    assert find_dispatch_layers(proto) == []


@pytest.mark.parametrize("k, tokens, activation", [
    pytest.param(2, 1, "relu", marks=pytest.mark.slow), (2, 7, "silu"), (1, 16, "relu"),
    pytest.param(2, 256, "relu", marks=pytest.mark.slow)])
def test_dispatch_matches_ort(dense_files, tmp_path, k, tokens, activation):
    """(1 and 256 tokens, top-2, also run in the symbolic-tokens test's one build.)"""
    model = _sparse(dense_files[activation], k)
    assert find_dispatch_layers(kir.to_proto(model))[0].activation == activation
    x = _tokens(tokens)
    want = _ort(model, x)
    bind_inputs(model, {"x": [tokens, DIM]})
    fold_constants(model)
    built = build_artifact(model, "host", tmp_path, model_hash="test")
    assert {name: built.rules.get(name) for name in GEMMS} == dict.fromkeys(GEMMS,
                                                                         "grouped_gemm")
    assert any(name.startswith("kiln_moe_rank") for name in built.rules)
    [got] = load(tmp_path, threads=1)(x=x)
    np.testing.assert_allclose(got, want, rtol=FLOAT_TOL, atol=FLOAT_TOL)


def test_symbolic_tokens_one_build_for_every_count(dense_file, tmp_path):
    model = _sparse(dense_file, 2)
    wants = {t: _ort(model, _tokens(t)) for t in (1, 7, 16, 256)}
    bind_inputs(model, {"x": ["T", DIM]})
    model.metadata_props["kiln.dims"] = '{"T": [1, 256]}'
    fold_constants(model)
    built = build_artifact(model, "host", tmp_path, model_hash="test")
    assert {name: built.rules.get(name) for name in GEMMS} == dict.fromkeys(GEMMS,
                                                                         "grouped_gemm")
    run = load(tmp_path, threads=1)
    for t, want in wants.items():
        [got] = run(x=_tokens(t))
        np.testing.assert_allclose(got, want, rtol=FLOAT_TOL, atol=FLOAT_TOL, err_msg=f"T={t}")


@pytest.mark.parametrize("k", [1, 2])
def test_tokens_of_one_expert_fill_padded_row_tiles(dense_file, tmp_path, k):
    """Identical tokens all choose the same k experts: 9 rows each, padded to 3 tiles of
    ROW_TILE (4) rows; the other experts get none (their tiles past the used ones)."""
    from kiln.backends.tvm.importer.moe_kernels import ROW_TILE, row_tiles

    tokens = 9
    assert row_tiles(tokens * k, EXPERTS) >= k * -(-tokens // ROW_TILE)
    model = _sparse(dense_file, k)
    x = np.repeat(_tokens(1), tokens, axis=0)
    want = _ort(model, x)
    bind_inputs(model, {"x": [tokens, DIM]})
    fold_constants(model)
    build_artifact(model, "host", tmp_path, model_hash="test")
    run = load(tmp_path, threads=2)             # the sort kernels share no buffer across threads
    for _ in range(3):
        [got] = run(x=x)
        np.testing.assert_allclose(got, want, rtol=FLOAT_TOL, atol=FLOAT_TOL)


def test_glu_experts_match_ort(tmp_path):
    """SwiGLU experts (Mixtral's w2(silu(w1 x) * w3 x)): the dispatch's kiln_moe_glu path."""
    import torch
    from torch import nn

    class Glu(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w1, self.w3 = nn.Linear(DIM, HIDDEN), nn.Linear(DIM, HIDDEN)
            self.w2 = nn.Linear(HIDDEN, DIM)

        def forward(self, x):
            return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))

    class GluMoE(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate = nn.Linear(DIM, EXPERTS)
            self.experts = nn.ModuleList(Glu() for _ in range(EXPERTS))

        def forward(self, x):
            probs = torch.softmax(self.gate(x), dim=-1)
            out = 0
            for e, expert in enumerate(self.experts):
                out = out + probs[:, e:e + 1] * expert(x)
            return out

    torch.manual_seed(0)
    model = _sparse(export(GluMoE(), tmp_path / "glu.onnx", tokens=8, dim=DIM), 2)
    [layer] = find_dispatch_layers(kir.to_proto(model))
    assert layer.experts[0].w3 is not None
    x = _tokens(11)
    want = _ort(model, x)
    bind_inputs(model, {"x": [11, DIM]})
    fold_constants(model)
    built = build_artifact(model, "host", tmp_path / "out", model_hash="glu")
    assert built.rules.get("kiln_moe_glu") == "grouped_gemm"
    [got] = load(tmp_path / "out", threads=1)(x=x)
    np.testing.assert_allclose(got, want, rtol=FLOAT_TOL, atol=FLOAT_TOL)
