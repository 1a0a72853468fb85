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
from kiln.compiler.driver.compile import compile_to_folder  # noqa: E402
from kiln.compiler.driver.generate import compiled_step, generate, greedy  # noqa: E402
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
    compile_to_folder(folder, None, root / "out", input_shapes=DIMS, target="host")
    return root / "out"


def _reference_logits(tokens):
    with torch.no_grad():
        return random_llama(llama_config("micro"), seed=SEED)(torch.tensor([tokens])).logits[0].numpy()


def _close(got, expected):
    return np.abs(got - expected).max() <= RELATIVE_TOLERANCE * np.abs(expected).max()


def test_prefill_logits_match_pytorch(compiled):
    step, layout = compiled_step(compiled, threads=1)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]
    outputs = step({"input_ids": np.asarray([prompt]), "position_ids": np.arange(11)[None],
                    "past_mask": np.zeros((1, 1), np.int64), **layout.empty()})
    assert _close(outputs[0][0], _reference_logits(prompt))
    assert outputs[1].shape == (1, 2, 12, 16)       # the masked slot + 11 tokens


def test_cached_decode_matches_pytorch(compiled):
    step, layout = compiled_step(compiled, threads=1)
    prompt = [7, 100, 42]
    result = greedy(step, layout, prompt, 12, keep_logits=True)
    expected = _reference_logits(prompt + result.tokens)[len(prompt) - 1:-1]
    assert _close(np.stack(result.logits), expected)
    assert result.tokens == [int(t) for t in expected.argmax(-1)]
    assert len(result.decode_seconds) == 11


def test_cli_prints_the_same_tokens_as_the_api(compiled, capsys):
    expected = generate(compiled, [1, 2, 3], 5).tokens
    assert main(["generate", str(compiled), "--prompt-ids", "1,2,3", "--max-new-tokens", "5",
                 "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["tokens"] == expected and printed["prompt"] == [1, 2, 3]


def test_a_generation_past_the_cache_range_is_one_line(compiled, capsys):
    with pytest.raises(KilnError, match="need 32 cached slots; the step takes at most 31"):
        generate(compiled, list(range(20)), 13)
    with pytest.raises(SystemExit) as exit_:
        main(["generate", str(compiled), "--prompt-ids", "1,x"])
    assert exit_.value.code == 2 and "expected token ids" in capsys.readouterr().err
