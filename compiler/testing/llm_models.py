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
