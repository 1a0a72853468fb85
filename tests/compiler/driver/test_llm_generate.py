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
    KVCache,
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
    """A fake decoder step: logits favour (last id + 1) % vocab; the new keys hold the
    tokens' positions (so the cache's contents can be checked), the values their ids."""
    seen = []

    def step(feeds):
        ids, keys, mask = feeds["input_ids"], feeds["past_key_0"], feeds["past_mask"]
        filled = int(mask.sum())
        seen.append((ids.shape[1], keys.shape[3], filled))
        # the filled slots hold what earlier steps returned, in order; the spare ones zeros
        assert np.array_equal(keys[0, 0, 0, 1:filled + 1], np.arange(filled))
        assert not keys[0, 0, 0, filled + 1:].any() and not mask[0, 0]
        assert np.array_equal(feeds["position_ids"][0],
                              np.arange(filled, filled + ids.shape[1]))
        logits = np.zeros((1, ids.shape[1], vocab), np.float32)
        logits[0, -1, (int(ids[0, -1]) + 1) % vocab] = 1.0
        new_k = np.broadcast_to(feeds["position_ids"][0].astype(np.float32),
                                (1, kv_heads, head_dim, ids.shape[1]))
        new_v = np.broadcast_to(ids[0].astype(np.float32)[:, None],
                                (1, kv_heads, ids.shape[1], head_dim))
        return [logits, new_k, new_v]

    return step, seen, CacheLayout(("past_key_0", "past_value_0"), kv_heads, head_dim, 31)


def test_greedy_feeds_the_prompt_once_then_one_token_per_step():
    step, seen, layout = _counting_step()
    result = greedy(step, layout, [1, 2, 3], 4, chunk=1)
    assert result.tokens == [4, 5, 6, 7]
    # (new tokens, cache slots, attended slots): the masked slot first, never attended
    assert seen == [(3, 1, 0), (1, 4, 3), (1, 5, 4), (1, 6, 5)]
    assert len(result.decode_seconds) == 3
    with pytest.raises(KilnError, match="need 32 cached slots; the step takes at most 31"):
        greedy(step, layout, list(range(20)), 13)


def test_the_cache_grows_by_chunks_and_is_written_in_place():
    step, seen, layout = _counting_step()
    cache = KVCache(layout, chunk=4)
    assert cache.capacity == 4 and cache.buffers["past_key_0"].ctypes.data % 64 == 0
    result = greedy(step, layout, [1, 2, 3], 8, chunk=4)
    assert result.tokens == [4, 5, 6, 7, 0, 1, 2, 3]
    # spare slots up to the next multiple of 4, at most the step's 31
    assert [s[1] for s in seen] == [4, 4, 8, 8, 8, 8, 12, 12]
    one = [np.ones((1, 2, 4, 1), np.float32), np.ones((1, 2, 1, 4), np.float32)]
    cache.append([np.full((1, 2, 4, 3), 2, np.float32), np.full((1, 2, 3, 4), 2, np.float32)])
    cache.append(one)                       # slot 5 of 4: the buffers grow to 8, copied
    key = cache.buffers["past_key_0"]
    assert cache.capacity == 8 and key[0, 0, 0].tolist() == [0, 2, 2, 2, 1, 0, 0, 0]
    cache.append(one)                       # slot 6 fits: written in place
    assert cache.buffers["past_key_0"] is key and cache.filled == 6
    assert key[0, 0, 0].tolist() == [0, 2, 2, 2, 1, 1, 0, 0]
    assert cache.mask.tolist() == [[0, 1, 1, 1, 1, 1, 0, 0]]


@pytest.mark.slow
def test_prefill_logits_match_pytorch(compiled):
    step, layout = compiled_step(compiled, threads=1)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]
    outputs = step({"input_ids": np.asarray([prompt]), "position_ids": np.arange(11)[None],
                    "past_mask": np.zeros((1, 1), np.int64), **layout.empty()})
    assert _close(outputs[0][0], _reference_logits(prompt))
    # only the 11 new tokens' keys (transposed: [1, KV, D, seq]) and values come back
    assert outputs[1].shape == (1, 2, 16, 11) and outputs[2].shape == (1, 2, 11, 16)


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


def _step_by_step(step, layout, prompt, new):
    """The reference loop: the whole cache rebuilt by concatenation every step (no spare
    slot, no KVCache), the new keys and values appended on their slot axes."""
    cache = {n: np.zeros(layout.shape(n, 1), np.float32) for n in layout.names}
    mask, ids, tokens, rows = np.zeros((1, 1), np.int64), list(prompt), [], []
    for _ in range(new):
        start = int(mask.sum())
        outputs = step({"input_ids": np.asarray([ids], np.int64),
                        "position_ids": np.arange(start, start + len(ids))[None],
                        "past_mask": mask, **cache})
        rows.append(np.array(outputs[0][0, -1]))
        tokens.append(int(rows[-1].argmax()))
        cache = {n: np.concatenate([cache[n], o], axis=3 if n.startswith("past_key") else 2)
                 for n, o in zip(layout.names, outputs[1:], strict=True)}
        mask = np.concatenate([mask, np.ones((1, len(ids)), np.int64)], axis=1)
        ids = [tokens[-1]]
    return tokens, np.stack(rows)


@pytest.mark.slow
def test_the_loop_matches_the_step_by_step_reference(compiled):
    # the compiled steps through KVCache (spare slots, in-place writes, one growth at 16)
    # give the tokens and logits of the plain concatenating loop on the same steps
    step, layout = compiled_step(compiled, threads=1)
    prompt = [9, 8, 7, 6, 5]
    result = greedy(step, layout, prompt, 20, keep_logits=True, chunk=16)
    tokens, rows = _step_by_step(step, layout, prompt, 20)
    assert result.tokens == tokens
    assert _close(np.stack(result.logits), rows)


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


@pytest.mark.slow
def test_kiln_compile_of_a_checkpoint_writes_the_decode_build(tmp_path, capsys):
    folder = save_random_llama(tmp_path / "micro", "micro", seed=SEED)
    out = tmp_path / "out"
    assert main(["compile", str(folder), "-t", "host", "-o", str(out), "--dim", "seq=1..8",
                 "--dim", "past=1..7"]) == 0
    printed = capsys.readouterr().out
    assert (out / DECODE_DIR / "manifest.json").is_file()
    manifest = json.loads((out / DECODE_DIR / "manifest.json").read_text())
    assert manifest["dims"] == {"past": [1, 7]}          # seq fixed at 1, past as asked
    assert "one-token step (seq = 1, decoding) [past 1..7]" in printed
    assert "symbolic step (prompts, any seq) [past 1..7, seq 1..8]" in printed
    step, layout = compiled_step(out, threads=1)
    assert layout.max_past == 7 and len(greedy(step, layout, [1, 2], 6).tokens) == 6


def test_bad_prompt_ids_are_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "model", "--prompt-ids", "1,x"])
    assert exit_.value.code == 2 and "expected token ids" in capsys.readouterr().err
