"""Llama-style checkpoints with seeded random weights, written locally (no network).

:func:`save_random_llama` builds a ``transformers`` ``LlamaForCausalLM`` from a
``LlamaConfig`` (GQA, RoPE, RMSNorm, SwiGLU) and writes it with ``save_pretrained``:
the folder is what ``kiln compile MODEL_DIR`` and ``kiln generate MODEL_DIR`` read.
Importing this module imports torch and transformers (the ``llm`` extra).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

#: the fast tests' model: 2 layers, hidden 64, 4 query heads over 2 key/value heads
MICRO = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)
#: a small model: 2 layers, hidden 256, 8 query heads over 2 key/value heads
TINY = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
            num_attention_heads=8, num_key_value_heads=2)
#: the bench model: 12 layers, hidden 768, 12 query heads over 4 key/value heads (~110M params)
BENCH = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
             num_attention_heads=12, num_key_value_heads=4)
CONFIGS = {"micro": MICRO, "tiny": TINY, "bench": BENCH}


def llama_config(name: str = "tiny", **overrides) -> LlamaConfig:
    """A named size (:data:`CONFIGS`) with RoPE theta 10000, RMSNorm eps 1e-5, untied head."""
    options = dict(CONFIGS[name], max_position_embeddings=2048, rms_norm_eps=1e-5,
                   rope_theta=10000.0, tie_word_embeddings=False, hidden_act="silu")
    options.update(overrides)
    return LlamaConfig(**options)


def random_llama(config: LlamaConfig, seed: int = 0) -> LlamaForCausalLM:
    """The model with seeded random weights (transformers' own initialisation)."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def save_random_llama(folder: str | Path, name: str = "tiny", seed: int = 0,
                      **overrides) -> Path:
    """Write a random Llama checkpoint to ``folder`` and return the folder."""
    folder = Path(folder)
    random_llama(llama_config(name, **overrides), seed).save_pretrained(folder)
    return folder


#: the byte-level model trained for the int4 agreement figures: hidden 256, 2 layers
BYTES = dict(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
             num_attention_heads=8, num_key_value_heads=2)
CONFIGS["bytes"] = BYTES
#: held-out text starts this far into the corpus (training reads only what is before)
HELD_OUT = 1_600_000


def corpus_bytes(max_bytes: int = 2_000_000) -> bytes:
    """Python's own standard-library sources (kiln.compiler.testing.moe_lm.stdlib_corpus)."""
    from kiln.compiler.testing.moe_lm import stdlib_corpus

    return stdlib_corpus(max_bytes)


def held_out_tokens(count: int, start: int = 0) -> list[int]:
    """``count`` byte tokens of held-out text (never trained on)."""
    data = corpus_bytes()[HELD_OUT + start:HELD_OUT + start + count]
    return list(data)


def train_llama(folder: str | Path, steps: int = 400, seed: int = 0, *, name: str = "bytes",
                context: int = 128, batch: int = 16, lr: float = 3e-3) -> tuple[Path, float]:
    """Train a byte-level Llama on the standard library's sources for ``steps`` Adam steps
    (next-byte cross-entropy, seeded batches), write it with ``save_pretrained``; returns
    the folder and the last training loss (nats per byte)."""
    import numpy as np

    folder = Path(folder)
    model = random_llama(llama_config(name), seed)
    model.train()
    data = np.frombuffer(corpus_bytes()[:HELD_OUT], np.uint8).astype(np.int64)
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss_value = float("nan")
    for _ in range(steps):
        starts = rng.integers(0, len(data) - context - 1, batch)
        window = torch.from_numpy(np.stack([data[s:s + context + 1] for s in starts]))
        logits = model(window[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 window[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss_value = float(loss)
    model.eval().save_pretrained(folder)
    return folder, loss_value
