"""A Llama checkpoint folder exported as one decoder step with a KV cache (docs/llm.md)."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

from kiln.compiler.core import graph as kir  # noqa: E402
from kiln.compiler.core import llm_export  # noqa: E402
from kiln.compiler.core.errors import FrontendError  # noqa: E402
from kiln.compiler.core.frontend import load_model  # noqa: E402
from kiln.compiler.driver.generate import CacheLayout, greedy  # noqa: E402
from kiln.compiler.testing.llm_models import llama_config, random_llama, save_random_llama  # noqa: E402

#: ONNX Runtime vs PyTorch, float32 both: largest |difference| over the largest |logit|
RELATIVE_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    folder = save_random_llama(tmp_path_factory.mktemp("llm") / "micro", "micro", seed=3)
    return folder, load_model(folder, fold=False)


def _ort_step(model):
    session = ort.InferenceSession(kir.model_bytes(model), providers=["CPUExecutionProvider"])
    return lambda feeds: session.run(None, feeds)


def _reference_logits(tokens):
    model = random_llama(llama_config("micro"), seed=3)
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


def _torch_step(step):
    """The PyTorch decoder step as a :data:`Step` (feeds in input order: ids, positions,
    mask, then the pasts as greedy() adds them)."""
    def run(feeds):
        with torch.no_grad():
            return [t.numpy() for t in step(*(torch.from_numpy(np.asarray(v))
                                              for v in feeds.values()))]
    return run


def test_the_decoder_step_matches_pytorch_through_the_cache():
    # the wrapper's own attention (masked slot, causal bias, GQA, RoPE) in PyTorch, no
    # export: the fast check of what the exported graph computes
    model = random_llama(llama_config("micro"), seed=3)
    layout = llm_export.layout_of(model)
    cache = CacheLayout(tuple(layout.past_names()), layout.kv_heads, layout.head_dim)
    prompt = [5, 17, 99, 3, 64]
    step = _torch_step(llm_export.decoder_step(model))
    # chunk 4: the cache outgrows its buffers twice, and attends past masked spare slots
    result = greedy(step, cache, prompt, 6, keep_logits=True, chunk=4)
    expected = _reference_logits(prompt + result.tokens)[len(prompt) - 1:-1]
    assert np.abs(np.stack(result.logits) - expected).max() <= \
        RELATIVE_TOLERANCE * np.abs(expected).max()
    assert result.tokens == [int(t) for t in expected.argmax(-1)]
    exact = greedy(step, cache, prompt, 6, keep_logits=True, chunk=1)   # no spare slot
    assert exact.tokens == result.tokens
    assert np.abs(np.stack(exact.logits) - expected).max() <= \
        RELATIVE_TOLERANCE * np.abs(expected).max()


@pytest.mark.slow
def test_inputs_outputs_and_symbolic_dims(micro):
    _, model = micro
    inputs = {v.name: v for v in model.graph.inputs}
    assert list(inputs)[:3] == ["input_ids", "position_ids", "past_mask"]
    # keys stored transposed (what q K^T reads), values as they are; only the new tokens out
    assert [str(d) for d in inputs["past_key_1"].shape] == ["1", "2", "16", "past"]
    assert [str(d) for d in inputs["past_value_1"].shape] == ["1", "2", "past", "16"]
    assert [v.name for v in model.graph.outputs] == [
        "logits", "new_key_0", "new_value_0", "new_key_1", "new_value_1"]
    outputs = {v.name: v for v in model.graph.outputs}
    assert [str(d) for d in outputs["new_key_0"].shape] == ["1", "2", "16", "seq"]
    assert json.loads(model.metadata_props[llm_export.DIMS_KEY]) == {
        "past": [1, 2047], "seq": [1, 2048]}
    layout = llm_export.DecoderLayout.from_json(model.metadata_props[llm_export.LLM_KEY])
    assert (layout.layers, layout.kv_heads, layout.head_dim, layout.vocab) == (2, 2, 16, 128)
    # no run-time shape arithmetic: what TVM's importer could not keep symbolic
    assert not {n.op_type for n in model.graph} & {"Shape", "Range", "Expand", "ConstantOfShape"}
    # nothing copies or transposes the cache: no Concat, and no Transpose of a past input
    ops = list(model.graph)
    assert "Concat" not in {n.op_type for n in ops if any(
        i is not None and i.name.startswith("past_") for i in n.inputs)}
    assert not [n for n in ops if n.op_type == "Transpose" and n.inputs[0] is not None
                and n.inputs[0].name.startswith("past_")]


@pytest.mark.slow
def test_prefill_and_cached_decode_match_pytorch(micro):
    _, model = micro
    layout = CacheLayout.from_inputs([(v.name, [getattr(d, "value", d) for d in v.shape])
                                      for v in model.graph.inputs])
    prompt = [5, 17, 99, 3, 64]
    result = greedy(_ort_step(model), layout, prompt, 6, keep_logits=True)
    expected = _reference_logits(prompt + result.tokens)[len(prompt) - 1:-1]
    got = np.stack(result.logits)
    assert np.abs(got - expected).max() <= RELATIVE_TOLERANCE * np.abs(expected).max()
    assert result.tokens == [int(t) for t in expected.argmax(-1)]


def test_refuses_an_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(FrontendError, match="model_type 'bert' is not supported"):
        load_model(tmp_path)


def test_a_folder_without_weights_is_one_line(tmp_path):
    llama_config("micro").save_pretrained(tmp_path)
    with pytest.raises(FrontendError, match="transformers cannot load it"):
        load_model(tmp_path)
