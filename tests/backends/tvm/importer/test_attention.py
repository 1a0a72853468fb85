"""ONNX Attention (opset 23) lowered by kiln (importer.attention): 4-D and 3-D inputs,
grouped-query heads, past key/value, causal and boolean masks (a fully masked row),
softcap, qk_matmul_output modes and float16, built for the host against ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from kiln.backends.tvm import build_artifact, load
from kiln.compiler.testing.onnx_models import to_ir
from kiln.compiler.testing.reference import ort_outputs

#: Max |kiln - ORT| for float32 (a few dot products of length <= 16) and float16.
ABS_TOL = {np.float32: 1e-5, np.float16: 2e-3}
B, HQ, HKV, S, KV, D, PAST = 2, 4, 2, 3, 5, 8, 2


def attention_model(*, rank=4, gqa=False, past=False, mask=None, dtype=np.float32,
                    outputs=("Y",), **attrs) -> tuple[onnx.ModelProto, dict]:
    """One Attention node and random feeds for it."""
    rng = np.random.default_rng(0)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    kv_heads = HKV if gqa else HQ
    shapes = {"Q": [B, HQ, S, D], "K": [B, kv_heads, KV, D], "V": [B, kv_heads, KV, D]}
    if rank == 3:
        shapes = {n: [s[0], s[2], s[1] * s[3]] for n, s in shapes.items()}
        attrs.update(q_num_heads=HQ, kv_num_heads=kv_heads)
    names = ["Q", "K", "V"]
    feeds = {n: rng.standard_normal(s).astype(dtype) for n, s in shapes.items()}
    total = KV + (PAST if past else 0)
    if mask is not None or past:
        names.append("M" if mask is not None else "")
    if mask is not None:
        feeds["M"] = mask(total)
    if past:
        names += ["PK", "PV"]
        for n in ("PK", "PV"):
            feeds[n] = rng.standard_normal((B, kv_heads, PAST, D)).astype(dtype)
    inputs = [helper.make_tensor_value_info(
        n, helper.np_dtype_to_tensor_dtype(feeds[n].dtype), list(feeds[n].shape))
        for n in names if n]
    outs = [o if o in outputs else "" for o in ("Y", "present_key", "present_value", "qk")]
    while outs[-1] == "":
        outs.pop()
    node = helper.make_node("Attention", names, outs, name="attention", **attrs)
    graph = helper.make_graph([node], "attention", inputs,
                              [helper.make_tensor_value_info(o, elem, None) for o in outs if o])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    return model, feeds


def bool_mask(total):
    mask = np.random.default_rng(1).random((S, total)) > 0.4
    mask[0] = False  # a fully masked row: P = 0, Y = 0
    return mask


def float_mask(total):
    return np.random.default_rng(2).standard_normal((B, 1, S, total)).astype(np.float32)


CASES = {
    "plain": {},
    "3d-gqa-scale": {"rank": 3, "gqa": True, "scale": 0.3},
    "causal-past": {"past": True, "is_causal": 1,
                    "outputs": ("Y", "present_key", "present_value")},
    "bool-mask-row-masked": {"mask": bool_mask},
    "float-mask-mode2": {"mask": float_mask, "qk_matmul_output_mode": 2, "outputs": ("Y", "qk")},
    "softcap-mode3": {"softcap": 2.0, "is_causal": 1, "qk_matmul_output_mode": 3,
                      "outputs": ("Y", "qk")},
    "float16-causal": {"dtype": np.float16, "is_causal": 1},
}


@pytest.mark.parametrize("name", list(CASES))
def test_attention_matches_ort(name, tmp_path):
    options = dict(CASES[name])
    model, feeds = attention_model(**options)
    build_artifact(to_ir(model), "host", tmp_path, model_hash="sha256:test")
    got = load(tmp_path)(**feeds)
    got = got if isinstance(got, (list, tuple)) else [got]
    want = ort_outputs(model, feeds)
    tol = ABS_TOL[options.get("dtype", np.float32)]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        np.testing.assert_allclose(g.astype(np.float64), w.astype(np.float64), atol=tol)


def test_opset24_padding_lengths_go_through_the_schema_body(tmp_path):
    """kiln's converter refuses nonpad_kv_seqlen; the importer then lowers ONNX's own
    function body of Attention-24 instead (importer.schema_functions), matching ORT."""
    model, feeds = attention_model()
    node = model.graph.node[0]
    node.input.extend(["", "", "", "lens"])
    model.graph.input.append(helper.make_tensor_value_info("lens", TensorProto.INT64, [B]))
    model.opset_import[0].version = 24
    feeds["lens"] = np.array([S // 2, S][:B] + [S] * max(0, B - 2), dtype=np.int64)
    build_artifact(to_ir(model), "host", tmp_path, model_hash="sha256:test")
    got = load(tmp_path)(**feeds)
    got = got[0] if isinstance(got, (list, tuple)) else got
    (want,) = ort_outputs(model, feeds)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
