"""A Llama checkpoint compiled for host (fp32, no passes): prefill and cached decode match
PyTorch; ``kiln generate`` and the Python API decode greedily (docs/llm.md)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

from kiln.compiler.core.errors import KilnError  # noqa: E402
from kiln.compiler.driver.cli import main  # noqa: E402
from kiln.compiler.driver.generate import (  # noqa: E402
    DECODE_DIR,
    CacheLayout,
    compile_checkpoint,
    compiled_step,
    generate,
    greedy,
)
from kiln.compiler.testing.llm_models import llama_config, random_llama, save_random_llama  # noqa: E402

#: compiled float32 vs PyTorch float32: largest |difference| over the largest |logit|
RELATIVE_TOLERANCE = 1e-5
SEED = 5
#: the build's ranges: up to 32 new tokens, up to 31 cached slots
DIMS = {"*seq": ["seq=1..32"], "*past": ["past=1..31"]}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    root = tmp_path_factory.mktemp("llm")
    folder = save_random_llama(root / "micro", "micro", seed=SEED)
    compile_checkpoint(folder, root / "out", input_shapes=DIMS)   # + out/decode (seq = 1)
    return root / "out"


def _reference_logits(tokens):
    with torch.no_grad():
        return random_llama(llama_config("micro"), seed=SEED)(torch.tensor([tokens])).logits[0].numpy()


def _close(got, expected):
    return np.abs(got - expected).max() <= RELATIVE_TOLERANCE * np.abs(expected).max()


def _counting_step(vocab=8, kv_heads=2, head_dim=4):
    """A fake decoder step: logits favour (last id + 1) % vocab; the cache grows by seq."""
    seen = []

    def step(feeds):
        ids, past = feeds["input_ids"], feeds["past_key_0"]
        seen.append((ids.shape[1], past.shape[2], int(feeds["past_mask"].sum())))
        logits = np.zeros((1, ids.shape[1], vocab), np.float32)
        logits[0, -1, (int(ids[0, -1]) + 1) % vocab] = 1.0
        grown = np.zeros((1, kv_heads, past.shape[2] + ids.shape[1], head_dim), np.float32)
        return [logits, grown, grown]

    return step, seen, CacheLayout(("past_key_0", "past_value_0"), kv_heads, head_dim, 31)


def test_greedy_feeds_the_prompt_once_then_one_token_per_step():
    step, seen, layout = _counting_step()
    result = greedy(step, layout, [1, 2, 3], 4)
    assert result.tokens == [4, 5, 6, 7]
    # (new tokens, cached slots, attended slots): the masked slot first, never attended
    assert seen == [(3, 1, 0), (1, 4, 3), (1, 5, 4), (1, 6, 5)]
    assert len(result.decode_seconds) == 3
    with pytest.raises(KilnError, match="need 32 cached slots; the step takes at most 31"):
        greedy(step, layout, list(range(20)), 13)


@pytest.mark.slow
def test_prefill_logits_match_pytorch(compiled):
    step, layout = compiled_step(compiled, threads=1)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]
    outputs = step({"input_ids": np.asarray([prompt]), "position_ids": np.arange(11)[None],
                    "past_mask": np.zeros((1, 1), np.int64), **layout.empty()})
    assert _close(outputs[0][0], _reference_logits(prompt))
    assert outputs[1].shape == (1, 2, 12, 16)       # the masked slot + 11 tokens


@pytest.mark.slow
def test_cached_decode_matches_pytorch(compiled):
    # one-token steps run on the decode build (seq fixed at 1), the prompt on the symbolic one
    assert (compiled / DECODE_DIR / "manifest.json").is_file()
    step, layout = compiled_step(compiled, threads=1)
    prompt = [7, 100, 42]
    result = greedy(step, layout, prompt, 12, keep_logits=True)
    expected = _reference_logits(prompt + result.tokens)[len(prompt) - 1:-1]
    assert _close(np.stack(result.logits), expected)
    assert result.tokens == [int(t) for t in expected.argmax(-1)]
    assert len(result.decode_seconds) == 11


@pytest.mark.slow
def test_cli_prints_the_same_tokens_as_the_api(compiled, capsys):
    expected = generate(compiled, [1, 2, 3], 5).tokens
    assert main(["generate", str(compiled), "--prompt-ids", "1,2,3", "--max-new-tokens", "5",
                 "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["tokens"] == expected and printed["prompt"] == [1, 2, 3]


@pytest.mark.slow
def test_a_generation_past_the_cache_range_is_one_line(compiled):
    with pytest.raises(KilnError, match="need 32 cached slots; the step takes at most 31"):
        generate(compiled, list(range(20)), 13)


def test_bad_prompt_ids_are_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "model", "--prompt-ids", "1,x"])
    assert exit_.value.code == 2 and "expected token ids" in capsys.readouterr().err
